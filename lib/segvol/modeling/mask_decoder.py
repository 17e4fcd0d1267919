"""SAM-style 3D mask decoder with SegVol's text-similarity term.

Prompt tokens and image tokens attend to each other in a two-way transformer; the image tokens are upscaled 4x and
each mask token's hypernetwork turns them into mask logits. The text embedding, projected to the upscaled channel
count, adds its own similarity map to every mask (additive, as in the official model).

What the decoder computes from an image before any prompt (``MaskDecoder.image_tokens`` -> ``ImageTokens``: the image
tokens and the first layer's projections of them) can be kept and passed instead of the embedding, so a new click
on a window already decoded skips that part (about 15 % of an official decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegVolConfig


class Attention(nn.Module):
    """Multi-head attention with optional channel downsampling of queries, keys and values (SAM's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError("attention inner dimension must divide by num_heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projected q (B, Nq, inner), k and v (B, Nk, inner) -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


@dataclass
class ImageTokens:
    """The decoder's prompt-independent start on B image embeddings (``MaskDecoder.image_tokens``).

    ``tokens`` (B, L, C): the embedding plus the no-mask dense embedding, token-major in (gd, gh, gw) raster order;
    ``first_keys`` and ``first_values`` (B, L, C / downsample): the first layer's token-to-image keys (of tokens + PE)
    and values; ``first_queries`` (B, L, C / downsample): its image-to-token queries (of tokens + PE).
    """

    tokens: torch.Tensor
    first_keys: torch.Tensor
    first_values: torch.Tensor
    first_queries: torch.Tensor
    grid: Tuple[int, int, int]

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self._tensors())

    def _tensors(self):
        return self.tokens, self.first_keys, self.first_values, self.first_queries

    def expand(self, batch: int) -> "ImageTokens":
        """One image's tokens shared by ``batch`` prompt sets (views)."""
        return ImageTokens(*(t.expand(batch, -1, -1) for t in self._tensors()), self.grid)

    @staticmethod
    def cat(items: List["ImageTokens"]) -> "ImageTokens":
        """Several images' tokens as one batch, in order."""
        if len(items) == 1:
            return items[0]
        return ImageTokens(*(torch.cat(parts) for parts in zip(*(i._tensors() for i in items))), items[0].grid)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token; post-norm after each step."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
                first: Optional[ImageTokens] = None):
        """``first``: the image tokens' projections of the first layer (``keys`` are then ``first.tokens``)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        to_image, to_tokens = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if first is None:
            k = keys + key_pe  # the image tokens do not change until norm4: one sum serves both cross-attentions
            image_keys, image_values, image_queries = to_image.k_proj(k), to_image.v_proj(keys), to_tokens.q_proj(k)
        else:
            image_keys, image_values, image_queries = first.first_keys, first.first_values, first.first_queries
        queries = self.norm2(queries + to_image.attend(to_image.q_proj(queries + query_pe), image_keys, image_values))
        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(keys + to_tokens.attend(image_queries, to_tokens.k_proj(queries + query_pe),
                                                  to_tokens.v_proj(queries)))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def image_tokens(self, image: torch.Tensor, image_pe: torch.Tensor) -> ImageTokens:
        """image (B, C, gd, gh, gw), image_pe (1, C, g...) -> the image tokens and the first layer's projections."""
        # token-major copies once: every projection of the image tokens would otherwise copy them first
        keys = image.flatten(2).transpose(1, 2).contiguous()
        k = keys + _token_major(image_pe)
        to_image, to_tokens = self.layers[0].cross_attn_token_to_image, self.layers[0].cross_attn_image_to_token
        return ImageTokens(keys, to_image.k_proj(k), to_image.v_proj(keys), to_tokens.q_proj(k), tuple(image.shape[2:]))

    def forward(self, image: Union[torch.Tensor, ImageTokens], image_pe: torch.Tensor, tokens: torch.Tensor):
        """image (B, C, gd, gh, gw) or its ``image_tokens``, image_pe (1, C, g...), tokens (B, T, C) -> tokens
        (B, T, C), image tokens (B, L, C)."""
        if not isinstance(image, ImageTokens):
            image = self.image_tokens(image, image_pe)
        keys, key_pe = image.tokens, _token_major(image_pe)
        queries = tokens
        for index, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, tokens, key_pe, image if index == 0 else None)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


def _token_major(grid_values: torch.Tensor) -> torch.Tensor:
    """(B, C, gd, gh, gw) -> (B, L, C), contiguous."""
    return grid_values.flatten(2).transpose(1, 2).contiguous()


class HypernetworkMLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (SAM's ``MLP``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Image embedding (B, C, gd, gh, gw) + prompts -> low-resolution mask logits (B, 1, 4gd, 4gh, 4gw).

    Officially (B, 768, 8, 16, 16) -> (B, 1, 32, 64, 64). Only mask 0 is returned, as the official model does; the
    IoU token and the other mask tokens still take part in attention, so they are kept.
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.hidden_size
        up1, up2 = config.upscaled_channels
        self.num_mask_tokens = config.num_mask_tokens
        self.transformer = TwoWayTransformer(config.decoder_depth, dim, config.decoder_heads,
                                             config.decoder_mlp_dim, config.attention_downsample_rate)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(config.num_mask_tokens, dim)
        # Spatial LayerNorm over (channels, 2*grid): the official model normalises jointly over C x D x H x W.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, up1, kernel_size=2, stride=2),
            nn.LayerNorm((up1, *(2 * g for g in config.grid_size))),
            nn.GELU(),
            nn.ConvTranspose3d(up1, up2, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HypernetworkMLP(dim, dim, up2, 3) for _ in range(config.num_mask_tokens)
        )
        self.iou_prediction_head = HypernetworkMLP(dim, config.iou_head_hidden_dim, config.num_mask_tokens, 3)
        self.txt_align_upscaled_embedding = nn.Linear(dim, up2)
        self.upscaling_block = 256  # image tokens per block of the second upscaling, over the batch (_upscaled_masks)
        self._upscaling_layout = None  # (parameter stamp, reordered parameters): see _upscaling_in_token_order

    def image_tokens(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                     dense_prompts: torch.Tensor) -> ImageTokens:
        """image_embedding (B, C, g...), image_pe (1, C, g...), dense (1, C, g...): the no-mask embedding (SegVol takes
        no mask prompt, so it is the same for every prompt) -> what the decoder computes before any prompt."""
        return self.transformer.image_tokens(image_embedding + dense_prompts, image_pe)

    def forward(
        self,
        image: Union[torch.Tensor, ImageTokens],
        image_pe: torch.Tensor,
        sparse_prompts: torch.Tensor,
        dense_prompts: torch.Tensor,
        text_embedding: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """image: an embedding (B or 1, C, g...) or its ``ImageTokens``; image_pe (1, C, g...); sparse (B, n, C); dense
        (B or 1, C, g...) (SegVol's no-mask embedding); text (B, C). An image of batch 1 serves every prompt set."""
        b = sparse_prompts.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompts], dim=1)
        if not isinstance(image, ImageTokens):
            image = self.image_tokens(image, image_pe, dense_prompts[:image.shape[0]])
        if image.batch != b:
            image = image.expand(b)

        hs, image_tokens = self.transformer(image, image_pe, tokens)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

        # Only mask 0 is returned, so only its hypernetwork is evaluated; the text term adds to its weights (both
        # are linear in the upscaled features, so they are summed before the product).
        weights = self.output_hypernetworks_mlps[0](mask_tokens_out[:, 0])
        if text_embedding is not None:
            weights = weights + self.txt_align_upscaled_embedding(text_embedding)
        return self._upscaled_masks(image_tokens, weights, image.grid)

    def _upscaling_in_token_order(self, grid: Tuple[int, int, int]):
        """``output_upscaling``'s parameters laid out for ``_upscaled_masks``: the two transposed-convolution kernels as
        (8 c_out, c_in) matrices with their biases repeated per child, and the spatial LayerNorm's weight and bias as
        (8L, c1) in (token, child, channel) order.

        The reordering copies about 4 M values (20-30 ms on CPU), so with autograd off it is kept until a parameter
        changes (a new tensor, or an in-place update, which bumps the tensor's version counter).
        """
        up_conv1, norm, _, up_conv2, _ = self.output_upscaling
        gd, gh, gw = grid
        c1, c2 = up_conv1.out_channels, up_conv2.out_channels

        def token_order(parameter: torch.Tensor) -> torch.Tensor:
            return parameter.reshape(c1, gd, 2, gh, 2, gw, 2).permute(1, 3, 5, 2, 4, 6, 0).reshape(-1, c1)

        def layout():
            return (up_conv1.weight.permute(2, 3, 4, 1, 0).reshape(8 * c1, -1), up_conv1.bias.repeat(8),
                    token_order(norm.weight), token_order(norm.bias),
                    up_conv2.weight.permute(2, 3, 4, 1, 0).reshape(8 * c2, c1), up_conv2.bias.repeat(8))

        if torch.is_grad_enabled():  # training: gradients flow through the reordering
            return layout()
        parameters = (up_conv1.weight, up_conv1.bias, norm.weight, norm.bias, up_conv2.weight, up_conv2.bias)
        stamp = (grid,) + tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in parameters)
        if self._upscaling_layout is None or self._upscaling_layout[0] != stamp:
            with torch.no_grad():
                self._upscaling_layout = (stamp, tuple(t.contiguous() for t in layout()))
        return self._upscaling_layout[1]

    def _upscaled_masks(self, image_tokens: torch.Tensor, weights: torch.Tensor, grid: Tuple[int, int, int]):
        """image_tokens (B, L, C) in (gd, gh, gw) raster order, weights (B, up2) -> masks (B, 1, 4gd, 4gh, 4gw).

        ``output_upscaling`` applied as matrix products: a transposed convolution with kernel 2 and stride 2 is one
        linear map per input voxel to its 2x2x2 children, so the tokens are upscaled in place (no layout change
        between the steps; the joint LayerNorm is order-free once its affine parameters follow the same order) and
        the children are put in spatial order only once, on the final one-channel masks. After the LayerNorm, which
        needs every value, the tokens go on in blocks of ``upscaling_block`` tokens of the whole batch (the second
        upscaling's 12 M activations per prompt set officially never exist at once: the blocks stay in the CPU cache
        and no large buffer is allocated; 68-77 -> 47-49 ms per prompt set for the official upscaling on 2 cores).
        Same result as the convolutions up to float summation order (< 1e-6).
        """
        b, length, _ = image_tokens.shape
        gd, gh, gw = grid
        kernel1, bias1, scale, shift, kernel2, bias2 = self._upscaling_in_token_order(grid)
        c1, c2 = kernel1.shape[0] // 8, kernel2.shape[0] // 8
        _, norm, gelu1, _, gelu2 = self.output_upscaling
        # (B, L, 8*c1): columns ordered (child1, channel); LayerNorm over all of (c1, 2gd, 2gh, 2gw)
        x = F.linear(image_tokens, kernel1, bias1).reshape(b, -1)
        x = F.layer_norm(x, (length * 8 * c1,), eps=norm.eps).reshape(b, length * 8, c1)
        weights = weights.unsqueeze(-1)
        blocks, step = [], 8 * max(1, self.upscaling_block // b)
        for first in range(0, length * 8, step):
            last = min(first + step, length * 8)
            y = gelu1(torch.addcmul(shift[first:last], x[:, first:last], scale[first:last]))
            y = gelu2(F.linear(y, kernel2, bias2))  # (B, 8n, 8*c2): (child2, channel)
            blocks.append(torch.bmm(y.reshape(b, (last - first) * 8, c2), weights))  # (B, 64n, 1)
        masks = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        # (token d, h, w; child1 a, b, c; child2 a', b', c') -> voxel (4d + 2a + a', 4h + 2b + b', 4w + 2c + c')
        masks = masks.reshape(b, gd, gh, gw, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, 1, 4 * gd, 4 * gh, 4 * gw)
