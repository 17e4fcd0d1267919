"""``segvol_auto`` (type ``segmentation``): one-click auto-segmentation of a label set (Slicer and OHIF auto panels).

Segments the configured set (``--conf auto_labels name,name,...``; default: the major abdominal and thoracic organs)
with zoom-out-zoom-in, or the ``label_prompt`` indices OHIF's Class Prompts tab sends, into one multi-label map
whose values are the /info label indices.
"""
from __future__ import annotations

from typing import List, Optional

from segvol.errors import BadTextError

from ..prompts import Prompts, parse_texts
from .base import SegVolInferTask

DEFAULT_AUTO_LABELS = [
    "liver", "spleen", "kidney left", "kidney right", "pancreas", "stomach", "gallbladder", "aorta",
    "inferior vena cava", "esophagus", "duodenum", "adrenal gland left", "adrenal gland right", "lung upper lobe left",
    "lung lower lobe left", "lung upper lobe right", "lung middle lobe right", "lung lower lobe right", "heart",
    "trachea", "urinary bladder",
]


class SegVolAutoInfer(SegVolInferTask):
    def __init__(self, service, auto_labels: Optional[List[str]] = None):
        vocabulary = service.vocabulary
        try:
            self.auto_labels = [vocabulary.resolve(name) for name in (auto_labels or DEFAULT_AUTO_LABELS)]
        except BadTextError as error:
            raise ValueError(f"--conf auto_labels: {error}") from None
        labels = {name: vocabulary.find(name).index for name in self.auto_labels}
        super().__init__(service, type="segmentation", labels=labels,
                         description=f"SegVol auto-segmentation of {len(labels)} organs (zoom-out-zoom-in)")

    def prompts(self, request) -> Prompts:
        texts = parse_texts(request, self.service.vocabulary) or list(self.auto_labels)
        return Prompts(texts=texts, requested=texts)
