"""Shared parts of the strategies: unlabelled candidates, their scores, time since each was last served."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy


class ScoredStrategy(Strategy):
    """Candidates are the images without a final label; ``score_key`` is the image-info field its scoring writes."""

    score_key = ""

    def candidates(self, request, datastore: Datastore) -> List[Tuple[str, Optional[float], float]]:
        """(image id, ``score_of`` its info, seconds since this strategy last served it)."""
        strategy = request.get("strategy", "")
        now = time.time()
        rows = []
        for image_id in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")):
            info: Dict = datastore.get_image_info(image_id) or {}
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            rows.append((image_id, self.score_of(info), now - served))
        return rows

    def score_of(self, info: Dict):
        """The image's score from its info (None when not scored yet)."""
        score = info.get(self.score_key)
        return float(score) if isinstance(score, (int, float)) else None

    def pick_highest(self, request, datastore: Datastore):
        """The unlabelled image with the highest score; ties (and unscored images) go to the least recently served."""
        rows = self.candidates(request, datastore)
        if not rows:
            return None
        image_id, score, idle = max(rows, key=lambda r: (r[1] if r[1] is not None else float("-inf"), r[2]))
        return {"id": image_id, self.score_key: score, "scored": score is not None}
