"""SegVol: universal, promptable volumetric CT segmentation (library of the SegVol Label project)."""
from .checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from .config import OFFICIAL, PRESETS, SMALL, SegVolConfig
from .modeling.segvol import SegVol

__all__ = [
    "CheckpointError",
    "OFFICIAL",
    "PRESETS",
    "SMALL",
    "SegVol",
    "SegVolConfig",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
]
