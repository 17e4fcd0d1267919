"""Zoom-in planning: the region of interest, the sliding-window grid over it, and the blending weight.

All coordinates are in the native frame (see ``segvol.frames``); boxes are inclusive ``[a0, a1, a2, b0, b1, b2]``,
ROIs are half-open ``(start, stop)`` triples.
"""
from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .frames import Triple, Window, as_box


def union_box(boxes: Iterable[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """Smallest inclusive box holding every given box (None entries are ignored); None when there are none."""
    boxes = [as_box(b) for b in boxes if b is not None]
    if not boxes:
        return None
    stacked = np.stack(boxes)
    return np.concatenate([stacked[:, :3].min(0), stacked[:, 3:].max(0)])


def grow_roi(core_box, shape: Sequence[int], window: Sequence[int], margin: Sequence[int],
             overlap: float = 0.5) -> Tuple[Triple, Triple]:
    """Core box (inclusive) -> ROI ``(start, stop)``: the core plus up to ``margin`` voxels of context on each side,
    at least one window large wherever the volume allows, kept inside the volume (grown symmetrically and shifted
    inward at the borders; the reference stayed smaller than a window at borders and had no margin).

    The margin never costs a window: per axis, the ROI is at most as long as the windows needed for the core alone
    can cover at the grid's stride.
    """
    box = as_box(core_box)
    start, stop = [], []
    for axis in range(3):
        n, w, m = int(shape[axis]), int(window[axis]), int(margin[axis])
        low, high = max(int(box[axis]), 0), min(int(box[axis + 3]) + 1, n)
        if n <= w:
            start.append(0)
            stop.append(n)  # the whole axis fits one (padded) window
            continue
        stride = max(int(w * (1.0 - overlap)), 1)
        core = high - low
        count = 1 if core <= w else math.ceil((core - w) / stride) + 1
        length = min(max(min(core + 2 * m, w + (count - 1) * stride), w, core), n)
        low -= (length - core) // 2
        high = low + length
        if low < 0:
            low, high = 0, length
        if high > n:
            low, high = n - length, n
        start.append(low)
        stop.append(high)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def axis_starts(low: int, high: int, window: int, overlap: float) -> List[int]:
    """Window starts covering ``[low, high)`` with windows of ``window`` voxels overlapping by ``overlap``.

    The count is the reference's (``ceil((L - window) / stride) + 1`` with ``stride = int(window * (1 - overlap))``);
    the starts are spread evenly from ``low`` to ``high - window`` so every overlap is about the same.
    """
    length = high - low
    if length <= window:
        return [low]
    stride = max(int(window * (1.0 - overlap)), 1)
    count = math.ceil((length - window) / stride) + 1
    span = length - window
    return sorted({low + round(i * span / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class Grid:
    """A sliding-window grid: the product of per-axis window starts over a native volume."""

    starts: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]
    window: Triple
    shape: Triple

    @classmethod
    def over(cls, roi: Tuple[Triple, Triple], shape: Sequence[int], window: Sequence[int], overlap: float) -> "Grid":
        """The grid covering an ROI ``(start, stop)``."""
        per_axis = []
        for axis in range(3):
            if int(shape[axis]) <= int(window[axis]):
                per_axis.append((0,))
            else:
                per_axis.append(tuple(axis_starts(roi[0][axis], roi[1][axis], int(window[axis]), overlap)))
        return cls(tuple(per_axis), tuple(int(w) for w in window), tuple(int(n) for n in shape))  # type: ignore

    def windows(self) -> List[Window]:
        """Every window, in (d, h, w) raster order."""
        return [Window((d, h, w), self.window, self.shape)
                for d in self.starts[0] for h in self.starts[1] for w in self.starts[2]]

    def covers(self, box) -> bool:
        """Whether the windows together cover every voxel of an inclusive box (per axis, as it is a product)."""
        box = as_box(box)
        for axis in range(3):
            reach = min(self.window[axis], self.shape[axis])
            position = int(box[axis])
            for start in sorted(self.starts[axis]):
                if start <= position < start + reach:
                    position = start + reach
            if position <= int(box[axis + 3]):
                return False
        return True


@lru_cache(maxsize=8)
def _axis_gaussian(size: int, sigma_scale: float) -> np.ndarray:
    centre = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    weights = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
    return (weights / weights.max()).astype(np.float32)


def gaussian_weight(window: Window, sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Blending weight of a window's valid voxels (shape ``window.valid_shape``), separable Gaussian.

    Peak 1 at the window centre, ``sigma = sigma_scale * size``, never below ``floor`` so a voxel seen by one window
    only keeps that window's value after normalisation.
    """
    parts = [np.maximum(_axis_gaussian(int(s), float(sigma_scale))[sl], floor)
             for s, sl in zip(window.size, window.window_slices)]
    return parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
