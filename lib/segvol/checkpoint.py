"""The single way to read and write SegVol weights, to name them (``checkpoint_id``) and to find their tokenizer.

Accepted inputs (all matched strictly, tensor by tensor):

* ``SegVol_v1.pth``: ``{'model': {'module.<key>': ...}, 'epoch': ..., ...}`` (the official release);
* the Hugging Face ``pytorch_model.bin`` or ``model.safetensors``: a flat dict with ``model.<key>``;
* a Hugging Face snapshot folder holding one of those files (and usually the tokenizer);
* the project's own checkpoints (``save_checkpoint``): ``{'format': 'segvol-label', 'config', 'model', ...}``.

``checkpoint_id`` is the one identity of a weights file (engine caches, result provenance, scoring freshness and the
DICOM SEG's algorithm version all use it); ``find_tokenizer`` is the one tokenizer fallback (an explicit folder, else
the folder of the weights, else any further candidate), used by loading, training and the app.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .config import SegVolConfig
from .io import atomic_output
from .modeling.segvol import SegVol
from .modeling.text_encoder import find_tokenizer_dir, load_tokenizer

FORMAT = "segvol-label"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "SegVol_v1.pth", "segvol_label.pt")
_TEXT_PREFIX = "text_encoder.clip_text_model."
_POSITION_IDS = _TEXT_PREFIX + "text_model.embeddings.position_ids"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the SegVol network; the message names the offending tensors."""


def resolve_weights_file(path: str) -> str:
    """A weights file, or the weights file inside a snapshot/models folder."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(
            f"no SegVol weights in folder {path!r}: expected one of {', '.join(WEIGHT_FILES)}. "
            "Run `python scripts/download_weights.py` or place the official file there by hand."
        )
    if not os.path.isfile(path):
        raise CheckpointError(
            f"SegVol weights not found at {path!r}. Run `python scripts/download_weights.py` "
            "or pass the path of SegVol_v1.pth / pytorch_model.bin / model.safetensors."
        )
    return path


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (state dict with official key names, metadata: config, epoch, vocabulary... when present)."""
    path = resolve_weights_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw: Any = load_file(path)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{path!r} is not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path!r} holds a {type(raw).__name__}, not a state dict")
    meta: Dict[str, Any] = {}
    if raw.get("format") == FORMAT:
        meta = {k: v for k, v in raw.items() if k != "model"}
        state = raw["model"]
    elif isinstance(raw.get("model"), dict):
        meta = {k: v for k, v in raw.items() if k in ("epoch",)}
        state = raw["model"]
    elif isinstance(raw.get("model_state_dict"), dict):
        meta = {k: v for k, v in raw.items() if k in ("epoch",)}
        state = raw["model_state_dict"]
    else:
        state = raw
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not contain a tensor state dict")
    return canonical_keys(state), meta


def canonical_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip the DataParallel (``module.``) or Hugging Face (``model.``) prefix and unify CLIP key layouts."""
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
    out = {}
    for key, value in state.items():
        # transformers' CLIPTextModel nests everything under `text_model.`; the official manifest keeps only the
        # position_ids buffer there. Accept both.
        if key.startswith(_TEXT_PREFIX + "text_model.") and key != _POSITION_IDS:
            key = _TEXT_PREFIX + key[len(_TEXT_PREFIX + "text_model."):]
        out[key] = value
    if _POSITION_IDS not in out and _TEXT_PREFIX + "embeddings.position_ids" in out:
        out[_POSITION_IDS] = out.pop(_TEXT_PREFIX + "embeddings.position_ids")
    return out


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {len(items)} {title} tensor(s):\n    {shown}")
        raise CheckpointError(f"{source} does not match the SegVol network:\n" + "\n".join(parts))


def find_tokenizer(tokenizer: Optional[str], *fallbacks: Optional[str]) -> str:
    """The CLIP tokenizer folder: ``tokenizer`` when given (a folder, or the folder of a file, or its ``tokenizer`` /
    ``clip`` sub-folder), else the first of ``fallbacks`` (weights files or folders) that holds one;
    ``FileNotFoundError`` saying where to put it otherwise."""
    found = find_tokenizer_dir(tokenizer) if tokenizer else find_tokenizer_dir(*fallbacks)
    if found is None:
        searched = [tokenizer] if tokenizer else [os.path.abspath(f) for f in fallbacks if f]
        raise FileNotFoundError(
            f"no CLIP tokenizer found in {', '.join(map(repr, searched)) or 'no folder'}: pass "
            "tokenizer=<folder with tokenizer.json/vocab.json> (the official weights use the CLIP ViT-B/32 tokenizer "
            "shipped with SegVol; text prompts need it, also when training from scratch)")
    return found


def checkpoint_id(path: str) -> str:
    """Short stable id of a weights file: its name plus a hash of size, mtime and the first MiB."""
    path = resolve_weights_file(path)
    stat = os.stat(path)
    digest = hashlib.sha1(f"{stat.st_size}:{int(stat.st_mtime)}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
    return f"{os.path.basename(path)}@{digest.hexdigest()[:12]}"


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    return device


def load_model(checkpoint: str, device: str = "cpu", tokenizer: Optional[str] = None, precision: str = "fp32",
               **accel_options: Any) -> SegVol:
    """Load SegVol weights (official or project format) into an eval-mode network on ``device``.

    ``precision``: the image encoder's backend (``segvol.accel``: fp32 exact by default, bf16, fp16, int8; a
    precision that cannot run here falls back to fp32 with a log line); ``accel_options`` go to
    ``segvol.accel.accelerate`` (``cache_dir``, ``calibration``, ``threads``).

    The CLIP tokenizer comes from ``tokenizer`` (a folder), else from the checkpoint's folder; if neither has one,
    a ``FileNotFoundError`` says where to put it.
    """
    weights_file = resolve_weights_file(checkpoint)
    tokenizer_dir = find_tokenizer(tokenizer, weights_file)
    state, meta = read_checkpoint(weights_file)
    config = SegVolConfig.from_dict(meta["config"]) if "config" in meta else SegVolConfig()
    clip_tokenizer = load_tokenizer(tokenizer_dir)
    with torch.device("meta"):
        model = SegVol(config, clip_tokenizer, checkpoint_id=checkpoint_id(weights_file),
                       vocabulary=meta.get("vocabulary", []))
    check_state_dict(model, state, source=repr(weights_file))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(resolve_device(device)).eval()
    if precision not in (None, "fp32") or accel_options:
        from .accel import accelerate

        accelerate(model, precision, **accel_options)
    return model


def save_checkpoint(path: str, model: SegVol, **extra: Any) -> str:
    """Write a project checkpoint (config, weights and any plain-typed extras: optimizer, epoch, vocabulary...)."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict(), **extra}
    with atomic_output(path) as tmp:  # a reader never sees a half-written checkpoint
        torch.save(payload, tmp)
    return path


def official_state_dict(model: SegVol, prefix: str = "module.") -> Dict[str, torch.Tensor]:
    """The model's weights with official key names (``module.`` for SegVol_v1.pth, ``model.`` for Hugging Face)."""
    return {prefix + k: v for k, v in model.state_dict().items()}
