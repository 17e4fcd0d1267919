"""3D prompt encoder (SAM's, in volumetric form): points, boxes and a text embedding -> sparse tokens.

Two quirks of the official model are load-bearing and reproduced on purpose:

* The random-Fourier positional encoding normalises prompt coordinates given in (d, h, w) voxel order by
  ``(image_size[1], image_size[0], image_size[2])`` = (256, 32, 256), while the dense grid encoding stacks its axes as
  (h, d, w). The two do not line up geometrically, but the weights were trained with exactly this.
  ``SegVolConfig.prompt_axis_swap = False`` lines them up, for networks trained from scratch.
* ``pe_layer.positional_encoding_gaussian_matrix`` is a *persistent* buffer: it must come from the checkpoint.

``mask_downscaling`` is SAM's 2D mask-prompt stack; the official model never calls it, but its tensors are part of
the checkpoint, so it is kept (unused) for a strict load. Networks configured with ``mask_prompt`` have a 3D one
(``MaskEmbedding``) that turns the previous interaction's logits and the clicks (``click_maps``) into a dense prompt.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..config import SegVolConfig


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of (B, C, D, H, W) at every voxel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class MaskEmbedding(nn.Module):
    """The previous prediction and the clicks, as maps on the decoder's low-resolution grid -> a dense prompt
    (B, C, gd, gh, gw) added to the no-mask embedding (SAM's mask input in 3D, with nnInteractive's click maps: two
    stride-2 convolutions, then a 1x1x1 one).

    Input channels (B, 3, 4gd, 4gh, 4gw): the previous prediction's probabilities, and a Gaussian blob (sigma one
    low-resolution voxel) at every positive and at every negative click (``click_maps``). A click token alone barely
    moves the voxels it lies on; the blob puts the click on the image tokens it belongs to. The last convolution
    starts at zero, so a network given this module answers exactly as it did without it until it is trained with
    previous predictions (``training.step``'s corrective clicks)."""

    CHANNELS = 3

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(self.CHANNELS, 16, kernel_size=2, stride=2),
            LayerNorm3d(16),
            nn.GELU(),
            nn.Conv3d(16, 32, kernel_size=2, stride=2),
            LayerNorm3d(32),
            nn.GELU(),
            nn.Conv3d(32, dim, kernel_size=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.layers(maps)


def click_maps(points: Optional[Tuple[torch.Tensor, torch.Tensor]], batch: int, low_res: Tuple[int, int, int],
               image_size: Tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """Points ``(coords (B, N, 3) in (d, h, w) window voxels, labels (B, N))`` -> (B, 2, *low_res): per voxel of the
    low-resolution grid, the largest ``exp(-r^2 / 2)`` (r: distance in low-resolution voxels) over the positive
    clicks (channel 0) and over the negative ones (channel 1); padding points (label -1) draw nothing."""
    maps = like.new_zeros(batch, 2, *low_res)
    if points is None or points[0].shape[1] == 0:
        return maps
    coords, labels = points[0].to(like), points[1].to(like)
    scale = like.new_tensor([l / s for l, s in zip(low_res, image_size)])
    centres = (coords + 0.5) * scale - 0.5  # (B, N, 3) in low-resolution voxels
    axes = [torch.arange(n, device=like.device, dtype=like.dtype) for n in low_res]
    # separable Gaussian: exp(-(dd^2 + dh^2 + dw^2) / 2) = product of one factor per axis
    factors = [torch.exp(-0.5 * (axis[None, None, :] - centres[..., k:k + 1]) ** 2) for k, axis in enumerate(axes)]
    for first in range(0, coords.shape[1], CLICK_MAP_CHUNK):  # a scribble's many points never exist as blobs at once
        part = slice(first, first + CLICK_MAP_CHUNK)
        blobs = (factors[0][:, part, :, None, None] * factors[1][:, part, None, :, None]
                 * factors[2][:, part, None, None, :])
        for channel, value in enumerate((1, 0)):
            chosen = (labels[:, part] == value).to(like)[..., None, None, None]
            maps[:, channel] = torch.maximum(maps[:, channel], (blobs * chosen).amax(dim=1))
    return maps


CLICK_MAP_CHUNK = 16  # points drawn per pass of click_maps (official low-res grid: 8 MB of blobs per prompt set)


class RandomFourierPositionEncoding(nn.Module):
    """Maps coordinates in [0, 1] to ``[sin(2*pi*(2u-1)G), cos(2*pi*(2u-1)G)]`` with a fixed Gaussian G (3, C/2)."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., 3) in [0, 1] -> (..., 2 * num_pos_feats)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        """Encoding of the token-grid centres: (C, gd, gh, gw), features stacked in the official (h, d, w) order."""
        gd, gh, gw = grid
        matrix = self.positional_encoding_gaussian_matrix
        ones = torch.ones(grid, device=matrix.device, dtype=matrix.dtype)
        d_frac = (ones.cumsum(0) - 0.5) / gd
        h_frac = (ones.cumsum(1) - 0.5) / gh
        w_frac = (ones.cumsum(2) - 0.5) / gw
        return self._encode(torch.stack([h_frac, d_frac, w_frac], dim=-1)).permute(3, 0, 1, 2)

    def at_voxels(self, coords: torch.Tensor, image_size: Tuple[int, int, int],
                  axis_swap: bool = True) -> torch.Tensor:
        """coords (B, N, 3) in (d, h, w) voxels (already shifted to voxel centres) -> (B, N, C).

        ``axis_swap`` (the official model): (d, h, w) normalised by (image_size[1], image_size[0], image_size[2]),
        so a prompt lands where (h, d, w) would on the dense grid. Without it: (h / H, d / D, w / W), the dense grid's
        own feature order, so a prompt's encoding equals the encoding of the grid position it lies at.
        """
        coords = coords.to(self.positional_encoding_gaussian_matrix.dtype)
        if axis_swap:
            return self._encode(coords / coords.new_tensor([image_size[1], image_size[0], image_size[2]]))
        return self._encode(coords[..., [1, 0, 2]] / coords.new_tensor([image_size[1], image_size[0], image_size[2]]))


class PromptEncoder(nn.Module):
    """Points ``(coords (B, N, 3), labels (B, N))``, boxes ``(B, 1, 6)`` and text ``(B, C)`` -> sparse (B, n, C).

    Coordinates are (d, h, w) voxel indices of the model's input window. Point labels: 1 positive, 0 negative,
    -1 padding (the official "not a point" token, which takes part in attention), -2 (``ABSENT``) an empty slot:
    ``SegVol.decode`` masks its token out of every attention, so prompt sets with fewer points share a batch with
    longer ones. Boxes are ``[d0, h0, w0, d1, h1, w1]`` with inclusive maxima.
    """

    NEGATIVE, POSITIVE, BOX_MIN, BOX_MAX = 0, 1, 2, 3
    ABSENT = -2

    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.hidden_size
        self.embed_dim = dim
        self.input_image_size = config.image_size
        self.axis_swap = config.prompt_axis_swap
        self.image_embedding_size = config.grid_size
        self.pe_layer = RandomFourierPositionEncoding(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=2, stride=2),
            LayerNorm2d(4),
            nn.GELU(),
            nn.Conv2d(4, 16, kernel_size=2, stride=2),
            LayerNorm2d(16),
            nn.GELU(),
            nn.Conv2d(16, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)
        self.mask_embedding = MaskEmbedding(dim) if config.mask_prompt else None
        self._dense_pe: Optional[Tuple[tuple, torch.Tensor]] = None  # (stamp, encoding): dense_positional_encoding

    def dense_positional_encoding(self) -> torch.Tensor:
        """(1, C, gd, gh, gw) encoding of the image-token grid. Every decode needs it (3-4 ms of sines and cosines
        officially), so it is kept until the Gaussian matrix changes (a checkpoint load, a move to another device or
        precision); it takes no gradient."""
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        stamp = (matrix.data_ptr(), matrix._version, matrix.device, matrix.dtype)
        if self._dense_pe is None or self._dense_pe[0] != stamp:
            # a normal tensor even under inference_mode: training may use it later
            with torch.inference_mode(False), torch.no_grad():
                self._dense_pe = (stamp, self.pe_layer.dense(self.image_embedding_size).unsqueeze(0))
        return self._dense_pe[1]

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.at_voxels(coords, self.input_image_size, self.axis_swap)
        padding = (labels == -1).unsqueeze(-1)
        embedding = torch.where(padding, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == self.NEGATIVE).unsqueeze(-1) * self.point_embeddings[self.NEGATIVE].weight
        embedding = embedding + (labels == self.POSITIVE).unsqueeze(-1) * self.point_embeddings[self.POSITIVE].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 3)
        embedding = self.pe_layer.at_voxels(corners, self.input_image_size, self.axis_swap)
        corner_type = torch.cat([self.point_embeddings[self.BOX_MIN].weight,
                                 self.point_embeddings[self.BOX_MAX].weight])
        return embedding + corner_type

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        text_embedding: Optional[torch.Tensor],
        batch_size: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> sparse (B, n, C) and dense (B, C, gd, gh, gw) prompt embeddings."""
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty(batch_size, 0, self.embed_dim)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords.to(weight), labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes.to(weight))], dim=1)
        if text_embedding is not None:
            sparse = torch.cat([sparse, text_embedding.to(weight).unsqueeze(1)], dim=1)
        return sparse, self.dense_embedding().expand(batch_size, -1, -1, -1, -1)

    def dense_embedding(self) -> torch.Tensor:
        """(1, C, gd, gh, gw): the no-mask embedding on every image token (the official SegVol takes no mask prompt)."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(1, -1, *self.image_embedding_size)

    def previous_mask_embedding(self, logits: torch.Tensor,
                                points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The previous prediction's low-resolution logits (B, 1, 4gd, 4gh, 4gw) and the points (window voxels, as
        ``forward`` takes them) -> what they add to the dense embedding (B, C, gd, gh, gw); only for networks
        configured with ``mask_prompt``."""
        if self.mask_embedding is None:
            raise ValueError("this network takes no previous-prediction prompt (its configuration has mask_prompt off)")
        expected = tuple(4 * g for g in self.image_embedding_size)
        if logits.dim() != 5 or logits.shape[1] != 1 or tuple(logits.shape[2:]) != expected:
            raise ValueError(f"previous logits must be (B, 1, {', '.join(map(str, expected))}), got "
                             f"{tuple(logits.shape)}")
        probabilities = torch.sigmoid(logits.to(self.no_mask_embed.weight))
        clicks = click_maps(points, logits.shape[0], expected, self.input_image_size, probabilities)
        return self.mask_embedding(torch.cat([probabilities, clicks], dim=1))
