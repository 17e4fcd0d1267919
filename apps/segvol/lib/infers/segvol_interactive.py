"""``segvol_interactive`` (type ``deepgrow``): 3D Slicer's interactive panel (and OHIF's point prompts for deepgrow).

Request: ``foreground`` / ``background`` clicks ``[[i, j, k], ...]``, the current segment name ``label`` as the text
prompt (generic names such as "Segment_1" add no text), and Slicer's ROI box ``roi = [i0, i1, j0, j1, k0, k1]``
(each pair in either order). The result is one object (value 1), which Slicer imports into the current segment.
"""
from __future__ import annotations

from ..prompts import Prompts, parse_box, parse_points, parse_segment_name, parse_slicer_roi, parse_texts, requested_free_text
from .base import SegVolInferTask


class SegVolInteractiveInfer(SegVolInferTask):
    def __init__(self, service):
        super().__init__(service, type="deepgrow", labels=[],
                         description="SegVol interactive: clicks, ROI box and the segment name as text")

    def class_agnostic(self) -> bool:
        return True

    def prompts(self, request) -> Prompts:
        vocabulary = self.service.vocabulary
        texts = parse_segment_name(request.get("label"), vocabulary, requested_free_text(request))
        texts += [t for t in parse_texts(request, vocabulary) if t not in texts]
        box = parse_slicer_roi(request.get("roi")) or parse_box(request.get("box"))
        return Prompts(
            texts=texts[:1],  # one object per request: the current segment
            positive=parse_points(request.get("foreground"), "foreground"),
            negative=parse_points(request.get("background"), "background"),
            box=box,
            requested=[request.get("label")] if request.get("label") else [],
        )
