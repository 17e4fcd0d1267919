"""Infer tasks: one SegVol engine, one face per client (OHIF vista3d, Slicer deepgrow and scribbles, auto)."""
from .segvol_auto import SegVolAutoInfer
from .segvol_interactive import SegVolInteractiveInfer
from .segvol_prompt import SegVolPromptInfer
from .segvol_scribbles import SegVolScribblesInfer

__all__ = ["SegVolAutoInfer", "SegVolInteractiveInfer", "SegVolPromptInfer", "SegVolScribblesInfer"]
