"""One SegVol model and engine shared by all infer tasks of the app, loaded on first use.

MONAI Label builds the app again in every train and scoring subprocess, so nothing is loaded in the constructor.
When a training run publishes a new checkpoint (``published``), the next request switches to it without a restart.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from segvol.checkpoint import CheckpointError, resolve_weights_file
from segvol.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

HOW_TO_GET_WEIGHTS = (
    "Download them with `python scripts/download_weights.py` (into models/), or start the server with "
    "`--conf weights /path/to/SegVol_v1.pth|pytorch_model.bin|model.safetensors` (and `--conf tokenizer <folder>` "
    "when the tokenizer files are not next to the weights)."
)


class WeightsUnavailableError(RuntimeError):
    """No usable SegVol weights: the server still runs, infer requests are answered 503 with this message."""


class SegVolService:
    def __init__(self, weights: str, tokenizer: str = "", device: str = "auto", mode: str = "zoom_out_zoom_in",
                 cache_mb: int = 2048, vocabulary: Optional[Vocabulary] = None, published: str = ""):
        self.weights = weights
        self.tokenizer = tokenizer or None
        self.device = device
        self.mode = mode
        self.cache_mb = cache_mb
        self.vocabulary = vocabulary or Vocabulary.load()
        self.published = published
        self._lock = threading.RLock()
        self._engine = None
        self._loaded_from: Optional[tuple] = None

    def weights_file(self) -> str:
        """The checkpoint to serve: a published fine-tuned one when present, else the configured weights."""
        if self.published and os.path.isfile(self.published):
            return self.published
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

    def engine(self):
        """The engine for the current checkpoint, (re)loaded when the file changed."""
        path = self.weights_file()
        stamp = (path, os.stat(path).st_mtime_ns)
        with self._lock:
            if self._engine is None or self._loaded_from != stamp:
                self._engine = self._build_engine(path)
                self._loaded_from = stamp
            return self._engine

    def _build_engine(self, path: str):
        import segvol
        from segvol.engine import SegVolEngine

        started = time.perf_counter()
        tokenizer = self.tokenizer
        if tokenizer is None and path == self.published:
            tokenizer = os.path.dirname(self.weights) if os.path.isfile(self.weights) else self.weights
        try:
            model = segvol.load_model(path, device=self.device, tokenizer=tokenizer)
        except (CheckpointError, FileNotFoundError) as error:
            raise WeightsUnavailableError(f"SegVol weights could not be loaded: {error} {HOW_TO_GET_WEIGHTS}") from None
        self.vocabulary.extend(model.vocabulary)  # names learned by fine-tuning become prompts
        logger.info("SegVol loaded from %s on %s in %.1f s", path, model.device, time.perf_counter() - started)
        return SegVolEngine(model, mode=self.mode, cache_mb=self.cache_mb)

    @property
    def checkpoint_id(self) -> Optional[str]:
        """Id of the checkpoint the last request ran with (file name and content hash)."""
        return self._engine.model.checkpoint_id if self._engine is not None else None

    def run(self, function):
        """Run ``function(engine)`` under the service lock: one inference at a time on the shared model."""
        engine = self.engine()
        with self._lock:
            return function(engine)
