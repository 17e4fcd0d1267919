"""CLIP text tower (ViT-B/32 layout) + ``dim_align``: category names -> (N, hidden) text embeddings.

Our own implementation of the transformer, so loading does not depend on how a given ``transformers`` release names
or registers buffers. It computes what the official model does: the prompt "A computerized tomography of a {name}.",
causal self-attention with quick-GELU MLPs, final LayerNorm, the hidden state of the first end-of-text token
(CLIP's pooling; no ``text_projection``), then ``dim_align`` (Linear 512 -> 768).

Key layout: ``clip_text_model.{embeddings,encoder,final_layer_norm}`` plus the persistent
``clip_text_model.text_model.embeddings.position_ids`` buffer, exactly as in the official checkpoint manifest.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegVolConfig


class ClipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, C); mask (B, 1, L, L) additive -> (B, L, C)."""
        b, length, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, length, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, c))


class ClipMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu, CLIP's activation


class ClipEncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate: int):
        super().__init__()
        self.self_attn = ClipAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.mlp = ClipMLP(dim, intermediate)
        self.layer_norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_positions, dim)


class ClipEncoder(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            ClipEncoderLayer(config.text_hidden_size, config.text_num_heads, config.text_intermediate_size)
            for _ in range(config.text_num_layers)
        )


class _PositionIds(nn.Module):
    """Holds the persistent ``position_ids`` buffer at the key path the official checkpoint stores it under."""

    def __init__(self, max_positions: int):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))


class _TextModelBuffers(nn.Module):
    def __init__(self, max_positions: int):
        super().__init__()
        self.embeddings = _PositionIds(max_positions)


class ClipTextTransformer(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config.text_vocab_size, config.text_hidden_size, config.text_max_positions)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.text_hidden_size)
        self.text_model = _TextModelBuffers(config.text_max_positions)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, L) -> pooled (B, text_hidden): final-LayerNorm state at the first end-of-text token."""
        b, length = input_ids.shape
        position_ids = self.text_model.embeddings.position_ids[:, :length]
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(position_ids)
        blocked = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1).expand(b, 1, length, length)
        if attention_mask is not None:
            blocked = blocked | (attention_mask[:, None, None, :] == 0)
        mask = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device).masked_fill(blocked, torch.finfo(x.dtype).min)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        # The end-of-text id is the largest in CLIP's vocabulary, so argmax finds the first one.
        return x[torch.arange(b, device=x.device), input_ids.argmax(dim=-1)]


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def find_tokenizer_dir(*candidates: Optional[str]) -> Optional[str]:
    """The first candidate folder (or a file's folder) that holds CLIP tokenizer files."""
    for candidate in candidates:
        if not candidate:
            continue
        folder = candidate if os.path.isdir(candidate) else os.path.dirname(os.path.abspath(candidate))
        for sub in (folder, os.path.join(folder, "tokenizer"), os.path.join(folder, "clip")):
            if any(os.path.isfile(os.path.join(sub, name)) for name in TOKENIZER_FILES):
                return sub
    return None


def load_tokenizer(path: str):
    """The CLIP BPE tokenizer in ``path`` (SegVol always uses CLIP's, whatever the folder's config says)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tokenizer_class = CLIPTokenizerFast if os.path.isfile(os.path.join(path, "tokenizer.json")) else CLIPTokenizer
    try:
        return tokenizer_class.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises several unrelated types here
        raise FileNotFoundError(f"could not load the CLIP tokenizer from {path!r}: {error}") from error


class TextEncoder(nn.Module):
    """Category names -> (N, hidden) embeddings, cached per name (the text tower is frozen at inference)."""

    def __init__(self, config: SegVolConfig, tokenizer=None):
        super().__init__()
        self.template = config.text_template
        self.clip_text_model = ClipTextTransformer(config)
        self.dim_align = nn.Linear(config.text_hidden_size, config.hidden_size)
        self.tokenizer = tokenizer
        self._cache: Dict[str, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.clear_cache())

    def prompts(self, names: Sequence[str]) -> List[str]:
        return [self.template.format(name) for name in names]

    def tokenize(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The official tokenisation: the template prompt, padded to the longest in the batch, no truncation."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no CLIP tokenizer; pass tokenizer=... to segvol.load_model")
        tokens = self.tokenizer(self.prompts(names), padding=True, return_tensors="pt")
        limit = self.clip_text_model.embeddings.position_embedding.num_embeddings
        if tokens["input_ids"].shape[-1] > limit:
            from ..errors import BadTextError

            lengths = tokens["attention_mask"].sum(-1).tolist()
            too_long = [name[:60] for name, length in zip(names, lengths) if length > limit]
            raise BadTextError(f"text prompt too long: CLIP reads at most {limit} tokens (template included); "
                               f"shorten {too_long}")
        return tokens

    def forward(self, names: Sequence[str]) -> torch.Tensor:
        """Uncached forward (use it for training); names -> (N, hidden)."""
        device = self.dim_align.weight.device
        tokens = self.tokenize(names)
        pooled = self.clip_text_model(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return self.dim_align(pooled)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached embeddings live on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """Cached, gradient-free embeddings (N, hidden); each distinct name is encoded once."""
        names = list(names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"text prompts must be a non-empty list of non-empty strings, got {names!r}")
        missing = list(dict.fromkeys(n for n in names if n not in self._cache))
        if missing:
            for name, embedding in zip(missing, self.forward(missing)):
                self._cache[name] = embedding
        return torch.stack([self._cache[n] for n in names])
