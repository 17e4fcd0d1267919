"""One optimizer step's data and loss: a batch of sampled views with their prompt targets (``build_batch``), the
differentiable step (``TrainStep``: encode each image once, decode every category under every prompt combination,
Dice + BCE, plus the weighted FH pseudo-label terms; the module DDP wraps) and the ``Prefetcher`` that builds the next
batch on a thread while the current one trains.

One optimizer step:

1. a batch of views (``data.sample_view``: zoom-out views and native crops) is drawn, and for every category present
   in a view a box and points are sampled (``prompts.sample_prompts``; on a crop, in a share ``window_box_prob`` of
   the targets the box is the one a zoom-in window gets: the structure's whole box clipped to the crop);
2. each image is **encoded once**; all categories and all six prompt combinations (point+text, box+text, text, box,
   point, box+point) are decoded against that embedding (the reference re-encoded the image per category);
3. the loss is the sum over combinations of the mean per-sample Dice + BCE (``losses``), plus ``pseudo_weight`` (0.1)
   times the same on FH pseudo-label targets when a case has them;
3a. continual learning (``distill``): for the targets naming a structure to keep, the same prompts decoded by the
   frozen starting model give soft targets (its sigmoid probabilities), and ``distill_weight`` times the binary
   cross-entropy toward them is added (Learning without Forgetting): the old structures keep the starting model's
   whole answer, not only its thresholded replay labels;
3b. in a share of the steps (``corrective_prob``) a **corrective-click** term: from a start prompt (box, box + text or
   text; on a crop, the box a zoom-in window gets: the structure's whole box clipped to the crop) the model predicts
   without gradients, the robot annotator's rule (``segvol.interaction.error_click``: the
   deepest voxel of the largest error region) adds a click on each prediction's own mistake, for 1 to
   ``corrective_rounds`` simulated rounds, and the loss is taken on the prediction from the start prompt plus every
   click (SAM's and nnInteractive's iterative training): the clicks a user makes are the clicks it learns from;
4. AdamW with linear warm-up and cosine decay (``schedule.WarmupCosine``, lr > 0 from the first step), optional
   gradient clipping, autocast on CUDA (bf16 where supported, else fp16 with a gradient scaler): ``optimizer_step``.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import increment_version

from ..interaction import error_click
from ..modeling.mask_decoder import ImageTokens
from ..modeling.segvol import SegVol
from .losses import dice_bce_loss
from .prompts import (
    COMBINATIONS,
    PromptConfig,
    PromptSample,
    combination_parts,
    jitter_box,
    pseudo_target,
    sample_prompts,
    stack_boxes,
    stack_points,
)


@dataclass
class Target:
    sample: int  # index of the view in the batch
    text: Optional[str]
    mask: np.ndarray  # (D, H, W) bool
    prompts: PromptSample
    # the whole structure's box clipped to the view (crops; else None): the box a zoom-in window gets, which the
    # corrective clicks start from
    window_box: Optional[np.ndarray] = None


@dataclass
class Batch:
    images: torch.Tensor  # (B, 1, D, H, W)
    targets: List[Target]
    pseudo: List[Tuple[str, Target]] = field(default_factory=list)  # (kind, target)
    kinds: List[str] = field(default_factory=list)
    combinations: Optional[Tuple[str, ...]] = None  # this step's prompt combinations (None: all)
    corrective: Optional[Tuple[str, int]] = None  # this step's corrective-click term: (start prompt, rounds)
    view_keys: Optional[List[Tuple[int, int]]] = None  # (case, fixed view) per image, when views are fixed


CORRECTIVE_STARTS = ("box", "box+text", "text")  # what the robot's protocols start from before clicking


def build_batch(views, rngs, prompt_config: PromptConfig, max_categories: int, pseudo_passes: int,
                combinations: Sequence[str] = COMBINATIONS, per_step: int = 0, corrective_prob: float = 0.0,
                corrective_rounds: int = 5, view_keys: Optional[List[Tuple[int, int]]] = None,
                step_rng: Optional[np.random.Generator] = None) -> Batch:
    """One step's batch: per view, its categories' targets and prompts (from that view's generator in ``rngs``); per
    step, the prompt combinations and the corrective-click term (from ``step_rng``, default ``rngs[0]``). The trainer
    gives every DDP rank the same ``step_rng``, so the ranks do the same kind of step together: each optimizer step
    waits for the slowest rank, and with independent draws a corrective step ran on one rank or the other in 3 of 4
    steps instead of 1 of 2."""
    step_rng = rngs[0] if step_rng is None else step_rng
    targets: List[Target] = []
    pseudo: List[Tuple[str, Target]] = []
    for index, (view, rng) in enumerate(zip(views, rngs)):
        values = list(view.texts)
        if len(values) > max_categories:
            values = [values[i] for i in sorted(rng.choice(len(values), size=max_categories, replace=False))]
        label = view.label.numpy()
        window_boxes = view.window_boxes or {}
        for value in values:
            mask = label == value
            prompts = sample_prompts(mask, rng, prompt_config)
            window_box = window_boxes.get(value)
            # drawn only when asked for, so runs without it keep their random streams
            if window_box is not None and prompt_config.window_box_prob > 0 \
                    and rng.random() < prompt_config.window_box_prob:
                prompts = replace(prompts, box=jitter_box(window_box, mask.shape, rng, prompt_config.box_jitter))
            targets.append(Target(index, view.texts[value], mask, prompts, window_box))
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
        chosen = tuple(combinations[i] for i in sorted(step_rng.choice(len(combinations), per_step, replace=False)))
    corrective = None
    if corrective_prob > 0 and step_rng.random() < corrective_prob and targets:
        corrective = (CORRECTIVE_STARTS[int(step_rng.integers(len(CORRECTIVE_STARTS)))],
                      1 + int(step_rng.integers(max(1, int(corrective_rounds)))))
    return Batch(images=images, targets=targets, pseudo=pseudo, kinds=[v.kind for v in views], combinations=chosen,
                 corrective=corrective, view_keys=view_keys)


@dataclass
class Distillation:
    """The distillation term's state (module docstring, 3a): the frozen starting model, the text prompts of the
    structures to keep, and the term's weight."""

    teacher: SegVol
    names: frozenset
    weight: float


class TrainStep(nn.Module):
    """``forward(batch) -> (loss, parts)`` for one batch; the module DDP wraps."""

    def __init__(self, model: SegVol, freeze: Sequence[str], combinations: Sequence[str], pseudo_weight: float,
                 loss_resolution: str = "full", checkpoint_blocks: bool = False, embedding_cache_mb: float = 0,
                 distill: Optional[Distillation] = None):
        super().__init__()
        self.model = model
        self.distill = distill
        self.loss_resolution = loss_resolution
        self.freeze = set(freeze)
        self.combinations = tuple(combinations)
        self.pseudo_weight = float(pseudo_weight)
        self.checkpoint_blocks = bool(checkpoint_blocks)
        self._pooled: Dict[str, torch.Tensor] = {}  # frozen CLIP tower output per name
        # a frozen encoder's embedding of each fixed view (Batch.view_keys), computed once (the decoder mode)
        self.embedding_cache_bytes = int(embedding_cache_mb * 2 ** 20)
        self._embeddings: Dict[Tuple[int, int], torch.Tensor] = {}
        self._cached_bytes = 0
        self.encoded = 0  # images run through the image encoder (the rest came from the cache)

    @property
    def _encoder_frozen(self) -> bool:
        """The image encoder does not train (frozen, no adapters): its embeddings need no gradients, may be cached, and
        equal the starting model's."""
        return "image_encoder" in self.freeze and not self.model.config.lora_rank

    def image_embeddings(self, batch: Batch, images: torch.Tensor) -> torch.Tensor:
        """(B, hidden, *grid): from the cache for fixed views already seen, else from the image encoder (frozen:
        without gradients)."""
        encoder = self.model.image_encoder
        if not self._encoder_frozen:
            self.encoded += len(images)
            return encoder(images, checkpoint_blocks=self.checkpoint_blocks)
        if not (self.embedding_cache_bytes and batch.view_keys):
            self.encoded += len(images)
            with torch.no_grad():
                return encoder(images)
        rows = []
        for key, image in zip(batch.view_keys, images):
            row = self._embeddings.get(key)
            if row is None:
                with torch.no_grad():
                    row = encoder(image[None])[0]
                self.encoded += 1
                if self._cached_bytes + row.numel() * row.element_size() <= self.embedding_cache_bytes:
                    self._embeddings[key] = row
                    self._cached_bytes += row.numel() * row.element_size()
            rows.append(row)
        return torch.stack(rows)

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

    def _decode(self, model: SegVol, image: ImageTokens, targets: Sequence[Target], use_text: bool, use_box: bool,
                use_points: bool, text: Optional[torch.Tensor], previous: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Logits (N, 1, ...) of the targets' prompts on the batch's decoder image tokens (``model.image_tokens``,
        made once per step) (``text``: their (N, C) embeddings; ``previous``: the low-resolution logits of the
        interaction before, for networks with the previous-prediction prompt) at the loss resolution."""
        device = image.tokens.device
        index = torch.as_tensor([t.sample for t in targets], device=device)
        prompts = [t.prompts for t in targets]
        boxes = stack_boxes(prompts, device) if use_box else None
        points = stack_points(prompts, device) if use_points else None
        low_res = model.decode(image.select(index), text if use_text else None, boxes, points, previous)
        return low_res if self.loss_resolution == "low" else model.upsample(low_res)

    def _decode_loss(self, image: ImageTokens, targets: Sequence[Target], use_text: bool, use_box: bool,
                     use_points: bool, text_table: Optional[torch.Tensor], text_index: Optional[torch.Tensor],
                     truth: torch.Tensor, previous: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (mean Dice + BCE of the targets' prompts, their logits)."""
        text = text_table[text_index] if use_text else None
        logits = self._decode(self.model, image, targets, use_text, use_box, use_points, text, previous)
        return dice_bce_loss(logits, truth).mean(), logits

    def _teacher_image(self, images: torch.Tensor, embedding: torch.Tensor) -> ImageTokens:
        """The starting model's decoder image tokens of the batch; a frozen encoder without adapters is the starting
        model's own, so its embedding is the student's."""
        teacher = self.distill.teacher
        with torch.no_grad():
            if not self._encoder_frozen:
                embedding = teacher.image_encoder(images)
            return teacher.image_tokens(embedding.detach())

    def _distill_loss(self, teacher_image: ImageTokens, targets: Sequence[Target], rows: List[int],
                      combination: str, logits: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the student's ``logits`` rows toward the starting model's probabilities for the
        same prompts (module docstring, 3a)."""
        teacher = self.distill.teacher
        use_text, use_box, use_points = combination_parts(combination)
        kept = [targets[i] for i in rows]
        with torch.no_grad():
            text = teacher.encode_text([t.text for t in kept]) if use_text else None
            soft = torch.sigmoid(self._decode(teacher, teacher_image, kept, use_text, use_box, use_points, text))
        return F.binary_cross_entropy_with_logits(logits[rows], soft)

    def _corrective_loss(self, image: ImageTokens, targets: Sequence[Target], start: str, rounds: int,
                         text_table: torch.Tensor, text_index: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Clicks on the model's own errors (see the module docstring, 3b): ``rounds`` gradient-free predictions, each
        adding one ``error_click`` per target (none once a target is exact), then the loss with every click. A network
        with the previous-prediction prompt (``mask_prompt``) gets, in each round after the first and in the last
        decode, the low-resolution logits of the prediction its newest click was placed on (what the engine gives it
        in a session)."""
        use_text, use_box, _ = combination_parts(start)
        clicks: List[List[Tuple[Tuple[int, int, int], int]]] = [[] for _ in targets]
        # the box a session's window gets (the user's box clipped to it) where the view is a crop: a window's box is
        # often looser than the part in view, and what it over-segments there is what the user's clicks remove
        start_boxes = [t.prompts.box if t.window_box is None else t.window_box for t in targets]

        def clicked() -> List[Target]:
            """The targets with their start box and the clicks so far as their prompts."""
            return [Target(t.sample, t.text, t.mask,
                           PromptSample(box=box, points=np.asarray([c[0] for c in row], np.float32).reshape(-1, 3),
                                        labels=np.asarray([c[1] for c in row], np.int64)))
                    for t, box, row in zip(targets, start_boxes, clicks)]

        device = image.tokens.device
        index = torch.as_tensor([t.sample for t in targets], device=device)
        text = text_table[text_index] if use_text else None
        boxes = stack_boxes([t.prompts for t in clicked()], device) if use_box else None
        with_previous = self.model.config.mask_prompt
        previous = None
        for _ in range(int(rounds)):
            with torch.no_grad():
                points = stack_points([t.prompts for t in clicked()], device) if any(clicks) else None
                low_res = self.model.decode(image.select(index), text, boxes, points, previous)
                predicted = (self.model.upsample(low_res)[:, 0] > 0).cpu().numpy()
            if with_previous:
                previous = low_res
            added = False
            for row, (target, mask) in enumerate(zip(targets, predicted)):
                click = error_click(target.mask, mask)
                if click is not None:
                    clicks[row].append((click.point, click.label))
                    added = True
            if not added:
                break
        return self._decode_loss(image, clicked(), use_text, use_box, any(clicks), text_table, text_index,
                                 truth, previous if any(clicks) else None)[0]

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
        embedding = self.image_embeddings(batch, images)
        image = model.image_tokens(embedding)  # the decoder's prompt-independent part, shared by every decode below
        parts: Dict[str, float] = {}
        losses = []
        distilled = [] if self.distill is None else [i for i, t in enumerate(batch.targets)
                                                      if t.text in self.distill.names]
        teacher_image = self._teacher_image(images, embedding) if distilled else None
        if batch.targets:
            truth = self._truth([t.mask for t in batch.targets], images.device)
            names = list(dict.fromkeys(t.text for t in batch.targets))
            table = self.text_embeddings(names)
            text_index = torch.as_tensor([names.index(t.text) for t in batch.targets], device=images.device)
            for combination in batch.combinations or self.combinations:
                use_text, use_box, use_points = combination_parts(combination)
                loss, logits = self._decode_loss(image, batch.targets, use_text, use_box, use_points, table,
                                                 text_index, truth)
                losses.append(loss)
                parts[combination] = float(loss.detach())
                if distilled:
                    loss = self._distill_loss(teacher_image, batch.targets, distilled, combination, logits)
                    losses.append(self.distill.weight * loss)
                    parts[f"distill_{combination}"] = float(loss.detach())
            if batch.corrective is not None:
                start, rounds = batch.corrective
                loss = self._corrective_loss(image, batch.targets, start, rounds, table, text_index, truth)
                losses.append(loss)
                parts["corrective"] = float(loss.detach())
        if batch.pseudo and self.pseudo_weight > 0:
            for kind in ("point", "box"):
                group = [t for k, t in batch.pseudo if k == kind]
                if not group:
                    continue
                truth = self._truth([t.mask for t in group], images.device)
                loss, _ = self._decode_loss(image, group, False, kind == "box", kind == "point", None, None,
                                            truth)
                losses.append(self.pseudo_weight * loss)
                parts[f"pseudo_{kind}"] = float(loss.detach())
        if not losses:  # nothing to learn from in this batch: a zero loss that still touches every parameter (DDP)
            zero = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad),
                       torch.zeros((), device=images.device))
            return zero, parts
        return torch.stack(losses).sum(), parts


def optimizer_step(runner: nn.Module, batch: Batch, optimizer, scheduler, scaler, parameters, grad_clip,
                   autocast_dtype=None) -> Tuple[float, Dict[str, float]]:
    """One optimizer step on ``batch``: forward under CUDA autocast (``autocast_dtype``; None: off), backward (through
    the gradient ``scaler`` when there is one), optional clipping, the optimizer and the schedule; -> (loss, parts)."""
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with autocast:
        loss, parts = runner(batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, float(grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # A fused AdamW writes the parameters in place without bumping their version counters, and the decoder keeps
    # layouts derived from its parameters while autograd is off, until a version changes: without this the
    # corrective rounds and the validation between epochs decoded with the first layouts they saw, all run long.
    increment_version([p for group in optimizer.param_groups for p in group["params"]])
    scheduler.step()
    return float(loss.detach()), parts


class Prefetcher:
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


__all__ = ["Batch", "CORRECTIVE_STARTS", "Distillation", "Prefetcher", "Target", "TrainStep", "build_batch",
           "optimizer_step"]
