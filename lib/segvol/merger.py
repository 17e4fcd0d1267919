"""Blending, in the style of MONAI's ``inferers/merger.py``: a ``WindowMerger`` aggregates one category's zoom-in
window probabilities with a Gaussian weight over the bounding box of its windows (``aggregate``) and hands back the
sums (``finalize`` -> ``BlendState``); given the state of the previous request of a session over the same windows, it
only re-blends the windows whose output changed. ``merge_categories`` then builds the label map: per category the
blended window probabilities where windows ran and the zoom-out probabilities elsewhere, and per voxel the category
with the highest probability when it is above 0.5. It can build only a sub-box (``within``): a session's next click
re-labels only where a window's output or the zoom-out probabilities can have changed (``zoom_out_box``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import numpy as np
import torch

from .caches import tensor_bytes
from .frames import Window, bounding_box, lerp_axis
from .io import label_dtype
from .windows import CategoryPlan, gaussian_weight, union_box

Start = Tuple[int, int, int]


@dataclass
class BlendState:
    """Blending sums of one category over the bounding box of its active windows, with the decoder output (and its
    cache key) each window contributed."""

    starts: Tuple[Start, ...]
    box: np.ndarray
    extents: np.ndarray  # (windows, 6) inclusive native boxes of the windows' valid voxels: where weight_sum > 0
    keys: Dict[Start, Hashable]
    logits: Dict[Start, torch.Tensor]
    total: np.ndarray
    weight_sum: np.ndarray
    covered: Optional[np.ndarray] = None  # weight_sum > 0: where a window ran (fixed for the state's windows)
    request: int = -1  # the request (of its session) that last updated the sums
    complete: bool = False  # False while an update is under way: a request that failed half way left it unusable

    @property
    def nbytes(self) -> int:
        return int(self.total.nbytes + self.weight_sum.nbytes + (0 if self.covered is None else self.covered.nbytes)
                   + sum(tensor_bytes(t) for t in self.logits.values()))

    def slices(self, window: Window):
        return tuple(slice(a - r, b - r) for a, b, r in zip(window.start, window.stop, self.box[:3]))


def _weight(window: Window, sigma_scale: float) -> torch.Tensor:
    return torch.from_numpy(gaussian_weight(window, sigma_scale))


class WindowMerger:
    """Gaussian-weighted average of window probabilities for one category.

    ``probability(window, low_res_logits)`` gives a window's probabilities on its valid voxels (CPU float32).
    ``previous``: the state of an earlier request over the same windows (the same starts and box; complete: a request
    that failed before ``finalize`` leaves its state to be rebuilt), updated in place:
    a window whose output key is unchanged is not blended again, a changed one has its old contribution replaced
    (``incremental``; ``changed_box`` is then the native box of the windows whose output changed, None when none did,
    and ``previous_request`` the request the previous sums came from).
    """

    def __init__(self, windows: List[Window], probability: Callable[[Window, torch.Tensor], torch.Tensor],
                 sigma_scale: float, previous: Optional[BlendState] = None):
        self.probability = probability
        self.sigma_scale = float(sigma_scale)
        extents = np.asarray([np.concatenate([w.start, np.asarray(w.stop) - 1]) for w in windows], dtype=np.int64)
        box = union_box(list(extents))
        starts = tuple(w.start for w in windows)
        if (previous is not None and previous.complete and previous.starts == starts
                and np.array_equal(previous.box, box)):
            self.state, self.incremental = previous, True
            previous.complete = False  # updated in place from here on, until finalize
        else:
            shape = tuple(int(b - a + 1) for a, b in zip(box[:3], box[3:]))
            self.state = BlendState(starts, box, extents, {}, {}, np.zeros(shape, np.float32),
                                    np.zeros(shape, np.float32))
            self.incremental = False
        self.previous_request = self.state.request if self.incremental else None
        self.changed_box: Optional[np.ndarray] = None
        self._keys: Dict[Start, Hashable] = {}
        self._logits: Dict[Start, torch.Tensor] = {}

    def _contribution(self, window: Window, logits: torch.Tensor) -> torch.Tensor:
        return self.probability(window, logits).mul_(_weight(window, self.sigma_scale))

    def aggregate(self, window: Window, key: Hashable, logits: torch.Tensor) -> None:
        """Add one window's low-resolution logits (``key``: the cache key of that decoder output)."""
        state = self.state
        total, where = torch.from_numpy(state.total), state.slices(window)
        if not self.incremental:
            total[where] += self._contribution(window, logits)
            torch.from_numpy(state.weight_sum)[where] += _weight(window, self.sigma_scale)
        elif state.keys[window.start] != key:
            change = self._contribution(window, logits)
            change -= self._contribution(window, state.logits[window.start])
            total[where] += change
            extent = np.concatenate([window.start, np.asarray(window.stop) - 1])
            self.changed_box = union_box([self.changed_box, extent])
        self._keys[window.start], self._logits[window.start] = key, logits

    def finalize(self, request: int = -1) -> BlendState:
        """The sums after every window was aggregated, stamped with ``request``."""
        self.state.keys, self.state.logits, self.state.request = self._keys, self._logits, request
        if self.state.covered is None:
            self.state.covered = self.state.weight_sum > 0
        self.state.complete = True
        return self.state


def _intersect(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Intersection of two inclusive boxes (None when either is None or they do not meet)."""
    if a is None or b is None:
        return None
    box = np.concatenate([np.maximum(a[:3], b[:3]), np.minimum(a[3:], b[3:])])
    return None if np.any(box[3:] < box[:3]) else box


def _slices(box: np.ndarray, origin) -> Tuple[slice, slice, slice]:
    """An inclusive box as slices of an array whose voxel 0 sits at ``origin``."""
    return tuple(slice(int(a - o), int(b + 1 - o)) for a, b, o in zip(box[:3], box[3:], origin))  # type: ignore


def zoom_out_box(plan: CategoryPlan, state: Optional[BlendState]) -> Optional[np.ndarray]:
    """Native box of the voxels whose probability ``merge_categories`` takes from the zoom-out logits: those of the
    category's zoom-out support that no window covers (None when there are none)."""
    if plan.support is None:
        return None
    if state is None:
        return plan.support
    return uncovered_box(plan.support, state.extents)


def uncovered_box(box: np.ndarray, covers: np.ndarray) -> Optional[np.ndarray]:
    """Tight inclusive box of the voxels of the inclusive ``box`` outside every inclusive box of ``covers`` (n, 6);
    None when they cover it all.

    Exact and without a voxel array: the boxes' faces cut ``box`` into a few cells (a dozen per axis for a zoom-in
    grid) that each lie wholly inside or wholly outside every cover; the answer is the bounding box of the uncovered
    cells. (A voxel mask of the support, up to the whole CT, took 0.15 s of a click.)
    """
    box = np.asarray(box, dtype=np.int64)
    covers = np.asarray(covers, dtype=np.int64).reshape(-1, 6)
    low, high = box[:3], box[3:] + 1  # half-open
    cuts = [np.unique(np.clip(np.concatenate([[low[a], high[a]], covers[:, a], covers[:, a + 3] + 1]),
                              low[a], high[a])) for a in range(3)]
    covered = np.zeros(tuple(len(c) - 1 for c in cuts), dtype=bool)
    for cover in covers:
        first = [np.searchsorted(cuts[a], max(cover[a], low[a])) for a in range(3)]
        last = [np.searchsorted(cuts[a], min(cover[a + 3] + 1, high[a])) for a in range(3)]
        if all(f < e for f, e in zip(first, last)):
            covered[first[0]:last[0], first[1]:last[1], first[2]:last[2]] = True
    cells = bounding_box(~covered)
    if cells is None:
        return None
    return np.asarray([cuts[a][cells[a]] for a in range(3)] + [cuts[a][cells[a + 3] + 1] - 1 for a in range(3)],
                      dtype=np.int64)


def merge_categories(frames, plans: List[CategoryPlan], states: Dict[str, Optional[BlendState]],
                     return_probabilities: bool, within: Optional[np.ndarray] = None,
                     zoom_out_boxes: Optional[Dict[str, Optional[np.ndarray]]] = None):
    """-> (native label map, native probabilities per category or None).

    Per category: window probabilities (Gaussian-blended) where windows ran, zoom-out probabilities elsewhere; a voxel
    takes the label of the category with the highest probability, when that is above 0.5. Without windows and without
    probabilities to return (a zoom-out preview) the label comes from ``zoom_out_label``. ``within`` (an inclusive
    native box): only that part of the label map, the same values as the whole map has there (no probabilities).
    ``zoom_out_boxes``: each category's ``zoom_out_box`` when the caller has them already.
    """
    if within is None and not return_probabilities and all(states.get(plan.name) is None for plan in plans):
        return zoom_out_label(frames.zoom, plans), None
    if within is not None and return_probabilities:
        raise ValueError("probabilities come for the whole volume only")
    shape = frames.native_shape
    within = np.asarray([0, 0, 0, *np.subtract(shape, 1)]) if within is None else np.asarray(within)
    origin = within[:3]
    size = tuple(int(v) for v in within[3:] - within[:3] + 1)
    label = np.zeros(size, dtype=_values_dtype(plans))
    best = np.zeros(size, dtype=np.float32)  # zero pages cost no memory until a region is written
    probabilities = {} if return_probabilities else None
    first = True
    for plan in plans:
        state = states.get(plan.name)
        if return_probabilities:
            full = frames.zoom.upsample_region(plan.zoom_logits, [0, 0, 0, *np.subtract(shape, 1)])
            probabilities[plan.name] = torch.sigmoid(full).cpu().numpy()
        # Outside the zoom-out support and the windows every probability is <= 0.5: background for sure.
        region = _intersect(union_box([plan.support, None if state is None else state.box]), within)
        if region is None:
            continue
        region_slices = _slices(region, origin)
        region_shape = tuple(int(v) for v in region[3:] - region[:3] + 1)
        # torch views of the numpy arrays: the element-wise work below runs on every core
        part = None if state is None else _intersect(state.box, region)
        if part is not None:
            in_state = _slices(part, state.box[:3])
            weight_sum = torch.from_numpy(state.weight_sum[in_state])
            inside = torch.from_numpy(state.covered[in_state])
            blended = torch.where(inside, torch.from_numpy(state.total[in_state]) / weight_sum, 0.0)
        if part is not None and np.array_equal(part, region):  # no zoom-out voxels outside the windows
            probability, covered = blended, inside
        else:
            probability = torch.zeros(region_shape)
            covered = torch.zeros(region_shape, dtype=torch.bool)
            if part is not None:
                covered[_slices(part, region[:3])] = inside
                probability[_slices(part, region[:3])] = blended
        # zoom-out probabilities where no window ran, computed only over those voxels' bounding box
        zoom_box = zoom_out_boxes[plan.name] if zoom_out_boxes is not None else zoom_out_box(plan, state)
        todo = _intersect(zoom_box, region)
        if todo is not None:
            todo_slices = _slices(todo, region[:3])
            base = torch.sigmoid(frames.zoom.upsample_region(plan.zoom_logits, todo)).float().cpu()
            target = probability[todo_slices]
            target.copy_(torch.where(covered[todo_slices], target, base))  # boolean indexing is far slower
        if probabilities is not None:
            target = torch.from_numpy(probabilities[plan.name])[region_slices]
            target.copy_(torch.where(covered, probability, target))
        if first:  # nothing labelled yet: no comparison with earlier categories
            wins = probability > 0.5
        else:
            best_region = torch.from_numpy(best)[region_slices]
            wins = (probability > 0.5) & (probability > best_region)
        if label.dtype == np.uint8:
            torch.from_numpy(label)[region_slices].masked_fill_(wins, plan.value)
        else:  # uint16 (a value past 255): torch has few kernels for it
            label[region_slices][wins.numpy()] = plan.value
        if plan is not plans[-1]:  # the best probability so far only matters to later categories
            best_region = torch.from_numpy(best)[region_slices]
            best_region.copy_(torch.where(wins, probability, best_region))
        first = False
    return label, probabilities


def _values_dtype(plans: List[CategoryPlan]) -> np.dtype:
    """The label dtype the categories' values need (``segvol.io.label_dtype``: uint8, else uint16 up to 65535)."""
    return label_dtype(np.asarray([plan.value for plan in plans], dtype=np.int64))


def zoom_out_label(zoom, plans: List[CategoryPlan], block_bytes: int = 2 ** 22) -> np.ndarray:
    """The label map ``merge_categories`` gives when no window ran: per native voxel the category with the highest
    trilinear zoom-out logit, when that is above 0 (sigmoid is monotonic; ties go to the earlier category).

    Never holds a category's whole native map: the zoom-out logits are interpolated in-plane one zoom slice at a
    time, then between two zoom slices for the native slices that lie between them, in blocks of rows that stay in
    the CPU cache (``block_bytes``), and only for the categories that are positive somewhere in the block's zoom
    voxels (the others are <= 0 there after interpolation, which only mixes them). The cost follows the area the
    categories cover: 21 categories of the ``fill.py`` weights, positive in 44 % of a 512x512x200 CT, take 2.4-2.9 s
    on 2 cores (51.6 s through the general path).
    """
    shape = zoom.native_shape
    wide = _values_dtype(plans) != np.uint8
    label = torch.zeros(shape, dtype=torch.int32 if wide else torch.uint8)
    live = [plan for plan in plans if plan.support is not None]  # the others are <= 0 everywhere
    if live:
        logits = torch.stack([plan.zoom_logits for plan in live]).float().cpu()  # (C, Z0, Z1, Z2)
        values = torch.tensor([plan.value for plan in live], dtype=label.dtype)
        positive = (logits > 0).any(-1)  # (C, Z0, Z1): the zoom rows where each category can be > 0
        slice_taps = zoom.interpolation_taps(0, 0, shape[0] - 1)
        row_taps = zoom.interpolation_taps(1, 0, shape[1] - 1)
        column_matrix = zoom.interpolation_matrix(2, 0, shape[2] - 1).T.contiguous()  # (Z2, W)
        near = [torch.nonzero(positive[:, max(z - 1, 0):z + 2].flatten(1).any(1))[:, 0]
                for z in range(logits.shape[1])]  # categories the slab on either side of zoom slice z can need
        planes: Dict[int, Tuple[List[int], torch.Tensor]] = {}  # zoom slice -> (its categories, (c, H, W))

        def plane(z: int):
            """Zoom slice ``z`` of the categories near it, interpolated to the native rows and columns."""
            if z not in planes:
                chosen = near[z]
                # columns as one matrix product (a gather along the last axis is slow), rows as row copies
                values_z = lerp_axis(logits[chosen, z] @ column_matrix, 1, row_taps)  # (c, H, W)
                planes[z] = ([int(c) for c in chosen], values_z)
            return planes[z]

        first, second, weight = slice_taps
        rows_per_block = max(1, block_bytes // max(1, 4 * len(live) * shape[2]))
        for z in torch.unique(first).tolist():
            slices = torch.nonzero(first == z)[:, 0].tolist()
            z1 = int(second[slices[0]])
            for stale in [key for key in planes if key not in (z, z1)]:
                del planes[stale]
            plane_a, plane_b = plane(z), plane(z1)
            for r0 in range(0, shape[1], rows_per_block):
                r1 = min(r0 + rows_per_block, shape[1])
                y0, y1 = int(row_taps[0][r0]), int(row_taps[1][r1 - 1]) + 1
                candidates = torch.nonzero(positive[:, z, y0:y1].any(1) | positive[:, z1, y0:y1].any(1))[:, 0]
                if len(candidates) == 0:
                    continue
                candidates = candidates.tolist()
                block_a, block_b = (_rows(plane_p, candidates, r0, r1) for plane_p in (plane_a, plane_b))
                _label_block(block_a, block_b, weight[slices], values[candidates], label[slices[0]:slices[-1] + 1,
                                                                                         r0:r1])
    return label.numpy().astype(np.uint16) if wide else label.numpy()


def _rows(plane, candidates: List[int], r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the ``candidates`` in a ``plane`` (a view when they are all its categories)."""
    chosen, values = plane
    if chosen == candidates:
        return values[:, r0:r1]
    where = {c: i for i, c in enumerate(chosen)}
    return values[[where[c] for c in candidates], r0:r1]


def _label_block(block_a: torch.Tensor, block_b: torch.Tensor, weights: torch.Tensor, names: torch.Tensor,
                 out: torch.Tensor) -> None:
    """Native slices between two zoom slices (``out`` (S, R, W), ``weights`` (S,)): each voxel gets the name of the
    first category of ``block_a``/``block_b`` (C, R, W) whose interpolated logit is the largest and above 0."""
    count = len(names)
    mixed = torch.empty_like(block_a)
    ties = torch.empty(mixed.shape, dtype=torch.bool)
    code = torch.uint8 if count < 256 else torch.int32
    rank = torch.arange(count, 0, -1, dtype=code).view(-1, 1, 1)  # the first category ranks highest
    lookup = torch.cat([torch.zeros(1, dtype=names.dtype), names.flip(0)])  # rank -> name, 0 -> background
    for index, weight in enumerate(weights.tolist()):
        torch.lerp(block_a, block_b, weight, out=mixed)
        best = mixed.amax(0)
        if count == 1:
            winner = (best > 0).to(code)
        else:  # argmax over dim 0 is slow on CPU: mark the maxima, keep the highest rank
            torch.eq(mixed, best, out=ties)
            marks = ties.view(torch.uint8) if code == torch.uint8 else ties.to(code)
            winner = marks.mul_(rank).amax(0)
            winner.masked_fill_(best <= 0, 0)
        out[index] = lookup[winner.long()]
