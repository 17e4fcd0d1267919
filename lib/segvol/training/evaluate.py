"""Validation: per-label Dice of a model through the real inference engine (``segvol.engine.SegVolEngine``).

Each label of each case is segmented on its own (one engine call per label; the engine encodes an image or window
once and reuses it across the calls), with the text prompt alone or text plus the label's tight box, in zoom-out or
zoom-out-zoom-in mode, and compared with the ground truth on the original voxel grid.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..frames import bounding_box
from .data import CaseStore
from .losses import dice_score

logger = logging.getLogger("segvol.training")

PROMPTS = ("text", "text+box", "box")


def evaluate(model, store: CaseStore, prompt: str = "text+box", mode: str = "zoom_out",
             indices: Optional[Iterable[int]] = None, reorient: bool = True,
             texts: Optional[Sequence[str]] = None) -> Dict:
    """-> ``{"per_label": {text: mean Dice}, "mean": mean over labels, "per_case": [...], "seconds": s}``.

    ``texts`` restricts the labels evaluated. The model is put in eval mode (and left there)."""
    from ..engine import SegVolEngine

    if prompt not in PROMPTS:
        raise ValueError(f"validation prompt must be one of {PROMPTS}, got {prompt!r}")
    started = time.perf_counter()
    was_training = model.training
    engine = SegVolEngine(model, mode=mode, reorient=reorient, reuse_windows=False, cache_mb=512, image_cache_mb=64)
    per_case: List[Dict] = []
    scores: Dict[str, List[float]] = {}
    try:
        for index in (range(len(store)) if indices is None else indices):
            case = store[index]
            original = case.original_label
            if original is None:
                raise ValueError("validation cases must be loaded with keep_original_label=True")
            row = {"case": case.case.id, "dice": {}}
            for value, text in case.texts.items():
                if texts is not None and text not in texts:
                    continue
                truth = original == value
                box = bounding_box(truth)
                if box is None:
                    continue
                result = engine.segment(case.prepared, texts=None if prompt == "box" else [text],
                                        box=box.tolist() if "box" in prompt else None, mode=mode)
                score = dice_score(result.label > 0, truth)
                row["dice"][text] = round(score, 4)
                scores.setdefault(text, []).append(score)
            per_case.append(row)
    finally:
        engine.clear_cache()
        model.train(was_training)
    per_label = {name: float(np.mean(values)) for name, values in sorted(scores.items())}
    mean = float(np.mean(list(per_label.values()))) if per_label else float("nan")
    return {"prompt": prompt, "mode": mode, "per_label": per_label, "mean": mean, "per_case": per_case,
            "seconds": round(time.perf_counter() - started, 2)}


def format_dice(per_label: Dict[str, float], limit: int = 12) -> str:
    items = list(per_label.items())
    shown = ", ".join(f"{name} {value:.3f}" for name, value in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


__all__ = ["PROMPTS", "evaluate", "format_dice"]
