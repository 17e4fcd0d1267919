"""``fg_fraction``: how much of an image is body, by SegVol's own foreground rule (voxels above the mean)."""
from __future__ import annotations

import numpy as np

from .base import ImageScoring, read_volume


class ForegroundScoring(ImageScoring):
    key = "fg_fraction"

    def __init__(self):
        super().__init__("Foreground fraction of each image (for the random_fg strategy)")

    def fresh(self, info) -> bool:
        return self.key in info

    def score(self, image_id, path):
        array = np.asarray(read_volume(path).array, dtype=np.float32)
        foreground = array > array.mean()
        return {self.key: round(float(foreground.mean()), 6), "fg_voxels": int(foreground.sum())}
