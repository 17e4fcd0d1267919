"""``disagreement``: the unlabelled image on which SegVol disagrees with itself most (``segvol_disagreement``).

Pick it when the model is already good on most images and annotation time should go where it is unsure; it needs
the weights and a ``segvol_disagreement`` scoring run (minutes per image on a CPU).
"""
from __future__ import annotations

from .base import ScoredStrategy


class DisagreementStrategy(ScoredStrategy):
    score_key = "segvol_disagreement"

    def __init__(self):
        super().__init__("Prompt disagreement: unlabelled image where zoom-out and zoom-in predictions differ most")

    def __call__(self, request, datastore):
        return self.pick_highest(request, datastore)
