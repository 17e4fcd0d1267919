"""Which structures the model-based scoring methods prompt: the ones this datastore's labels name.

A head-and-neck datastore labels parotids and the spinal cord, an abdominal one the liver and kidneys: scoring with a
fixed abdominal list measures nothing on the first. The names come from the ``label_info`` of the final labels (the
names annotators saved, most frequent first), each resolved through the served vocabulary (a name it does not know
goes to the model as free text); with no final label yet, the configured structures (``--conf auto_labels``) are used.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import List, Sequence

from segvol.training.data import parse_label_names

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
