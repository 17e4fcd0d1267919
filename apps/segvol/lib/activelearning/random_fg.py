"""``random_fg`` (default): random among unlabelled images, weighted by how much of each image is body.

The nnActive study (see docs/curation.md) found foreground-aware random sampling the strongest simple baseline for 3D
active learning: plain random wastes annotation on volumes that are mostly air, table or a thin scout. Weights are
the ``fg_fraction`` written by the ``fg_fraction`` scoring method (images not scored yet get the mean weight),
times the time since this strategy last served the image, so the same image is not handed out twice in a row.
"""
from __future__ import annotations

import random

from .base import ScoredStrategy


class RandomForegroundStrategy(ScoredStrategy):
    score_key = "fg_fraction"

    def __init__(self, description: str = "Foreground-aware random: unlabelled images weighted by their body fraction"):
        super().__init__(description)

    def __call__(self, request, datastore):
        rows = self.candidates(request, datastore)
        if not rows:
            return None
        known = [score for _, score, _ in rows if score is not None]
        default = sum(known) / len(known) if known else 1.0
        weights = [max(score if score is not None else default, 1e-6) * max(idle, 1.0) for _, score, idle in rows]
        rng = random.Random(request.get("seed"))
        image_id, score, _ = rng.choices(rows, weights=weights)[0]
        return {"id": image_id, "fg_fraction": score, "weight": weights[[r[0] for r in rows].index(image_id)]}
