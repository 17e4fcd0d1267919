"""Which structures the model-based scoring methods prompt: the ones this datastore's labels name.

A head-and-neck datastore labels parotids and the spinal cord, an abdominal one the liver and kidneys: scoring with a
fixed abdominal list measures nothing on the first. The names come from the ``label_info`` of the final labels (the
names annotators saved, most frequent first), each resolved through the served vocabulary (a name it does not know
goes to the model as free text); with no final label yet, the configured structures (``--conf auto_labels``) are used.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Dict, List, Sequence

from segvol.checkpoint import checkpoint_id
from segvol.training.data import parse_label_names

from .base import ImageScoring

logger = logging.getLogger(__name__)


def structure_names(datastore, vocabulary, fallback: Sequence[str], limit: int = 10) -> List[str]:
    """Up to ``limit`` text prompts: the datastore's labelled structures, else ``fallback``."""
    counts: Counter = Counter()
    for image_id in datastore.get_labeled_images():
        try:
            info = datastore.get_label_info(image_id, "final") or {}
        except Exception:  # a remote datastore may keep no label info
            continue
        for key in ("label_info", "label_names", "labels"):
            if info.get(key):
                try:
                    names = parse_label_names(info[key]).values()
                except ValueError:
                    continue
                counts.update(_prompt(name, vocabulary) for name in set(names))
                break
    if not counts:
        return list(fallback)[:limit]
    return [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:limit]


def _prompt(name: str, vocabulary) -> str:
    category = vocabulary.find(name) if vocabulary is not None else None
    return category.name if category is not None else name.strip()


class StructureScoring(ImageScoring):
    """A scoring method that runs SegVol on the unlabelled images for ``structures`` (``structure_names``, read at the
    start of each run); a stored score is fresh while the checkpoint and the structure list are the same."""

    def __init__(self, description: str, service, fallback: Sequence[str]):
        super().__init__(description)
        self.service = service
        self.fallback = list(fallback)
        self.structures: List[str] = list(fallback)  # this run's

    def images(self, datastore):
        return datastore.get_unlabeled_images()

    def __call__(self, request, datastore) -> Dict[str, Any]:
        if not self.service.available():
            return {"method": self.key, "scored": 0, "error": "SegVol weights are not available"}
        self.structures = structure_names(datastore, self.service.vocabulary, self.fallback)
        return {**super().__call__(request, datastore), "structures": self.structures}

    def tag(self) -> str:
        """The checkpoint and the structures a score was computed with."""
        try:
            model = checkpoint_id(self.service.weights_file())
        except Exception:  # no weights file (the score is then never fresh)
            model = None
        return hashlib.sha1(f"{model}|{'|'.join(self.structures)}".encode()).hexdigest()[:16]

    def fresh(self, info) -> bool:
        return self.key in info and info.get(f"{self.key}_tag") == self.tag()

    def tagged(self, score: Any) -> Dict[str, Any]:
        return {self.key: score, f"{self.key}_tag": self.tag()}
