"""``segvol_disagreement``: how much SegVol disagrees with itself on an unlabelled image.

For each structure this datastore's labels name (``structures.structure_names``; the configured structures until
there is a final label), the zoom-out (global) prediction is compared with the zoom-out-zoom-in prediction;
the score is 1 - mean Dice over the categories present in either. A model that changes its mind between the coarse
and the native-resolution view is uncertain there, so the image is worth annotating. Scores are tied to the
checkpoint and to the structure list: a new checkpoint or a new structure makes them stale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from segvol.training.losses import dice_score

from .structures import StructureScoring

DEFAULT_LABELS = ("liver", "spleen", "kidney left", "kidney right", "pancreas", "stomach", "aorta")


class DisagreementScoring(StructureScoring):
    key = "segvol_disagreement"

    def __init__(self, service, fallback: Sequence[str] = DEFAULT_LABELS):
        super().__init__("SegVol zoom-out vs zoom-out-zoom-in disagreement (for the disagreement strategy)", service,
                         fallback)

    def score(self, image_id, path):
        with self.service.exclusive_engine() as engine:
            coarse = engine.segment(path, texts=self.structures, mode="zoom_out")
            fine = engine.segment(path, texts=self.structures, mode="zoom_out_zoom_in")
        scores = []
        for name, value in fine.labels.items():
            a, b = coarse.label == coarse.labels[name], fine.label == value
            if a.any() or b.any():
                scores.append(dice_score(a, b))
        disagreement = 1.0 - (float(np.mean(scores)) if scores else 1.0)
        return self.tagged(round(disagreement, 6))
