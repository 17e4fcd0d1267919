"""Blending, in the style of MONAI's ``inferers/merger.py``: a ``WindowMerger`` aggregates one category's zoom-in
window probabilities with a Gaussian weight over the bounding box of its windows (``aggregate``) and hands back the
sums (``finalize`` -> ``BlendState``); given the state of the previous request of a session over the same windows, it
only re-blends the windows whose output changed. ``merge_categories`` then builds the label map: per category the
blended window probabilities where windows ran and the zoom-out probabilities elsewhere, and per voxel the category
with the highest probability when it is above 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import numpy as np
import torch

from .caches import tensor_bytes
from .frames import Window, bounding_box
from .windows import CategoryPlan, gaussian_weight, union_box

Start = Tuple[int, int, int]


@dataclass
class BlendState:
    """Blending sums of one category over the bounding box of its active windows, with the decoder output (and its
    cache key) each window contributed."""

    starts: Tuple[Start, ...]
    box: np.ndarray
    keys: Dict[Start, Hashable]
    logits: Dict[Start, torch.Tensor]
    total: np.ndarray
    weight_sum: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.total.nbytes + self.weight_sum.nbytes + sum(tensor_bytes(t) for t in self.logits.values()))

    def slices(self, window: Window):
        return tuple(slice(a - r, b - r) for a, b, r in zip(window.start, window.stop, self.box[:3]))


class WindowMerger:
    """Gaussian-weighted average of window probabilities for one category.

    ``probability(window, low_res_logits)`` gives a window's probabilities on its valid voxels (CPU float32).
    ``previous``: the state of an earlier request over the same windows (the same starts and box), updated in place:
    a window whose output key is unchanged is not blended again, a changed one has its old contribution replaced.
    """

    def __init__(self, windows: List[Window], probability: Callable[[Window, torch.Tensor], torch.Tensor],
                 sigma_scale: float, previous: Optional[BlendState] = None):
        self.probability = probability
        self.sigma_scale = float(sigma_scale)
        box = union_box([np.concatenate([w.start, np.asarray(w.stop) - 1]) for w in windows])
        starts = tuple(w.start for w in windows)
        if previous is not None and previous.starts == starts and np.array_equal(previous.box, box):
            self.state, self.incremental = previous, True
        else:
            shape = tuple(int(b - a + 1) for a, b in zip(box[:3], box[3:]))
            self.state = BlendState(starts, box, {}, {}, np.zeros(shape, np.float32), np.zeros(shape, np.float32))
            self.incremental = False
        self._keys: Dict[Start, Hashable] = {}
        self._logits: Dict[Start, torch.Tensor] = {}

    def _contribution(self, window: Window, logits: torch.Tensor) -> torch.Tensor:
        return self.probability(window, logits).mul_(torch.from_numpy(gaussian_weight(window, self.sigma_scale)))

    def aggregate(self, window: Window, key: Hashable, logits: torch.Tensor) -> None:
        """Add one window's low-resolution logits (``key``: the cache key of that decoder output)."""
        state = self.state
        total, where = torch.from_numpy(state.total), state.slices(window)
        if not self.incremental:
            total[where] += self._contribution(window, logits)
            torch.from_numpy(state.weight_sum)[where] += torch.from_numpy(gaussian_weight(window, self.sigma_scale))
        elif state.keys[window.start] != key:
            change = self._contribution(window, logits)
            change -= self._contribution(window, state.logits[window.start])
            total[where] += change
        self._keys[window.start], self._logits[window.start] = key, logits

    def finalize(self) -> BlendState:
        self.state.keys, self.state.logits = self._keys, self._logits
        return self.state


def merge_categories(frames, plans: List[CategoryPlan], states: Dict[str, Optional[BlendState]],
                     return_probabilities: bool):
    """-> (native label map, native probabilities per category or None).

    Per category: window probabilities (Gaussian-blended) where windows ran, zoom-out probabilities elsewhere; a voxel
    takes the label of the category with the highest probability, when that is above 0.5.
    """
    shape = frames.native_shape
    label = np.zeros(shape, dtype=np.uint8 if len(plans) < 256 else np.uint16)
    best = np.zeros(shape, dtype=np.float32)  # zero pages cost no memory until a region is written
    probabilities = {} if return_probabilities else None
    first = True
    for plan in plans:
        state = states.get(plan.name)
        if return_probabilities:
            full = frames.zoom.upsample_region(plan.zoom_logits, [0, 0, 0, *np.subtract(shape, 1)])
            probabilities[plan.name] = torch.sigmoid(full).cpu().numpy()
        # Outside the zoom-out support and the windows every probability is <= 0.5: background for sure.
        region = union_box([plan.support, None if state is None else state.box])
        if region is None:
            continue
        region_slices = tuple(slice(a, b + 1) for a, b in zip(region[:3], region[3:]))
        # torch views of the numpy arrays: the element-wise work below runs on every core
        if state is not None:
            weight_sum = torch.from_numpy(state.weight_sum)
            inside = weight_sum > 0
            blended = torch.where(inside, torch.from_numpy(state.total) / weight_sum, 0.0)
        if state is not None and np.array_equal(state.box, region):  # no zoom-out voxels outside the windows
            probability, covered = blended, inside
        else:
            probability = torch.zeros(tuple(int(b - a + 1) for a, b in zip(region[:3], region[3:])))
            covered = torch.zeros(probability.shape, dtype=torch.bool)
            if state is not None:
                where = tuple(slice(a - r, b + 1 - r) for a, b, r in zip(state.box[:3], state.box[3:], region[:3]))
                covered[where] = inside
                probability[where] = blended
        if plan.support is not None:
            # zoom-out probabilities where no window ran, computed only over those voxels' bounding box
            support = tuple(slice(a - r, b + 1 - r) for a, b, r in zip(plan.support[:3], plan.support[3:],
                                                                        region[:3]))
            uncovered = ~covered[support]
            todo = bounding_box(uncovered.numpy()) if uncovered.any() else None
            if todo is not None:
                todo_slices = tuple(slice(a, b + 1) for a, b in zip(todo[:3], todo[3:]))
                native_box = todo + np.tile(plan.support[:3], 2)
                base = torch.sigmoid(frames.zoom.upsample_region(plan.zoom_logits, native_box)).float().cpu()
                target = probability[support][todo_slices]
                mask = uncovered[todo_slices]
                target[mask] = base[mask]
        if probabilities is not None:
            target = torch.from_numpy(probabilities[plan.name])[region_slices]
            target[covered] = probability[covered]
        if first:  # nothing labelled yet: no comparison with earlier categories
            wins = probability > 0.5
        else:
            best_region = torch.from_numpy(best)[region_slices]
            wins = (probability > 0.5) & (probability > best_region)
        if label.dtype == np.uint8:
            torch.from_numpy(label)[region_slices].masked_fill_(wins, plan.value)
        else:  # uint16 (256 categories or more): torch has few kernels for it
            label[region_slices][wins.numpy()] = plan.value
        if plan is not plans[-1]:  # the best probability so far only matters to later categories
            best_region = torch.from_numpy(best)[region_slices]
            best_region.copy_(torch.where(wins, probability, best_region))
        first = False
    return label, probabilities
