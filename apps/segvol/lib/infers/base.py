"""What every SegVol infer task shares: run the engine on the request's image and write the label file."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from segvol.errors import BadRequestError

from ..prompts import Prompts
from ..service import SegVolService

logger = logging.getLogger(__name__)


class SegVolInferTask(InferTask):
    """Subclasses turn a client's request into ``Prompts`` (``prompts``) and name the label values (``values``)."""

    def __init__(self, service: SegVolService, type: str, labels, description: str, config: Optional[dict] = None):
        super().__init__(type=type, labels=labels, dimension=3, description=description,
                         config={"zoom": service.mode, "free_text": False, **(config or {})})
        self.service = service

    def is_valid(self) -> bool:
        return True  # listed even without weights; a request then gets a 503 saying how to get them

    def prompts(self, request: Dict[str, Any]) -> Prompts:
        raise NotImplementedError

    def class_agnostic(self) -> bool:
        """True when the result is one object (value 1) rather than vocabulary-indexed labels."""
        return False

    def __call__(self, request: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        started = time.perf_counter()
        self.service.engine()  # (re)load first: a new checkpoint's learned names must resolve in this request
        prompts = self.prompts(request)
        if prompts.is_empty():
            raise BadRequestError("no prompt: send a label/text, a foreground point or a box")
        mode = request.get("zoom", self.service.mode)
        if mode not in ("zoom_out_zoom_in", "zoom_out"):
            raise BadRequestError(f"zoom must be 'zoom_out_zoom_in' or 'zoom_out', got {mode!r}")
        image = request["image"]
        if not isinstance(image, str):
            raise BadRequestError("this task needs an image file or datastore id")

        result = self.service.run(lambda engine: engine.segment(
            image, texts=prompts.texts or None, box=prompts.box,
            points=[(*p, 1) for p in prompts.positive] + [(*p, 0) for p in prompts.negative] or None,
            mode=mode))

        if self.class_agnostic() or not prompts.texts:
            labels = (result.label > 0).astype(np.uint8)
            names = {(prompts.texts[0] if prompts.texts else "object"): 1}
        else:
            # Engine values 1..N follow prompts.texts; clients expect the /info label index of each name.
            # Free-text names get an index after the vocabulary's, so values never collide with known labels.
            vocabulary = self.service.vocabulary
            vocabulary.extend(list(result.labels))
            lookup = np.zeros(max(result.labels.values(), default=0) + 1, dtype=np.int64)
            names = {}
            for name, value in result.labels.items():
                lookup[value] = vocabulary.find(name).index
                names[name] = int(lookup[value])
            if lookup.max() > 255:
                raise BadRequestError("label indices above 255 cannot be returned as uint8")
            labels = lookup[result.label].astype(np.uint8)

        output = write_label_file(labels, result.affine, request)
        engine_stats = getattr(result, "stats", {}) or {}
        return output, {
            "label_names": names,
            "prompts": {**prompts.to_json(), "requested": prompts.requested},
            "model": self.service.checkpoint_id,
            "mode": mode,
            "latencies": {"total": round(time.perf_counter() - started, 3), **engine_stats.get("seconds", {})},
            "stats": engine_stats,
        }


def write_label_file(labels: np.ndarray, affine: np.ndarray, request: Dict[str, Any]) -> str:
    """A uint8 label on the image grid -> a temp file in the format the client asked for (``result_extension``)."""
    from monailabel.transform.writer import write_itk

    extension = request.get("result_extension") or ".nii.gz"
    if not isinstance(extension, str) or not extension.startswith(".") or "/" in extension:
        raise BadRequestError(f"result_extension must look like '.nrrd' or '.nii.gz', got {extension!r}")
    handle, path = tempfile.mkstemp(suffix=extension, prefix="segvol_")
    os.close(handle)
    compress = str(request.get("result_compress", "true")).lower() not in ("false", "0")
    write_itk(labels, path, np.asarray(affine, dtype=np.float64), np.uint8, compress)
    return path
