"""``fh_novelty``: how unlike the already-labelled images an image's FH region statistics are.

Each image is summarised by its Felzenszwalb-Huttenlocher regions on a coarse grid: the volume fraction of regions
per intensity band (soft tissue, fat, air, bone...) and the distribution of region sizes. The novelty of an
unlabelled image is the distance from its summary to the nearest labelled image's (to the mean of all images when
none is labelled yet). High novelty means anatomy or acquisition the labelled set does not cover yet.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from segvol.io import spacing

from .base import ImageScoring, read_volume

INTENSITY_BANDS = np.array([-1000, -500, -150, -30, 30, 100, 300, 700, 4000], dtype=np.float32)  # HU edges
SIZE_BANDS = np.array([0, 1e-4, 1e-3, 1e-2, 1e-1, 1.01])  # region volume as a fraction of the image
WORKING_SHAPE = (96, 96, 48)


def fh_features(array: np.ndarray, spacing) -> List[float]:
    from scipy import ndimage

    from segvol import fh

    volume = np.asarray(array, dtype=np.float32)
    zoom = [w / s for w, s in zip(WORKING_SHAPE, volume.shape)]
    small = ndimage.zoom(volume, zoom, order=1)
    small_spacing = [sp / z for sp, z in zip(spacing, zoom)]
    regions = fh.segment(fh.normalize_intensity(small), spacing=small_spacing, min_size=50)
    count = int(regions.max()) + 1
    sizes = np.bincount(regions.ravel(), minlength=count).astype(np.float64)
    means = np.bincount(regions.ravel(), weights=small.ravel(), minlength=count) / np.maximum(sizes, 1)
    fractions = sizes / sizes.sum()
    band = np.clip(np.searchsorted(INTENSITY_BANDS, means) - 1, 0, len(INTENSITY_BANDS) - 2)
    intensity = np.bincount(band, weights=fractions, minlength=len(INTENSITY_BANDS) - 1)
    size_band = np.clip(np.searchsorted(SIZE_BANDS, fractions) - 1, 0, len(SIZE_BANDS) - 2)
    size_hist = np.bincount(size_band, weights=fractions, minlength=len(SIZE_BANDS) - 1)
    return [round(float(v), 6) for v in (*intensity, *size_hist, np.log10(count) / 4)]


def novelty(features: Dict[str, List[float]], labelled: List[str]) -> Dict[str, float]:
    """Distance of each image's features to the nearest labelled image's (the mean, when none is labelled)."""
    if not features:
        return {}
    ids = list(features)
    matrix = np.array([features[i] for i in ids])
    references = np.array([features[i] for i in labelled if i in features])
    if len(references) == 0:
        references = matrix.mean(axis=0, keepdims=True)
    distances = np.linalg.norm(matrix[:, None, :] - references[None, :, :], axis=-1).min(axis=1)
    return {image_id: round(float(d), 6) for image_id, d in zip(ids, distances)}


class FHNoveltyScoring(ImageScoring):
    key = "fh_novelty"

    def __init__(self):
        super().__init__("FH region-statistics novelty w.r.t. labelled images (for the fh_novelty strategy)")

    def fresh(self, info) -> bool:
        return "fh_features" in info

    def score(self, image_id, path):
        volume = read_volume(path)
        return {"fh_features": fh_features(volume.array, spacing(volume.affine))}

    def after(self, datastore, scored) -> None:
        """Novelty depends on every image and on which are labelled, so it is recomputed for all at the end."""
        features = {}
        for image_id in datastore.list_images():
            info = datastore.get_image_info(image_id) or {}
            if "fh_features" in info:
                features[image_id] = info["fh_features"]
        for image_id, value in novelty(features, datastore.get_labeled_images()).items():
            if image_id in datastore.list_images():
                datastore.update_image_info(image_id, {self.key: value})
