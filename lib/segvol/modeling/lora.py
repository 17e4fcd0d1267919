"""Low-rank adapters (LoRA, Hu et al. 2021) for the image encoder's attention projections.

An adapted projection computes ``W x + (alpha / r) * B A x`` with the pretrained ``W`` frozen and only ``A`` (r x in)
and ``B`` (out x r) trained; ``B`` starts at zero, so an adapted model starts exactly where its checkpoint was.
``merge_adapters`` folds ``(alpha / r) * B A`` into ``W`` and returns a model without adapters: a published checkpoint
serves at the cost of the plain network.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """x (..., in_features) -> (alpha / rank) * B A x, (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.scale = float(alpha) / float(rank)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # what nn.Linear uses for its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) matrix this adapter adds to the frozen weight."""
        return (self.lora_b @ self.lora_a) * self.scale


def merge_adapters(model):
    """A copy of ``model`` (``SegVol``) without adapters, each adapter folded into the weight it adapts; ``model``
    itself is left unchanged. A model without adapters is returned as is."""
    from .segvol import SegVol

    if not model.config.lora_rank:
        return model
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LowRankAdapter):
            # "<...>.attn.qkv_adapter" adapts "<...>.attn.qkv"
            target = name[: -len("_adapter")] + ".weight"
            state[target] = state[target] + module.delta_weight().detach().to(state[target].dtype)
    plain = SegVol(dataclasses.replace(model.config, lora_rank=0), model.tokenizer,
                   vocabulary=model.vocabulary)
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device).train(model.training)


def adapter_parameters(model):
    """The adapters' parameters (what the ``lora`` training mode trains in the image encoder)."""
    return [p for m in model.modules() if isinstance(m, LowRankAdapter) for p in m.parameters()]
