"""``fh_novelty``: the unlabelled image whose FH region statistics are least like any labelled image's.

Pick it to cover a heterogeneous collection (several scanners, body regions, contrast phases) before refining:
it needs no model weights, only an ``fh_novelty`` scoring run (seconds per image).
"""
from __future__ import annotations

from .base import ScoredStrategy


class FHNoveltyStrategy(ScoredStrategy):
    score_key = "fh_novelty"

    def __init__(self):
        super().__init__("FH novelty: unlabelled image least like the labelled ones (FH region statistics)")

    def __call__(self, request, datastore):
        return self.pick_highest(request, datastore)
