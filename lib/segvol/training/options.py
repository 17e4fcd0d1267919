"""What a training run is asked to do and what it answers: ``TrainOptions`` (every option; CLI flags and train-task
request keys map 1:1 onto its fields, validated here), ``TrainResult``, the run status (``TrainStatus``), the freeze
choices and the names of the run folder's checkpoints (``last.pt``, ``best.pt``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple

from ..modes import MODES
from .evaluate import PROMPTS
from .prompts import COMBINATIONS, combination_parts

FREEZABLE = ("image_encoder", "text_encoder", "dim_align", "prompt_encoder", "mask_decoder")
DEFAULT_FREEZE = ("image_encoder", "text_encoder")  # the SegVol maintainers' advice for fine-tuning
# What each training mode trains (``TrainOptions.mode``; "" keeps ``freeze`` as given):
# full: every part; decoder: the image and text encoders frozen (image embeddings cached per fixed view);
# lora: as decoder, plus low-rank adapters on the image encoder's attention (merged when published).
MODE_FREEZE = {"full": (), "decoder": ("image_encoder", "text_encoder"), "lora": ("image_encoder", "text_encoder")}
DISTILL_WEIGHT = 1.0  # the distillation term's weight in continual learning (benchmark.py fewshot measured it)
DECODER_VIEWS_PER_CASE = 8  # fixed views per case in the decoder mode, so their embeddings are computed once
LAST = "last.pt"
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
    mode: str = ""  # "full" | "decoder" | "lora" (MODE_FREEZE; overrides ``freeze``) or "" (``freeze`` decides)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    views_per_case: Optional[int] = None  # k > 0: each case offers k fixed views (embeddings cacheable when the
    # image encoder is frozen); 0: a fresh random view every time; None: DECODER_VIEWS_PER_CASE in "decoder" mode
    embedding_cache_mb: float = 2048  # the decoder mode's cache of image embeddings
    checkpointing: bool = False  # gradient checkpointing of the image encoder's blocks (memory for compute)
    keep: Tuple[str, ...] = ()  # continual learning: structures the starting model knows and must keep; a case
    # without one gets the starting model's prediction of it as a replay label (``continual.add_replay_labels``)
    distill_weight: Optional[float] = None  # continual learning: weight of a distillation term toward the starting
    # model's answers for the ``keep`` structures' prompts (soft targets on the same views and prompts; step.py 3a);
    # None: DISTILL_WEIGHT with ``keep``, else 0
    amp: Optional[bool] = None  # default: on when training on CUDA
    device: str = "auto"
    seed: int = 0
    zoom_out_prob: float = 0.5
    pos_fraction: float = 2.0 / 3.0
    intensity_prob: float = 0.1
    box_jitter: float = 0.1
    window_box_prob: float = 0.0  # share of a crop's box prompts that are the box a zoom-in window gets (PromptConfig)
    max_positive: int = 10
    max_negative: int = 10
    boundary_fraction: float = 0.5
    combinations: Tuple[str, ...] = COMBINATIONS
    combinations_per_step: int = 0  # 0: every combination every step; k: a random k of them per step (cheaper steps)
    corrective_prob: float = 0.5  # share of steps with the corrective-click term (clicks on the model's own errors)
    corrective_rounds: int = 5  # simulated click rounds of that term: uniform in 1..corrective_rounds (the robot's 5)
    mask_prompt: bool = False  # give a starting network without it the previous-prediction prompt
    # (SegVolConfig.mask_prompt; from scratch, the configuration says): its corrective clicks then see the answer
    # they correct, as in a session
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
        if self.mode:
            if self.mode not in MODE_FREEZE:
                raise ValueError(f"mode must be one of {', '.join(MODE_FREEZE)} (or empty), got {self.mode!r}")
            self.freeze = MODE_FREEZE[self.mode]
        if self.views_per_case is None:
            self.views_per_case = DECODER_VIEWS_PER_CASE if self.mode == "decoder" else 0
        if int(self.views_per_case) < 0 or (self.mode == "lora" and int(self.lora_rank) < 1):
            raise ValueError("views_per_case must be >= 0 and lora_rank >= 1")
        if isinstance(self.keep, str):
            self.keep = tuple(k.strip() for k in self.keep.split(",") if k.strip())
        self.keep = tuple(self.keep)
        if self.distill_weight is None:
            self.distill_weight = DISTILL_WEIGHT if self.keep else 0.0
        self.distill_weight = float(self.distill_weight)
        if self.distill_weight < 0 or (self.distill_weight > 0 and not self.keep):
            raise ValueError("distill_weight must be >= 0, and needs keep (the structures to distil)")
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
        if self.val_mode not in MODES:
            raise ValueError(f"val_mode must be one of {', '.join(MODES)}")
        if self.loss_resolution not in ("full", "low"):
            raise ValueError("loss_resolution must be 'full' or 'low'")
        if not 0.0 <= float(self.window_box_prob) <= 1.0:
            raise ValueError("window_box_prob must be in [0, 1]")
        if not 0.0 <= float(self.corrective_prob) <= 1.0 or int(self.corrective_rounds) < 1:
            raise ValueError("corrective_prob must be in [0, 1] and corrective_rounds at least 1")
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
        out["keep"] = list(self.keep)
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


class TrainStatus(str, Enum):
    """Where a run stands: ``RUNNING`` (only in ``last.pt`` between epochs), ``FINISHED`` (every planned epoch done),
    ``BUDGET`` (the time budget ran out before the plan), ``STOPPED`` (a signal, a callback or another rank asked).
    Stored as its plain string value (``weights_only`` checkpoints and history.json hold no enum)."""

    RUNNING = "running"
    FINISHED = "finished"
    BUDGET = "budget"
    STOPPED = "stopped"


class StopTraining(Exception):
    """Raised by a callback to stop after the current step with a checkpoint (tests, external control)."""


__all__ = ["BEST", "DEFAULT_FREEZE", "FREEZABLE", "LAST", "MODE_FREEZE", "StopTraining", "TrainOptions", "TrainResult",
           "TrainStatus"]
