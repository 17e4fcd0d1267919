"""One SegVol model and engine shared by all infer tasks of the app, loaded on first use.

MONAI Label builds the app again in every train and scoring subprocess, so nothing is loaded in the constructor.
When a training run publishes a new checkpoint (``published``), the next request switches to it without a restart.

A checkpoint that does not load (a truncated or corrupt published file, a damaged base weights file) never takes a
working server down: the engine already loaded keeps serving; with none loaded yet, the last published checkpoint that
did load (``segvol_finetuned.last_good.pt``, an atomic copy made each time a newly published checkpoint loads) is
tried, then the configured base weights. A 503 only comes when none of them loads. Every fallback is logged and
``status()`` (``model_status`` in ``/info``) tells which checkpoint serves and why.

Requests run in image sessions (``with service.session(image, client_id) as session``): one
``segvol.session.ImageSession`` per image content and client (``client_id`` when the request carries one), at most
``max_sessions`` of them, least recently used dropped first, all dropped when another checkpoint starts serving. A
session keeps its zoom-out embedding, grids and blending sums, so a client's next click on the same image costs only
the windows it changes; two clients never see each other's state.

Locks, in the order they are taken: the server's inference worker (``segvol_server``: one thread runs every HTTP
inference, so the event loop never waits on one), this service's lock (``_lock``: the loaded checkpoint and the
sessions; a session is used by one request at a time), then the engine's (``segvol.engine``: its caches, shared by
every session and by library callers that use no service).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from segvol.checkpoint import CheckpointError, resolve_weights_file
from segvol.io import atomic_copy
from segvol.modes import DEFAULT_MODE
from segvol.vocabulary import Vocabulary

if TYPE_CHECKING:
    from segvol.engine import SegVolEngine
    from segvol.session import ImageSession

logger = logging.getLogger(__name__)

HOW_TO_GET_WEIGHTS = (
    "Download them with `python scripts/download_weights.py` (into models/), or start the server with "
    "`--conf weights /path/to/SegVol_v1.pth|pytorch_model.bin|model.safetensors` (and `--conf tokenizer <folder>` "
    "when the tokenizer files are not next to the weights)."
)

Stamp = Tuple[str, int, int, int]  # path, inode, mtime_ns, size: a publish (rename) or rewrite changes it


class WeightsUnavailableError(RuntimeError):
    """No usable SegVol weights: the server still runs, infer requests are answered 503 with this message."""


def last_good_path(published: str) -> str:
    """``<dir>/segvol_finetuned.pt`` -> ``<dir>/segvol_finetuned.last_good.pt``."""
    root, ext = os.path.splitext(published)
    return f"{root}.last_good{ext or '.pt'}"


def _stamp(path: str) -> Stamp:
    st = os.stat(path)
    return path, st.st_ino, st.st_mtime_ns, st.st_size


class SegVolService:
    def __init__(self, weights: str, tokenizer: str = "", device: str = "auto", mode: str = DEFAULT_MODE.value,
                 cache_mb: int = 2048, vocabulary: Optional[Vocabulary] = None, published: str = "",
                 precision: str = "fp32", max_sessions: int = 8,
                 calibration_images: Callable[[], Iterable[str]] = lambda: []):
        self.weights = weights
        self.precision = precision  # image encoder (segvol.accel); "auto": bf16 where native, else fp32
        # int8: the CT files its quantization is calibrated on (the app gives the datastore's images, read lazily)
        self.calibration_images = calibration_images
        self.tokenizer = tokenizer or None
        self.device = device
        self.mode = mode
        self.cache_mb = cache_mb
        self.vocabulary = vocabulary or Vocabulary.load()
        self.published = published
        self.last_good = last_good_path(published) if published else ""
        self._lock = threading.RLock()  # the loaded checkpoint and the sessions (lock order: module docstring)
        self._engine = None
        self._loaded_from: Optional[Stamp] = None
        self._loaded_ts: Optional[float] = None
        self._failed: Dict[Stamp, str] = {}  # checkpoints that did not load (not retried until the file changes)
        self._error: Optional[Dict[str, Any]] = None  # the last load failure, while it still matters
        self.max_sessions = max(1, int(max_sessions))
        self._sessions: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()  # (content key, client) -> session
        self._sessions_engine = None  # the engine the sessions belong to

    # ------------------------------------------------------------------------------------------------------------
    # which file
    # ------------------------------------------------------------------------------------------------------------
    def weights_file(self) -> str:
        """The checkpoint to serve: a published fine-tuned one when present, else the configured weights."""
        if self.published and os.path.isfile(self.published):
            return self.published
        return self.base_file()

    def base_file(self) -> str:
        try:
            return resolve_weights_file(self.weights)
        except CheckpointError as error:
            raise WeightsUnavailableError(f"SegVol weights are not available: {error} {HOW_TO_GET_WEIGHTS}") from None

    def available(self) -> bool:
        try:
            self.weights_file()
            return True
        except WeightsUnavailableError:
            return False

    def _candidates(self, wanted: str) -> List[str]:
        """Files to try when ``wanted`` does not load, best first (the last good fine-tuned one, then the base)."""
        out = []
        if wanted == self.published and self.last_good and os.path.isfile(self.last_good):
            out.append(self.last_good)
        try:
            base = self.base_file()
        except WeightsUnavailableError:
            base = None
        if base and base not in out and base != wanted:
            out.append(base)
        return out

    def kind(self, path: Optional[str]) -> Optional[str]:
        if not path:
            return None
        if path == self.published:
            return "fine-tuned"
        if path == self.last_good:
            return "fine-tuned (last good)"
        return "base"

    # ------------------------------------------------------------------------------------------------------------
    # loading, with fallback
    # ------------------------------------------------------------------------------------------------------------
    def engine(self):
        """The engine for the current checkpoint, (re)loaded when the file changed; see the module docstring for
        what happens when it does not load."""
        with self._lock:
            try:
                wanted = self.weights_file()
                stamp = _stamp(wanted)
            except (WeightsUnavailableError, OSError) as error:  # removed meanwhile, or no weights at all
                if self._engine is not None:
                    return self._engine
                if isinstance(error, WeightsUnavailableError):
                    raise
                raise WeightsUnavailableError(f"SegVol weights are not available: {error}") from None
            if self._engine is not None and self._loaded_from == stamp:
                return self._engine
            error = self._failed.get(stamp)
            if error is None:
                error = self._try_load(stamp)
                if error is None:
                    return self._engine
            if self._engine is not None:  # keep serving what works
                return self._engine
            for path in self._candidates(wanted):
                try:
                    other = _stamp(path)
                except OSError:
                    continue
                if other not in self._failed and self._try_load(other, fallback_for=(wanted, error)) is None:
                    return self._engine
            raise WeightsUnavailableError(f"SegVol weights could not be loaded: {error} {HOW_TO_GET_WEIGHTS}")

    def _try_load(self, stamp: Stamp, fallback_for: Optional[Tuple[str, str]] = None) -> Optional[str]:
        """Load ``stamp``'s file as the served engine; -> None, or the error (recorded and logged)."""
        path = stamp[0]
        try:
            with open(path, "rb") as handle:  # keeps this exact file (inode) readable for the last-good copy
                engine = self._build_engine(path)
                if path == self.published and _stamp(path) == stamp and os.fstat(handle.fileno()).st_ino == stamp[1]:
                    self._keep_last_good(handle)
        except Exception as error:  # any unreadable checkpoint: torch, safetensors, shape checks, tokenizer
            message = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
            self._failed[stamp] = message
            self._error = {"checkpoint": path, "error": message[:2000], "ts": int(time.time())}
            logger.error("SegVol checkpoint %s does not load: %s%s", path, message[:500],
                         "; the loaded model keeps serving" if self._engine is not None else "")
            return message
        previous = self._loaded_from[0] if self._loaded_from else None
        self._engine, self._loaded_from, self._loaded_ts = engine, stamp, time.time()
        if fallback_for is None:
            self._error = None  # the checkpoint we want serves
        else:
            logger.warning("serving %s instead of %s, which does not load (%s)", path, fallback_for[0],
                           fallback_for[1][:300])
        if previous and previous != path:
            logger.info("now serving %s (was %s)", path, previous)
        return None

    def _keep_last_good(self, handle) -> None:
        """Atomically copy the published checkpoint that just loaded (open as ``handle``) to ``last_good``
        (``segvol.io.atomic_copy``: temp file, fsync, rename, fsync the folder; the temp file removed on failure)."""
        if not self.last_good:
            return
        try:
            atomic_copy(handle, self.last_good)
        except OSError as error:
            logger.warning("could not keep a last-good copy of %s: %s", self.published, error)

    def _build_engine(self, path: str):
        import segvol
        from segvol.engine import SegVolEngine

        started = time.perf_counter()
        # segvol.checkpoint.find_tokenizer: --conf tokenizer, else beside the served weights for a fine-tuned
        # checkpoint (it has none of its own), else beside the checkpoint
        tokenizer = self.tokenizer or (self.weights if path in (self.published, self.last_good) else None)
        model = segvol.load_model(path, device=self.device, tokenizer=tokenizer)
        if self.precision != "fp32":  # converted once per checkpoint and cached on disk (segvol.accel)
            from segvol.accel import accelerate, default_server_precision

            precision = default_server_precision(str(model.device)) if self.precision == "auto" else self.precision
            if precision == "int8":
                views = self._calibration_views(model)
                if views:
                    accelerate(model, "int8", calibration=views)
                else:
                    logger.warning("precision int8 unavailable: no readable image in the datastore to calibrate "
                                   "it on; the image encoder runs in fp32 until the next load")
            else:
                accelerate(model, precision)
        self.vocabulary.extend(model.vocabulary)  # names learned by fine-tuning become prompts
        logger.info("SegVol loaded from %s on %s in %.1f s (image encoder: %s)", path, model.device,
                    time.perf_counter() - started, getattr(model, "precision_info", {"precision": "fp32"}))
        return SegVolEngine(model, mode=self.mode, cache_mb=self.cache_mb)

    def _calibration_views(self, model, count: int = 4) -> list:
        """Calibration views (``segvol.accel.calibration_views``, 2 per CT) of the first ``count`` readable CTs."""
        from segvol.accel import calibration_views
        from segvol.errors import SegVolInputError

        views: list = []
        for path in self.calibration_images():
            try:
                views += calibration_views([path], model.config.image_size, per_image=2)
            except (SegVolInputError, OSError) as error:
                logger.info("int8 calibration skips %s: %s", path, error)
            if len(views) >= 2 * count:
                break
        return views

    # ------------------------------------------------------------------------------------------------------------
    # what /info shows
    # ------------------------------------------------------------------------------------------------------------
    @property
    def checkpoint_id(self) -> Optional[str]:
        """Id of the checkpoint the last request ran with (file name and content hash)."""
        return self._engine.model.checkpoint_id if self._engine is not None else None

    def status(self) -> Dict[str, Any]:
        """``/info``'s ``model_status``: the checkpoint serving (``serving``: path, kind, id, load time; None before the
        first inference), the one that should serve (``wanted``), whether a fallback serves because ``wanted`` does
        not load (``fallback``), the last load error, and the last-good copy."""
        try:
            wanted: Optional[str] = self.weights_file()
            unavailable = None
        except WeightsUnavailableError as error:
            wanted, unavailable = None, str(error)
        try:
            current: Optional[Stamp] = _stamp(wanted) if wanted else None
        except OSError:
            current = None
        # No lock: run() holds it for a whole inference, and /info must answer meanwhile. The fields are read once
        # (the loader replaces them, never mutates them; _failed only grows): at worst the snapshot is one load old.
        engine, loaded_from, loaded_ts, last_error = self._engine, self._loaded_from, self._loaded_ts, self._error
        loaded = loaded_from[0] if loaded_from else None
        serving = None if engine is None else {
            "checkpoint": loaded, "kind": self.kind(loaded), "id": engine.model.checkpoint_id,
            "loaded_ts": int(loaded_ts or 0), "precision": getattr(engine.model, "precision_info", None)
            or {"precision": "fp32", "runtime": "torch"}}
        failed_error = self._failed.get(current) if current is not None else None
        failed = failed_error is not None
        error = dict(last_error) if last_error else None
        if failed and (error is None or error.get("checkpoint") != wanted):
            error = {"checkpoint": wanted, "error": failed_error[:2000]}
        out: Dict[str, Any] = {
            "serving": serving, "wanted": wanted, "wanted_kind": self.kind(wanted),
            "fallback": bool(serving is not None and failed),
            "error": error if error else ({"checkpoint": None, "error": unavailable} if unavailable else None),
            "last_good": self.last_good if self.last_good and os.path.isfile(self.last_good) else None,
        }
        if serving is not None and current is not None and current != loaded_from and not failed:
            out["pending"] = "a newer checkpoint is there: the next inference loads it"
        return out

    @contextlib.contextmanager
    def session(self, image, client_id: Optional[str] = None) -> Iterator["ImageSession"]:
        """``with service.session(image, client_id) as session: session.segment(...)``: the session of ``image`` for
        ``client_id`` (see the module docstring), held under the service lock for the block."""
        engine = self.engine()
        with self._lock:
            yield self._session(engine, image, client_id)

    @contextlib.contextmanager
    def exclusive_engine(self) -> Iterator["SegVolEngine"]:
        """``with service.exclusive_engine() as engine: engine.segment(...)``: the engine, under the service lock for
        the block (work outside any session, e.g. scoring)."""
        engine = self.engine()
        with self._lock:
            yield engine

    def _session(self, engine, image, client_id: Optional[str]):
        if self._sessions_engine is not engine:  # another checkpoint: nothing of the old sessions applies
            self.close_sessions()
            self._sessions_engine = engine
        opened = engine.open(image)  # cheap for an image seen before (its prepared form is cached)
        key = (opened.key, str(client_id or ""))
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
            # the same voxels may come with another file's geometry: the result is written with this request's
            session.set_source(opened.affine, opened.header, opened.source)
            return session
        self._sessions[key] = opened
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)[1].close()
        return opened

    def close_sessions(self) -> None:
        while self._sessions:
            self._sessions.popitem(last=False)[1].close()
