"""Learning-rate schedule: linear warm-up then cosine decay, per optimizer step, with a positive rate from step 0.

The reference stepped ``LinearWarmupCosineAnnealingLR`` per epoch from ``warmup_start_lr=0``, so its whole first
epoch ran at lr = 0 (``segvol-reference.md`` section 9 item 22). Here step ``s`` (0-based) of a warm-up of ``W``
steps uses ``lr * (s + 1) / (W + 1)``, and the cosine runs from ``lr`` to ``min_lr_ratio * lr`` over the remaining
steps. The state is a handful of numbers, so a checkpoint stays loadable with ``weights_only=True``, and the total
can be changed mid-run (a time budget that shortens the run also shortens the decay).
"""
from __future__ import annotations

import math
from typing import Dict, List


class WarmupCosine:
    def __init__(self, optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.01):
        self.optimizer = optimizer
        self.base_lrs: List[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.min_lr_ratio = float(min_lr_ratio)
        self.step_count = 0  # optimizer steps taken
        self.apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> None:
        """Set the rate of the next optimizer step."""
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def set_total(self, total_steps: int) -> None:
        self.total_steps = max(int(total_steps), self.step_count + 1, 1)
        self.apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> Dict:
        return {"base_lrs": list(self.base_lrs), "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "step_count": self.step_count}

    def load_state_dict(self, state: Dict) -> None:
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.step_count = int(state["step_count"])
        self.apply()


__all__ = ["WarmupCosine"]
