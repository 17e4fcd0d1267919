"""Shared loop of the scoring methods: tolerant of images added or removed while it runs."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

logger = logging.getLogger(__name__)


class ImageScoring(ScoringMethod):
    """Scores every image (``images()``) with ``score(image_id, path) -> dict`` and stores the dict in its info.

    The list of images is read once; an image removed meanwhile is skipped (its read fails or it is no longer
    listed when the score is written), and one added meanwhile is scored on the next run. ``fresh(info)`` lets a
    method skip images whose stored score is still valid.
    """

    key = "score"

    def images(self, datastore: Datastore) -> Iterable[str]:
        return datastore.list_images()

    def fresh(self, info: Dict[str, Any]) -> bool:
        return False

    def score(self, image_id: str, path: str) -> Optional[Dict[str, Any]]:
        raise NotImplementedError

    def after(self, datastore: Datastore, scored: Dict[str, Dict[str, Any]]) -> None:
        """Hook run once every image is scored."""

    def __call__(self, request, datastore: Datastore):
        started = time.perf_counter()
        scored: Dict[str, Dict[str, Any]] = {}
        skipped, failed = 0, 0
        images = list(self.images(datastore))
        for number, image_id in enumerate(images, 1):
            try:
                info = datastore.get_image_info(image_id) or {}
                if self.fresh(info) and not request.get("force"):
                    skipped += 1
                    continue
                result = self.score(image_id, datastore.get_image_uri(image_id))
                if result is None:
                    continue
                if image_id not in datastore.list_images():
                    continue  # removed while it was being scored
                datastore.update_image_info(image_id, {**result, f"{self.key}_ts": int(time.time())})
                scored[image_id] = result
            except Exception as error:  # one bad or vanished image must not stop the run
                failed += 1
                logger.warning("%s: image %s skipped: %s", self.key, image_id, error)
            logger.info("%s: %d/%d images", self.key, number, len(images))
        self.after(datastore, scored)
        seconds = time.perf_counter() - started
        return {"method": self.key, "scored": len(scored), "up_to_date": skipped, "failed": failed,
                "seconds": round(seconds, 2), "seconds_per_image": round(seconds / len(scored), 3) if scored else None}


def read_volume(path: str):
    from segvol.io import read_image

    return read_image(path)
