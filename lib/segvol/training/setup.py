"""Building a run: the architecture (``resolve_config``), where the weights and tokenizer come from, which parameters
train (``freeze_parameters``, ``parameter_groups`` with per-prefix learning-rate scales, ``set_modes``), a from-scratch
text tower's CLIP initialisation, SIGTERM/SIGINT as a stop request, and the run folder's housekeeping (``read_last``,
``remove_stale_temp_files``) and the progress bar.

Frozen parts (``freeze``: ``image_encoder``, ``text_encoder`` = the CLIP tower, ``prompt_encoder``, ``mask_decoder``,
``dim_align``) run under ``no_grad``; with the CLIP tower frozen its pooled output per category name is computed once
and kept (it cannot change), while ``dim_align`` (512 -> 768) still trains: the reference never trained it
(``segvol-reference.md`` section 9 item 20), and it is what lets a new name become a usable prompt. Parameters the
network never uses (the 2-D mask downscaling, the IoU head, the hypernetworks of masks 1-3) are frozen as well.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import find_tokenizer, read_checkpoint
from ..config import PRESETS, SegVolConfig
from ..modeling.lora import adapter_parameters
from ..modeling.segvol import SegVol
from .options import LAST, TrainOptions

logger = logging.getLogger("segvol.training")


def resolve_config(config: Any) -> SegVolConfig:
    if isinstance(config, SegVolConfig):
        return config
    if isinstance(config, dict):
        return SegVolConfig.from_dict(config)
    if isinstance(config, str):
        if config in PRESETS:
            return PRESETS[config]
        if os.path.isfile(config):
            with open(config) as handle:
                return SegVolConfig.from_dict(json.load(handle))
    raise ValueError(f"unknown configuration {config!r}: use one of {sorted(PRESETS)} or a JSON file")


def init_path(options: TrainOptions) -> Optional[str]:
    if options.init == "scratch":
        return None
    if options.init == "official":
        if not options.weights:
            raise ValueError("init='official' needs the weights path (--weights)")
        return options.weights
    return options.init


def tokenizer_dir(options: TrainOptions) -> str:
    """The CLIP tokenizer of a run (``checkpoint.find_tokenizer``): ``options.tokenizer``, else beside the init
    checkpoint, else beside ``options.weights``."""
    return find_tokenizer(options.tokenizer, init_path(options), options.weights)


def init_text_tower_like_clip(model: SegVol) -> None:
    """CLIP's own initialisation of the token and position embeddings (std 0.02 / 0.01) for a from-scratch model.

    With PyTorch's default N(0, 1) embeddings the pooled end-of-text state is dominated by that token's own
    embedding: same-length names such as "parotid gland left" / "parotid gland right" come out identical (cosine
    1.000), so a text prompt could not tell them apart until the tower had been retrained. CLIP's small embeddings
    let the attention over the name's tokens dominate instead."""
    embeddings = model.text_encoder.clip_text_model.embeddings
    with torch.no_grad():
        nn.init.normal_(embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(embeddings.position_embedding.weight, std=0.01)
    model.text_encoder.clear_cache()


def freeze_parameters(model: SegVol, freeze: Sequence[str]) -> Dict[str, int]:
    """Set ``requires_grad`` by the freeze list (plus the never-used parameters; low-rank adapters always train);
    -> trainable counts per part."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    groups = {
        "image_encoder": [model.image_encoder],
        "text_encoder": [model.text_encoder.clip_text_model],
        "dim_align": [model.text_encoder.dim_align],
        "prompt_encoder": [model.prompt_encoder],
        "mask_decoder": [model.mask_decoder],
    }
    for name in freeze:
        for module in groups[name]:
            module.requires_grad_(False)
    dead = [model.prompt_encoder.mask_downscaling, model.mask_decoder.iou_prediction_head,
            *list(model.mask_decoder.output_hypernetworks_mlps)[1:]]
    for module in dead:
        module.requires_grad_(False)
    for parameter in adapter_parameters(model):  # low-rank adapters exist to be trained (the ``lora`` mode)
        parameter.requires_grad_(True)
    return {name: sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
            for name, modules in groups.items()}


def patch_embedding_lr_scale(factor: float) -> Dict[str, float]:
    """``TrainOptions.lr_scale`` giving the image encoder's patch embedding (projection and position embeddings)
    ``factor`` times the base rate; empty for 1."""
    return {"image_encoder.patch_embedding": float(factor)} if factor != 1 else {}


def parameter_groups(model: SegVol, lr: float, scales: Dict[str, float]) -> List[Dict[str, Any]]:
    """Trainable parameters in groups by learning-rate multiplier (the longest matching name prefix wins)."""
    groups: Dict[float, List[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        matches = [prefix for prefix in scales if name.startswith(prefix)]
        scale = float(scales[max(matches, key=len)]) if matches else 1.0
        groups.setdefault(scale, []).append(parameter)
    # the unscaled group first: the schedule reports (and logs) the first group's rate
    ordered = sorted(groups.items(), key=lambda item: (item[0] != 1.0, item[0]))
    return [{"params": params, "lr": lr * scale} for scale, params in ordered]


def set_modes(model: SegVol, freeze: Sequence[str]) -> None:
    model.train()
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if name in freeze:
            getattr(model, name).eval()


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call ``request_stop()`` (the loop then stops after its step with a checkpoint) while the
    block runs; the previous handlers come back after it. Only the main thread can set handlers: elsewhere a no-op."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            request_stop()
            logger.warning("signal %d: stopping after this step with a checkpoint", signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def remove_stale_temp_files(output_dir: str) -> List[str]:
    """Remove what interrupted writes of an earlier run left in ``output_dir`` (``last.pt.tmp``, ``best.pt.tmp``,
    ``history.json.<pid>.tmp``...); called when a run starts, before anything is written. -> removed paths."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if name.endswith(".tmp") and os.path.isfile(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
    if removed:
        logger.info("removed %d temp file(s) of an interrupted run: %s", len(removed),
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


def read_last(output_dir: str) -> Optional[Dict[str, Any]]:
    """Metadata of an output folder's ``last.pt`` (epoch, step, status...) or None."""
    path = os.path.join(output_dir, LAST)
    if not os.path.isfile(path):
        return None
    _, meta = read_checkpoint(path)
    return meta


def progress_bar(options: TrainOptions, main: bool, total: int, description: str):
    """A tqdm bar on rank 0 when ``options.progress`` (None: when stderr is a terminal), else None."""
    if main and (options.progress or (options.progress is None and _stderr_is_tty())):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, leave=False)
    return None


def close_progress(bar) -> None:
    if bar is not None:
        bar.close()


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def with_adapters(model: SegVol, rank: int, alpha: float) -> SegVol:
    """A copy of ``model`` with low-rank adapters (rank ``rank``) on the image encoder's attention, starting at zero
    (the copy computes exactly what ``model`` does); a model that already has adapters is returned as is."""
    if model.config.lora_rank:
        return model
    return _with_new_parts(model, "adapters", lambda key: ".lora_" in key, lora_rank=int(rank), lora_alpha=float(alpha))


def with_mask_prompt(model: SegVol) -> SegVol:
    """A copy of ``model`` with the previous-prediction prompt (``SegVolConfig.mask_prompt``; its last layer starts at
    zero, so the copy computes exactly what ``model`` does); a model that has it is returned as is."""
    if model.config.mask_prompt:
        return model
    return _with_new_parts(model, "previous-prediction prompt",
                           lambda key: key.startswith("prompt_encoder.mask_embedding."), mask_prompt=True)


def _with_new_parts(model: SegVol, what: str, is_new: Callable[[str], bool], **config_changes) -> SegVol:
    """A copy of ``model`` under its configuration with ``config_changes``, holding its weights; the parts the changes
    add (the state keys ``is_new`` accepts, and only those) keep their own initialisation."""
    import dataclasses

    extended = SegVol(dataclasses.replace(model.config, **config_changes), model.tokenizer,
                      vocabulary=model.vocabulary)
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(is_new(key) for key in missing):
        raise RuntimeError(f"{what}: unexpected {unexpected}, missing {missing}")
    return extended.to(next(model.parameters()).device)


__all__ = ["close_progress", "freeze_parameters", "init_path", "init_text_tower_like_clip", "parameter_groups",
           "patch_embedding_lr_scale", "progress_bar", "read_last", "remove_stale_temp_files", "resolve_config",
           "set_modes", "stop_on_signals", "tokenizer_dir", "with_adapters", "with_mask_prompt"]

