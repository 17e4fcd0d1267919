"""Segmentation quality measures of one structure, and the interactive summaries the robot annotator reports.

* ``dice_score``: hard Dice of two masks.
* ``surface_dice``: normalized surface Dice (NSD) at a tolerance in millimetres, MONAI's ``compute_surface_dice``
  (boundary voxels, Euclidean distances in mm) on the masks cropped to where they are, so a 512x512x200 volume costs
  what its structure's bounding box costs.
* ``click_auc``: the CVPR 2025 interactive challenge's DSC_AUC / NSD_AUC, the trapezoid area under the metric of the
  predictions that followed each click (unit spacing: five clicks give an area of at most 4).
* ``interactions_to_reach``: NoC@t, the number of interactions until the Dice reaches ``t`` (RITM's convention: the
  cap when it never does).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from .frames import bounding_box


def dice_score(prediction, truth) -> float:
    """Hard Dice of two boolean arrays (numpy or torch); 1.0 when both are empty."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def surface_dice(prediction, truth, spacing: Sequence[float] = (1.0, 1.0, 1.0), tolerance_mm: float = 2.0) -> float:
    """Normalized surface Dice of two boolean 3-D masks: the share of both boundaries (voxels of a mask with a
    6-neighbour outside it) lying within ``tolerance_mm`` of the other mask's boundary. 1.0 when both masks are
    empty, 0.0 when exactly one is."""
    import torch
    from monai.metrics import compute_surface_dice

    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape or prediction.ndim != 3:
        raise ValueError(f"surface_dice needs two 3-D masks of one shape, got {prediction.shape} and {truth.shape}")
    has_prediction, has_truth = bool(prediction.any()), bool(truth.any())
    if not (has_prediction or has_truth):
        return 1.0
    if not (has_prediction and has_truth):
        return 0.0
    # Only the union's bounding box matters; one voxel of margin keeps a boundary at the array edge a boundary.
    box = bounding_box(prediction | truth)
    low = np.maximum(box[:3] - 1, 0)
    high = np.minimum(box[3:] + 2, prediction.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    pad = [(1, 1)] * 3  # an edge of the array is a boundary (MONAI erodes with the border as outside)
    crop_prediction = np.pad(prediction[region], pad)
    crop_truth = np.pad(truth[region], pad)

    def one_hot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None])

    with warnings.catch_warnings():  # MONAI 1.5 warns about its own deprecated argument on every call
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(one_hot(crop_prediction), one_hot(crop_truth),
                                     class_thresholds=[float(tolerance_mm)], include_background=False,
                                     spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


def click_auc(values: Sequence[float]) -> float:
    """Area under the metric of the predictions after each click (trapezoid, unit spacing): the CVPR 2025 challenge's
    DSC_AUC/NSD_AUC over its five clicks; 0.0 with fewer than two clicks."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    return float(sum((a + b) / 2.0 for a, b in zip(values[:-1], values[1:])))


def interactions_to_reach(dice_per_interaction: Sequence[float], threshold: float, cap: int = 20) -> Optional[int]:
    """NoC@threshold: the 1-based index of the first interaction whose Dice reaches ``threshold``; ``cap`` when none
    of the first ``cap`` does and at least ``cap`` were made; None when the run stopped earlier without reaching it
    (the count is unknown, not ``cap``)."""
    for index, value in enumerate(dice_per_interaction[:cap], start=1):
        if value >= threshold:
            return index
    return cap if len(dice_per_interaction) >= cap else None


__all__ = ["click_auc", "dice_score", "interactions_to_reach", "surface_dice"]
