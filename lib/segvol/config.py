"""Architecture configuration of the SegVol network.

The defaults are the official SegVol configuration (the one the released weights were trained with). Smaller
configurations exist for CPU tests and from-scratch training; every size in the network is derived from this object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

Triple = Tuple[int, int, int]


@dataclass(frozen=True)
class SegVolConfig:
    # Image encoder (ViT): the input window is (D, H, W) voxels.
    image_size: Triple = (32, 256, 256)
    patch_size: Triple = (4, 16, 16)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    # Low-rank adapters on the image encoder's attention projections (``modeling.lora``; 0: none, the official
    # network). Only the ``lora`` training mode sets them; a published checkpoint has them merged (rank 0 again).
    lora_rank: int = 0
    lora_alpha: float = 16.0

    # Prompt positions. The official model encodes a prompt at (d, h, w) as if it were at (h, d, w) of the image-token
    # grid (normalised by (H, D, W)); its weights depend on it, so it stays the default. A network trained from
    # scratch learns boxes and points much faster with positions encoded the way the image grid is (False).
    prompt_axis_swap: bool = True
    # The previous-prediction prompt (SAM's mask input, in 3D): a decode may also take the low-resolution logits its
    # prompts gave one interaction earlier, so a click corrects that answer instead of starting over. The official
    # network has none (False); networks trained with corrective clicks may (``PromptEncoder.mask_embedding``).
    mask_prompt: bool = False

    # Mask decoder (two-way transformer; its token dimension is the encoder's hidden size).
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_mask_tokens: int = 4
    iou_head_hidden_dim: int = 256

    # Text encoder (CLIP text tower) and its projection to the hidden size.
    text_vocab_size: int = 49408
    text_hidden_size: int = 512
    text_intermediate_size: int = 2048
    text_num_layers: int = 12
    text_num_heads: int = 8
    text_max_positions: int = 77
    text_template: str = "A computerized tomography of a {}."

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        for size, patch in zip(self.image_size, self.patch_size):
            if size % patch:
                raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 8:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads and by 8")
        if self.text_hidden_size % self.text_num_heads:
            raise ValueError("text_hidden_size must divide by text_num_heads")

    @property
    def grid_size(self) -> Triple:
        """Token grid of the image encoder, (D/pd, H/ph, W/pw): (8, 16, 16) for the official model."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        d, h, w = self.grid_size
        return d * h * w

    @property
    def patch_dim(self) -> int:
        d, h, w = self.patch_size
        return d * h * w

    @property
    def upscaled_channels(self) -> Tuple[int, int]:
        """Channels after the decoder's first and second transposed convolutions (192, 96 officially)."""
        return self.hidden_size // 4, self.hidden_size // 8

    @property
    def low_res_size(self) -> Triple:
        """Spatial size of the decoder's mask logits: 4x the token grid, (32, 64, 64) officially."""
        return tuple(4 * g for g in self.grid_size)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SegVolConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown SegVol configuration fields: {sorted(unknown)}")
        return cls(**values)


OFFICIAL = SegVolConfig()

# A configuration that trains and runs in seconds on a laptop CPU. It keeps the official patch grid shape (so the
# prompt encoder's quirks are exercised identically) at a quarter of the in-plane resolution.
SMALL = SegVolConfig(
    image_size=(32, 64, 64),
    patch_size=(4, 8, 8),
    hidden_size=96,
    num_layers=2,
    num_heads=4,
    mlp_dim=192,
    decoder_depth=2,
    decoder_heads=4,
    decoder_mlp_dim=128,
    iou_head_hidden_dim=32,
    text_hidden_size=64,
    text_intermediate_size=128,
    text_num_layers=2,
    text_num_heads=4,
)

PRESETS = {"official": OFFICIAL, "small": SMALL}
