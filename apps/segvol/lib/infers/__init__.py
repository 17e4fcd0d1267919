"""Infer tasks: one SegVol engine, one face per client (OHIF vista3d, Slicer deepgrow, auto-segmentation)."""
from .segvol_auto import SegVolAutoInfer
from .segvol_interactive import SegVolInteractiveInfer
from .segvol_prompt import SegVolPromptInfer

__all__ = ["SegVolAutoInfer", "SegVolInteractiveInfer", "SegVolPromptInfer"]
