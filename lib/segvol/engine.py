"""Zoom-out-zoom-in inference: the engine owns the model and the content-keyed caches; an ``ImageSession`` (from
``engine.open``) owns one image's state and runs the requests on it.

    engine = SegVolEngine(segvol.load_model(checkpoint, device, tokenizer))
    session = engine.open("ct.nii.gz")
    result = session.segment(texts=["liver", "spleen"], box=[i0, j0, k0, i1, j1, k1], points=[(i, j, k, 1)])
    result.label            # original array shape, 0 = background, result.labels = {"liver": 1, "spleen": 2}
    engine.segment("ct.nii.gz", texts=["liver"])   # open + segment, for one-off calls

Algorithm (frames in ``segvol.frames``; steps in ``segvol.session``):

1. **Zoom-out**: the whole foreground-cropped CT resized to ``image_size`` is encoded once; every category is decoded
   against it (text + the user's box/points mapped analytically into the zoom frame).
2. **ROI**: per category, the zoom-out foreground (at native resolution) united with the box and positive points;
   the union over categories, plus a context margin, at least one window large, kept inside the volume
   (``segvol.windows``).
3. **Zoom-in**: a sliding-window grid over the ROI at native resolution. A window is used for a category when it
   holds that category's zoom-out foreground or a user prompt, and is encoded once for all categories (and cached).
   Per window the prompts are the text, the user's box clipped to the window (else the tight box of the zoom-out
   foreground in it) and every user point, positive or negative, that falls inside it.
4. **Blend**: window probabilities are averaged with a Gaussian weight and pasted into the zoom-out probabilities;
   categories are merged by highest probability (> 0.5), and the label map is mapped back to the original array
   (``segvol.merger``).

Caches (bounded in bytes, ``segvol.caches``): prepared images (by content or file identity), image embeddings and
the decoder's image tokens (by content and window), decoder outputs (by window and prompt), blending states and last
labels (by session), text embeddings (in the model). A second click in a session re-runs the zoom-out decoder and only
the windows whose prompts changed, and labels again only where they reach.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .caches import BoundedDict, ByteLRU, tensor_bytes
from .errors import BadImageError, BadRequestError
from .frames import AxisMap, Window
from .io import Volume, read_image, source_signature
from .modes import DEFAULT_MODE, Mode
from .preprocess import PreparedImage, check_volume, content_key, preprocess
from .prompts import Prompts
from .session import ImageSession, SegmentationResult
from .windows import PackedMask

__all__ = ["ByteLRU", "ImageSession", "PackedMask", "Prompts", "SegVolEngine", "SegmentationResult"]


ImageInput = Union[str, os.PathLike, Volume, np.ndarray, PreparedImage]


class SegVolEngine:
    """SegVol inference with caching; see the module docstring.

    ``model``: a ``segvol.SegVol`` (``segvol.load_model``); ``mode``: ``zoom_out_zoom_in`` (default) or ``zoom_out``
    (fast preview; ``segvol.modes.Mode``); ``overlap``: of the zoom-in windows (the reference's 0.5); ``cache_mb``:
    bound of the image embedding, decoder output and blending caches together; ``image_cache_mb``: bound of the
    prepared-image cache; ``roi_margin``: context voxels added around the ROI (default 1/8 of the window);
    ``reorient``: RAS before the reference axis swap (False: the stored array order, like the reference demo);
    ``amp``: float16 autocast of the image encoder on CUDA when no ``precision`` is given (default on; the decoder
    always runs in float32); ``precision``: ``fp32``/``bf16``/``fp16``/``int8`` image encoder
    (``segvol.accel.accelerate``; None keeps the model's current backend, exact float32 unless one was attached);
    ``encode_batch``: zoom-in windows encoded per encoder forward (default 8 on CUDA, 1 on CPU where a batch costs the
    same per window); ``reuse_windows``: within a session, keep an earlier grid when it covers the new ROI and needs
    fewer encoder forwards, and re-blend only the windows whose prompts changed (False: every request plans and
    blends from scratch). Requests are serialised by one lock (the caches are shared).
    """

    def __init__(self, model, mode: str = DEFAULT_MODE, overlap: float = 0.5, cache_mb: float = 2048,
                 image_cache_mb: float = 1024, roi_margin: Optional[Sequence[int]] = None, reorient: bool = True,
                 sigma_scale: float = 0.125, amp: Optional[bool] = None, reuse_windows: bool = True,
                 precision: Optional[str] = None, encode_batch: Optional[int] = None):
        self.mode = Mode.parse(mode)
        if not 0.0 <= overlap < 1.0:
            raise BadRequestError(f"overlap must be in [0, 1), got {overlap}")
        self.model = model.eval()
        if precision is not None:
            from .accel import accelerate

            accelerate(model, precision)
        self.window_size = tuple(int(s) for s in model.config.image_size)
        self.overlap = float(overlap)
        self.roi_margin = tuple(int(m) for m in (roi_margin or [s // 8 for s in self.window_size]))
        self.reorient = bool(reorient)
        self.sigma_scale = float(sigma_scale)
        self.amp = (model.device.type == "cuda") if amp is None else bool(amp) and model.device.type == "cuda"
        self.reuse_windows = bool(reuse_windows)
        self.images = ByteLRU(int(image_cache_mb * 2 ** 20))
        # image embeddings (6 MB per window officially; the default bound holds the 108 windows of a CT whose ROI is
        # the whole body), the decoder's image tokens (28 MB per window: the 18 windows clicked last), decoder outputs
        # (0.5 MB each: 200), blending sums and last labels (9 bytes per voxel of a category's windows, 1 per CT voxel)
        self.embeddings = ByteLRU(int(cache_mb * 2 ** 20 * 0.35))
        self.image_tokens_cache = ByteLRU(int(cache_mb * 2 ** 20 * 0.25))
        self.decodes = ByteLRU(int(cache_mb * 2 ** 20 * 0.05))
        self.blends = ByteLRU(int(cache_mb * 2 ** 20 * 0.35))
        self._sources = BoundedDict(256)  # file identity -> content key
        backend = getattr(model, "encoder_backend", None)
        self.precision = backend.precision if backend is not None else "fp32"
        if backend is not None:
            self.amp = False  # the backend decides the encoder's precision
        # cached embeddings of one precision are never served to another
        self.model_tag = str(getattr(model, "checkpoint_id", None) or id(model)) + (
            "" if backend is None else f"|{backend.tag}")
        self.encode_batch = max(1, int(encode_batch or (8 if model.device.type == "cuda" else 1)))
        self.progress_after_s = 2.0
        self.window_block = 8  # windows encoded before their decodes run together
        self.decode_batch = 4  # prompt sets per decoder call (bounds the decoder's activation memory)
        self._lock = threading.RLock()  # one request at a time: the caches are shared

    # ---------------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        for cache in (self.images, self.embeddings, self.image_tokens_cache, self.decodes, self.blends):
            cache.clear()
        self._sources.clear()

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
        return prepared, {"affine": affine, "header": header, "source": source}

    def open(self, image: ImageInput, *, affine: Optional[np.ndarray] = None, keep_blends: bool = True) -> ImageSession:
        """A session on ``image`` (a path, a ``segvol.io.Volume``, a 3-D array with its ``affine``, or a
        ``PreparedImage``): prepared now (or taken from the cache); the zoom-out embedding comes with the first
        request. Close it (or use it as a context manager) to free its blending states early."""
        started = time.perf_counter()
        with self._lock:
            prepared, original = self.prepare(image, affine)
        return ImageSession(self, prepared, original, preprocess_seconds=time.perf_counter() - started,
                            keep_blends=keep_blends)

    def segment(self, image: ImageInput, texts: Optional[Union[str, Sequence[str]]] = None,
                box: Optional[Sequence[float]] = None, points=None, *, affine: Optional[np.ndarray] = None,
                mode: Optional[str] = None, return_probabilities: bool = False) -> SegmentationResult:
        """Segment ``texts`` (category names) and/or the object given by ``box`` / ``points`` in a session of its own
        (the result never depends on earlier calls; the caches only make it faster).

        ``box``: ``[i0, j0, k0, i1, j1, k1]``, inclusive voxel indices of the image array as stored (one box for the
        call, applied to every text); ``points``: ``[(i, j, k, label), ...]`` or ``(coords (N, 3), labels (N,))``
        with label 1 (positive) or 0 (negative). With no text, the result is the single label ``"object"``.
        """
        mode = Mode.parse(mode or self.mode)
        prompts = Prompts(texts=texts, points=points, box=box)
        # a one-off session: its blending states could never be reused, so they stay out of the shared pool
        with self._lock, self.open(image, affine=affine, keep_blends=False) as session:
            return session.segment(prompts, mode=mode, return_probabilities=return_probabilities)

    # ---------------------------------------------------------------------------------------------------------------
    # model calls and their caches (used by the sessions)
    # ---------------------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def is_encoded(self, prepared: PreparedImage, window: Window) -> bool:
        return (self.model_tag, prepared.key, window.start) in self.embeddings

    def embedding(self, prepared: PreparedImage, where: Hashable, image: torch.Tensor,
                  counters: Dict[str, int]) -> torch.Tensor:
        """The image embedding of ``image`` (the zoom-out view or a window at ``where``), from the cache or encoded."""
        key = (self.model_tag, prepared.key, where)
        embedding = self.embeddings.get(key)
        if embedding is not None:
            counters["embedding_cache_hits"] += 1
            return embedding
        with self._autocast():
            embedding = self.model.encode_image(image.to(self.model.device)).float()
        counters["encoder_forwards"] += 1
        self.embeddings.put(key, embedding, tensor_bytes(embedding))
        return embedding

    def encode_windows(self, prepared: PreparedImage, windows: List[Window],
                       counters: Dict[str, int]) -> Dict[Tuple[int, ...], torch.Tensor]:
        """Encode the windows whose embeddings are not cached, ``encode_batch`` per encoder forward (batched
        zoom-in on a GPU); -> window start -> embedding (1, C, g...) of the windows encoded, also put in the cache."""
        todo = [w for w in windows if not self.is_encoded(prepared, w)]
        encoded: Dict[Tuple[int, ...], torch.Tensor] = {}
        for first in range(0, len(todo), self.encode_batch):
            chunk = todo[first:first + self.encode_batch]
            images = torch.stack([torch.from_numpy(w.extract(prepared.native))[None] for w in chunk])
            with self._autocast():
                embeddings = self.model.encode_image(images.to(self.model.device)).float()
            counters["encoder_forwards"] += len(chunk)
            for window, embedding in zip(chunk, embeddings):
                embedding = embedding[None].clone()
                self.embeddings.put((self.model_tag, prepared.key, window.start), embedding, tensor_bytes(embedding))
                encoded[window.start] = embedding
        return encoded

    def image_tokens(self, prepared: PreparedImage, where: Hashable, embedding: torch.Tensor,
                     counters: Dict[str, int]):
        """The decoder's prompt-independent part for the embedding at ``where`` (``SegVol.image_tokens``), from the
        cache or computed: a window clicked again skips it."""
        key = (self.model_tag, prepared.key, where)
        tokens = self.image_tokens_cache.get(key)
        if tokens is not None:
            counters["image_tokens_cache_hits"] += 1
            return tokens
        tokens = self.model.image_tokens(embedding)
        self.image_tokens_cache.put(key, tokens, tokens.nbytes)
        return tokens

    def decode(self, embedding, text_embedding, boxes, points, counters: Dict[str, int],
               previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``SegVol.decode``; ``previous``: the low-res logits one interaction earlier (mask_prompt networks)."""
        # float32 decoder: in bf16/fp16 its masks lose Dice (0.971 measured) for a few hundredths of a second
        low_res = self.model.decode(embedding, text_embedding, boxes, points, previous=previous).float()
        counters["decoder_calls"] += 1
        counters["decoded_prompts"] += low_res.shape[0]
        if previous is not None:
            counters["refined_prompts"] += low_res.shape[0]
        return low_res

    def remember_decode(self, key: Hashable, logits: torch.Tensor) -> None:
        self.decodes.put(key, logits, tensor_bytes(logits))

    def window_probability(self, window: Window, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res window logits (1, 1, *low_res_size) -> probabilities on the window's valid voxels (CPU float32)."""
        logits = self.model.upsample(low_res.to(self.model.device))[0, 0][window.window_slices]
        return torch.sigmoid(logits).float().cpu()
