"""The SegVol fine-tuning loop (``Trainer``), shared by ``scripts/train.py`` and the MONAI Label train task: it owns a
run's state (model, optimizer, schedule, counters, history, best score) and its order of events; what a step computes
is in ``step``, how a run is built in ``setup``, the options and status in ``options``, DDP in ``distributed``.

One optimizer step is ``step.TrainStep`` (encode once, decode every category under every prompt combination, Dice +
BCE) plus AdamW with warm-up and cosine decay (``schedule.WarmupCosine``), optional clipping and autocast on CUDA;
which parts train is ``setup.freeze_parameters``.

Each epoch ends with validation (per-label Dice through the inference engine) and a checkpoint ``last.pt`` holding
model, optimizer, scheduler, scaler, epoch, step, vocabulary, history and options (``segvol.save_checkpoint``, so
``weights_only`` loading works). An interrupted run resumes from it exactly where it stopped (samples are a pure
function of seed, epoch and position, so the resumed run draws what the uninterrupted one would have). The best
checkpoint (``best.pt``) is also written atomically to ``publish_path``, where the app's infer tasks pick it up.

A run is ``restore`` (resume ``last.pt`` or initialise), then ``run_epoch`` / ``end_epoch`` (validate, fit the plan
to the time budget with ``fit_budget``, publish, checkpoint) until the plan is done or a stop is requested; a stop
inside an epoch saves the position and ends the run at once (``TrainStatus``).

Multi-GPU: ``run_training`` spawns one process per GPU (torch DDP, NCCL; gloo on CPU) when ``world_size`` > 1, or
joins a process group that ``torchrun`` set up.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_model, resolve_device, save_checkpoint
from ..io import atomic_copy, atomic_write_json
from ..modeling.lora import merge_adapters
from ..modeling.segvol import SegVol
from ..modeling.text_encoder import load_tokenizer
from ..vocabulary import Vocabulary
from . import distributed, setup
from .data import Case, CaseStore, ViewConfig, epoch_order, fixed_view_rng, sample_view, step_rng, view_rng
from .evaluate import evaluate, format_dice
from .options import BEST, DEFAULT_FREEZE, FREEZABLE, LAST, StopTraining, TrainOptions, TrainResult, TrainStatus
from .prompts import PromptConfig
from .schedule import WarmupCosine
from .setup import freeze_parameters, patch_embedding_lr_scale, read_last, resolve_config  # noqa: F401 (API)
from .step import Batch, Distillation, Prefetcher, TrainStep, build_batch, optimizer_step

logger = logging.getLogger("segvol.training")

Callback = Callable[[str, Dict[str, Any]], None]


@dataclass
class EpochLog:
    """What one epoch's steps produced (``run_epoch``), for ``end_epoch``."""

    started: float
    losses: List[float] = field(default_factory=list)
    parts: Dict[str, float] = field(default_factory=dict)


class Trainer:
    """One training run in this process (every rank of a DDP group builds one). ``fit()`` runs it; see the module
    docstring for the order of events. ``callback(event, info)`` gets ``"step"`` and ``"epoch"`` events (rank 0);
    raising ``StopTraining`` from it stops after a checkpoint."""

    def __init__(self, options: TrainOptions, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
                 callback: Optional[Callback] = None):
        self.options, self.callback = options, callback
        self.started = time.time()
        if int(options.threads) > 0:
            torch.set_num_threads(int(options.threads))
        self.rank, self.world = distributed.rank_and_world()
        self.main = self.rank == 0
        os.makedirs(options.output_dir, exist_ok=True)
        if self.main:
            setup.remove_stale_temp_files(options.output_dir)
        device = resolve_device(options.device)
        if distributed.active() and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.amp = (device.type == "cuda") if options.amp is None else bool(options.amp) and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.tokenizer = setup.tokenizer_dir(options)
        self.last_path = os.path.join(options.output_dir, LAST)
        self.resumed_from: Optional[Dict[str, Any]] = None
        meta = self.restore()
        self._build_data(train_cases, val_cases)
        self._build_optimisation(meta)
        self.run_info = {"options": options.to_json(), "world_size": self.world, "device": str(device),
                         "amp": self.amp, "tokenizer": self.tokenizer, "trainable_parameters": self.trainable,
                         "train_cases": [c.id for c in train_cases], "val_cases": [c.id for c in val_cases],
                         "label_texts": self.train_store.names()}
        self.stop: Optional[TrainStatus] = None  # BUDGET or STOPPED once a stop is requested
        self._signalled = False
        self.published: Optional[str] = None
        self._progress = None
        if self.main:
            logger.info("training %s on %s: %d train / %d val cases, %d steps/epoch x %d epochs, batch %d x %d "
                        "process(es), lr %.2g, frozen: %s, trainable parameters %s, amp %s",
                        self.model.config.image_size, device, len(self.train_store), len(self.val_store),
                        self.steps_per_epoch, self.total_epochs, options.batch_size, self.world, options.lr,
                        ", ".join(options.freeze) or "none", self.trainable, self.amp)
            logger.info("text prompts: %s", ", ".join(f"{k} -> {v!r}" for k, v in self.train_store.names().items()))

    # ---- building ----------------------------------------------------------------------------------------------------
    def restore(self) -> Optional[Dict[str, Any]]:
        """The model: ``last.pt`` of an unfinished run (``resume``; -> its metadata, whose optimizer, schedule and
        counters ``_build_optimisation`` restores), else a fresh one from ``init`` (-> None)."""
        options = self.options
        meta = setup.read_last(options.output_dir) if options.resume else None
        if meta is not None and options.resume == "auto" and meta.get("status") == TrainStatus.FINISHED.value:
            meta = None  # a finished run is not resumed automatically: start a new one (from options.init)
        if meta is not None:
            model = load_model(self.last_path, device=str(self.device), tokenizer=self.tokenizer)
            self.resumed_from = {"epoch": int(meta.get("epoch", 0)), "step": int(meta.get("step", 0)),
                                 "step_in_epoch": int(meta.get("step_in_epoch", 0)), "status": meta.get("status")}
            if self.main:
                logger.info("resuming %s at epoch %d, step %d (%s)", self.last_path, self.resumed_from["epoch"],
                            self.resumed_from["step"], meta.get("status"))
        elif options.init == "scratch":
            torch.manual_seed(options.seed)
            model = SegVol(setup.resolve_config(options.config), load_tokenizer(self.tokenizer))
            setup.init_text_tower_like_clip(model)
            model = model.to(self.device)
        else:
            model = load_model(setup.init_path(options), device=str(self.device), tokenizer=self.tokenizer)
        if options.mode == "lora":  # a resumed lora run's last.pt already holds its adapters
            model = setup.with_adapters(model, options.lora_rank, options.lora_alpha)
        if options.mask_prompt:
            model = setup.with_mask_prompt(model)
        self.model = model.float()
        return meta

    def _build_data(self, train_cases: Sequence[Case], val_cases: Sequence[Case]) -> None:
        """Case stores and the vocabulary: every label name becomes a text prompt."""
        options, model = self.options, self.model
        vocabulary = Vocabulary.load(options.vocabulary)
        vocabulary.extend(model.vocabulary)

        def resolve(name: str) -> str:
            return vocabulary.resolve(name, allow_free_text=True)

        size = model.config.image_size
        self.train_store = CaseStore(train_cases, size, resolve, options.reorient, options.cache_mb)
        self.val_store = CaseStore(val_cases, size, resolve, options.reorient, options.cache_mb / 4,
                                   keep_original_label=True)
        trained = list(dict.fromkeys(list(self.train_store.names().values()) + list(self.val_store.names().values())))
        self.names = list(dict.fromkeys(model.vocabulary + trained))
        if not len(self.train_store):
            raise ValueError("no training cases")
        self.prompt_config = PromptConfig(options.box_jitter, options.max_positive, options.max_negative,
                                          options.boundary_fraction, window_box_prob=float(options.window_box_prob))
        self.view_config = ViewConfig(options.zoom_out_prob, options.pos_fraction,
                                      intensity_prob=options.intensity_prob)
        self.kept_texts = frozenset(resolve(name) for name in options.keep)  # the text prompts of the kept names

    def _build_optimisation(self, meta: Optional[Dict[str, Any]]) -> None:
        """Optimizer, schedule, scaler, the step module (DDP-wrapped) and the counters, restored from ``meta``."""
        options, model = self.options, self.model
        self.trainable = setup.freeze_parameters(model, options.freeze)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError(f"nothing to train: every part is frozen ({', '.join(options.freeze)})")
        # fused: one kernel per group instead of a loop over tensors (the loop was 8 % of a small model's CPU step)
        self.optimizer = torch.optim.AdamW(setup.parameter_groups(model, float(options.lr), options.lr_scale),
                                           lr=float(options.lr), weight_decay=float(options.weight_decay),
                                           fused=model.device.type in ("cpu", "cuda"))
        self.per_epoch = len(self.train_store) * int(options.repeats)
        self.steps_per_epoch = max(1, math.ceil(self.per_epoch / (self.world * int(options.batch_size))))
        self.total_epochs = int(options.epochs)
        steps = self.steps_per_epoch
        warmup = min(int(round(float(options.warmup_epochs) * steps)), max(self.total_epochs * steps // 5, 0))
        self.scheduler = WarmupCosine(self.optimizer, self.total_epochs * steps, warmup, options.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.amp_dtype == torch.float16 else None
        self.history: List[Dict[str, Any]] = []
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.epoch, self.skip_steps, self.global_step = 0, 0, 0
        if meta is not None:
            self.optimizer.load_state_dict(meta["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
            if self.scaler is not None and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            self.history = list(meta.get("history", []))
            self.best_metric, self.best_epoch = meta.get("best_metric"), meta.get("best_epoch")
            self.epoch, self.skip_steps = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
            self.global_step = int(meta.get("step", 0))
            # the options' epochs are the plan (the same options continue the same schedule exactly)
            self.total_epochs = max(int(options.epochs), self.epoch + (1 if self.skip_steps else 0))
            if self.total_epochs * steps != self.scheduler.total_steps:
                self.scheduler.set_total(self.total_epochs * steps)
        self.epoch_seconds: List[float] = [h["seconds"] for h in self.history if "seconds" in h]
        cache = ("image_encoder" in options.freeze and not model.config.lora_rank and options.views_per_case > 0)
        self.step_module = TrainStep(model, options.freeze, options.combinations, options.pseudo_weight,
                                     options.loss_resolution, checkpoint_blocks=options.checkpointing,
                                     embedding_cache_mb=options.embedding_cache_mb if cache else 0,
                                     distill=self._distillation())
        self.runner: nn.Module = self.step_module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.step_module, device_ids=device_ids,
                                                  find_unused_parameters=True)

    def _distillation(self) -> Optional[Distillation]:
        """The distillation term toward the starting model (``options.distill_weight``; step.py, 3a), or None."""
        options = self.options
        if not float(options.distill_weight) > 0:
            return None
        if options.init == "scratch":
            raise ValueError("distill_weight: a model trained from scratch has no starting model to distil")
        teacher = load_model(setup.init_path(options), device=str(self.device), tokenizer=self.tokenizer).float()
        teacher.eval().requires_grad_(False)
        return Distillation(teacher, self.kept_texts, float(options.distill_weight))

    # ---- the run -----------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run (or continue) the plan; -> the result (rank 0 also writes it to ``history.json`` unless the run stopped
        inside an epoch)."""
        with setup.stop_on_signals(self._on_signal):
            try:
                setup.set_modes(self.model, self.options.freeze)
                self._validate_initial_model()
                while self.epoch < self.total_epochs:
                    log = self.run_epoch()
                    if log is None:  # stopped inside the epoch: last.pt holds the position
                        return self.result()
                    if self.end_epoch(log):
                        break
                distributed.barrier()
            finally:
                self._progress = setup.close_progress(self._progress)
        result = self.result()
        if self.main:
            atomic_write_json(os.path.join(self.options.output_dir, "history.json"), result.to_json())
        return result

    def run_epoch(self) -> Optional[EpochLog]:
        """This rank's steps of the current epoch (from ``skip_steps`` on a resume); -> their losses, or None when a
        stop request ended the epoch before its last step (``last.pt`` then holds the next step)."""
        options = self.options
        log = EpochLog(started=time.time())
        order = epoch_order(self.per_epoch, options.seed, self.epoch) % len(self.train_store)
        padded = np.resize(order, self.steps_per_epoch * self.world * int(options.batch_size))
        mine = padded[self.rank::self.world]
        steps = range(self.skip_steps, self.steps_per_epoch)
        self.skip_steps = 0
        epoch = self.epoch

        def make(step: int) -> Batch:
            return self.make_batch(epoch, mine, step)

        description = f"epoch {self.epoch + 1}/{self.total_epochs}"
        self._progress = setup.progress_bar(options, self.main, len(steps), description)
        for step, batch in Prefetcher(make, steps, options.prefetch):
            value, parts = self.train_step(batch)
            log.losses.append(value)
            for key, part in parts.items():
                log.parts[key] = log.parts.get(key, 0.0) + part
            if self._progress is not None:
                self._progress.update(1)
                self._progress.set_postfix(loss=f"{value:.3f}", lr=f"{self.scheduler.lr:.2e}")
            if distributed.any_rank(self._stop_requested(step, value), self.device):
                self.stop = self.stop or TrainStatus.STOPPED
                if step + 1 < self.steps_per_epoch:
                    self.save_last(self.epoch, step + 1, self.stop)
                    if self.main:
                        logger.info("stopped in epoch %d after step %d/%d (%s); resume continues there",
                                    self.epoch + 1, step + 1, self.steps_per_epoch, self.stop.value)
                    return None
                break
        self._progress = setup.close_progress(self._progress)
        return log

    def make_batch(self, epoch: int, mine: np.ndarray, step: int) -> Batch:
        """The views and prompts of one step: a pure function of seed, epoch, position and rank."""
        options = self.options
        positions = range(step * int(options.batch_size), (step + 1) * int(options.batch_size))
        rngs = [view_rng(options.seed, epoch, p, self.rank) for p in positions]
        keys = None
        if options.views_per_case:  # one of the case's fixed views (its own generator); the prompts stay per step
            keys = [(int(mine[p]), int(r.integers(options.views_per_case))) for p, r in zip(positions, rngs)]
            views = [sample_view(self.train_store[case], fixed_view_rng(options.seed, case, variant),
                                 self.view_config) for case, variant in keys]
        else:
            views = [sample_view(self.train_store[int(mine[p])], r, self.view_config)
                     for p, r in zip(positions, rngs)]
        return build_batch(views, rngs, self.prompt_config, options.max_categories,
                           options.pseudo_passes if options.pseudo_weight > 0 else 0, options.combinations,
                           int(options.combinations_per_step), float(options.corrective_prob),
                           int(options.corrective_rounds), view_keys=keys,
                           step_rng=step_rng(options.seed, epoch, step))

    def train_step(self, batch: Batch):
        """One optimizer step (``step.optimizer_step``); -> (loss, loss parts)."""
        result = optimizer_step(self.runner, batch, self.optimizer, self.scheduler, self.scaler, self.parameters,
                                self.options.grad_clip, self.amp_dtype if self.amp else None)
        self.global_step += 1
        return result

    def _stop_requested(self, step: int, loss: float) -> bool:
        """This rank's view: a signal, the callback's ``StopTraining`` or the time budget (-> ``self.stop``)."""
        stop = self._signalled
        if self.main and self.callback is not None:
            try:
                self.callback("step", {"epoch": self.epoch, "step": step, "global_step": self.global_step,
                                       "loss": loss})
            except StopTraining:
                stop = True
        if self.options.time_budget_s and time.time() - self.started > float(self.options.time_budget_s):
            stop, self.stop = True, TrainStatus.BUDGET
        return stop

    def _on_signal(self) -> None:
        self._signalled = True

    def end_epoch(self, log: EpochLog) -> bool:
        """Validate, fit the plan to the time budget, record, publish (best or last) and checkpoint; -> True when
        the run ends here (plan done or a stop requested)."""
        options = self.options
        self.epoch += 1
        epoch = self.epoch
        stopping = self.stop is not None  # a stop request arrived on the epoch's last step
        losses = log.losses
        entry: Dict[str, Any] = {"epoch": epoch, "steps": len(losses), "global_step": self.global_step,
                                 "loss": float(np.mean(losses)) if losses else None, "lr": self.scheduler.lr,
                                 "parts": {k: v / max(len(losses), 1) for k, v in log.parts.items()},
                                 "encoded": self.step_module.encoded}  # images the image encoder ran on so far
        val = None
        if self.main and (epoch % max(int(options.val_every), 1) == 0 or epoch >= self.total_epochs or stopping):
            val = self.validate()
        if val is not None:
            entry["val"] = {"mean": val["mean"], "per_label": val["per_label"], "seconds": val["seconds"]}
        entry["seconds"] = round(time.time() - log.started, 2)
        entry["elapsed"] = round(time.time() - self.started, 2)
        self.epoch_seconds.append(entry["seconds"])
        if options.time_budget_s and options.fit_budget and not stopping and epoch < self.total_epochs:
            planned = self.fit_budget()
            if planned is not None:
                entry["planned_epochs"] = planned
        final = epoch >= self.total_epochs
        self.history.append(entry)
        if self.main:
            improved = val is not None and (self.best_metric is None or val["mean"] > self.best_metric)
            if improved:
                self.best_metric, self.best_epoch = val["mean"], epoch
            if options.publish == "last" or improved or (not len(self.val_store) and (final or stopping)):
                self.published = self.publish(val["mean"] if val else None, val["per_label"] if val else None)
            logger.info("epoch %d/%d: loss %.4f, lr %.2e, %d steps, %.1fs%s", epoch, self.total_epochs,
                        entry["loss"] if entry["loss"] is not None else float("nan"), self.scheduler.lr, len(losses),
                        entry["seconds"], "" if val is None else
                        f", validation Dice ({options.val_prompt}, {options.val_mode}) {val['mean']:.4f} "
                        f"[{format_dice(val['per_label'])}]")
            if self.callback is not None:
                try:
                    self.callback("epoch", entry)
                except StopTraining:
                    stopping, self.stop = True, TrainStatus.STOPPED
        if distributed.any_rank(stopping, self.device):
            self.stop = self.stop or TrainStatus.STOPPED
            stopping = True
        if final:
            self.stop = None  # a stop request on the plan's last step still finishes the run
        self.save_last(epoch, 0, self.status() if (final or stopping) else TrainStatus.RUNNING)
        return final or stopping

    def fit_budget(self) -> Optional[int]:
        """Shorten the plan (and the cosine decay) to the epochs that still fit the time budget, or let it grow back
        up to the requested epochs when epochs got faster; every rank agrees on rank 0's plan. -> the new plan, or
        None when it is unchanged."""
        remaining = float(self.options.time_budget_s) - (time.time() - self.started)
        mean_epoch = float(np.mean(self.epoch_seconds[-3:]))
        fit = max(int(remaining // max(mean_epoch, 1e-6)), 0)
        planned = max(min(int(self.options.epochs), self.epoch + fit), self.epoch)
        if planned == self.total_epochs + 1:
            planned = self.total_epochs  # no jitter from one epoch's noise
        planned = distributed.broadcast_int(planned, self.device)
        if planned == self.total_epochs:
            return None
        if self.main:
            logger.info("time budget: %d of %d planned epochs fit (%.0fs left, %.1fs per epoch)", planned,
                        self.total_epochs, remaining, mean_epoch)
        self.total_epochs = planned
        self.scheduler.set_total(self.total_epochs * self.steps_per_epoch)
        return planned

    def validate(self) -> Optional[Dict[str, Any]]:
        """Per-label Dice of the validation cases through the inference engine (None without any)."""
        if not len(self.val_store):
            return None
        result = evaluate(self.model, self.val_store, prompt=self.options.val_prompt, mode=self.options.val_mode,
                          reorient=self.options.reorient)
        setup.set_modes(self.model, self.options.freeze)
        return result

    def _validate_initial_model(self) -> None:
        """The starting model's score: a fine-tuning run then publishes only what beats it."""
        options = self.options
        if not (self.main and options.publish_if_better_than_init and self.resumed_from is None
                and len(self.val_store)):
            return
        initial = self.validate()
        self.best_metric, self.best_epoch = initial["mean"], 0
        logger.info("initial validation Dice %.4f (%s)", initial["mean"], format_dice(initial["per_label"]))
        self.history.append({"epoch": 0, "val": {"mean": initial["mean"], "per_label": initial["per_label"]}})

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def save_last(self, epoch: int, step_in_epoch: int, status: TrainStatus) -> None:
        """``last.pt``: everything a resume needs (rank 0)."""
        if not self.main:
            return
        save_checkpoint(self.last_path, self.model, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(),
                        scaler=self.scaler.state_dict() if self.scaler is not None else None, epoch=epoch,
                        step_in_epoch=step_in_epoch, step=self.global_step, total_epochs=self.total_epochs,
                        vocabulary=self.names, history=self.history, best_metric=self.best_metric,
                        best_epoch=self.best_epoch, status=TrainStatus(status).value,
                        run=json.loads(json.dumps(self.run_info, default=str)))

    def publish(self, metric: Optional[float], per_label: Optional[Dict[str, float]]) -> Optional[str]:
        """``best.pt`` in the run folder, copied atomically to ``publish_path`` where the infer tasks pick it up."""
        if not self.main:
            return None
        options = self.options
        path = os.path.join(options.output_dir, BEST)
        # adapters folded into the weights: the published model serves at the plain network's cost
        save_checkpoint(path, merge_adapters(self.model), epoch=self.epoch, vocabulary=self.names, metric=metric,
                        per_label=per_label,
                        run={"output_dir": os.path.abspath(options.output_dir), "step": self.global_step})
        if options.publish_path:
            atomic_copy(path, options.publish_path)
            logger.info("published %s (epoch %d%s)", options.publish_path, self.epoch,
                        "" if metric is None else f", validation Dice {metric:.4f}")
        return path

    def status(self) -> TrainStatus:
        return self.stop or TrainStatus.FINISHED

    def result(self) -> TrainResult:
        options = self.options
        best = os.path.join(options.output_dir, BEST)
        return TrainResult(status=self.status().value,
                           epoch=self.epoch, total_epochs=self.total_epochs, steps=self.global_step,
                           best_metric=self.best_metric, best_epoch=self.best_epoch, history=self.history,
                           vocabulary=self.names, seconds=round(time.time() - self.started, 2),
                           checkpoint=best if os.path.isfile(best) else self.last_path,
                           published=options.publish_path if self.published and options.publish_path else None,
                           resumed_from=self.resumed_from)


def train(options: TrainOptions, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
          callback: Optional[Callback] = None) -> TrainResult:
    """Train (or resume) in this process; in a DDP process group every rank calls this (``Trainer.fit``)."""
    return Trainer(options, train_cases, val_cases, callback).fit()


def with_replay_labels(options: TrainOptions, cases: Sequence[Case]) -> List[Case]:
    """The cases with the starting model's predictions of the ``keep`` structures each case's label lacks."""
    from ..engine import SegVolEngine
    from .continual import add_replay_labels

    if options.init == "scratch":
        raise ValueError("keep: a model trained from scratch knows no structures to keep; start from a checkpoint")
    device = resolve_device(options.device)
    model = load_model(setup.init_path(options), device=str(device), tokenizer=setup.tokenizer_dir(options))
    vocabulary = Vocabulary.load(options.vocabulary)
    vocabulary.extend(model.vocabulary)
    engine = SegVolEngine(model, mode="zoom_out_zoom_in", cache_mb=256, image_cache_mb=64)
    try:
        cases, _ = add_replay_labels(cases, engine, options.keep, options.output_dir,
                                     lambda name: vocabulary.resolve(name, allow_free_text=True))
    finally:
        engine.clear_cache()
    return cases


def run_training(options: TrainOptions, train_cases: Sequence[Case], val_cases: Sequence[Case] = (),
                 callback: Optional[Callback] = None) -> TrainResult:
    """Train in this process, or in ``options.world_size`` DDP processes (one per GPU) and return rank 0's result.

    Under ``torchrun`` (``WORLD_SIZE`` set) the process group is joined instead of spawning. With ``options.keep``
    the training cases first get replay labels of the structures to keep (``continual.add_replay_labels``)."""
    if options.keep:
        train_cases = with_replay_labels(options, train_cases)
    result = distributed.launch(train, (options, list(train_cases), list(val_cases)), int(options.world_size),
                                options.ddp_backend, resolve_device(options.device),
                                lambda: train(options, train_cases, val_cases, callback))
    if result is not None:
        return result
    with open(os.path.join(options.output_dir, "history.json")) as handle:
        return TrainResult(**json.load(handle))


__all__ = ["DEFAULT_FREEZE", "FREEZABLE", "StopTraining", "TrainOptions", "TrainResult", "TrainStatus", "TrainStep",
           "Trainer", "build_batch", "freeze_parameters", "patch_embedding_lr_scale", "read_last", "resolve_config",
           "run_training", "train", "with_replay_labels"]
