"""``class_entropy``: the unlabelled image whose structures SegVol is least sure of, each structure weighing the same
(class-stratified predictive entropy, in the spirit of ClaSP PE), with exploration noise that fades as labels arrive.

Needs a ``class_entropy`` scoring run (``lib.scoring.class_entropy``): one zoom-out decode per structure per image.
Unscored images come last; among the scored, each structure's entropies are normalised over the candidates and
averaged, then noise with a spread of 0.3 halving every 3 labelled images is added (seeded by the image and the
number of labels, so a pick can be repeated).
"""
from __future__ import annotations

import random

from ..scoring.class_entropy import exploration_noise, image_seed, labelled_count, stratified_scores
from .base import ScoredStrategy


class ClassEntropyStrategy(ScoredStrategy):
    score_key = "class_entropy"

    def __init__(self):
        super().__init__("Class-stratified entropy: the unlabelled image SegVol is least sure of, per structure")

    def score_of(self, info):
        """{structure: entropy}, or None when not scored yet."""
        value = info.get(self.score_key)
        return value if isinstance(value, dict) and value else None

    def __call__(self, request, datastore):
        rows = self.candidates(request, datastore)
        if not rows:
            return None
        scored = {image_id: value for image_id, value, _ in rows if value is not None}
        labelled = labelled_count(datastore)
        ranked = {image_id: score + exploration_noise(labelled, rng=random.Random(image_seed(image_id, labelled)))
                  for image_id, score in stratified_scores(scored).items()}
        image_id, _, _ = max(rows, key=lambda r: (ranked.get(r[0], float("-inf")), r[2]))
        return {"id": image_id, self.score_key: ranked.get(image_id), "scored": image_id in ranked,
                "labelled": labelled}
