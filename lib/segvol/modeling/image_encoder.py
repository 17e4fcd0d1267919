"""ViT image encoder, key-compatible with MONAI 0.9's ``ViT`` (the encoder the official weights were trained in).

Parameter names follow MONAI 0.9 exactly (``patch_embedding.patch_embeddings.1``, ``blocks.{i}.attn.qkv`` without
bias, ``mlp.linear1``...), so the official tensors load strictly. The computation is ours: attention goes through
``scaled_dot_product_attention`` (fused kernels on CPU and CUDA) instead of materialising the 2048x2048 score matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import SegVolConfig
from .lora import LowRankAdapter


class PatchEmbedding(nn.Module):
    """Non-overlapping 3D patches -> linear projection + learned absolute position embedding.

    The patch vector is flattened in (pd, ph, pw) order and tokens in (gd, gh, gw) row-major order, as MONAI's
    ``perceptron`` embedding does; ``patch_embeddings.1`` is the projection (index 0 was MONAI's parameter-free
    Rearrange).
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.patch_embeddings = nn.ModuleList([nn.Identity(), nn.Linear(config.patch_dim, config.hidden_size)])
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 1, D, H, W) -> tokens (B, gd*gh*gw, hidden)."""
        b = image.shape[0]
        (gd, gh, gw), (pd, ph, pw) = self.grid_size, self.patch_size
        patches = image.reshape(b, gd, pd, gh, ph, gw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        patches = patches.reshape(b, gd * gh * gw, pd * ph * pw)
        return self.patch_embeddings[1](patches) + self.position_embeddings


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``qkv`` output is laid out (3, heads, head_dim) as in MONAI's SABlock. With
    ``lora_rank`` > 0, low-rank adapters (``qkv_adapter``, ``out_proj_adapter``) add to both projections."""

    def __init__(self, hidden_size: int, num_heads: int, lora_rank: int = 0, lora_alpha: float = 16.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.qkv_adapter = LowRankAdapter(hidden_size, 3 * hidden_size, lora_rank, lora_alpha) if lora_rank else None
        self.out_proj_adapter = LowRankAdapter(hidden_size, hidden_size, lora_rank, lora_alpha) if lora_rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C)."""
        b, length, c = x.shape
        qkv = self.qkv(x) if self.qkv_adapter is None else self.qkv(x) + self.qkv_adapter(x)
        q, k, v = qkv.view(b, length, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, c)
        if self.out_proj_adapter is None:
            return self.out_proj(attended)
        return self.out_proj(attended) + self.out_proj_adapter(attended)


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, lora_rank: int = 0, lora_alpha: float = 16.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, lora_rank, lora_alpha)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = FeedForward(hidden_size, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """(B, 1, D, H, W) image in [0, 1] -> (B, hidden, gd, gh, gw) embedding; (B, 768, 8, 16, 16) officially."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.hidden_size, config.num_heads, config.mlp_dim, config.lora_rank, config.lora_alpha)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, image: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
        """``checkpoint_blocks``: recompute each block's activations in the backward pass instead of keeping them
        (gradient checkpointing: training memory for about a third more compute)."""
        expected = (1, *self.config.image_size)
        if image.dim() != 5 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"image must be (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}")
        x = self.patch_embedding(image)
        for block in self.blocks:
            if checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        b = x.shape[0]
        return x.transpose(1, 2).reshape(b, self.config.hidden_size, *self.config.grid_size)
