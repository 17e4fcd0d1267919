"""One image under segmentation: ``ImageSession`` (from ``SegVolEngine.open``) holds the prepared image, its zoom-out
embedding, the zoom-in grids it used and its blending states, and runs one request per ``segment`` call: validate and
map the prompts, zoom-out (encode once, decode every category), plan the zoom-in windows, encode and decode them in
blocks (``DecodeRequest``s batched by prompt structure), blend (``segvol.merger``) and map the label back. Window
embeddings and decoder outputs are content-keyed caches of the engine, shared by every session of the same image;
the session's blending states live in the engine's byte-bounded pool under the session's own key.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .errors import BadPromptError, BadRequestError
from .frames import bounding_box
from .merger import WindowMerger, merge_categories, zoom_out_box
from .modeling.mask_decoder import ImageTokens
from .modeling.prompt_encoder import PromptEncoder
from .modes import Mode
from .prompts import OBJECT_LABEL, NativePrompts, Prompts, to_native
from .windows import CategoryPlan, Grid, PackedMask, ZoomInPlan, plan_zoom_in, union_box, window_prompts

logger = logging.getLogger("segvol.engine")  # the engine's logger: scripts quieten per-window progress through it
_TOKENS = itertools.count()
_INTERACTIONS = itertools.count()
Outputs = Dict[Tuple[int, str], Tuple[Hashable, torch.Tensor]]  # (window index, category) -> (cache key, logits)
_LAST_LABEL = ("last label",)  # the key, beside the category names, of a session's last label in the blend pool


@dataclass
class _LastLabel:
    """A session's last label (original array shape) and what its next request needs to re-label only a part."""

    request: int
    names: Tuple[Tuple[str, int], ...]  # (category, value) in order
    label: np.ndarray
    windowed: Dict[str, bool]  # whether the category ran in windows
    zoom_out_boxes: Dict[str, Optional[np.ndarray]]  # merger.zoom_out_box per category


@dataclass
class _Interaction:
    """What one category's last request gave, for the next request that adds clicks to the same prompts (networks
    with the previous-prediction prompt, ``SegVolConfig.mask_prompt``): its prompts, the interaction it was computed
    from (``fed``: an identical request is computed from it again, so it repeats its answer), the zoom-out
    low-resolution logits and, per zoom-in window start, (key without the previous prediction, decoder-cache key,
    low-resolution logits)."""

    prompts: Tuple[Any, ...]
    fed: Optional["_Interaction"]
    zoom_out: torch.Tensor
    windows: Dict[Tuple[int, ...], Tuple[Hashable, Hashable, torch.Tensor]] = field(default_factory=dict)
    serial: int = field(default_factory=lambda: next(_INTERACTIONS))  # names its zoom-out logits in cache keys

    def followed_by(self, prompts: Tuple[Any, ...]) -> Optional["_Interaction"]:
        """The interaction a request with ``prompts`` refines: this one when they add points to its prompts (same text
        use, same box, every earlier point still there), the one this came from when they are the same; else None (a
        fresh start). Points are compared in any order: clients send them grouped by label (MONAI Label's
        foreground/background lists), and the decoder's point tokens carry no order."""
        if prompts == self.prompts:
            return self.fed
        (text, box, points), (text0, box0, points0) = prompts, self.prompts
        if text != text0 or box != box0 or len(points) <= len(points0):
            return None
        return self if not Counter(points0) - Counter(points) else None


def _interaction_prompts(with_text: bool, prompts: NativePrompts) -> Tuple[Any, ...]:
    """A request's spatial prompts as comparable values: (text used, box, sorted (d, h, w, label) of every point)."""
    box = None if prompts.box is None else tuple(float(v) for v in prompts.box)
    points = sorted(tuple(float(v) for v in p) + (int(label),) for p, label in zip(prompts.points, prompts.labels))
    return with_text, box, tuple(points)


@dataclass
class SegmentationResult:
    """``label``: the original array's shape (uint8, uint16 when a value passes 255), 0 = background; ``labels``:
    name -> value; ``probabilities``: name -> float32 map on the original grid (when asked); ``stats``: timings and
    counts."""

    label: np.ndarray
    affine: Optional[np.ndarray]
    labels: Dict[str, int]
    probabilities: Optional[Dict[str, np.ndarray]] = None
    stats: Dict[str, Any] = field(default_factory=dict)
    plan: Optional[ZoomInPlan] = None
    header: Any = None  # the input NIfTI header, for writing the label next to it


def _label_values(categories: List[str], values: Optional[Mapping[str, int]]) -> List[int]:
    """The label value of each category: ``values[name]`` (every one given, 1..65535), or 1..N in order."""
    if values is None:
        return list(range(1, len(categories) + 1))
    missing = [name for name in categories if name not in values]
    if missing:
        raise BadRequestError(f"no label value for {', '.join(map(repr, missing))}")
    out = [values[name] for name in categories]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 65535 for v in out):
        raise BadRequestError(f"label values must be integers 1..65535, got {out}")
    return [int(v) for v in out]


@dataclass
class DecodeRequest:
    """One prompt set to decode against one zoom-in window: the window's index in the plan, the category, the
    window-frame box and points, the decoder-cache key of the result and the window's image tokens."""

    window: int
    plan: CategoryPlan
    box: Optional[np.ndarray]
    points: Optional[Tuple[np.ndarray, np.ndarray]]
    key: Hashable
    image: Optional[ImageTokens] = None
    previous: Optional[torch.Tensor] = None  # the window's low-res logits one interaction earlier (mask_prompt)

    @property
    def structure(self) -> Tuple[bool, bool, bool]:
        """(has a box, has points, has a previous prediction): requests of one structure are decoded in one batch,
        the shorter point lists filled with absent slots (``PromptEncoder.ABSENT``)."""
        return self.box is not None, self.points is not None, self.previous is not None

    @property
    def point_count(self) -> int:
        return 0 if self.points is None else len(self.points[1])


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


class ImageSession:
    """Requests on one image; see the module docstring. ``segment`` calls are serialised by the engine's lock.

    With the engine's ``reuse_windows`` (default), a request keeps an earlier grid of this session when it covers the
    new ROI and needs fewer encoder forwards, re-blends only the windows whose prompts changed, and re-labels only the
    box where a changed window or the zoom-out probabilities reach (the rest of the last label is kept); otherwise
    every request plans, blends and labels from scratch. Either way the label is the same, and a session's results
    never depend on other sessions.
    """

    def __init__(self, engine, prepared, original: Dict[str, Any], preprocess_seconds: float = 0.0,
                 keep_blends: bool = True):
        self.engine = engine
        self.prepared = prepared
        self.affine, self.header, self.source = original["affine"], original["header"], original["source"]
        self.zoom_out_embedding: Optional[torch.Tensor] = None  # encoded by the first request
        self.grids: List[Grid] = []  # zoom-in grids used, newest first
        self.token = next(_TOKENS)
        self._preprocess_seconds = preprocess_seconds  # reported by the first request
        self._blend_names: set = set()
        self.keep_blends = keep_blends and engine.reuse_windows  # blending states kept for the next request
        self._requests = 0  # requests begun: stamps the blending states and the last label
        # per category, the last request's answer a click refines (networks with the previous-prediction prompt)
        self._interactions: Dict[str, _Interaction] = {}

    def set_source(self, affine: np.ndarray, header: Any, source: Any) -> None:
        """The geometry results are written with from now on: the same voxels (one prepared image, one session) may
        come again from another file with another affine or header."""
        self.affine, self.header, self.source = affine, header, source

    @property
    def key(self) -> str:
        """The content key of the prepared image."""
        return self.prepared.key

    def __enter__(self) -> "ImageSession":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Drop this session's blending states from the engine's pool (the content-keyed caches stay)."""
        for name in self._blend_names:
            self.engine.blends.pop((self.token, name))
        self._blend_names.clear()
        self.engine.blends.pop((self.token, _LAST_LABEL))
        self._interactions.clear()

    def segment(self, prompts: Optional[Prompts] = None, *, texts=None, box=None, points=None,
                mode: Optional[str] = None, return_probabilities: bool = False,
                values: Optional[Mapping[str, int]] = None):
        """Segment ``prompts`` (a ``segvol.prompts.Prompts``), or the ``texts``/``box``/``points`` keywords (see
        ``SegVolEngine.segment``). -> ``SegmentationResult``.

        ``values``: the label value of each text (1..65535; default 1..N in text order). Texts may share a value:
        their union then carries it (all 1: one class-agnostic object). The label is written with them directly, so
        a server's own numbering costs no extra pass over the volume."""
        mode = Mode.parse(mode or self.engine.mode)
        if prompts is None:
            prompts = Prompts(texts=texts, points=points, box=box)
        elif texts is not None or box is not None or points is not None:
            raise BadRequestError("give either a Prompts object or texts/box/points, not both")
        categories = list(prompts.texts) or [OBJECT_LABEL]
        label_values = _label_values(categories, values)
        with self.engine._lock, torch.inference_mode():
            return self._segment(prompts, categories, label_values, mode, return_probabilities)

    def _segment(self, prompts: Prompts, categories: List[str], values: List[int], mode: Mode,
                 return_probabilities: bool):
        prepared = self.prepared
        counters = {"encoder_forwards": 0, "decoder_calls": 0, "decoded_prompts": 0, "refined_prompts": 0,
                    "decoder_cache_hits": 0, "embedding_cache_hits": 0, "image_tokens_cache_hits": 0}
        seconds: Dict[str, float] = {"preprocess": self._preprocess_seconds}
        self._preprocess_seconds = 0.0
        clock = _Clock(seconds)
        native = to_native(prompts, prepared.frames)
        if not prompts.texts and not native.any():
            if native.dropped:
                raise BadPromptError("every box and point lies outside the body (the region above the minimum "
                                     "intensity): nothing there to segment")
            raise BadRequestError("nothing to segment: give at least one text, a box or a point")
        with_text = bool(prompts.texts)
        interaction = _interaction_prompts(with_text, native)
        refined = self._refined(categories, interaction)
        plans = self._zoom_out(categories, values, with_text, native, clock, counters,
                               with_foreground=mode is Mode.ZOOM_OUT_ZOOM_IN, refined=refined)
        zoom_in = ZoomInPlan()
        window_logits: Outputs = {}
        if mode is Mode.ZOOM_OUT_ZOOM_IN:
            with clock("plan"):
                zoom_in = self._plan(plans, native)
            window_logits = self._zoom_in(plans, native, zoom_in, with_text, seconds, counters, refined)
        self._remember_interactions(plans, zoom_in, window_logits, interaction, refined)
        self._requests += 1
        with clock("blend"):
            mergers = {plan.name: self._blend(plan, zoom_in, window_logits) for plan in plans}
            states = {name: None if merger is None else merger.state for name, merger in mergers.items()}
            remember = self.keep_blends and mode is Mode.ZOOM_OUT_ZOOM_IN
            zoom_out_boxes = {p.name: zoom_out_box(p, states[p.name]) for p in plans} if remember else {}
            last, relabel, probabilities = None, None, None
            if remember and not return_probabilities:
                last, relabel = self._relabel_box(plans, mergers, zoom_out_boxes)
            if last is None:
                label_native, probabilities = merge_categories(prepared.frames, plans, states, return_probabilities,
                                                               zoom_out_boxes=zoom_out_boxes or None)
            elif relabel is not None:
                part, _ = merge_categories(prepared.frames, plans, states, False, within=relabel,
                                           zoom_out_boxes=zoom_out_boxes)
        with clock("output"):
            if last is None:
                label = prepared.frames.native_to_original_array(label_native)
                relabelled = int(np.prod(prepared.frames.native_shape))
            else:
                label = last.label.copy(order="K")  # the memory order writers want (see frames)
                relabelled = 0 if relabel is None else int(np.prod(relabel[3:] - relabel[:3] + 1))
                if relabel is not None:
                    prepared.frames.paste_native_region(label, part, relabel)
            if probabilities is not None:
                probabilities = {name: prepared.frames.native_to_original_array(p)
                                 for name, p in probabilities.items()}
            if remember:
                memo = _LastLabel(self._requests, tuple((p.name, p.value) for p in plans), label.copy(order="K"),
                                  {p.name: mergers[p.name] is not None for p in plans}, zoom_out_boxes)
                self.engine.blends.put((self.token, _LAST_LABEL), memo, memo.label.nbytes)
        seconds["total"] = sum(seconds.values())
        stats = {
            "mode": mode.value,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            **counters,
            "windows": {"grid": len(zoom_in.windows), "used": len(zoom_in.used), "skipped": zoom_in.skipped,
                        "reused_grid": zoom_in.reused_grid, "per_label": {p.name: len(p.windows) for p in plans}},
            "prompts_dropped": native.dropped,
            "relabelled_voxels": relabelled,
            "native_shape": list(prepared.frames.native_shape),
        }
        return SegmentationResult(label=label, affine=self.affine, labels={p.name: p.value for p in plans},
                                  probabilities=probabilities, stats=stats, plan=zoom_in, header=self.header)

    # ---------------------------------------------------------------------------------------------------------------
    # interactions (networks with the previous-prediction prompt)
    # ---------------------------------------------------------------------------------------------------------------
    def _refined(self, categories: List[str], interaction: Tuple[Any, ...]) -> Dict[str, Optional[_Interaction]]:
        """Per category, the earlier answer this request (``interaction``: its ``_interaction_prompts``) refines
        (``_Interaction.followed_by``), or None."""
        if not self.engine.model.config.mask_prompt:
            return {}
        return {name: self._interactions[name].followed_by(interaction) if name in self._interactions else None
                for name in categories}

    def _remember_interactions(self, plans: List[CategoryPlan], zoom_in: ZoomInPlan, outputs: Outputs,
                               interaction: Tuple[Any, ...], refined: Dict[str, Optional[_Interaction]]) -> None:
        if not self.engine.model.config.mask_prompt:
            return
        for plan in plans:
            fed = refined.get(plan.name)
            if fed is not None and fed.fed is not None:  # only one step back is ever needed
                fed = _Interaction(fed.prompts, None, fed.zoom_out, fed.windows)
            windows = {}
            for index in plan.windows:
                start = zoom_in.windows[index].start
                cache_key, logits = outputs[(index, plan.name)]
                windows[start] = (_base_key(cache_key), cache_key, logits)
            self._interactions[plan.name] = _Interaction(interaction, fed, plan.zoom_low_res, windows)

    # ---------------------------------------------------------------------------------------------------------------
    # zoom-out
    # ---------------------------------------------------------------------------------------------------------------
    def _zoom_out(self, categories: List[str], values: List[int], with_text: bool, prompts: NativePrompts,
                  clock: _Clock, counters: Dict[str, int], with_foreground: bool = True,
                  refined: Optional[Dict[str, Optional[_Interaction]]] = None) -> List[CategoryPlan]:
        """Encode the zoom-out view (once per session), decode every category, and find each one's support (and
        its native foreground, which only the zoom-in planning needs)."""
        with clock("zoom_out_encode"):
            if self.zoom_out_embedding is None:
                self.zoom_out_embedding = self.engine.embedding(self.prepared, "zoom_out", self.prepared.zoom_out,
                                                                counters)
            else:
                counters["embedding_cache_hits"] += 1
        with clock("zoom_out_decode"):
            return self._zoom_out_decode(categories, values, with_text, prompts, counters, with_foreground,
                                         refined or {})

    def _zoom_out_decode(self, categories: List[str], values: List[int], with_text: bool, prompts: NativePrompts,
                         counters: Dict[str, int], with_foreground: bool,
                         refined: Dict[str, Optional[_Interaction]]) -> List[CategoryPlan]:
        engine, frames = self.engine, self.prepared.frames
        count, step, device = len(categories), engine.decode_batch, engine.model.device
        text = engine.model.encode_text(categories) if with_text else None
        boxes = None
        if prompts.box is not None:
            boxes = torch.as_tensor(frames.native_to_zoom_box(prompts.box), dtype=torch.float32,
                                    device=device).reshape(1, 6).expand(count, 6)
        point_prompt = None
        if len(prompts.points):
            coords = torch.as_tensor(frames.native_to_zoom_points(prompts.points), dtype=torch.float32, device=device)
            labels = torch.as_tensor(prompts.labels, dtype=torch.float32, device=device)
            point_prompt = (coords[None].expand(count, -1, -1), labels[None].expand(count, -1))
        image = engine.image_tokens(self.prepared, "zoom_out", self.zoom_out_embedding, counters)
        previous = [refined.get(name) for name in categories]
        low_res: List[Optional[torch.Tensor]] = [None] * count
        # categories refining an earlier answer decode apart from fresh ones (a batch has a previous mask or none)
        for group in ([i for i in range(count) if previous[i] is None],
                      [i for i in range(count) if previous[i] is not None]):
            for first in range(0, len(group), step):
                rows = group[first:first + step]
                index = torch.as_tensor(rows, device=device)
                out = engine.decode(
                    image, None if text is None else text[index], None if boxes is None else boxes[index],
                    None if point_prompt is None else (point_prompt[0][index], point_prompt[1][index]), counters,
                    previous=None if previous[rows[0]] is None else torch.cat([previous[i].zoom_out for i in rows]))
                for row, logits in zip(rows, out):
                    low_res[row] = logits[None]
        zoom_low_res = torch.cat(low_res)
        logits = engine.model.upsample(zoom_low_res)[:, 0]  # (B, Z0, Z1, Z2)
        plans = []
        for index, (name, value) in enumerate(zip(categories, values)):
            plan = CategoryPlan(name=name, value=value, zoom_logits=logits[index],
                                zoom_low_res=zoom_low_res[index:index + 1])
            zoom_box = bounding_box((plan.zoom_logits > 0).cpu().numpy())
            if zoom_box is not None:
                plan.support = frames.zoom.native_support(zoom_box)
            if zoom_box is not None and with_foreground:
                mask = frames.zoom.positive_region(plan.zoom_logits, plan.support)
                tight = bounding_box(mask)
                plan.foreground = PackedMask(mask)
                if tight is not None:
                    plan.foreground_box = tight + np.tile(plan.support[:3], 2)
            plans.append(plan)
        return plans

    # ---------------------------------------------------------------------------------------------------------------
    # zoom-in
    # ---------------------------------------------------------------------------------------------------------------
    def _plan(self, plans: List[CategoryPlan], prompts: NativePrompts) -> ZoomInPlan:
        engine = self.engine
        plan = plan_zoom_in(plans, prompts, self.prepared.frames.native_shape, engine.window_size, engine.roi_margin,
                            engine.overlap, self.grids if engine.reuse_windows else (),
                            cached=lambda window: engine.is_encoded(self.prepared, window))
        if plan.grid is not None:
            self.grids = [plan.grid] + [g for g in self.grids if g != plan.grid][:3]
        return plan

    def _zoom_in(self, plans: List[CategoryPlan], prompts: NativePrompts, zoom_in: ZoomInPlan, with_text: bool,
                 seconds: Dict[str, float], counters: Dict[str, int],
                 refined: Optional[Dict[str, Optional[_Interaction]]] = None) -> Outputs:
        """Run every used window once: encode (or reuse), decode each category needing it. -> low-res logits.

        A category refining an earlier answer (``refined``) keeps that answer's logits in each window whose prompts
        did not change, and decodes the others with them as the previous-prediction prompt (their cache key then
        names the previous key too).

        Windows go in blocks of ``window_block``: encode the block's windows, then, once ``window_block`` requests
        are pending (or at the end), decode them together, batched across windows and categories.
        """
        engine, prepared = self.engine, self.prepared
        out: Outputs = {}
        seconds.setdefault("zoom_in_encode", 0.0)
        seconds.setdefault("zoom_in_decode", 0.0)
        if not zoom_in.used:
            return out
        names = [p.name for p in plans]
        text_embeddings = dict(zip(names, engine.model.encode_text(names))) if with_text else {}
        # per category refining an answer: its zoom-out logits, upsampled, and their lowest value
        earlier_zoom: Dict[str, Tuple[torch.Tensor, float]] = {}
        started = time.perf_counter()
        requests: List[DecodeRequest] = []  # pending decodes: a click's few, from blocks far apart, go in one call
        for first in range(0, len(zoom_in.used), engine.window_block):
            block = zoom_in.used[first:first + engine.window_block]
            work = []  # (step, window, categories needing it, pending decoder requests)
            for step, index in enumerate(block, start=first):
                window = zoom_in.windows[index]
                needing = [p for p in plans if index in p.windows]
                pending = []
                for plan in needing:
                    box, points = window_prompts(plan, window, prompts)
                    key = _window_key(engine.model_tag, prepared.key, window.start, plan.name if with_text else None,
                                      box, points)
                    earlier = (refined or {}).get(plan.name)
                    before = None if earlier is None else earlier.windows.get(window.start)
                    if before is not None and before[0] == key:  # this window's prompts did not change
                        out[(index, plan.name)] = before[1:]
                        continue
                    previous = None
                    if before is not None:
                        key, previous = key + (before[1],), before[2]
                    elif earlier is not None:
                        # a window the earlier answer did not decode (new to the category, or a new grid) still
                        # gets that answer as its previous prediction, so the clicks in it reach the decoder as the
                        # network was trained to read them; without it half the robot's click windows ignored them
                        key = key + (("earlier zoom-out", earlier.serial),)
                        if plan.name not in earlier_zoom:  # upsampled once per request, not once per window
                            upsampled = engine.model.upsample(earlier.zoom_out.to(engine.model.device))[0, 0]
                            earlier_zoom[plan.name] = (upsampled, float(upsampled.min()))
                        previous = self._earlier_answer_in(*earlier_zoom[plan.name], window)
                    cached = engine.decodes.get(key)
                    if cached is not None:
                        counters["decoder_cache_hits"] += 1
                        out[(index, plan.name)] = (key, cached)
                    elif box is not None or points is not None or with_text:
                        pending.append(DecodeRequest(index, plan, box, points, key, previous=previous))
                work.append((step, window, needing, pending))
            fresh: Dict[Tuple[int, ...], torch.Tensor] = {}
            if engine.encode_batch > 1:  # GPU: the block's windows to decode in batched encoder forwards
                tick = time.perf_counter()
                fresh = engine.encode_windows(prepared, [window for _, window, _, pending in work if pending],
                                              counters)
                seconds["zoom_in_encode"] += time.perf_counter() - tick
            for step, window, needing, pending in work:
                if pending:
                    tick = time.perf_counter()
                    embedding = fresh.get(window.start)
                    if embedding is None:
                        image = torch.from_numpy(window.extract(prepared.native))[None, None]
                        embedding = engine.embedding(prepared, window.start, image, counters)
                    image_tokens = engine.image_tokens(prepared, window.start, embedding, counters)
                    for request in pending:
                        request.image = image_tokens
                    requests += pending
                    seconds["zoom_in_encode"] += time.perf_counter() - tick
                elapsed = time.perf_counter() - started
                # Per-window progress is INFO once a run is long enough for someone to wait on it, DEBUG before.
                logger.log(logging.INFO if elapsed > engine.progress_after_s else logging.DEBUG,
                           "zoom-in window %d/%d at %s for %s: %s, %.1fs elapsed, about %.0fs left", step + 1,
                           len(zoom_in.used), window.start, ", ".join(p.name for p in needing),
                           "to decode" if pending else "all cached", elapsed,
                           elapsed / (step + 1) * (len(zoom_in.used) - step - 1))
            if len(requests) >= engine.window_block or first + engine.window_block >= len(zoom_in.used):
                tick = time.perf_counter()
                self._decode_requests(requests, text_embeddings, out, counters)
                requests = []
                seconds["zoom_in_decode"] += time.perf_counter() - tick
        return out

    def _earlier_answer_in(self, zoom_logits: torch.Tensor, lowest: float, window) -> torch.Tensor:
        """An earlier answer's zoom-out logits (the zoom frame, ``image_size``) on ``window``'s low-resolution grid
        (1, 1, *low_res_size): what that answer showed there where no window of it ran (trilinear into the native
        voxels, as the label is made; the window's padding outside the volume takes ``lowest``, the lowest of those
        logits; averaged onto the grid where it is coarser)."""
        model = self.engine.model
        box = np.concatenate([np.asarray(window.start), np.asarray(window.stop) - 1])
        native = self.prepared.frames.zoom.upsample_region(zoom_logits, box)
        logits = native.new_full(tuple(window.size), lowest)
        logits[window.window_slices] = native
        low_res = tuple(model.config.low_res_size)
        if tuple(logits.shape) != low_res:
            return torch.nn.functional.adaptive_avg_pool3d(logits[None, None], low_res)
        return logits[None, None]

    def _decode_requests(self, requests: List[DecodeRequest], text_embeddings: Dict[str, torch.Tensor],
                         out: Outputs, counters: Dict[str, int]) -> None:
        """Decode window requests in batches of the same prompt structure (``DecodeRequest.structure``): a click's
        windows hold different numbers of the earlier clicks, yet share one decoder call (on 2 CPU cores, 8 windows
        of 1-5 points: 1.36 s one structure at a time, 1.29 s in padded batches of 4)."""
        engine = self.engine
        device = engine.model.device
        groups: Dict[Tuple[bool, bool, bool], List[DecodeRequest]] = {}
        for request in sorted(requests, key=lambda r: r.point_count):  # batches of similar lengths
            groups.setdefault(request.structure, []).append(request)
        for (has_box, has_points, has_previous), group in groups.items():
            for start in range(0, len(group), engine.decode_batch):
                chunk = group[start:start + engine.decode_batch]
                image = ImageTokens.cat([r.image for r in chunk])
                text = torch.stack([text_embeddings[r.plan.name] for r in chunk]) if text_embeddings else None
                boxes = None
                if has_box:
                    boxes = torch.as_tensor(np.stack([r.box for r in chunk]), dtype=torch.float32, device=device)
                point_prompt = None
                if has_points:
                    slots = max(r.point_count for r in chunk)
                    coords = np.zeros((len(chunk), slots, 3), dtype=np.float32)
                    labels = np.full((len(chunk), slots), PromptEncoder.ABSENT, dtype=np.float32)
                    for row, r in enumerate(chunk):
                        coords[row, :r.point_count], labels[row, :r.point_count] = r.points
                    point_prompt = (torch.as_tensor(coords, device=device), torch.as_tensor(labels, device=device))
                previous = torch.cat([r.previous for r in chunk]) if has_previous else None
                low_res = engine.decode(image, text, boxes, point_prompt, counters, previous=previous)
                for request, logits in zip(chunk, low_res):
                    logits = logits[None].clone()  # its own storage: the cache must not pin the whole batch
                    engine.remember_decode(request.key, logits)
                    out[(request.window, request.plan.name)] = (request.key, logits)

    # ---------------------------------------------------------------------------------------------------------------
    # blending
    # ---------------------------------------------------------------------------------------------------------------
    def _blend(self, plan: CategoryPlan, zoom_in: ZoomInPlan, outputs: Outputs) -> Optional[WindowMerger]:
        """The category's blending sums over its windows (``merger.state``), starting from this session's previous
        ones when the same windows are active again (``reuse_windows``): a new click then re-blends only the windows
        it changed."""
        if not plan.windows:
            return None
        engine = self.engine
        state_key = (self.token, plan.name)
        previous = engine.blends.get(state_key) if self.keep_blends else None
        merger = WindowMerger([zoom_in.windows[i] for i in plan.windows], engine.window_probability,
                              engine.sigma_scale, previous)
        for index in plan.windows:
            merger.aggregate(zoom_in.windows[index], *outputs[(index, plan.name)])
        state = merger.finalize(self._requests)
        if self.keep_blends:
            engine.blends.put(state_key, state, state.nbytes)
            self._blend_names.add(plan.name)
        return merger

    def _relabel_box(self, plans: List[CategoryPlan], mergers: Dict[str, Optional[WindowMerger]],
                     zoom_out_boxes: Dict[str, Optional[np.ndarray]]):
        """(last label, native box to label again; None: nothing changed), or (None, None) when the whole volume must
        be labelled: the last label of this session must come from the request every blending state was updated
        from, with the same categories, each on the same windows (or none, both times).

        A voxel outside every changed window and outside the zoom-out part of each category (``zoom_out_box``, now
        and in the last request) keeps its probabilities, so its label.
        """
        last = self.engine.blends.get((self.token, _LAST_LABEL))
        if last is None or last.names != tuple((p.name, p.value) for p in plans):
            return None, None
        relabel = None
        for plan in plans:
            merger = mergers[plan.name]
            if merger is None:
                if last.windowed[plan.name]:
                    return None, None
            elif not merger.incremental or merger.previous_request != last.request or not last.windowed[plan.name]:
                return None, None
            else:
                relabel = union_box([relabel, merger.changed_box])
            relabel = union_box([relabel, zoom_out_boxes[plan.name], last.zoom_out_boxes[plan.name]])
        return last, relabel


def _window_key(model_tag: str, image_key: str, start: Tuple[int, ...], text: Optional[str],
                box: Optional[np.ndarray], points: Optional[Tuple[np.ndarray, np.ndarray]]) -> Tuple[Hashable, ...]:
    """The decoder-cache key of one window's prompt set; a refining decode appends the previous decode's key to it
    (``_base_key`` takes it off again)."""
    return (model_tag, image_key, start, text, None if box is None else tuple(int(v) for v in box),
            None if points is None else (points[0].round(4).tobytes(), points[1].tobytes()))


def _base_key(key: Tuple[Hashable, ...]) -> Tuple[Hashable, ...]:
    """A window's decoder-cache key without the previous prediction's key a refining decode appends to it."""
    return key[:_WINDOW_KEY_LENGTH]


_WINDOW_KEY_LENGTH = 6  # the fields of _window_key
