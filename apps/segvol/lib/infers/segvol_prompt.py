"""``segvol`` (type ``vista3d``): what OHIF v3's MONAI Label panel drives (Auto Segmentation, Point and Class Prompts).

Request: ``label_prompt`` (indices into the /info labels) become text prompts; ``points`` with ``point_labels``
(1 foreground, 0 background) become point prompts. Several labels give one multi-label result whose values are the
/info indices. Also accepted: ``texts`` (names), ``box`` ([i0, j0, k0, i1, j1, k1]), ``free_text``.
"""
from __future__ import annotations

from ..prompts import Prompts, parse_box, parse_texts, vista_points
from .base import SegVolInferTask


class SegVolPromptInfer(SegVolInferTask):
    def __init__(self, service):
        super().__init__(service, type="vista3d", labels=service.vocabulary.labels(),
                         description="SegVol: text (label), point and box prompts, zoom-out-zoom-in")

    def prompts(self, request) -> Prompts:
        positive, negative = vista_points(request)
        return Prompts(
            texts=parse_texts(request, self.service.vocabulary),
            positive=positive,
            negative=negative,
            box=parse_box(request.get("box")),
            requested=[request.get(k) for k in ("label_prompt", "texts") if request.get(k) not in (None, [], "")],
        )
