from .retrain import RetrainCounter
from .segvol_finetune import SegVolFinetune

__all__ = ["RetrainCounter", "SegVolFinetune"]
