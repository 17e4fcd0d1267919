"""Zoom-out-zoom-in inference: one call segments any number of categories of one CT.

    engine = SegVolEngine(segvol.load_model(checkpoint, device, tokenizer))
    result = engine.segment("ct.nii.gz", texts=["liver", "spleen"], box=[i0, j0, k0, i1, j1, k1],
                            points=[(i, j, k, 1)])
    result.label            # original array shape, 0 = background, result.labels = {"liver": 1, "spleen": 2}

Algorithm (frames in ``segvol.frames``):

1. **Zoom-out**: the whole foreground-cropped CT resized to ``image_size`` is encoded once; every category is decoded
   against it (text + the user's box/points mapped analytically into the zoom frame).
2. **ROI**: per category, the zoom-out foreground (at native resolution) united with the box and positive points;
   the union over categories, plus a context margin, at least one window large, kept inside the volume.
3. **Zoom-in**: a sliding-window grid over the ROI at native resolution. A window is used for a category when it
   holds that category's zoom-out foreground or a user prompt, and is encoded once for all categories (and cached).
   Per window the prompts are the text, the user's box clipped to the window (else the tight box of the zoom-out
   foreground in it) and every user point, positive or negative, that falls inside it.
4. **Blend**: window probabilities are averaged with a Gaussian weight and pasted into the zoom-out probabilities;
   categories are merged by highest probability (> 0.5), and the label map is mapped back to the original array.

Caches (bounded in bytes): prepared images (by content or file identity), image embeddings (by content and window),
decoder outputs (by window and prompt), text embeddings (in the model). A second click on the same image re-runs the
zoom-out decoder and only the windows whose prompts changed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import BadImageError, BadPromptError, BadRequestError, BadTextError
from .frames import AxisMap, Window, bounding_box, clip_box
from .io import Volume, read_image, source_signature
from .preprocess import PreparedImage, check_volume, content_key, preprocess
from .windows import Grid, gaussian_weight, grow_roi, union_box

MODES = ("zoom_out", "zoom_out_zoom_in")
OBJECT_LABEL = "object"  # the single label of a call with a box/points and no text

logger = logging.getLogger("segvol.engine")


class ByteLRU:
    """Least-recently-used mapping bounded by the bytes of its values (an entry larger than the bound is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, int(nbytes))
        self.nbytes += int(nbytes)
        while self.nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class NativePrompts:
    """The user's spatial prompts in the native frame: an inclusive box, points (N, 3) and labels (N,) 1/0."""

    box: Optional[np.ndarray]
    points: np.ndarray
    labels: np.ndarray
    dropped: List[str] = field(default_factory=list)

    @property
    def positive(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def extent(self) -> Optional[np.ndarray]:
        """Inclusive box around the user's box and positive points (negative points do not grow the ROI)."""
        boxes = [self.box]
        if len(self.positive):
            rounded = np.rint(self.positive).astype(np.int64)
            boxes.append(np.concatenate([rounded.min(0), rounded.max(0)]))
        return union_box(boxes)

    def any(self) -> bool:
        return self.box is not None or len(self.points) > 0


class PackedMask:
    """A 3-D boolean mask stored 8 voxels per byte (a category's zoom-out foreground can span the whole CT)."""

    def __init__(self, mask: np.ndarray):
        self.shape = tuple(mask.shape)
        self.bits = np.packbits(mask, axis=-1)

    def region(self, low, high) -> np.ndarray:
        """The mask on ``[low, high)`` (per axis) as a bool array."""
        (d0, h0, w0), (d1, h1, w1) = [int(v) for v in low], [int(v) for v in high]
        packed = self.bits[d0:d1, h0:h1, w0 // 8:(w1 + 7) // 8]
        return np.unpackbits(packed, axis=-1)[..., w0 % 8:w0 % 8 + (w1 - w0)].astype(bool)


@dataclass
class CategoryPlan:
    """Zoom-out outcome of one category: its logits in the zoom frame and its foreground at native resolution."""

    name: str
    value: int
    zoom_logits: torch.Tensor  # (Z0, Z1, Z2) on the model device
    support: Optional[np.ndarray] = None  # native box where zoom-out logits can be > 0
    foreground: Optional["PackedMask"] = None  # over ``support``
    foreground_box: Optional[np.ndarray] = None  # tight native box of the zoom-out foreground
    windows: List[int] = field(default_factory=list)  # indices into ZoomInPlan.windows

    def _overlap(self, window: Window):
        """(low, high) native corners of the window's part inside ``support``, or None."""
        low = np.maximum(np.asarray(window.start), self.support[:3])
        high = np.minimum(np.asarray(window.stop), self.support[3:] + 1)
        return None if np.any(high <= low) else (low, high)

    def has_foreground(self, window: Window) -> bool:
        if self.foreground_box is None or window.box_to_window(self.foreground_box) is None:
            return False
        low, high = self._overlap(window)
        return bool(self.foreground.region(low - self.support[:3], high - self.support[:3]).any())

    def foreground_in(self, window: Window) -> Optional[np.ndarray]:
        """Boolean zoom-out foreground on the window's valid voxels (None when there is none)."""
        if not self.has_foreground(window):
            return None
        low, high = self._overlap(window)
        part = self.foreground.region(low - self.support[:3], high - self.support[:3])
        out = np.zeros(window.valid_shape, dtype=bool)
        out[tuple(slice(a - w, b - w) for a, b, w in zip(low, high, window.start))] = part
        return out


@dataclass
class ZoomInPlan:
    """Where zoom-in work happens: the core ROI (foreground united with prompts), the grown ROI and the grid."""

    core: Optional[np.ndarray] = None
    roi: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    grid: Optional[Grid] = None
    windows: List[Window] = field(default_factory=list)  # every window of the grid
    used: List[int] = field(default_factory=list)  # indices of the windows run for at least one category
    reused_grid: bool = False

    @property
    def skipped(self) -> int:
        return len(self.windows) - len(self.used)


@dataclass
class SegmentationResult:
    """``label``: the original array's shape (uint8, uint16 past 255 labels), 0 = background; ``labels``: name ->
    value; ``probabilities``: name -> float32 map on the original grid (when asked); ``stats``: timings and counts."""

    label: np.ndarray
    affine: Optional[np.ndarray]
    labels: Dict[str, int]
    probabilities: Optional[Dict[str, np.ndarray]] = None
    stats: Dict[str, Any] = field(default_factory=dict)
    plan: Optional[ZoomInPlan] = None
    header: Any = None  # the input NIfTI header, for writing the label next to it


ImageInput = Union[str, os.PathLike, Volume, np.ndarray, PreparedImage]


class SegVolEngine:
    """SegVol inference with caching; see the module docstring.

    ``model``: a ``segvol.SegVol`` (``segvol.load_model``); ``mode``: ``zoom_out_zoom_in`` (default) or ``zoom_out``
    (fast preview); ``overlap``: of the zoom-in windows (the reference's 0.5); ``cache_mb``: bound of the image
    embedding, decoder output and blending caches together; ``image_cache_mb``: bound of the prepared-image cache;
    ``roi_margin``: context voxels added around the ROI (default 1/8 of the window); ``reorient``: RAS before the
    reference axis swap (False: the stored array order, like the reference demo); ``amp``: float16 autocast of the
    image encoder on CUDA when no ``precision`` is given (default on; the decoder always runs in float32);
    ``precision``: ``fp32``/``bf16``/``fp16``/``int8`` image encoder (``segvol.accel.accelerate``; None keeps the
    model's current backend, exact float32 unless one was attached); ``encode_batch``: zoom-in windows encoded per
    encoder forward (default 8 on CUDA, 1 on CPU where a batch costs the same per window); ``reuse_windows``: on a new call for an image already seen, keep an earlier grid when it covers
    the new ROI and needs fewer encoder forwards, and re-blend only the windows whose prompts changed (False: every
    call plans and blends from scratch, so results never depend on earlier calls). ``segment`` calls are serialised.
    """

    def __init__(self, model, mode: str = "zoom_out_zoom_in", overlap: float = 0.5, cache_mb: float = 2048,
                 image_cache_mb: float = 1024, roi_margin: Optional[Sequence[int]] = None, reorient: bool = True,
                 sigma_scale: float = 0.125, amp: Optional[bool] = None, reuse_windows: bool = True,
                 precision: Optional[str] = None, encode_batch: Optional[int] = None):
        if mode not in MODES:
            raise BadRequestError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
        if not 0.0 <= overlap < 1.0:
            raise BadRequestError(f"overlap must be in [0, 1), got {overlap}")
        self.model = model.eval()
        if precision is not None:
            from .accel import accelerate

            accelerate(model, precision)
        self.window_size = tuple(int(s) for s in model.config.image_size)
        self.mode = mode
        self.overlap = float(overlap)
        self.roi_margin = tuple(int(m) for m in (roi_margin or [s // 8 for s in self.window_size]))
        self.reorient = bool(reorient)
        self.sigma_scale = float(sigma_scale)
        self.amp = (model.device.type == "cuda") if amp is None else bool(amp) and model.device.type == "cuda"
        self.reuse_windows = bool(reuse_windows)
        self.images = ByteLRU(int(image_cache_mb * 2 ** 20))
        # image embeddings (6 MB per window officially), decoder outputs (0.5 MB each), blending sums (8 bytes per
        # voxel of a category's windows)
        self.embeddings = ByteLRU(int(cache_mb * 2 ** 20 * 0.55))
        self.decodes = ByteLRU(int(cache_mb * 2 ** 20 * 0.1))
        self.blends = ByteLRU(int(cache_mb * 2 ** 20 * 0.35))
        self._sources: "OrderedDict[str, str]" = OrderedDict()  # file identity -> content key
        self._grids: "OrderedDict[str, List[Grid]]" = OrderedDict()  # content key -> grids used, newest first
        backend = getattr(model, "encoder_backend", None)
        self.precision = backend.precision if backend is not None else "fp32"
        if backend is not None:
            self.amp = False  # the backend decides the encoder's precision
        # cached embeddings of one precision are never served to another
        self._model_tag = str(getattr(model, "checkpoint_id", None) or id(model)) + (
            "" if backend is None else f"|{backend.tag}")
        self.encode_batch = max(1, int(encode_batch or (8 if model.device.type == "cuda" else 1)))
        self._counters: Dict[str, int] = {}
        self.progress_after_s = 2.0
        self.window_block = 8  # windows encoded before their decodes run together
        self.decode_batch = 4  # prompt sets per decoder call (bounds the decoder's activation memory)
        self._lock = threading.RLock()  # one segment() at a time: the caches and counters are shared

    # ---------------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        for cache in (self.images, self.embeddings, self.decodes, self.blends):
            cache.clear()
        self._sources.clear()
        self._grids.clear()

    def prepare(self, image: ImageInput, affine: Optional[np.ndarray] = None) -> Tuple[PreparedImage, Dict[str, Any]]:
        """Any image input -> (cached) ``PreparedImage`` and ``{"affine", "header", "source"}`` of the original."""
        if isinstance(image, PreparedImage):
            return image, {"affine": image.affine, "header": None, "source": None}
        source = header = None
        signature = None
        if isinstance(image, (str, os.PathLike)):
            source = os.fspath(image)
            signature = source_signature(source)
            if signature is not None:
                key = self._sources.get(f"{signature}|{self.reorient}")
                cached = self.images.get(key) if key else None
                if cached is not None:
                    return cached, {"affine": cached.affine, "header": cached.stats.get("header"), "source": source}
            volume = read_image(source)
            array, affine, header = volume.array, volume.affine, volume.header
        elif isinstance(image, Volume):
            array, affine, header, source = image.array, image.affine, image.header, image.source
        elif isinstance(image, np.ndarray) or torch.is_tensor(image):
            array = image.numpy() if torch.is_tensor(image) else image
        else:
            raise BadImageError(f"unsupported image input of type {type(image).__name__}: pass a path, a "
                                "segvol.io.Volume or a 3-D array with its affine")
        array = check_volume(array)
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise BadImageError("the affine must be a finite, invertible 4x4 matrix")
        axis_map = AxisMap.from_affine(affine, array.shape, reorient=self.reorient)
        key = content_key(array, axis_map, self.window_size)
        prepared = self.images.get(key)
        if prepared is None:
            prepared = preprocess(array, affine, self.window_size, reorient=self.reorient, key=key)
            prepared.stats["header"] = header
            self.images.put(key, prepared, prepared.nbytes)
        if signature is not None:
            self._sources[f"{signature}|{self.reorient}"] = key
            while len(self._sources) > 256:
                self._sources.popitem(last=False)
        return prepared, {"affine": affine, "header": header, "source": source}

    def segment(self, image: ImageInput, texts: Optional[Union[str, Sequence[str]]] = None,
                box: Optional[Sequence[float]] = None, points=None, *, affine: Optional[np.ndarray] = None,
                mode: Optional[str] = None, return_probabilities: bool = False) -> SegmentationResult:
        """Segment ``texts`` (category names) and/or the object given by ``box`` / ``points``.

        ``box``: ``[i0, j0, k0, i1, j1, k1]``, inclusive voxel indices of the image array as stored (one box for the
        call, applied to every text); ``points``: ``[(i, j, k, label), ...]`` or ``(coords (N, 3), labels (N,))``
        with label 1 (positive) or 0 (negative). With no text, the result is the single label ``"object"``.
        """
        with self._lock:
            return self._segment(image, texts, box, points, affine, mode, return_probabilities)

    def _segment(self, image, texts, box, points, affine, mode, return_probabilities) -> SegmentationResult:
        mode = mode or self.mode
        if mode not in MODES:
            raise BadRequestError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
        names = _check_texts(texts)
        self._counters = {"encoder_forwards": 0, "decoder_calls": 0, "decoded_prompts": 0, "decoder_cache_hits": 0,
                          "embedding_cache_hits": 0}
        seconds: Dict[str, float] = {}
        clock = _Clock(seconds)
        with torch.inference_mode():
            with clock("preprocess"):
                prepared, original = self.prepare(image, affine)
            prompts = self._native_prompts(prepared, box, points)
            if names is None and not prompts.any():
                if prompts.dropped:
                    raise BadPromptError("every box and point lies outside the body (the region above the minimum "
                                         "intensity): nothing there to segment")
                raise BadRequestError("nothing to segment: give at least one text, a box or a point")
            categories = [OBJECT_LABEL] if names is None else names
            plans = self._zoom_out(prepared, categories, names is not None, prompts, clock)
            zoom_in = ZoomInPlan()
            window_logits: Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]] = {}
            if mode == "zoom_out_zoom_in":
                with clock("plan"):
                    zoom_in = self._plan(prepared, plans, prompts)
                window_logits = self._zoom_in(prepared, plans, prompts, zoom_in, names is not None, seconds)
            with clock("blend"):
                label_native, probabilities = self._blend(prepared, plans, zoom_in, window_logits,
                                                          return_probabilities)
            with clock("output"):
                label = prepared.frames.native_to_original_array(label_native)
                if probabilities is not None:
                    probabilities = {name: prepared.frames.native_to_original_array(p)
                                     for name, p in probabilities.items()}
        seconds["total"] = sum(v for k, v in seconds.items())
        stats = {
            "mode": mode,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            **self._counters,
            "windows": {
                "grid": len(zoom_in.windows),
                "used": len(zoom_in.used),
                "skipped": zoom_in.skipped,
                "reused_grid": zoom_in.reused_grid,
                "per_label": {p.name: len(p.windows) for p in plans},
            },
            "prompts_dropped": prompts.dropped,
            "native_shape": list(prepared.frames.native_shape),
        }
        return SegmentationResult(label=label, affine=original["affine"], labels={p.name: p.value for p in plans},
                                  probabilities=probabilities, stats=stats, plan=zoom_in, header=original["header"])

    # ---------------------------------------------------------------------------------------------------------------
    # prompts
    # ---------------------------------------------------------------------------------------------------------------
    def _native_prompts(self, prepared: PreparedImage, box, points) -> NativePrompts:
        """Validate prompts in the original array's voxel indices and map them to the native frame."""
        frames = prepared.frames
        shape = np.asarray(frames.original_shape)
        dropped: List[str] = []
        native_box = None
        if box is not None:
            values = np.asarray(box, dtype=np.float64).reshape(-1)
            if values.size != 6 or not np.isfinite(values).all():
                raise BadPromptError(f"a box is 6 finite numbers [i0, j0, k0, i1, j1, k1], got {list(values)}")
            low, high = values[:3], values[3:]
            if np.any(low > high):
                raise BadPromptError(f"inverted box {values.tolist()}: need i0 <= i1, j0 <= j1, k0 <= k1")
            if np.any(low < 0) or np.any(high > shape - 1):
                raise BadPromptError(f"box {values.tolist()} is outside the image (valid indices 0..{list(shape - 1)})")
            native_box = frames.original_to_native_box(np.concatenate([np.floor(low), np.ceil(high)]))
            if native_box is None:
                dropped.append("box: outside the body (foreground) region")
        coords, labels = _parse_points(points)
        if len(coords):
            outside = np.any(coords < 0, axis=1) | np.any(coords > shape - 1, axis=1)
            if outside.any():
                raise BadPromptError(f"point {coords[outside][0].tolist()} is outside the image "
                                     f"(valid indices 0..{list(shape - 1)})")
            model_points = frames.axis_map.points_to_model(coords)
            inside = frames.crop.contains(model_points)
            for point in coords[~inside]:
                dropped.append(f"point {point.tolist()}: outside the body (foreground) region")
            coords, labels = frames.crop.points_to_native(model_points[inside]), labels[inside]
        return NativePrompts(native_box, coords.reshape(-1, 3), labels.astype(np.int64), dropped)

    # ---------------------------------------------------------------------------------------------------------------
    # model calls
    # ---------------------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _embedding(self, prepared: PreparedImage, where: Hashable, image: torch.Tensor) -> torch.Tensor:
        key = (self._model_tag, prepared.key, where)
        embedding = self.embeddings.get(key)
        if embedding is not None:
            self._counters["embedding_cache_hits"] += 1
            return embedding
        with self._autocast():
            embedding = self.model.encode_image(image.to(self.model.device)).float()
        self._counters["encoder_forwards"] += 1
        self.embeddings.put(key, embedding, _tensor_bytes(embedding))
        return embedding

    def _encode_windows(self, prepared: PreparedImage, windows: List[Window]) -> Dict[Tuple[int, ...], torch.Tensor]:
        """Encode the windows whose embeddings are not cached, ``encode_batch`` per encoder forward (batched
        zoom-in on a GPU); -> window start -> embedding (1, C, g...) of the windows encoded, also put in the cache."""
        todo = [w for w in windows if (self._model_tag, prepared.key, w.start) not in self.embeddings]
        encoded: Dict[Tuple[int, ...], torch.Tensor] = {}
        for first in range(0, len(todo), self.encode_batch):
            chunk = todo[first:first + self.encode_batch]
            images = torch.stack([torch.from_numpy(w.extract(prepared.native))[None] for w in chunk])
            with self._autocast():
                embeddings = self.model.encode_image(images.to(self.model.device)).float()
            self._counters["encoder_forwards"] += len(chunk)
            for window, embedding in zip(chunk, embeddings):
                embedding = embedding[None].clone()
                self.embeddings.put((self._model_tag, prepared.key, window.start), embedding,
                                    _tensor_bytes(embedding))
                encoded[window.start] = embedding
        return encoded

    def _decode(self, embedding, text_embedding, boxes, points) -> torch.Tensor:
        # float32 decoder: in bf16/fp16 its masks lose Dice (0.971 measured) for a few hundredths of a second
        low_res = self.model.decode(embedding, text_embedding, boxes, points).float()
        self._counters["decoder_calls"] += 1
        self._counters["decoded_prompts"] += low_res.shape[0]
        return low_res

    def _text(self, names: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(list(names))

    # ---------------------------------------------------------------------------------------------------------------
    # zoom-out
    # ---------------------------------------------------------------------------------------------------------------
    def _zoom_out(self, prepared: PreparedImage, categories: List[str], with_text: bool, prompts: NativePrompts,
                  clock: "_Clock") -> List[CategoryPlan]:
        """Encode the zoom-out view (or reuse it), decode every category, and find each one's foreground."""
        with clock("zoom_out_encode"):
            embedding = self._embedding(prepared, "zoom_out", prepared.zoom_out)
        with clock("zoom_out_decode"):
            return self._zoom_out_decode(prepared, embedding, categories, with_text, prompts)

    def _zoom_out_decode(self, prepared: PreparedImage, embedding: torch.Tensor, categories: List[str],
                         with_text: bool, prompts: NativePrompts) -> List[CategoryPlan]:
        frames = prepared.frames
        count = len(categories)
        device = self.model.device
        text = self._text(categories) if with_text else None
        boxes = None
        if prompts.box is not None:
            boxes = torch.as_tensor(frames.native_to_zoom_box(prompts.box), dtype=torch.float32,
                                    device=device).reshape(1, 6).expand(count, 6)
        point_prompt = None
        if len(prompts.points):
            coords = torch.as_tensor(frames.native_to_zoom_points(prompts.points), dtype=torch.float32, device=device)
            labels = torch.as_tensor(prompts.labels, dtype=torch.float32, device=device)
            point_prompt = (coords[None].expand(count, -1, -1), labels[None].expand(count, -1))
        low_res = torch.cat([
            self._decode(embedding, None if text is None else text[i:i + self.decode_batch],
                         None if boxes is None else boxes[i:i + self.decode_batch],
                         None if point_prompt is None else (point_prompt[0][i:i + self.decode_batch],
                                                            point_prompt[1][i:i + self.decode_batch]))
            for i in range(0, count, self.decode_batch)])
        logits = self.model.upsample(low_res)[:, 0]  # (B, Z0, Z1, Z2)
        plans = []
        for index, name in enumerate(categories):
            plan = CategoryPlan(name=name, value=index + 1, zoom_logits=logits[index])
            zoom_box = bounding_box((plan.zoom_logits > 0).cpu().numpy())
            if zoom_box is not None:
                plan.support = frames.zoom.native_support(zoom_box)
                native_logits = frames.zoom.upsample_region(plan.zoom_logits, plan.support)
                mask = (native_logits > 0).cpu().numpy()
                del native_logits
                tight = bounding_box(mask)
                plan.foreground = PackedMask(mask)
                if tight is not None:
                    plan.foreground_box = tight + np.tile(plan.support[:3], 2)
            plans.append(plan)
        return plans

    # ---------------------------------------------------------------------------------------------------------------
    # zoom-in planning
    # ---------------------------------------------------------------------------------------------------------------
    def _plan(self, prepared: PreparedImage, plans: List[CategoryPlan], prompts: NativePrompts) -> ZoomInPlan:
        shape = prepared.frames.native_shape
        core = union_box([p.foreground_box for p in plans] + [prompts.extent])
        if core is None:
            return ZoomInPlan()
        roi = grow_roi(core, shape, self.window_size, self.roi_margin, self.overlap)
        candidates: List[Tuple[Grid, bool]] = []
        if self.reuse_windows:
            candidates += [(grid, True) for grid in self._grids.get(prepared.key, []) if grid.covers(core)]
        candidates.append((Grid.over(roi, shape, self.window_size, self.overlap), False))
        best = None
        for grid, reused in candidates:
            windows = grid.windows()
            active = [self._active_windows(plan, windows, prompts) for plan in plans]
            used = sorted(set().union(*active))
            uncached = sum((self._model_tag, prepared.key, windows[i].start) not in self.embeddings for i in used)
            cost = (uncached, len(used))
            if best is None or cost < best[0]:
                best = (cost, grid, reused, windows, active, used)
        _, grid, reused, windows, active, used = best
        for plan, indices in zip(plans, active):
            plan.windows = indices
        history = [g for g in self._grids.pop(prepared.key, []) if g != grid]
        self._grids[prepared.key] = [grid] + history[:3]
        while len(self._grids) > 64:
            self._grids.popitem(last=False)
        return ZoomInPlan(core=core, roi=roi, grid=grid, windows=windows, used=used, reused_grid=reused)

    @staticmethod
    def _active_windows(plan: CategoryPlan, windows: List[Window], prompts: NativePrompts) -> List[int]:
        """Windows that hold this category's zoom-out foreground or a user prompt (box or positive point)."""
        active = []
        for index, window in enumerate(windows):
            if prompts.box is not None and window.box_to_window(prompts.box) is not None:
                active.append(index)
            elif len(prompts.positive) and window.contains(prompts.positive).any():
                active.append(index)
            elif plan.has_foreground(window):
                active.append(index)
        return active

    # ---------------------------------------------------------------------------------------------------------------
    # zoom-in
    # ---------------------------------------------------------------------------------------------------------------
    def _window_prompts(self, plan: CategoryPlan, window: Window, prompts: NativePrompts):
        """(box in window coordinates or None, (coords, labels) or None) for one category in one window."""
        box = window.box_to_window(prompts.box) if prompts.box is not None else None
        if box is None:
            foreground = plan.foreground_in(window)
            if foreground is not None:
                box = bounding_box(foreground) + np.tile(np.asarray(window.pad_before), 2)
        points = None
        if len(prompts.points):
            inside = window.contains(prompts.points)
            if inside.any():
                points = (window.points_to_window(prompts.points[inside]), prompts.labels[inside])
        return box, points

    def _zoom_in(self, prepared: PreparedImage, plans: List[CategoryPlan], prompts: NativePrompts, zoom_in: ZoomInPlan,
                 with_text: bool, seconds: Dict[str, float]) -> Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]]:
        """Run every used window once: encode (or reuse), decode each category needing it. -> low-res logits.

        Windows go in blocks of ``window_block``: encode the block's windows, then decode all their requests
        together, batched across windows and categories (a batch of prompt sets costs about half per set on CPU).
        """
        out: Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]] = {}
        seconds.setdefault("zoom_in_encode", 0.0)
        seconds.setdefault("zoom_in_decode", 0.0)
        if not zoom_in.used:
            return out
        text_embeddings = dict(zip([p.name for p in plans], self._text([p.name for p in plans]))) if with_text else {}
        started = time.perf_counter()
        for first in range(0, len(zoom_in.used), self.window_block):
            block = zoom_in.used[first:first + self.window_block]
            requests = []  # (window index, plan, box, points, cache key, embedding)
            work = []  # (step, window index, window, categories needing it, pending decoder requests)
            for step, index in enumerate(block, start=first):
                window = zoom_in.windows[index]
                needing = [p for p in plans if index in p.windows]
                pending = []
                for plan in needing:
                    box, points = self._window_prompts(plan, window, prompts)
                    key = (self._model_tag, prepared.key, window.start, plan.name if with_text else None,
                           None if box is None else tuple(int(v) for v in box),
                           None if points is None else (points[0].round(4).tobytes(), points[1].tobytes()))
                    cached = self.decodes.get(key)
                    if cached is not None:
                        self._counters["decoder_cache_hits"] += 1
                        out[(index, plan.name)] = (key, cached)
                    elif box is not None or points is not None or with_text:
                        pending.append((index, plan, box, points, key))
                work.append((step, index, window, needing, pending))
            fresh: Dict[Tuple[int, int, int], torch.Tensor] = {}
            if self.encode_batch > 1:  # GPU: the block's windows to decode in batched encoder forwards
                tick = time.perf_counter()
                fresh = self._encode_windows(prepared, [window for _, _, window, _, pending in work if pending])
                seconds["zoom_in_encode"] += time.perf_counter() - tick
            for step, index, window, needing, pending in work:
                if pending:
                    tick = time.perf_counter()
                    embedding = fresh.get(window.start)
                    if embedding is None:
                        image = torch.from_numpy(window.extract(prepared.native))[None, None]
                        embedding = self._embedding(prepared, window.start, image)
                    requests += [request + (embedding,) for request in pending]
                    seconds["zoom_in_encode"] += time.perf_counter() - tick
                elapsed = time.perf_counter() - started
                # Per-window progress is INFO once a run is long enough for someone to wait on it, DEBUG before.
                logger.log(logging.INFO if elapsed > self.progress_after_s else logging.DEBUG,
                           "zoom-in window %d/%d at %s for %s: %s, %.1fs elapsed, about %.0fs left", step + 1,
                           len(zoom_in.used), window.start, ", ".join(p.name for p in needing),
                           "to decode" if pending else "all cached", elapsed,
                           elapsed / (step + 1) * (len(zoom_in.used) - step - 1))
            tick = time.perf_counter()
            self._decode_requests(requests, text_embeddings if with_text else None, out)
            seconds["zoom_in_decode"] += time.perf_counter() - tick
        return out

    def _decode_requests(self, requests, text_embeddings, out) -> None:
        """Decode window requests in batches of the same prompt structure (box or not, number of points)."""
        device = self.model.device
        groups: Dict[Tuple[bool, int], list] = {}
        for request in requests:
            points = request[3]
            groups.setdefault((request[2] is not None, 0 if points is None else len(points[1])), []).append(request)
        for (has_box, point_count), group in groups.items():
            for start in range(0, len(group), self.decode_batch):
                chunk = group[start:start + self.decode_batch]
                embedding = torch.cat([r[5] for r in chunk])
                text = torch.stack([text_embeddings[r[1].name] for r in chunk]) if text_embeddings else None
                boxes = None
                if has_box:
                    boxes = torch.as_tensor(np.stack([r[2] for r in chunk]), dtype=torch.float32, device=device)
                point_prompt = None
                if point_count:
                    coords = torch.as_tensor(np.stack([r[3][0] for r in chunk]), dtype=torch.float32, device=device)
                    labels = torch.as_tensor(np.stack([r[3][1] for r in chunk]), dtype=torch.float32, device=device)
                    point_prompt = (coords, labels)
                low_res = self._decode(embedding, text, boxes, point_prompt)
                for (index, plan, _, _, key, _), logits in zip(chunk, low_res):
                    logits = logits[None].clone()  # its own storage: the cache must not pin the whole batch
                    self.decodes.put(key, logits, _tensor_bytes(logits))
                    out[(index, plan.name)] = (key, logits)

    # ---------------------------------------------------------------------------------------------------------------
    # blending and merging
    # ---------------------------------------------------------------------------------------------------------------
    def _window_contribution(self, window: Window, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res window logits (1, 1, *low_res_size) -> Gaussian weight x probability on the window's valid voxels
        (CPU float32)."""
        logits = self.model.upsample(low_res.to(self.model.device))[0, 0][window.window_slices]
        weight = torch.from_numpy(gaussian_weight(window, self.sigma_scale))
        return torch.sigmoid(logits).float().cpu().mul_(weight)

    @staticmethod
    def _state_slices(state: "_BlendState", window: Window):
        return tuple(slice(a - r, b - r) for a, b, r in zip(window.start, window.stop, state.box[:3]))

    def _blend_windows(self, prepared: PreparedImage, plan: CategoryPlan, windows: List[Window],
                       outputs: Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]]) -> "_BlendState":
        """Gaussian-weighted sums of window probabilities over the windows' bounding box.

        The sums of the last call for this image and category are kept (``reuse_windows``): when the same windows
        are active again, only the windows whose prompts changed are re-blended (their old contribution removed,
        the new one added), which is what makes a new click cheap on a large ROI.
        """
        box = union_box([np.concatenate([w.start, np.asarray(w.stop) - 1]) for w in windows])
        starts = tuple(w.start for w in windows)
        keys = {w.start: outputs[(i, plan.name)][0] for i, w in zip(plan.windows, windows)}
        logits = {w.start: outputs[(i, plan.name)][1] for i, w in zip(plan.windows, windows)}
        state_key = (self._model_tag, prepared.key, plan.name)
        state = self.blends.get(state_key) if self.reuse_windows else None
        if state is not None and state.starts == starts and np.array_equal(state.box, box):
            total = torch.from_numpy(state.total)
            for window in windows:
                if state.keys[window.start] != keys[window.start]:
                    change = self._window_contribution(window, logits[window.start])
                    change -= self._window_contribution(window, state.logits[window.start])
                    total[self._state_slices(state, window)] += change
            state.keys, state.logits = keys, logits
            return state
        shape = tuple(int(b - a + 1) for a, b in zip(box[:3], box[3:]))
        state = _BlendState(starts, box, keys, logits, np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        total, weight_sum = torch.from_numpy(state.total), torch.from_numpy(state.weight_sum)
        for window in windows:
            where = self._state_slices(state, window)
            total[where] += self._window_contribution(window, logits[window.start])
            weight_sum[where] += torch.from_numpy(gaussian_weight(window, self.sigma_scale))
        if self.reuse_windows:
            self.blends.put(state_key, state, state.nbytes)
        return state

    def _blend(self, prepared: PreparedImage, plans: List[CategoryPlan], zoom_in: ZoomInPlan,
               outputs: Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]], return_probabilities: bool):
        """-> (native label map, native probabilities per category or None).

        Per category: window probabilities (Gaussian-blended) where windows ran, zoom-out probabilities elsewhere;
        a voxel takes the label of the category with the highest probability, when that is above 0.5.
        """
        frames = prepared.frames
        shape = frames.native_shape
        label = np.zeros(shape, dtype=np.uint8 if len(plans) < 256 else np.uint16)
        best = np.zeros(shape, dtype=np.float32)  # zero pages cost no memory until a region is written
        probabilities = {} if return_probabilities else None
        first = True
        for plan in plans:
            windows = [zoom_in.windows[i] for i in plan.windows]
            state = self._blend_windows(prepared, plan, windows, outputs) if windows else None
            if return_probabilities:
                full = frames.zoom.upsample_region(plan.zoom_logits, [0, 0, 0, *np.subtract(shape, 1)])
                probabilities[plan.name] = torch.sigmoid(full).cpu().numpy()
            # Outside the zoom-out support and the windows every probability is <= 0.5: background for sure.
            region = union_box([plan.support, None if state is None else state.box])
            if region is None:
                continue
            region_slices = tuple(slice(a, b + 1) for a, b in zip(region[:3], region[3:]))
            # torch views of the numpy arrays: the element-wise work below runs on every core
            if state is not None:
                weight_sum = torch.from_numpy(state.weight_sum)
                inside = weight_sum > 0
                blended = torch.where(inside, torch.from_numpy(state.total) / weight_sum, 0.0)
            if state is not None and np.array_equal(state.box, region):  # no zoom-out voxels outside the windows
                probability, covered = blended, inside
            else:
                probability = torch.zeros(tuple(int(b - a + 1) for a, b in zip(region[:3], region[3:])))
                covered = torch.zeros(probability.shape, dtype=torch.bool)
                if state is not None:
                    where = tuple(slice(a - r, b + 1 - r) for a, b, r in zip(state.box[:3], state.box[3:], region[:3]))
                    covered[where] = inside
                    probability[where] = blended
            if plan.support is not None:
                # zoom-out probabilities where no window ran, computed only over those voxels' bounding box
                support = tuple(slice(a - r, b + 1 - r) for a, b, r in zip(plan.support[:3], plan.support[3:],
                                                                            region[:3]))
                uncovered = ~covered[support]
                todo = bounding_box(uncovered.numpy()) if uncovered.any() else None
                if todo is not None:
                    todo_slices = tuple(slice(a, b + 1) for a, b in zip(todo[:3], todo[3:]))
                    native_box = todo + np.tile(plan.support[:3], 2)
                    base = torch.sigmoid(frames.zoom.upsample_region(plan.zoom_logits, native_box)).float().cpu()
                    target = probability[support][todo_slices]
                    mask = uncovered[todo_slices]
                    target[mask] = base[mask]
            if probabilities is not None:
                target = torch.from_numpy(probabilities[plan.name])[region_slices]
                target[covered] = probability[covered]
            if first:  # nothing labelled yet: no comparison with earlier categories
                wins = probability > 0.5
            else:
                best_region = torch.from_numpy(best)[region_slices]
                wins = (probability > 0.5) & (probability > best_region)
            if label.dtype == np.uint8:
                torch.from_numpy(label)[region_slices].masked_fill_(wins, plan.value)
            else:  # uint16 (256 categories or more): torch has few kernels for it
                label[region_slices][wins.numpy()] = plan.value
            if plan is not plans[-1]:  # the best probability so far only matters to later categories
                best_region = torch.from_numpy(best)[region_slices]
                best_region.copy_(torch.where(wins, probability, best_region))
            first = False
        return label, probabilities


@dataclass
class _BlendState:
    """Blending sums of one category over the bounding box of its active windows (see ``_blend_windows``)."""

    starts: Tuple[Tuple[int, int, int], ...]
    box: np.ndarray
    keys: Dict[Tuple[int, int, int], Hashable]
    logits: Dict[Tuple[int, int, int], torch.Tensor]
    total: np.ndarray
    weight_sum: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.total.nbytes + self.weight_sum.nbytes + sum(_tensor_bytes(t) for t in self.logits.values()))


class _Clock:
    """``with clock("stage"):`` adds the stage's wall seconds to a dict."""

    def __init__(self, seconds: Dict[str, float]):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _check_texts(texts) -> Optional[List[str]]:
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise BadTextError(f"texts must be a list of category names, got {type(texts).__name__}") from None
    if not texts:
        raise BadTextError("the text list is empty: give at least one category name (or pass texts=None with a "
                           "box or points)")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise BadTextError(f"category names must be non-empty strings, got {text!r}")
    return list(dict.fromkeys(t.strip() for t in texts))  # duplicates would only repeat a label


def _parse_points(points) -> Tuple[np.ndarray, np.ndarray]:
    """``[(i, j, k, label), ...]`` or ``(coords (N, 3), labels (N,))`` -> float (N, 3), int (N,)."""
    if points is None:
        return np.zeros((0, 3)), np.zeros((0,), dtype=np.int64)
    try:
        if isinstance(points, tuple) and len(points) == 2 and np.ndim(points[0]) == 2:
            coords = np.asarray(points[0], dtype=np.float64).reshape(-1, 3)
            labels = np.asarray(points[1], dtype=np.float64).reshape(-1)
        else:
            rows = np.asarray([list(p) for p in points], dtype=np.float64)
            if rows.size == 0:
                return np.zeros((0, 3)), np.zeros((0,), dtype=np.int64)
            if rows.ndim != 2 or rows.shape[1] != 4:
                raise ValueError
            coords, labels = rows[:, :3], rows[:, 3]
    except (TypeError, ValueError):
        raise BadPromptError("points must be [(i, j, k, label), ...] or (coords (N, 3), labels (N,)) with label "
                             "1 (positive) or 0 (negative)") from None
    if len(coords) != len(labels):
        raise BadPromptError(f"{len(coords)} point coordinates but {len(labels)} labels")
    if not np.isfinite(coords).all():
        raise BadPromptError("point coordinates must be finite numbers")
    if not np.isin(labels, (0, 1)).all():
        raise BadPromptError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels.tolist()))}")
    return coords, labels.astype(np.int64)
