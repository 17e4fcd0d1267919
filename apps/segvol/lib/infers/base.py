"""What every SegVol infer task shares: turn the request into a ``PromptRequest``, run its prompts in the service's
session for the request's image (and ``client_id``) with the label values the face promised, and write the label
file."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from segvol.errors import BadRequestError
from segvol.modes import Mode

from ..prompts import PromptRequest
from ..service import SegVolService
from ..validation import RESULT_EXTENSIONS, check_result_extension, parse_bool

logger = logging.getLogger(__name__)


class SegVolInferTask(InferTask):
    """Subclasses turn a client's request into a ``PromptRequest`` (``parse_request``) and say how they number labels
    (``value_space``, ``class_agnostic``); every value in a result is one the face's ``/info`` labels or the response's
    ``label_names`` name, so each stock client imports it into the right segment (see the table in docs/rest-api.md)."""

    def __init__(self, service: SegVolService, type: str, labels, description: str, config: Optional[dict] = None):
        super().__init__(type=type, labels=labels, dimension=3, description=description,
                         config={"zoom": service.mode, "free_text": False, **(config or {})})
        self.service = service

    def is_valid(self) -> bool:
        return True  # listed even without weights; a request then gets a 503 saying how to get them

    def served_labels(self):
        """This face's ``/info`` labels now (names learned by a newly loaded checkpoint included)."""
        return self.labels

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "labels": self.served_labels()}

    def parse_request(self, request: Dict[str, Any]) -> PromptRequest:
        raise NotImplementedError

    def class_agnostic(self) -> bool:
        """True when the result is one object (value 1) rather than one value per label."""
        return False

    def value_space(self) -> Tuple[Dict[str, int], Iterable[int]]:
        """How this face numbers its labels: ``{text: value}`` for the names its ``/info`` labels list, and the
        values left for other names (free text) in one request. Default: the vocabulary's served indices, and the
        values after them (never a served index; nothing is added to the vocabulary)."""
        vocabulary = self.service.vocabulary
        return {c.name: c.index for c in vocabulary.categories}, vocabulary.free_values()

    def label_values(self, asked: PromptRequest) -> Dict[str, int]:
        """The value of each text prompt in the returned label: the ``label_prompt`` index it was asked by, else its
        index in this face's ``/info`` labels, else the next value free in this request."""
        known, free = self.value_space()
        texts, asked_values = asked.prompts.texts, asked.values
        taken = set(asked_values.values()) | {known[t] for t in texts if t in known}
        spare = (v for v in free if v not in taken)
        values: Dict[str, int] = {}
        for text in texts:
            value = asked_values.get(text, known.get(text))
            if value is None:
                value = next(spare, None)
                if value is None:
                    outside = [t for t in texts if t not in known and t not in asked_values]
                    raise BadRequestError(f"{len(outside)} names outside the vocabulary in one request: a uint8 label "
                                          f"has room for {len(list(self.value_space()[1]))} of them")
            if not 1 <= value <= 255:
                raise BadRequestError(f"label value {value} of {text!r} does not fit a uint8 label")
            values[text] = value
        return values

    def __call__(self, request: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        started = time.perf_counter()
        self.service.engine()  # (re)load first: a new checkpoint's learned names must resolve in this request
        load_seconds = time.perf_counter() - started
        asked = self.parse_request(request)
        prompts = asked.prompts
        if prompts.is_empty():
            raise BadRequestError(self.no_prompt_message(asked))
        mode = Mode.parse(request.get("zoom", self.service.mode), "zoom").value
        image = request["image"]
        if not isinstance(image, str):
            raise BadRequestError("this task needs an image file or datastore id")
        agnostic = self.class_agnostic() or not prompts.texts
        # the engine writes the label with this face's values directly (class-agnostic: every text is value 1)
        values = {text: 1 for text in prompts.texts} if agnostic else self.label_values(asked)

        with self.service.session(image, request.get("client_id")) as session:
            result = session.segment(prompts, mode=mode, values=values or None)

        labels = result.label
        if agnostic:
            names = {self.object_name(asked): 1}
        else:
            names = {self.service.vocabulary.served_name(text): values[text]
                     for text in sorted(values, key=lambda t: values[t])}  # ascending: Slicer reads keys in order

        tick = time.perf_counter()
        output = write_label_file(labels, result.affine, request)
        write_seconds = time.perf_counter() - tick
        engine_stats = getattr(result, "stats", {}) or {}
        # the engine's own stages, its sum as "engine"; "total" is this task's whole time (SegVolApp.infer widens it
        # to the app's, which also covers finding the image)
        stages = {("engine" if k == "total" else k): v for k, v in engine_stats.get("seconds", {}).items()}
        return output, {
            "label_names": names,
            "prompts": {**prompts.to_json(), "requested": asked.requested},
            "model": self.service.checkpoint_id,
            "mode": mode,
            "latencies": {"load": round(load_seconds, 3), **stages, "write": round(write_seconds, 3),
                          "total": round(time.perf_counter() - started, 3)},
            "stats": engine_stats,
            **self.extra_params(asked),
        }

    def object_name(self, asked: PromptRequest) -> str:
        """The name of a class-agnostic result (value 1)."""
        texts = asked.prompts.texts
        return self.service.vocabulary.served_name(texts[0]) if texts else "object"

    def no_prompt_message(self, asked: PromptRequest) -> str:
        return "no prompt: send a label/text, a foreground point or a box"

    def extra_params(self, asked: PromptRequest) -> Dict[str, Any]:
        return {}


def write_label_file(labels: np.ndarray, affine: np.ndarray, request: Dict[str, Any]) -> str:
    """A uint8 label on the image grid -> a temp file in the format the client asked for (``result_extension``).

    NIfTI goes through the project's label writer (``segvol.io.write_label``, nibabel): a ragged 512x512x200 label
    writes in 0.56 s there against 1.54 s through ITK, which every click of a session would pay. NRRD and MetaImage
    (what Slicer and OHIF ask for) go through MONAI Label's ITK writer."""
    extension = check_result_extension(request.get("result_extension"))
    compress = parse_bool(request.get("result_compress"), "params.result_compress", True)  # NRRD, MetaImage
    handle, path = tempfile.mkstemp(suffix=extension, prefix="segvol_")
    os.close(handle)
    if extension in (".nii.gz", ".nii"):
        from segvol.io import write_label

        return write_label(path, labels, affine, dtype=np.uint8)
    from monailabel.transform.writer import write_itk

    write_itk(labels, path, np.asarray(affine, dtype=np.float64), np.uint8, compress)
    return path


def warm_label_writer() -> None:
    """Write (and delete) a tiny label in every result format: ITK loads its image IO modules on first use, seconds
    that the first infer request would otherwise spend (the server starts this on a background thread)."""
    for extension in RESULT_EXTENSIONS:
        try:
            os.unlink(write_label_file(np.zeros((2, 2, 2), np.uint8), np.eye(4), {"result_extension": extension}))
        except Exception:  # a warm-up never matters enough to fail anything
            logger.debug("label writer warm-up for %s failed", extension, exc_info=True)
