"""The SegVol fine-tuning loop, shared by ``scripts/train.py`` and the MONAI Label train task.

One optimizer step:

1. a batch of views (``data.sample_view``: zoom-out views and native crops) is drawn, and for every category present
   in a view a box and points are sampled (``prompts.sample_prompts``);
2. each image is **encoded once**; all categories and all six prompt combinations (point+text, box+text, text, box,
   point, box+point) are decoded against that embedding (the reference re-encoded the image per category);
3. the loss is the sum over combinations of the mean per-sample Dice + BCE (``losses``), plus ``pseudo_weight`` (0.1)
   times the same on FH pseudo-label targets when a case has them;
4. AdamW with linear warm-up and cosine decay (``schedule.WarmupCosine``, lr > 0 from the first step), optional
   gradient clipping, autocast on CUDA (bf16 where supported, else fp16 with a gradient scaler).

Frozen parts (``freeze``: ``image_encoder``, ``text_encoder`` = the CLIP tower, ``prompt_encoder``, ``mask_decoder``,
``dim_align``) run under ``no_grad``; with the CLIP tower frozen its pooled output per category name is computed once
and kept (it cannot change), while ``dim_align`` (512 -> 768) still trains: the reference never trained it
(``segvol-reference.md`` section 9 item 20), and it is what lets a new name become a usable prompt. Parameters the
network never uses (the 2-D mask downscaling, the IoU head, the hypernetworks of masks 1-3) are frozen as well.

Each epoch ends with validation (per-label Dice through the inference engine) and a checkpoint ``last.pt`` holding
model, optimizer, scheduler, scaler, epoch, step, vocabulary, history and options (``segvol.save_checkpoint``, so
``weights_only`` loading works). An interrupted run resumes from it exactly where it stopped (samples are a pure
function of seed, epoch and position, so the resumed run draws what the uninterrupted one would have). The best
checkpoint (``best.pt``) is also written atomically to ``publish_path``, where the app's infer tasks pick it up.

Multi-GPU: ``run_training`` spawns one process per GPU (torch DDP, NCCL; gloo on CPU) when ``world_size`` > 1, or
joins a process group that ``torchrun`` set up.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import load_model, read_checkpoint, resolve_device, save_checkpoint
from ..config import PRESETS, SegVolConfig
from ..modeling.segvol import SegVol
from ..modeling.text_encoder import find_tokenizer_dir, load_tokenizer
from ..vocabulary import Vocabulary
from .data import Case, CaseStore, ViewConfig, epoch_order, sample_view, view_rng
from .evaluate import PROMPTS, evaluate, format_dice
from .losses import dice_bce_loss
from .prompts import COMBINATIONS, PromptConfig, PromptSample, combination_parts, pseudo_target, sample_prompts, \
    stack_boxes, stack_points
from .schedule import WarmupCosine

logger = logging.getLogger("segvol.training")

FREEZABLE = ("image_encoder", "text_encoder", "dim_align", "prompt_encoder", "mask_decoder")
DEFAULT_FREEZE = ("image_encoder", "text_encoder")  # the SegVol maintainers' advice for fine-tuning
LAST = "last.pt"
DDP_TIMEOUT = datetime.timedelta(hours=2)  # other ranks wait while rank 0 validates
BEST = "best.pt"


@dataclass
class TrainOptions:
    """Every training option (CLI flags and train-task request keys map 1:1 onto these fields)."""

    output_dir: str
    init: str = "official"  # "official" (= ``weights``), "scratch", or a checkpoint path (official or project)
    weights: Optional[str] = None  # the official weights file/folder for init="official"
    tokenizer: Optional[str] = None  # CLIP tokenizer folder (default: next to the init weights)
    config: Any = "small"  # architecture for init="scratch": a preset name or a SegVolConfig dict
    epochs: int = 10
    batch_size: int = 1
    repeats: int = 1  # views per case per epoch
    lr: float = 1e-4
    lr_scale: Dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr multiplier
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: Optional[float] = 1.0
    freeze: Tuple[str, ...] = DEFAULT_FREEZE
    amp: Optional[bool] = None  # default: on when training on CUDA
    device: str = "auto"
    seed: int = 0
    zoom_out_prob: float = 0.5
    pos_fraction: float = 2.0 / 3.0
    intensity_prob: float = 0.1
    box_jitter: float = 0.1
    max_positive: int = 10
    max_negative: int = 10
    boundary_fraction: float = 0.5
    combinations: Tuple[str, ...] = COMBINATIONS
    combinations_per_step: int = 0  # 0: every combination every step; k: a random k of them per step (cheaper steps)
    max_categories: int = 8  # categories trained per view (a random subset when more are present)
    pseudo_weight: float = 0.1
    pseudo_passes: int = 2  # pseudo-label decoder passes per view, alternating point / box
    loss_resolution: str = "full"  # "full": logits upsampled to the window (the reference); "low": the decoder's
    # grid against area-averaged targets (several times cheaper on CPU; what inference upsamples is the same logits)
    val_every: int = 1
    val_prompt: str = "text+box"
    val_mode: str = "zoom_out_zoom_in"
    time_budget_s: Optional[float] = None  # stop (checkpointed) when this much wall time has passed
    fit_budget: bool = True  # with a budget: shorten the planned epochs (and the cosine) to what fits
    resume: Any = "auto"  # "auto": continue an unfinished run in output_dir; True: continue it even if finished
    publish_path: Optional[str] = None
    publish: str = "best"  # "best" (by validation Dice; the last epoch without validation) or "last"
    publish_if_better_than_init: bool = False  # validate the starting model first; publish only improvements
    reorient: bool = True
    cache_mb: float = 4096
    vocabulary: Optional[str] = None  # base vocabulary file (default: the built-in SegVol names)
    world_size: int = 1  # processes (GPUs); >1 spawns DDP workers
    ddp_backend: Optional[str] = None  # default nccl on CUDA, gloo on CPU
    prefetch: bool = True
    progress: Optional[bool] = None  # tqdm bar: None = when stderr is a terminal
    threads: int = 0  # torch intra-op threads per process (0: leave as is)

    def __post_init__(self):
        if isinstance(self.freeze, str):
            self.freeze = tuple(p.strip() for p in self.freeze.split(",") if p.strip() and p.strip() != "none")
        self.freeze = tuple(self.freeze)
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise ValueError(f"cannot freeze {sorted(unknown)}: choose among {', '.join(FREEZABLE)}")
        if isinstance(self.combinations, str):
            self.combinations = tuple(c.strip() for c in self.combinations.split(",") if c.strip())
        for combination in self.combinations:
            combination_parts(combination)
        if self.val_prompt not in PROMPTS:
            raise ValueError(f"val_prompt must be one of {PROMPTS}")
        if self.val_mode not in ("zoom_out", "zoom_out_zoom_in"):
            raise ValueError("val_mode must be zoom_out or zoom_out_zoom_in")
        if self.loss_resolution not in ("full", "low"):
            raise ValueError("loss_resolution must be 'full' or 'low'")
        if self.publish not in ("best", "last"):
            raise ValueError("publish must be 'best' or 'last'")
        if int(self.epochs) < 1 or int(self.batch_size) < 1 or int(self.repeats) < 1:
            raise ValueError("epochs, batch_size and repeats must be at least 1")
        if not float(self.lr) > 0:
            raise ValueError("lr must be positive")

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["freeze"] = list(self.freeze)
        out["combinations"] = list(self.combinations)
        return out

    @classmethod
    def from_mapping(cls, values: Dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainResult:
    status: str  # finished | budget | stopped
    epoch: int
    total_epochs: int
    steps: int
    best_metric: Optional[float]
    best_epoch: Optional[int]
    history: List[Dict[str, Any]]
    vocabulary: List[str]
    seconds: float
    checkpoint: Optional[str] = None  # best (or last) checkpoint of this run
    published: Optional[str] = None
    resumed_from: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


class StopTraining(Exception):
    """Raised by a callback to stop after the current step with a checkpoint (tests, external control)."""


# ---------------------------------------------------------------------------------------------------------------------
# the differentiable step
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Target:
    sample: int  # index of the view in the batch
    text: Optional[str]
    mask: np.ndarray  # (D, H, W) bool
    prompts: PromptSample


@dataclass
class Batch:
    images: torch.Tensor  # (B, 1, D, H, W)
    targets: List[Target]
    pseudo: List[Tuple[str, Target]] = field(default_factory=list)  # (kind, target)
    kinds: List[str] = field(default_factory=list)
    combinations: Optional[Tuple[str, ...]] = None  # this step's prompt combinations (None: all)


def build_batch(views, rngs, prompt_config: PromptConfig, max_categories: int, pseudo_passes: int,
                combinations: Sequence[str] = COMBINATIONS, per_step: int = 0) -> Batch:
    targets: List[Target] = []
    pseudo: List[Tuple[str, Target]] = []
    for index, (view, rng) in enumerate(zip(views, rngs)):
        values = list(view.texts)
        if len(values) > max_categories:
            values = [values[i] for i in sorted(rng.choice(len(values), size=max_categories, replace=False))]
        label = view.label.numpy()
        for value in values:
            mask = label == value
            targets.append(Target(index, view.texts[value], mask, sample_prompts(mask, rng, prompt_config)))
        if view.pseudo is not None and pseudo_passes > 0:
            pseudo_map = view.pseudo.numpy()
            for number in range(pseudo_passes):
                kind = "point" if number % 2 == 0 else "box"
                found = pseudo_target(pseudo_map, rng, kind, prompt_config)
                if found is not None:
                    pseudo.append((kind, Target(index, None, found[0], found[1])))
    images = torch.stack([v.image for v in views])
    chosen = None
    if 0 < per_step < len(combinations):
        chosen = tuple(combinations[i] for i in sorted(rngs[0].choice(len(combinations), per_step, replace=False)))
    return Batch(images=images, targets=targets, pseudo=pseudo, kinds=[v.kind for v in views], combinations=chosen)


class TrainStep(nn.Module):
    """``forward(batch) -> (loss, parts)`` for one batch; the module DDP wraps."""

    def __init__(self, model: SegVol, freeze: Sequence[str], combinations: Sequence[str], pseudo_weight: float,
                 loss_resolution: str = "full"):
        super().__init__()
        self.model = model
        self.loss_resolution = loss_resolution
        self.freeze = set(freeze)
        self.combinations = tuple(combinations)
        self.pseudo_weight = float(pseudo_weight)
        self._pooled: Dict[str, torch.Tensor] = {}  # frozen CLIP tower output per name

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        encoder = self.model.text_encoder
        device = encoder.dim_align.weight.device
        if "text_encoder" in self.freeze:
            missing = [n for n in dict.fromkeys(names) if n not in self._pooled]
            if missing:
                with torch.no_grad():
                    tokens = encoder.tokenize(missing)
                    pooled = encoder.clip_text_model(tokens["input_ids"].to(device),
                                                     tokens["attention_mask"].to(device)).float()
                for name, row in zip(missing, pooled):
                    self._pooled[name] = row
            pooled = torch.stack([self._pooled[n] for n in names])
        else:
            tokens = encoder.tokenize(list(names))
            pooled = encoder.clip_text_model(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        if "dim_align" in self.freeze:
            with torch.no_grad():
                return encoder.dim_align(pooled)
        return encoder.dim_align(pooled)

    def _decode_loss(self, embedding, targets: Sequence[Target], use_text: bool, use_box: bool, use_points: bool,
                     text_table: Optional[torch.Tensor], text_index: Optional[torch.Tensor], truth: torch.Tensor):
        device = embedding.device
        index = torch.as_tensor([t.sample for t in targets], device=device)
        prompts = [t.prompts for t in targets]
        text = text_table[text_index] if use_text else None
        boxes = stack_boxes(prompts, device) if use_box else None
        points = stack_points(prompts, device) if use_points else None
        low_res = self.model.decode(embedding[index], text, boxes, points)
        logits = low_res if self.loss_resolution == "low" else self.model.upsample(low_res)
        return dice_bce_loss(logits, truth).mean()

    def _truth(self, masks: Sequence[np.ndarray], device) -> torch.Tensor:
        """(N, 1, *image_size) float targets, area-averaged to the decoder's grid for ``loss_resolution='low'``."""
        truth = torch.from_numpy(np.stack(masks)[:, None]).to(device=device, dtype=torch.float32)
        if self.loss_resolution == "low":
            factor = [s // l for s, l in zip(self.model.config.image_size, self.model.config.low_res_size)]
            if any(f > 1 for f in factor):
                truth = torch.nn.functional.avg_pool3d(truth, kernel_size=factor, stride=factor)
        return truth

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        model = self.model
        images = batch.images.to(model.device)
        if "image_encoder" in self.freeze:
            with torch.no_grad():
                embedding = model.image_encoder(images)
        else:
            embedding = model.image_encoder(images)
        parts: Dict[str, float] = {}
        losses = []
        if batch.targets:
            truth = self._truth([t.mask for t in batch.targets], images.device)
            names = list(dict.fromkeys(t.text for t in batch.targets))
            table = self.text_embeddings(names)
            text_index = torch.as_tensor([names.index(t.text) for t in batch.targets], device=images.device)
            for combination in batch.combinations or self.combinations:
                use_text, use_box, use_points = combination_parts(combination)
                loss = self._decode_loss(embedding, batch.targets, use_text, use_box, use_points, table, text_index,
                                         truth)
                losses.append(loss)
                parts[combination] = float(loss.detach())
        if batch.pseudo and self.pseudo_weight > 0:
            for kind in ("point", "box"):
                group = [t for k, t in batch.pseudo if k == kind]
                if not group:
                    continue
                truth = self._truth([t.mask for t in group], images.device)
                loss = self._decode_loss(embedding, group, False, kind == "box", kind == "point", None, None, truth)
                losses.append(self.pseudo_weight * loss)
                parts[f"pseudo_{kind}"] = float(loss.detach())
        if not losses:  # nothing to learn from in this batch: a zero loss that still touches every parameter (DDP)
            zero = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=images.device))
            return zero, parts
        return torch.stack(losses).sum(), parts


# ---------------------------------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------------------------------
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
    found = find_tokenizer_dir(options.tokenizer) if options.tokenizer else None
    if found is None and options.init != "scratch":
        path = init_path(options)
        found = find_tokenizer_dir(path)
    if found is None and options.weights:
        found = find_tokenizer_dir(options.weights)
    if found is None:
        raise FileNotFoundError("no CLIP tokenizer: pass tokenizer=<folder with tokenizer.json / vocab.json> "
                                "(text prompts need it, also when training from scratch)")
    return found


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
    """Set ``requires_grad`` by the freeze list (plus the never-used parameters); -> trainable counts per part."""
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
    return {name: sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
            for name, modules in groups.items()}


def patch_embedding_lr_scale(factor: float) -> Dict[str, float]:
    """``TrainOptions.lr_scale`` giving the image encoder's patch embedding (projection and position embeddings)
    ``factor`` times the base rate; empty for 1."""
    return {"image_encoder.patch_embedding": float(factor)} if factor != 1 else {}


def _parameter_groups(model: SegVol, lr: float, scales: Dict[str, float]) -> List[Dict[str, Any]]:
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


def _set_modes(model: SegVol, freeze: Sequence[str]) -> None:
    model.train()
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if name in freeze:
            getattr(model, name).eval()


def _distributed() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


def _copy_atomic(source: str, destination: str) -> None:
    """Publish: copy to a temp file in the destination's folder, fsync it, rename it over ``destination``, fsync the
    folder. A reader (or a kill -9, or a power cut) sees the previous file or the new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(destination)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{destination}.{os.getpid()}.tmp"
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _write_json(path: str, payload: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
    os.replace(tmp, path)


def read_last(output_dir: str) -> Optional[Dict[str, Any]]:
    """Metadata of an output folder's ``last.pt`` (epoch, step, status...) or None."""
    path = os.path.join(output_dir, LAST)
    if not os.path.isfile(path):
        return None
    _, meta = read_checkpoint(path)
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------------
class _Prefetcher:
    """Builds the next batch on a background thread while the current one trains."""

    def __init__(self, make: Callable[[int], Batch], steps: Sequence[int], enabled: bool):
        self.make, self.steps, self.enabled = make, list(steps), enabled

    def __iter__(self):
        if not self.enabled or len(self.steps) < 2:
            for step in self.steps:
                yield step, self.make(step)
            return
        result: Dict[str, Any] = {}

        def work(step):
            try:
                result["batch"] = self.make(step)
            except BaseException as error:  # re-raised in the consumer
                result["error"] = error

        thread = threading.Thread(target=work, args=(self.steps[0],), daemon=True)
        thread.start()
        for position, step in enumerate(self.steps):
            thread.join()
            if "error" in result:
                raise result.pop("error")
            batch = result.pop("batch")
            if position + 1 < len(self.steps):
                thread = threading.Thread(target=work, args=(self.steps[position + 1],), daemon=True)
                thread.start()
            yield step, batch


def train(options: TrainOptions, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
          callback: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> TrainResult:
    """Train (or resume) in this process; in a DDP process group every rank calls this. See the module docstring.

    ``callback(event, info)`` is called with ``"step"`` and ``"epoch"`` events (rank 0); raising ``StopTraining``
    from it stops after a checkpoint.
    """
    started = time.time()
    if int(options.threads) > 0:
        torch.set_num_threads(int(options.threads))
    rank, world = _distributed()
    main = rank == 0
    os.makedirs(options.output_dir, exist_ok=True)
    if main:
        remove_stale_temp_files(options.output_dir)
    device = resolve_device(options.device)
    if dist.is_available() and dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    amp = (device.type == "cuda") if options.amp is None else bool(options.amp) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    tokenizer = tokenizer_dir(options)

    # ---- model: resume, or initialise -------------------------------------------------------------------------------
    last_path = os.path.join(options.output_dir, LAST)
    meta = read_last(options.output_dir) if options.resume else None
    if meta is not None and options.resume == "auto" and meta.get("status") == "finished":
        meta = None  # a finished run is not resumed automatically: start a new one (from options.init)
    resumed_from = None
    if meta is not None:
        model = load_model(last_path, device=str(device), tokenizer=tokenizer)
        resumed_from = {"epoch": int(meta.get("epoch", 0)), "step": int(meta.get("step", 0)),
                        "step_in_epoch": int(meta.get("step_in_epoch", 0)), "status": meta.get("status")}
        if main:
            logger.info("resuming %s at epoch %d, step %d (%s)", last_path, resumed_from["epoch"],
                        resumed_from["step"], meta.get("status"))
    elif options.init == "scratch":
        torch.manual_seed(options.seed)
        model = SegVol(resolve_config(options.config), load_tokenizer(tokenizer))
        init_text_tower_like_clip(model)
        model = model.to(device)
        model.vocabulary = []
    else:
        model = load_model(init_path(options), device=str(device), tokenizer=tokenizer)
    model.float()

    # ---- vocabulary: every label name becomes a text prompt --------------------------------------------------------
    vocabulary = Vocabulary.load(options.vocabulary)
    vocabulary.extend(list(getattr(model, "vocabulary", []) or []))

    def resolve(name: str) -> str:
        return vocabulary.resolve(name, allow_free_text=True)

    train_store = CaseStore(train_cases, model.config.image_size, resolve, options.reorient, options.cache_mb)
    val_store = CaseStore(val_cases, model.config.image_size, resolve, options.reorient, options.cache_mb / 4,
                          keep_original_label=True)
    trained_names = list(dict.fromkeys(list(train_store.names().values()) + list(val_store.names().values())))
    names = list(dict.fromkeys(list(getattr(model, "vocabulary", []) or []) + trained_names))
    if not len(train_store):
        raise ValueError("no training cases")

    # ---- optimisation ----------------------------------------------------------------------------------------------
    trainable = freeze_parameters(model, options.freeze)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"nothing to train: every part is frozen ({', '.join(options.freeze)})")
    optimizer = torch.optim.AdamW(_parameter_groups(model, float(options.lr), options.lr_scale),
                                  lr=float(options.lr), weight_decay=float(options.weight_decay))
    per_epoch = len(train_store) * int(options.repeats)
    steps_per_epoch = max(1, math.ceil(per_epoch / (world * int(options.batch_size))))
    total_epochs = int(options.epochs)
    warmup = min(int(round(float(options.warmup_epochs) * steps_per_epoch)), max(total_epochs * steps_per_epoch // 5, 0))
    scheduler = WarmupCosine(optimizer, total_epochs * steps_per_epoch, warmup, options.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None

    history: List[Dict[str, Any]] = []
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    start_epoch, skip_steps, global_step = 0, 0, 0
    if meta is not None:
        optimizer.load_state_dict(meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        history = list(meta.get("history", []))
        best_metric, best_epoch = meta.get("best_metric"), meta.get("best_epoch")
        start_epoch, skip_steps = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
        global_step = int(meta.get("step", 0))
        # the options' epochs are the plan (the same options continue the same schedule exactly)
        total_epochs = max(int(options.epochs), start_epoch + (1 if skip_steps else 0))
        if total_epochs * steps_per_epoch != scheduler.total_steps:
            scheduler.set_total(total_epochs * steps_per_epoch)
        meta = None  # free the optimizer copy

    step_module = TrainStep(model, options.freeze, options.combinations, options.pseudo_weight,
                            options.loss_resolution)
    runner: nn.Module = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=True)

    prompt_config = PromptConfig(options.box_jitter, options.max_positive, options.max_negative,
                                 options.boundary_fraction)
    view_config = ViewConfig(options.zoom_out_prob, options.pos_fraction, intensity_prob=options.intensity_prob)
    run_info = {"options": options.to_json(), "world_size": world, "device": str(device), "amp": amp,
                "tokenizer": tokenizer, "trainable_parameters": trainable, "train_cases": [c.id for c in train_cases],
                "val_cases": [c.id for c in val_cases], "label_texts": train_store.names()}
    if main:
        logger.info("training %s on %s: %d train / %d val cases, %d steps/epoch x %d epochs, batch %d x %d "
                    "process(es), lr %.2g, frozen: %s, trainable parameters %s, amp %s", model.config.image_size,
                    device, len(train_store), len(val_store), steps_per_epoch, total_epochs, options.batch_size, world,
                    options.lr, ", ".join(options.freeze) or "none", trainable, amp)
        logger.info("text prompts: %s", ", ".join(f"{k} -> {v!r}" for k, v in train_store.names().items()))

    def save_last(epoch: int, step_in_epoch: int, status: str) -> None:
        if not main:
            return
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch,
                        step_in_epoch=step_in_epoch, step=global_step, total_epochs=total_epochs,
                        vocabulary=names, history=history, best_metric=best_metric, best_epoch=best_epoch,
                        status=status, run=json.loads(json.dumps(run_info, default=str)))

    def publish(epoch: int, metric: Optional[float], per_label: Optional[Dict[str, float]]) -> Optional[str]:
        if not main:
            return None
        path = os.path.join(options.output_dir, BEST)
        save_checkpoint(path, model, epoch=epoch, vocabulary=names, metric=metric, per_label=per_label,
                        run={"output_dir": os.path.abspath(options.output_dir), "step": global_step})
        if options.publish_path:
            _copy_atomic(path, options.publish_path)
            logger.info("published %s (epoch %d%s)", options.publish_path, epoch,
                        "" if metric is None else f", validation Dice {metric:.4f}")
        return path

    def validate(epoch: int) -> Optional[Dict[str, Any]]:
        if not len(val_store):
            return None
        result = evaluate(model, val_store, prompt=options.val_prompt, mode=options.val_mode,
                          reorient=options.reorient)
        _set_modes(model, options.freeze)
        return result

    # the starting model's score: a fine-tuning run then publishes only what beats it
    if main and options.publish_if_better_than_init and resumed_from is None and len(val_store):
        initial = validate(0)
        best_metric, best_epoch = initial["mean"], 0
        logger.info("initial validation Dice %.4f (%s)", initial["mean"], format_dice(initial["per_label"]))
        history.append({"epoch": 0, "val": {"mean": initial["mean"], "per_label": initial["per_label"]}})

    # ---- signals: SIGTERM/SIGINT save a resumable checkpoint ---------------------------------------------------------
    interrupted = {"flag": False}
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            interrupted["flag"] = True
            logger.warning("signal %d: stopping after this step with a checkpoint", signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, on_signal)

    status = "finished"
    epoch_seconds: List[float] = [h["seconds"] for h in history if "seconds" in h]
    epoch = start_epoch
    published = None
    progress = None
    try:
        _set_modes(model, options.freeze)
        while epoch < total_epochs:
            epoch_started = time.time()
            order = epoch_order(per_epoch, options.seed, epoch) % len(train_store)
            padded = np.resize(order, steps_per_epoch * world * int(options.batch_size))
            mine = padded[rank::world]
            steps = range(skip_steps, steps_per_epoch)
            skip_steps = 0

            def make(step: int, epoch: int = epoch, mine: np.ndarray = mine) -> Batch:
                positions = range(step * int(options.batch_size), (step + 1) * int(options.batch_size))
                rngs = [view_rng(options.seed, epoch, p, rank) for p in positions]
                views = [sample_view(train_store[int(mine[p])], r, view_config) for p, r in zip(positions, rngs)]
                return build_batch(views, rngs, prompt_config, options.max_categories,
                                   options.pseudo_passes if options.pseudo_weight > 0 else 0, options.combinations,
                                   int(options.combinations_per_step))

            if main and (options.progress or (options.progress is None and _stderr_is_tty())):
                from tqdm import tqdm

                progress = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{total_epochs}", leave=False)
            losses, parts_sum = [], {}
            stop_reason = None
            for step, batch in _Prefetcher(make, steps, options.prefetch):
                optimizer.zero_grad(set_to_none=True)
                autocast = torch.autocast("cuda", dtype=amp_dtype) if amp else contextlib.nullcontext()
                with autocast:
                    loss, parts = runner(batch)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if options.grad_clip:
                    torch.nn.utils.clip_grad_norm_(parameters, float(options.grad_clip))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                global_step += 1
                value = float(loss.detach())
                losses.append(value)
                for key, part in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + part
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.lr:.2e}")
                stop = interrupted["flag"]
                if main and callback is not None:
                    try:
                        callback("step", {"epoch": epoch, "step": step, "global_step": global_step, "loss": value})
                    except StopTraining:
                        stop = True
                if options.time_budget_s and time.time() - started > float(options.time_budget_s):
                    stop, stop_reason = True, "budget"
                if _any_rank(stop, device):
                    if step + 1 < steps_per_epoch:
                        status = stop_reason or "stopped"
                        save_last(epoch, step + 1, status)
                        if main:
                            logger.info("stopped in epoch %d after step %d/%d (%s); resume continues there",
                                        epoch + 1, step + 1, steps_per_epoch, status)
                        return _result(status, epoch, total_epochs, global_step, best_metric, best_epoch, history,
                                       names, started, options, published, resumed_from)
                    status = stop_reason or "stopped"
                    break
            if progress is not None:
                progress.close()
                progress = None

            # ---- end of epoch: validate, checkpoint, publish ----------------------------------------------------------
            epoch += 1
            stopping = status != "finished"  # a stop request arrived on the epoch's last step
            entry: Dict[str, Any] = {"epoch": epoch, "steps": len(losses), "global_step": global_step,
                                     "loss": float(np.mean(losses)) if losses else None, "lr": scheduler.lr,
                                     "parts": {k: v / max(len(losses), 1) for k, v in parts_sum.items()}}
            val = None
            if main and (epoch % max(int(options.val_every), 1) == 0 or epoch >= total_epochs or stopping):
                val = validate(epoch)
            if val is not None:
                entry["val"] = {"mean": val["mean"], "per_label": val["per_label"], "seconds": val["seconds"]}
            entry["seconds"] = round(time.time() - epoch_started, 2)
            entry["elapsed"] = round(time.time() - started, 2)
            epoch_seconds.append(entry["seconds"])
            # a time budget shortens the plan (and the cosine decay) to the epochs that still fit
            if options.time_budget_s and options.fit_budget and not stopping and epoch < total_epochs:
                remaining = float(options.time_budget_s) - (time.time() - started)
                mean_epoch = float(np.mean(epoch_seconds[-3:]))
                # the plan may grow back (up to the requested epochs) when epochs got faster, and shrinks when slower
                planned = max(min(int(options.epochs), epoch + max(int(remaining // max(mean_epoch, 1e-6)), 0)),
                              epoch)
                if planned == total_epochs + 1:
                    planned = total_epochs  # no jitter from one epoch's noise
                if _distributed()[1] > 1:  # every rank must agree on the plan
                    tensor = torch.tensor([float(planned)], device=device)
                    dist.broadcast(tensor, 0)
                    planned = int(tensor.item())
                if planned != total_epochs:
                    if main:
                        logger.info("time budget: %d of %d planned epochs fit (%.0fs left, %.1fs per epoch)",
                                    planned, total_epochs, remaining, mean_epoch)
                    total_epochs = planned
                    scheduler.set_total(total_epochs * steps_per_epoch)
                    entry["planned_epochs"] = planned
            final = epoch >= total_epochs
            history.append(entry)
            if main:
                improved = val is not None and (best_metric is None or val["mean"] > best_metric)
                if improved:
                    best_metric, best_epoch = val["mean"], epoch
                if options.publish == "last" or improved or (not len(val_store) and (final or stopping)):
                    published = publish(epoch, val["mean"] if val else None, val["per_label"] if val else None)
                logger.info("epoch %d/%d: loss %.4f, lr %.2e, %d steps, %.1fs%s", epoch, total_epochs,
                            entry["loss"] if entry["loss"] is not None else float("nan"), scheduler.lr, len(losses),
                            entry["seconds"], "" if val is None else
                            f", validation Dice ({options.val_prompt}, {options.val_mode}) {val['mean']:.4f} "
                            f"[{format_dice(val['per_label'])}]")
                if callback is not None:
                    try:
                        callback("epoch", entry)
                    except StopTraining:
                        stopping, status = True, "stopped"
            stopping = _any_rank(stopping, device)
            if final:
                status = "finished"
            elif stopping and status == "finished":
                status = "stopped"
            save_last(epoch, 0, status if (final or stopping) else "running")
            if final or stopping:
                break
        _barrier()
    finally:
        if progress is not None:
            progress.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    result = _result(status, epoch, total_epochs, global_step, best_metric, best_epoch, history, names, started,
                     options, published, resumed_from)
    if main:
        _write_json(os.path.join(options.output_dir, "history.json"), result.to_json())
    return result


def _result(status, epoch, total_epochs, steps, best_metric, best_epoch, history, names, started, options, published,
            resumed_from) -> TrainResult:
    best = os.path.join(options.output_dir, BEST)
    return TrainResult(status=status, epoch=epoch, total_epochs=total_epochs, steps=steps, best_metric=best_metric,
                       best_epoch=best_epoch, history=history, vocabulary=names,
                       seconds=round(time.time() - started, 2),
                       checkpoint=best if os.path.isfile(best) else os.path.join(options.output_dir, LAST),
                       published=options.publish_path if published and options.publish_path else None,
                       resumed_from=resumed_from)


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# multi-process (DDP) launch
# ---------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, options: TrainOptions, train_cases, val_cases, backend: str) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=DDP_TIMEOUT)
    try:
        train(options, train_cases, val_cases)
    finally:
        dist.destroy_process_group()


def run_training(options: TrainOptions, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
                 callback=None) -> TrainResult:
    """Train in this process, or in ``options.world_size`` DDP processes (one per GPU) and return rank 0's result.

    Under ``torchrun`` (``WORLD_SIZE`` set) the process group is joined instead of spawning."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = options.ddp_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=DDP_TIMEOUT)
        try:
            return train(options, train_cases, val_cases, callback)
        finally:
            dist.destroy_process_group()
    world = int(options.world_size)
    if world <= 1:
        return train(options, train_cases, val_cases, callback)
    backend = options.ddp_backend or ("nccl" if resolve_device(options.device).type == "cuda" else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(f"{world} processes requested but only {torch.cuda.device_count()} GPU(s) are visible")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, options, list(train_cases), list(val_cases), backend), nprocs=world, join=True)
    with open(os.path.join(options.output_dir, "history.json")) as handle:
        return TrainResult(**json.load(handle))


__all__ = ["DEFAULT_FREEZE", "FREEZABLE", "StopTraining", "TrainOptions", "TrainResult", "TrainStep", "build_batch",
           "freeze_parameters", "read_last", "run_training", "train"]
