"""``segvol_disagreement``: how much SegVol disagrees with itself on an unlabelled image.

For each structure this datastore's labels name (``structures.structure_names``; the configured structures until
there is a final label), the zoom-out (global) prediction is compared with the zoom-out-zoom-in prediction;
the score is 1 - mean Dice over the categories present in either. A model that changes its mind between the coarse
and the native-resolution view is uncertain there, so the image is worth annotating. Scores are tied to the
checkpoint and to the structure list: a new checkpoint or a new structure makes them stale.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from segvol.checkpoint import checkpoint_id
from segvol.training.losses import dice_score

from .base import ImageScoring
from .structures import structure_names

DEFAULT_LABELS = ("liver", "spleen", "kidney left", "kidney right", "pancreas", "stomach", "aorta")


class DisagreementScoring(ImageScoring):
    key = "segvol_disagreement"

    def __init__(self, service, fallback: Sequence[str] = DEFAULT_LABELS):
        super().__init__("SegVol zoom-out vs zoom-out-zoom-in disagreement (for the disagreement strategy)")
        self.service = service
        self.fallback = list(fallback)
        self.labels = list(fallback)  # this run's structures

    def images(self, datastore):
        return datastore.get_unlabeled_images()

    def __call__(self, request, datastore):
        if not self.service.available():
            return {"method": self.key, "scored": 0, "error": "SegVol weights are not available"}
        self.labels = structure_names(datastore, self.service.vocabulary, self.fallback)
        return {**super().__call__(request, datastore), "structures": self.labels}

    def _labels_tag(self) -> str:
        return hashlib.sha1("|".join(self.labels).encode()).hexdigest()[:16]

    def fresh(self, info) -> bool:
        return (self.key in info and info.get(f"{self.key}_model") == self._model_id()
                and info.get(f"{self.key}_labels") == self._labels_tag())

    def _model_id(self):
        """The served checkpoint's ``segvol.checkpoint.checkpoint_id`` (None when there is none)."""
        try:
            return checkpoint_id(self.service.weights_file())
        except Exception:
            return None

    def score(self, image_id, path):
        with self.service.exclusive_engine() as engine:
            coarse = engine.segment(path, texts=self.labels, mode="zoom_out")
            fine = engine.segment(path, texts=self.labels, mode="zoom_out_zoom_in")
        scores = []
        for name, value in fine.labels.items():
            a, b = coarse.label == coarse.labels[name], fine.label == value
            if a.any() or b.any():
                scores.append(dice_score(a, b))
        disagreement = 1.0 - (float(np.mean(scores)) if scores else 1.0)
        return {self.key: round(disagreement, 6), f"{self.key}_model": self._model_id(),
                f"{self.key}_labels": self._labels_tag()}
