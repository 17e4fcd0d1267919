"""``class_entropy``: class-stratified predictive entropy (in the spirit of ClaSP PE, TMLR 2026).

For each structure the datastore's labels name (``structures.structure_names``), SegVol's zoom-out prediction of an
unlabelled image gives a probability per voxel; the structure's score is the mean binary entropy of the voxels its
prediction reaches (probability above ``REACH``), so a small structure counts as much as a large one. The
``class_entropy`` strategy then normalises each structure's scores over the candidates (so rare or hard structures
weigh as much as common ones) and adds noise that decays with the number of labelled images (early diversity).
Scores are tied to the checkpoint and to the structure list.
"""
from __future__ import annotations

import hashlib
import random
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .structures import StructureScoring

REACH = 0.05  # the voxels a structure's prediction reaches: probability above this


def mean_entropy(probability: np.ndarray, reach: float = REACH) -> float:
    """Mean binary entropy (bits) of the voxels where ``probability`` exceeds ``reach``; 0 when none does."""
    p = probability[probability > reach].astype(np.float64)
    if p.size == 0:
        return 0.0
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


def stratified_scores(per_image: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """{image: {structure: entropy}} -> {image: score}: each structure's values min-max normalised over the images,
    then averaged per image over the structures scored for it."""
    structures = sorted({name for scores in per_image.values() for name in scores})
    normalised: Dict[str, list] = {image: [] for image in per_image}
    for name in structures:
        values = {image: scores[name] for image, scores in per_image.items() if name in scores}
        low, high = min(values.values()), max(values.values())
        for image, value in values.items():
            normalised[image].append(0.0 if high <= low else (value - low) / (high - low))
    return {image: float(np.mean(values)) if values else 0.0 for image, values in normalised.items()}


def exploration_noise(labelled: int, scale: float = 0.3, half_life: float = 3.0,
                      rng: Optional[random.Random] = None) -> float:
    """Gaussian noise whose spread halves every ``half_life`` labelled images: early picks explore."""
    sigma = scale * 0.5 ** (labelled / half_life)
    return (rng or random).gauss(0.0, sigma)


class ClassEntropyScoring(StructureScoring):
    key = "class_entropy"

    def __init__(self, service, fallback: Sequence[str] = ()):
        super().__init__("Class-stratified predictive entropy of SegVol's zoom-out prediction, per labelled structure",
                         service, fallback)

    def score(self, image_id, path):
        per_structure = {}
        with self.service.exclusive_engine() as engine:
            for name in self.structures:  # one map at a time: a CT's probability map is 4 bytes per voxel
                result = engine.segment(path, texts=[name], mode="zoom_out", return_probabilities=True)
                per_structure[name] = round(mean_entropy(next(iter(result.probabilities.values()))), 6)
        return self.tagged(per_structure)


def labelled_count(datastore) -> int:
    try:
        return len(datastore.get_labeled_images())
    except Exception:
        return 0


def image_seed(*parts) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)

