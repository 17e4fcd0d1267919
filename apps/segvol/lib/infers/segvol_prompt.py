"""``segvol`` (type ``vista3d``): what OHIF v3's MONAI Label panel drives (Auto Segmentation, Point and Class Prompts).

Request: ``label_prompt`` (indices into the /info labels) become text prompts; ``points`` with ``point_labels``
(1 foreground, 0 background) become point prompts. Several labels give one multi-label result whose values are the
/info indices (OHIF maps each value through this model's /info labels); a request for more than ``max_labels`` labels
(OHIF's Auto Segmentation asks for nearly all) segments the auto-segmentation set among them. Also accepted: ``texts``
(names), ``box`` ([i0, j0, k0, i1, j1, k1]), ``free_text`` (a free-text name gets a value after the vocabulary's, for
this request only). The /info labels are the vocabulary's served names plus the client aliases OHIF's presets use.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ..prompts import PromptRequest, parse_box, parse_texts, vista_points
from .base import SegVolInferTask

logger = logging.getLogger(__name__)


class SegVolPromptInfer(SegVolInferTask):
    def __init__(self, service, auto_labels: Sequence[str], max_labels: int = 40):
        super().__init__(service, type="vista3d", labels=service.vocabulary.served_labels(),
                         description="SegVol: text (label), point and box prompts, zoom-out-zoom-in",
                         config={"max_labels": max_labels})
        self.auto_labels = list(auto_labels)
        self.max_labels = max_labels

    def served_labels(self):
        return self.service.vocabulary.served_labels()

    def parse_request(self, request) -> PromptRequest:
        positive, negative = vista_points(request)
        texts, values = parse_texts(request, self.service.vocabulary)
        limit = int(request.get("max_labels", self.max_labels))
        if len(texts) > limit:
            # OHIF's Auto Segmentation tab asks for nearly every label of a vista3d model; segmenting 200+ categories
            # would take many minutes on a CPU, so such a request segments the auto-segmentation set it contains.
            subset = [t for t in self.auto_labels if t in texts]  # the set's order: the same result as segvol_auto
            logger.info("%d labels requested (more than max_labels=%d): segmenting the %d auto labels among them",
                        len(texts), limit, len(subset))
            texts = subset or texts[:limit]
        return PromptRequest.from_clicks(
            texts=texts,
            positive=positive,
            negative=negative,
            box=parse_box(request.get("box")),
            requested=[request.get(k) for k in ("label_prompt", "texts") if request.get(k) not in (None, [], "")],
            values={t: v for t, v in values.items() if t in texts},
        )
