"""Zoom-in planning: what the zoom-out pass found per category (``CategoryPlan``, its foreground packed 8 voxels a
byte), the region of interest around it and the prompts, the sliding-window grid over that region (``Grid``, chosen
among the fresh one and a session's earlier grids by ``plan_zoom_in``), which windows each category runs in, the
prompts each window gets (``window_prompts``), and the Gaussian blending weight of a window.

All coordinates are in the native frame (see ``segvol.frames``); boxes are inclusive ``[a0, a1, a2, b0, b1, b2]``,
ROIs are half-open ``(start, stop)`` triples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .frames import Triple, Window, as_box

if TYPE_CHECKING:
    from .prompts import NativePrompts


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
    only keeps that window's value after normalisation. The array is shared by every window of the same size and
    valid part (a grid has few; building one costs as much as a window's probabilities): read it, never write it.
    """
    valid = tuple((int(s.start), int(s.stop)) for s in window.window_slices)
    return _gaussian_weight(tuple(int(s) for s in window.size), valid, float(sigma_scale), float(floor))


@lru_cache(maxsize=8)
def _gaussian_weight(size: Tuple[int, ...], valid: Tuple[Tuple[int, int], ...], sigma_scale: float,
                     floor: float) -> np.ndarray:
    parts = [np.maximum(_axis_gaussian(s, sigma_scale)[a:b], floor) for s, (a, b) in zip(size, valid)]
    return parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]


class PackedMask:
    """A 3-D boolean mask stored 8 voxels per byte (a category's zoom-out foreground can span the whole CT)."""

    def __init__(self, mask: np.ndarray):
        self.shape = tuple(mask.shape)
        self.bits = np.packbits(mask, axis=-1)

    def region(self, low, high) -> np.ndarray:
        """The mask on ``[low, high)`` (per axis) as a bool array."""
        (d0, h0, w0), (d1, h1, w1) = [int(v) for v in low], [int(v) for v in high]
        packed = self.bits[d0:d1, h0:h1, w0 // 8:(w1 + 7) // 8]
        return np.unpackbits(packed, axis=-1)[..., w0 % 8:w0 % 8 + (w1 - w0)].view(bool)  # 0/1 bytes: a view

    def _bytes_in(self, low, high):
        """The packed bytes over ``[low, high)`` (per axis; a view) with what selects the range in its first and last
        byte columns: (bytes, lead mask, tail mask, offset of voxel ``low[2]`` in the first byte); None when the range
        is empty. packbits is big-endian (voxel r of a byte is bit 7 - r): the lead mask keeps voxels >= w0 % 8 of
        the first byte, the tail mask voxels <= (w1 - 1) % 8 of the last."""
        (d0, h0, w0), (d1, h1, w1) = [int(v) for v in low], [int(v) for v in high]
        if d1 <= d0 or h1 <= h0 or w1 <= w0:
            return None
        packed = self.bits[d0:d1, h0:h1, w0 // 8:(w1 + 7) // 8]
        return packed, 0xFF >> (w0 % 8), (0xFF << (7 - (w1 - 1) % 8)) & 0xFF, w0 % 8

    def box_in(self, low, high) -> Optional[np.ndarray]:
        """Tight inclusive box (relative to ``low``) of the mask's voxels in ``[low, high)`` (per axis), None when there
        are none: ``bounding_box(region(low, high))`` read from the packed bytes (an eighth of the memory, nothing
        unpacked but one row of bytes; a click asks it of every window whose prompt is the foreground's box)."""
        found = self._bytes_in(low, high)
        if found is None:
            return None
        view, lead, tail, offset = found
        packed = view.copy()
        packed[..., 0] &= lead
        packed[..., -1] &= tail
        depth = np.flatnonzero(packed.reshape(len(packed), -1).any(axis=1))
        if depth.size == 0:
            return None
        plane = np.bitwise_or.reduce(packed, axis=0)  # (rows, bytes): reductions along the first axis vectorise
        rows = np.flatnonzero(plane.any(axis=1))
        columns = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(plane, axis=0))) - offset
        return np.asarray([depth[0], rows[0], columns[0], depth[-1], rows[-1], columns[-1]], dtype=np.int64)

    def any_in(self, low, high) -> bool:
        """Whether the mask holds a voxel in ``[low, high)`` (per axis), read from the packed bytes: an eighth of the
        memory ``region(...).any()`` reads, and no unpacking."""
        found = self._bytes_in(low, high)
        if found is None:
            return False
        packed, lead, tail, _ = found
        if packed.shape[-1] == 1:
            return bool((packed[..., 0] & (lead & tail)).any())
        return bool((packed[..., 0] & lead).any() or (packed[..., -1] & tail).any() or packed[..., 1:-1].any())


@dataclass
class CategoryPlan:
    """Zoom-out outcome of one category: its logits in the zoom frame and its foreground at native resolution."""

    name: str
    value: int
    zoom_logits: torch.Tensor  # (Z0, Z1, Z2) on the model device
    zoom_low_res: Optional[torch.Tensor] = None  # (1, 1, *low_res_size): the decoder's zoom-out logits
    support: Optional[np.ndarray] = None  # native box where zoom-out logits can be > 0
    foreground: Optional[PackedMask] = None  # over ``support``
    foreground_box: Optional[np.ndarray] = None  # tight native box of the zoom-out foreground
    windows: List[int] = field(default_factory=list)  # indices into ZoomInPlan.windows
    _window_boxes: Dict[Triple, Optional[np.ndarray]] = field(default_factory=dict, repr=False)
    _window_has: Dict[Triple, bool] = field(default_factory=dict, repr=False)

    def _overlap(self, window: Window):
        """(low, high) native corners of the window's part inside ``support``, or None."""
        low = np.maximum(np.asarray(window.start), self.support[:3])
        high = np.minimum(np.asarray(window.stop), self.support[3:] + 1)
        return None if np.any(high <= low) else (low, high)

    def foreground_box_in(self, window: Window) -> Optional[np.ndarray]:
        """Tight inclusive box of the zoom-out foreground on the window's valid voxels (valid-voxel coordinates), None
        when the window holds none. Kept per window: planning and prompting ask for the same windows."""
        if window.start not in self._window_boxes:
            box = None
            if self.foreground_box is not None and window.box_to_window(self.foreground_box) is not None:
                low, high = self._overlap(window)
                found = self.foreground.box_in(low - self.support[:3], high - self.support[:3])
                if found is not None:
                    box = found + np.tile(low - np.asarray(window.start), 2)
            self._window_boxes[window.start] = box
        return self._window_boxes[window.start]

    def has_foreground(self, window: Window) -> bool:
        """Whether the window's valid voxels hold zoom-out foreground (planning asks it of every window of a grid;
        answered from the packed mask, without the tight box ``foreground_box_in`` finds)."""
        if window.start in self._window_boxes:
            return self._window_boxes[window.start] is not None
        if window.start not in self._window_has:
            found = False
            if self.foreground_box is not None and window.box_to_window(self.foreground_box) is not None:
                overlap = self._overlap(window)
                found = overlap is not None and self.foreground.any_in(overlap[0] - self.support[:3],
                                                                       overlap[1] - self.support[:3])
            self._window_has[window.start] = found
        return self._window_has[window.start]


@dataclass
class ZoomInPlan:
    """Where zoom-in work happens: the core ROI (foreground united with prompts), the grown ROI and the grid."""

    core: Optional[np.ndarray] = None
    roi: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    grid: Optional[Grid] = None
    windows: List[Window] = field(default_factory=list)  # every window of the grid
    used: List[int] = field(default_factory=list)  # indices of the windows run for at least one category
    reused_grid: bool = False

    @property
    def skipped(self) -> int:
        return len(self.windows) - len(self.used)


def active_windows(plan: CategoryPlan, windows: List[Window], prompts: "NativePrompts") -> List[int]:
    """Windows that hold this category's zoom-out foreground or a user prompt (box or positive point)."""
    active = []
    for index, window in enumerate(windows):
        if prompts.box is not None and window.box_to_window(prompts.box) is not None:
            active.append(index)
        elif len(prompts.positive) and window.contains(prompts.positive).any():
            active.append(index)
        elif plan.has_foreground(window):
            active.append(index)
    return active


def plan_zoom_in(plans: List[CategoryPlan], prompts: "NativePrompts", shape: Sequence[int],
                 window_size: Sequence[int], margin: Sequence[int], overlap: float, earlier: Sequence[Grid] = (),
                 cached: Callable[[Window], bool] = lambda window: False) -> ZoomInPlan:
    """The zoom-in plan: the core ROI, grown by ``margin``; the grid over it, or one of the ``earlier`` grids when it
    covers the core and needs fewer uncached encoder forwards (``cached``); each category's windows
    (``plan.windows`` is set)."""
    core = union_box([p.foreground_box for p in plans] + [prompts.extent])
    if core is None:
        return ZoomInPlan()
    roi = grow_roi(core, shape, window_size, margin, overlap)
    roi_box = np.concatenate([np.asarray(roi[0]), np.asarray(roi[1]) - 1])
    candidates = [(grid, True) for grid in earlier if grid.covers(roi_box)]
    candidates.append((Grid.over(roi, shape, window_size, overlap), False))
    best = None
    for grid, reused in candidates:
        windows = grid.windows()
        active = [active_windows(plan, windows, prompts) for plan in plans]
        used = sorted(set().union(*active))
        cost = (sum(not cached(windows[i]) for i in used), len(used))
        if best is None or cost < best[0]:
            best = (cost, grid, reused, windows, active, used)
    _, grid, reused, windows, active, used = best
    for plan, indices in zip(plans, active):
        plan.windows = indices
    return ZoomInPlan(core=core, roi=roi, grid=grid, windows=windows, used=used, reused_grid=reused)


def window_prompts(plan: CategoryPlan, window: Window, prompts: "NativePrompts"):
    """(box in window coordinates or None, (coords, labels) or None) for one category in one window: the user's box
    clipped to the window, else the tight box of the zoom-out foreground in it; every point inside the window."""
    box = window.box_to_window(prompts.box) if prompts.box is not None else None
    if box is None:
        foreground = plan.foreground_box_in(window)
        if foreground is not None:
            box = foreground + np.tile(np.asarray(window.pad_before), 2)
    points = None
    if len(prompts.points):
        inside = window.contains(prompts.points)
        if inside.any():
            points = (window.points_to_window(prompts.points[inside]), prompts.labels[inside])
    return box, points
