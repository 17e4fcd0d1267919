"""``segvol_interactive`` (type ``deepgrow``): 3D Slicer's interactive panel (and OHIF's point prompts for deepgrow).

Request: ``foreground`` / ``background`` clicks ``[[i, j, k], ...]``, the current segment name ``label`` and Slicer's
ROI box ``roi = [i0, i1, j0, j1, k0, k1]`` (each pair in either order). The result is one object (value 1), which
Slicer imports into the current segment and OHIF into the current label.

The segment name is the text prompt when the vocabulary knows it (any spelling). A generic name ("Segment_1") adds no
text. Any other name ("my lesion") adds no text either, unless ``free_text`` is on (the model's config, shown in
Slicer's Options; its default is ``--conf segment_name_free_text``): the request still segments from the clicks and the
ROI, and the response says how the name was treated (``name_used``, ``name_ignored``, ``name_treated_as``,
``warnings``).
"""
from __future__ import annotations

from typing import Any, Dict

from ..prompts import (
    PromptRequest,
    SegmentName,
    parse_box,
    parse_points,
    parse_segment_name,
    parse_slicer_roi,
    parse_texts,
    requested_free_text,
)
from .base import SegVolInferTask


class SegVolInteractiveInfer(SegVolInferTask):
    def __init__(self, service, segment_name_free_text: bool = False):
        super().__init__(service, type="deepgrow", labels=[],
                         description="SegVol interactive: clicks, ROI box and the segment name as text",
                         config={"free_text": bool(segment_name_free_text)})
        self.segment_name_free_text = bool(segment_name_free_text)

    def class_agnostic(self) -> bool:
        return True

    def parse_request(self, request) -> PromptRequest:
        vocabulary = self.service.vocabulary
        free_text = requested_free_text({"free_text": request.get("free_text", self.segment_name_free_text)})
        name = parse_segment_name(request.get("label"), vocabulary, free_text)
        texts = [name.text] if name.text else []
        extra, _ = parse_texts(request, vocabulary)
        texts += [t for t in extra if t not in texts]
        box = parse_slicer_roi(request.get("roi")) or parse_box(request.get("box"))
        return PromptRequest.from_clicks(
            texts=texts[:1],  # one object per request: the current segment
            positive=parse_points(request.get("foreground"), "foreground"),
            negative=parse_points(request.get("background"), "background"),
            box=box,
            requested=[request.get("label")] if request.get("label") else [],
            segment_name=name,
        )

    def object_name(self, asked: PromptRequest) -> str:
        name = asked.segment_name
        if name is not None and name.sent:
            return name.sent  # the segment the client imports value 1 into
        return super().object_name(asked)

    def no_prompt_message(self, asked: PromptRequest) -> str:
        name = asked.segment_name
        if name is not None and name.reason:
            return (f"no prompt: {name.reason} and no click or ROI was given (free_text sends the name to the model "
                    "as typed)")
        return super().no_prompt_message(asked)

    def extra_params(self, asked: PromptRequest) -> Dict[str, Any]:
        name = asked.segment_name or SegmentName()
        return {**name.to_json(), "warnings": [name.warning] if name.warning else []}
