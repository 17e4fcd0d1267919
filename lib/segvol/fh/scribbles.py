"""Scribbles answered with FH supervoxels: every supervoxel a foreground stroke touches and no background stroke
does, then the strokes themselves (foreground on, background off).

Supervoxels are computed in a box around the strokes (``SupervoxelCache``), so a 512x512x200 CT answers in seconds,
and kept per image content, box and scale, so redrawing strokes in the same box is instant.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence, Tuple

import numpy as np

from .graph import segment
from .pseudo import normalize_intensity

Box = Tuple[slice, slice, slice]


class SupervoxelCache:
    """FH supervoxels (int32 label maps) of boxes of images, the ``items`` used last kept."""

    def __init__(self, items: int = 8, min_size: int = 64):
        self.items = max(1, int(items))
        self.min_size = int(min_size)
        self._maps: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._maps)

    def supervoxels(self, volume: np.ndarray, spacing: Sequence[float], box: Box, k: float) -> np.ndarray:
        """The FH label map of ``volume[box]`` at scale ``k`` (computed, or the one kept for the same content)."""
        crop = volume[box]
        digest = hashlib.sha1(np.ascontiguousarray(crop).tobytes()).hexdigest()
        key = f"{digest}|{crop.shape}|{tuple(float(s) for s in spacing)}|{float(k)}"
        found = self._maps.get(key)
        if found is not None:
            self._maps.move_to_end(key)
            return found
        found = segment(normalize_intensity(crop.astype(np.float32)), spacing=spacing, k=k, min_size=self.min_size)
        self._maps[key] = found
        while len(self._maps) > self.items:
            self._maps.popitem(last=False)
        return found


def fill_from_scribbles(supervoxels: np.ndarray, box: Box, foreground: np.ndarray,
                        background: np.ndarray) -> np.ndarray:
    """uint8 mask of the whole image: the supervoxels of ``box`` touched by ``foreground`` and not by ``background``
    (boolean masks of the whole image), then the strokes themselves."""
    touched_foreground = np.unique(supervoxels[foreground[box]])
    touched_background = np.unique(supervoxels[background[box]])
    selected = np.setdiff1d(touched_foreground, touched_background)
    label = np.zeros(foreground.shape, dtype=np.uint8)
    label[box] = np.isin(supervoxels, selected)
    label[foreground] = 1
    label[background] = 0
    return label
