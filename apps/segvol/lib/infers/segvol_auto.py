"""``segvol_auto`` (type ``segmentation``): one-click auto-segmentation of a label set (Slicer and OHIF auto panels).

Segments the configured set (``--conf auto_labels name,name,...``; default: the major abdominal and thoracic organs)
with zoom-out-zoom-in into one multi-label map. Values are positions in the set: the /info labels are
``{name: 1..N}`` and the full set comes back as 1..N with ``label_names`` ``{name: k}``. That is what both stock
clients import correctly: 3D Slicer puts value k into the k-th name of ``label_names`` sorted by value, OHIF maps each
value through this model's /info labels. OHIF's Class Prompts tab sends ``label_prompt`` = positions in the set;
``texts`` outside the set get N+1, N+2... for that request.
"""
from __future__ import annotations

from typing import List, Optional

from segvol.errors import BadTextError

from ..prompts import PromptRequest, parse_texts
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
            resolved = [vocabulary.resolve(name) for name in (auto_labels or DEFAULT_AUTO_LABELS)]
        except BadTextError as error:
            raise ValueError(f"--conf auto_labels: {error}") from None
        self.auto_labels = list(dict.fromkeys(resolved))  # training texts, in the configured order
        labels = {vocabulary.served_name(name): k for k, name in enumerate(self.auto_labels, 1)}
        super().__init__(service, type="segmentation", labels=labels,
                         description=f"SegVol auto-segmentation of {len(labels)} organs (zoom-out-zoom-in)")

    def value_space(self):
        known = {name: k for k, name in enumerate(self.auto_labels, 1)}
        return known, range(len(known) + 1, 256)

    def position(self, index: int) -> str:
        if not 1 <= index <= len(self.auto_labels):
            raise BadTextError(f"label index {index} is not one of segvol_auto's labels (1..{len(self.auto_labels)})")
        return self.auto_labels[index - 1]

    def parse_request(self, request) -> PromptRequest:
        texts, values = parse_texts(request, self.service.vocabulary, lookup=self.position)
        texts = texts or list(self.auto_labels)
        return PromptRequest.from_clicks(texts=texts, requested=texts, values=values)
