"""``segvol_scribbles`` (type ``scribbles``): 3D Slicer's scribbles panel, answered with FH supervoxels or SegVol.

Request (Slicer's shape): file field ``label`` = the scribbles label volume on the image grid; ``label_info`` =
``[{"name": segment, "id": value}, ...]`` where the segments ``foreground_scribbles`` / ``background_scribbles``
give the scribble values (default 3 / 2, MONAI Label's values for a task without labels); optional ``roi``
(``[i0, i1, j0, j1, k0, k1]``) limiting the result; ``selected_label_name`` (the text prompt in ``segvol`` mode when the
vocabulary knows it, or with ``free_text``); ``method`` = ``fh`` (default) or ``segvol``.

``fh``: Felzenszwalb-Huttenlocher supervoxels in a box around the scribbles (plus a margin, or the ROI): every
supervoxel touched by a foreground scribble and by no background scribble, then the scribbles themselves
(``segvol.fh.scribbles``, whose cache makes redrawing in the same box instant). ``segvol``: the scribbles become
SegVol prompts (positive and negative points spread along the strokes, and the foreground strokes' bounding box) and
the engine segments them.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from segvol.errors import BadImageError, BadPromptError, BadRequestError
from segvol.fh import SupervoxelCache, fill_from_scribbles
from segvol.io import read_image, spacing
from segvol.modes import Mode
from segvol.prompts import check_box

from ..prompts import SegmentName, parse_segment_name, parse_slicer_roi, requested_free_text
from .base import SegVolInferTask, write_label_file

logger = logging.getLogger(__name__)

FOREGROUND, BACKGROUND = "foreground_scribbles", "background_scribbles"
DEFAULT_IDS = {BACKGROUND: 2, FOREGROUND: 3}


def scribble_ids(label_info: Any) -> Dict[str, int]:
    ids = dict(DEFAULT_IDS)
    if label_info in (None, ""):
        return ids
    if not isinstance(label_info, list):
        raise BadPromptError(f"label_info must be a list of {{name, id}}, got {label_info!r}")
    for number, entry in enumerate(label_info):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadPromptError(f"label_info[{number}] must be a {{name, id}} object, got {str(entry)[:60]!r}")
        if entry["name"] in ids:
            value = entry.get("id", entry.get("idx"))
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
                raise BadPromptError(f"label_info[{number}] ({entry['name']}) has no integer id: {str(value)[:40]!r}")
            ids[entry["name"]] = int(value)
    return ids


def spread_points(mask: np.ndarray, count: int) -> List[Tuple[int, int, int]]:
    """Up to ``count`` voxels of ``mask`` spread along it (evenly spaced in raster order): deterministic."""
    voxels = np.argwhere(mask)
    if len(voxels) == 0:
        return []
    picks = np.unique(np.linspace(0, len(voxels) - 1, num=min(count, len(voxels))).round().astype(int))
    return [tuple(int(v) for v in voxels[p]) for p in picks]


def fh_scale(value: Any) -> float:
    """The request's FH scale ``k`` (Slicer sends the option as typed, possibly inside a list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        k = float(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"k (the FH scale) must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(k) or not 0 < k <= 1e6:
        raise BadRequestError(f"k (the FH scale) must be a positive finite number, got {k}")
    return k


def voxel_box(box) -> "Tuple[int, ...] | None":
    """A box of voxel coordinates (checked by ``segvol.prompts.check_box``) -> the voxel indices it covers."""
    box = check_box(box)
    return None if box is None else tuple(int(round(v)) for v in box)


class SegVolScribblesInfer(SegVolInferTask):
    def __init__(self, service, margin: int = 24, k: float = 0.05, cache_items: int = 8,
                 segment_name_free_text: bool = False):
        self.segment_name_free_text = bool(segment_name_free_text)
        super().__init__(service, type="scribbles", labels=[],
                         description="Scribbles: FH supervoxels touched by foreground strokes, or SegVol prompts",
                         config={"method": ["fh", "segvol"], "margin": margin, "k": k,
                                 "free_text": self.segment_name_free_text})
        self.margin = margin
        self.k = k
        self.supervoxels = SupervoxelCache(cache_items)

    def __call__(self, request: Dict[str, Any]):
        started = time.perf_counter()
        method = request.get("method", "fh")
        if isinstance(method, list):
            method = method[0]
        if method not in ("fh", "segvol"):
            raise BadRequestError(f"method must be 'fh' or 'segvol', got {method!r}")
        request = {**request, "k": fh_scale(request.get("k", self.k))}
        scribbles_path = request.get("label")
        if not isinstance(scribbles_path, str) or not scribbles_path:
            raise BadRequestError("scribbles missing: send the scribbles label volume as the `label` file field")
        image = read_image(request["image"])
        scribbles = read_image(scribbles_path).array
        if scribbles.shape != image.array.shape:
            raise BadImageError(f"the scribbles volume {scribbles.shape} does not match the image {image.array.shape}")
        ids = scribble_ids(request.get("label_info"))
        foreground = scribbles == ids[FOREGROUND]
        background = scribbles == ids[BACKGROUND]
        if not foreground.any():
            raise BadPromptError("no foreground scribble: draw on the structure with the foreground_scribbles segment")
        roi = voxel_box(parse_slicer_roi(request.get("roi")))
        timings: Dict[str, float] = {}
        prompts: Dict[str, Any] = {}
        name = SegmentName()
        if method == "fh":
            label = self._fh(image.array, image.affine, foreground, background, roi, request, timings)
        else:
            free_text = requested_free_text({"free_text": request.get("free_text", self.segment_name_free_text)})
            name = parse_segment_name(request.get("selected_label_name"), self.service.vocabulary, free_text)
            label = self._segvol(request, name, foreground, background, roi, timings, prompts)
        if roi is not None:
            keep = np.zeros_like(label)
            keep[roi[0]:roi[3] + 1, roi[1]:roi[4] + 1, roi[2]:roi[5] + 1] = 1
            label = label * keep
        output = write_label_file(label.astype(np.uint8), image.affine, request)
        timings["total"] = round(time.perf_counter() - started, 3)
        return output, {"label_names": {request.get("selected_label_name") or "scribbles": 1}, "method": method,
                        "latencies": timings, "prompts": prompts, "foreground_voxels": int(foreground.sum()),
                        "background_voxels": int(background.sum()), **name.to_json(),
                        "warnings": [name.warning] if name.warning else []}

    def _box(self, shape, foreground: np.ndarray, roi) -> Tuple[slice, slice, slice]:
        if roi is not None:
            low, high = np.array(roi[:3]), np.array(roi[3:])
        else:
            voxels = np.argwhere(foreground)
            low, high = voxels.min(0) - self.margin, voxels.max(0) + self.margin
        low = np.clip(low, 0, np.array(shape) - 1)
        high = np.clip(high, low, np.array(shape) - 1)
        return tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))  # type: ignore[return-value]

    def _fh(self, volume, affine, foreground, background, roi, request, timings) -> np.ndarray:
        started = time.perf_counter()
        box = self._box(volume.shape, foreground, roi)
        supervoxels = self.supervoxels.supervoxels(volume, spacing(affine), box, request["k"])
        timings["supervoxels"] = round(time.perf_counter() - started, 3)
        return fill_from_scribbles(supervoxels, box, foreground, background)

    def _segvol(self, request, name: SegmentName, foreground, background, roi, timings, prompts) -> np.ndarray:
        started = time.perf_counter()
        # The strokes are the prompt here; a segment name the vocabulary does not know adds no text (unless free_text).
        texts = [name.text] if name.text else []
        prompts["text"] = texts[0] if texts else None
        points = [(*p, 1) for p in spread_points(foreground, 5)] + [(*p, 0) for p in spread_points(background, 5)]
        voxels = np.argwhere(foreground)
        box = roi or (*voxels.min(0).tolist(), *voxels.max(0).tolist())
        prompts.update(points=[list(p) for p in points], box=list(box))
        mode = Mode.parse(request.get("zoom", self.service.mode), "zoom").value  # the task's zoom option
        with self.service.session(request["image"], request.get("client_id")) as session:
            result = session.segment(texts=texts or None, box=box, points=points, mode=mode)
        timings["segvol"] = round(time.perf_counter() - started, 3)
        label = (result.label > 0).astype(np.uint8)
        label[foreground] = 1
        label[background] = 0
        return label
