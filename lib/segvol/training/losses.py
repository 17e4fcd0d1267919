"""Per-sample Dice + BCE on mask logits.

Every prompt set (one sample, one category, one prompt combination) is one row; Dice is taken over the row's whole
volume, so a batch of one is not turned into per-slice Dice (the reference's ``logits.squeeze()`` bug,
``segvol-reference.md`` section 9 item 21). Computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import dice_score


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(B, ...) logits and {0, 1} targets -> (B,) soft Dice loss ``1 - (2|P.T| + s) / (|P| + |T| + s)``."""
    probability = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (probability * target).sum(1)
    total = probability.sum(1) + target.sum(1)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean binary cross-entropy with logits per row."""
    return F.binary_cross_entropy_with_logits(logits.float().flatten(1), target.float().flatten(1),
                                              reduction="none").mean(1)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) Dice + BCE per row."""
    return dice_loss(logits, target) + bce_loss(logits, target)


__all__ = ["bce_loss", "dice_bce_loss", "dice_loss", "dice_score"]
