"""SAM-style 3D mask decoder with SegVol's text-similarity term.

Prompt tokens and image tokens attend to each other in a two-way transformer; the image tokens are upscaled 4x and
each mask token's hypernetwork turns them into mask logits. The text embedding, projected to the upscaled channel
count, adds its own similarity map to every mask (additive, as in the official model).

A decoder meets thousands of image tokens (L = 2048 officially) with a few prompt tokens (T = 7-20). Two exact
rearrangements keep the L-long side off the wide matrix products (an official decode: 17 -> 7 GFLOP, 0.19 -> 0.10 s
on 2 CPU cores):

* every projection of the image tokens after the first layer is folded into the prompt tokens
  (``Attention.to_few_keys``, ``Attention.to_many_keys``);
* the image tokens change only by attention to the prompt tokens (``LowRankUpdate``: rank heads x T) and by a
  per-token LayerNorm, so the first upscaling of the final tokens is the image's own share, computed once, plus
  low-rank terms (``MaskDecoder._first_upscaling``).

Both give the plain computation's values and gradients up to float summation order (tested against it).

What the decoder computes from an image before any prompt (``MaskDecoder.image_tokens`` -> ``ImageTokens``: the image
tokens, the first layer's projections of them and their share of the first upscaling) can be kept and passed instead
of the embedding, so a new click on a window already decoded skips it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C), key_mask (B, Nk) bool (False: the key takes no part) -> (B, Nq, C)."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v), key_mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Projected q (B, Nq, inner), k and v (B, Nk, inner), key_mask (B, Nk) bool -> (B, Nq, C)."""
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=mask)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))

    # The decoder's cross-attentions pair a few prompt tokens (T, about 7-20) with thousands of image tokens (L, 2048
    # officially). Projecting the image side costs L x C x inner per projection; folding the projection into the few
    # tokens instead costs L x C x (heads x T), 3-7x less officially. Same values as ``forward`` up to float summation
    # order (products are re-associated; the softmax is the same).

    def to_few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_projected: bool = False,
                    key_mask: Optional[torch.Tensor] = None) -> "LowRankUpdate":
        """Many queries (B, L, C), or their projection (B, L, inner) with ``q_projected``, attend to few keys and values
        (B, T, C; ``key_mask`` (B, T) bool: False where a key takes no part) -> what ``forward`` gives (B, L, C), as a
        ``LowRankUpdate``: the query projection is folded into the keys and the output projection into the values.
        A masked key gets weight 0 exactly, so its (finite) value adds nothing."""
        heads = self.num_heads
        k, v = self.k_proj(k), self.v_proj(v)  # (B, T, inner)
        b, t, inner = k.shape
        d = inner // heads
        k_heads = k.reshape(b, t, heads, d)
        if q_projected:
            scores = torch.einsum("blhd,bthd->blht", q.reshape(q.shape[0], q.shape[1], heads, d), k_heads)
        else:
            # q_h k_h^T = x (W_q,h^T k_h^T) + b_q,h k_h^T: a (C, heads * T) matrix per prompt set
            w_q = self.q_proj.weight.reshape(heads, d, -1)  # (heads, d, C)
            folded = torch.einsum("hdc,bthd->bcht", w_q, k_heads).reshape(b, -1, heads * t)
            bias = torch.einsum("hd,bthd->bht", self.q_proj.bias.reshape(heads, d), k_heads).reshape(b, 1, heads * t)
            scores = torch.baddbmm(bias, q.expand(b, -1, -1), folded).reshape(b, -1, heads, t)
        scores = scores * d ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).reshape(b, -1, heads * t)
        # softmax_h v_h W_o,h^T summed over heads: the output projection applied to the T values of each head
        w_o = self.out_proj.weight.reshape(-1, heads, d)  # (C, heads, d)
        values = torch.einsum("bthd,chd->bhtc", v.reshape(b, t, heads, d), w_o).reshape(b, heads * t, -1)
        return LowRankUpdate(weights, values, self.out_proj.bias)

    def to_many_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries (B, T, C) attend to many keys and values (B, L, C) -> (B, T, C), as ``forward``: the key
        projection is folded into the queries, and the value projection applied after the attention weights (they
        sum to 1 over the keys, so the value bias passes through unchanged)."""
        heads = self.num_heads
        q = self.q_proj(q)
        b, t, inner = q.shape
        d = inner // heads
        q_heads = q.reshape(b, t, heads, d)
        w_k = self.k_proj.weight.reshape(heads, d, -1)
        folded = torch.einsum("bthd,hdc->bhtc", q_heads, w_k).reshape(b, heads * t, -1)
        bias = torch.einsum("bthd,hd->bht", q_heads, self.k_proj.bias.reshape(heads, d)).reshape(b, heads * t, 1)
        scores = torch.baddbmm(bias, folded, k.expand(b, -1, -1).transpose(1, 2))  # (B, heads * T, L)
        weights = torch.softmax(scores * d ** -0.5, dim=-1)
        mixed = torch.bmm(weights, v.expand(b, -1, -1)).reshape(b, heads, t, -1)  # (B, heads, T, C)
        w_v = self.v_proj.weight.reshape(heads, d, -1)
        out = torch.einsum("bhtc,hdc->bthd", mixed, w_v).reshape(b, t, inner) + self.v_proj.bias
        return self.out_proj(out)


@dataclass
class LowRankUpdate:
    """What an attention of L image tokens to T prompt tokens adds to the image tokens, kept factored:
    ``weights @ values + bias`` (B, L, C), with ``weights`` (B, L, heads * T) the attention weights of every head and
    ``values`` (B, heads * T, C) each head's values through the output projection. The first upscaling of the image
    tokens is linear in them, so it is carried through these factors (``MaskDecoder._first_upscaling``)."""

    weights: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor

    def added_to(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, C; an expanded view of one image's is fine) plus this update, as a new tensor: one pass to add
        the bias, the product accumulated into it in place (not the update made whole, then added)."""
        return (tokens + self.bias).baddbmm_(self.weights, self.values)


@dataclass
class KeysStep:
    """One decoder layer's change of the image tokens: ``tokens = LayerNorm(tokens + update)``; ``rstd`` (B, L, 1) is
    that LayerNorm's 1 / sqrt(var + eps) per token."""

    update: LowRankUpdate
    rstd: torch.Tensor


@dataclass
class ImageTokens:
    """The decoder's prompt-independent start on B image embeddings (``MaskDecoder.image_tokens``).

    ``tokens`` (B, L, C): the embedding plus the no-mask dense embedding, token-major in (gd, gh, gw) raster order;
    ``first_keys`` and ``first_values`` (B, L, C / downsample): the first layer's token-to-image keys (of tokens + PE)
    and values; ``first_queries`` (B, L, C / downsample): its image-to-token queries (of tokens + PE); ``upscaled``
    (B, L, 8 x upscaled channels): the tokens' share of the first upscaling, carried through every decoder layer's
    LayerNorm (``MaskDecoder._first_upscaling``).
    """

    tokens: torch.Tensor
    first_keys: torch.Tensor
    first_values: torch.Tensor
    first_queries: torch.Tensor
    upscaled: torch.Tensor
    grid: Tuple[int, int, int]

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self._tensors())

    def _tensors(self):
        return self.tokens, self.first_keys, self.first_values, self.first_queries, self.upscaled

    def expand(self, batch: int) -> "ImageTokens":
        """One image's tokens shared by ``batch`` prompt sets (views)."""
        return ImageTokens(*(t.expand(batch, -1, -1) for t in self._tensors()), self.grid)

    def select(self, index: torch.Tensor) -> "ImageTokens":
        """The tokens of images ``index`` (N,), in that order: N prompt sets on B images, each image's tokens computed
        once (training decodes many prompt sets per image)."""
        return ImageTokens(*(t[index] for t in self._tensors()), self.grid)

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
                first: Optional[ImageTokens] = None, token_mask: Optional[torch.Tensor] = None):
        """``first``: the image tokens' projections of the first layer (``keys`` are then ``first.tokens``);
        ``token_mask`` (B, T) bool: False for a padding slot, which no token and no image token attends to (its own
        row is computed and ignored) -> queries (B, T, C), image tokens (B, L, C) and their ``KeysStep``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        to_image, to_tokens = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if first is None:
            k = keys + key_pe  # the image tokens do not change until norm4: one sum serves both cross-attentions
            queries = self.norm2(queries + to_image.to_many_keys(queries + query_pe, k, keys))
        else:
            attended = to_image.attend(to_image.q_proj(queries + query_pe), first.first_keys, first.first_values)
            queries = self.norm2(queries + attended)
            k = first.first_queries
        queries = self.norm3(queries + self.mlp(queries))

        update = to_tokens.to_few_keys(k, queries + query_pe, queries, q_projected=first is not None,
                                       key_mask=token_mask)
        keys = update.added_to(keys)
        norm = self.norm4
        if not torch.is_grad_enabled():  # one fused pass gives the normalised tokens and their per-token scale
            keys, _, rstd = torch.native_layer_norm(keys, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            return queries, keys, KeysStep(update, rstd)
        # with autograd the scale is computed apart: native_layer_norm's rstd output takes no gradient (and
        # Tensor.var is 7x slower on CPU)
        centred = keys - keys.mean(dim=-1, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + norm.eps)
        return queries, norm(keys), KeysStep(update, rstd)


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def first_projections(self, tokens: torch.Tensor, image_pe: torch.Tensor):
        """tokens (B, L, C) in token order, image_pe (1, C, g...) -> the first layer's projections of them
        (token-to-image keys and values, image-to-token queries), each (B, L, C / downsample)."""
        k = tokens + _token_major(image_pe)
        to_image, to_tokens = self.layers[0].cross_attn_token_to_image, self.layers[0].cross_attn_image_to_token
        return to_image.k_proj(k), to_image.v_proj(tokens), to_tokens.q_proj(k)

    def forward(self, image: ImageTokens, image_pe: torch.Tensor, tokens: torch.Tensor,
                token_mask: Optional[torch.Tensor] = None):
        """image: ``MaskDecoder.image_tokens``, image_pe (1, C, g...), tokens (B, T, C), token_mask (B, T) bool (False:
        a padding slot, see ``TwoWayAttentionBlock``) -> tokens (B, T, C), image tokens (B, L, C), and each layer's
        ``KeysStep``."""
        keys, key_pe = image.tokens, _token_major(image_pe)
        queries, steps = tokens, []
        for index, layer in enumerate(self.layers):
            queries, keys, step = layer(queries, keys, tokens, key_pe, image if index == 0 else None, token_mask)
            steps.append(step)
        queries = queries + self.final_attn_token_to_image.to_many_keys(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys, steps


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
        self._kept: Dict[str, tuple] = {}  # name -> (parameter stamp, derived tensors): see _derived

    def image_tokens(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                     dense_prompts: torch.Tensor) -> ImageTokens:
        """image_embedding (B, C, g...), image_pe (1, C, g...), dense (1, C, g...): the no-mask embedding (SegVol takes
        no mask prompt, so it is the same for every prompt) -> what the decoder computes before any prompt."""
        # token-major copies once: every projection of the image tokens would otherwise copy them first
        return self._image_tokens(_token_major(image_embedding + dense_prompts), image_pe,
                                  tuple(image_embedding.shape[2:]))

    def with_previous_mask(self, image: ImageTokens, image_pe: torch.Tensor, mask_dense: torch.Tensor) -> ImageTokens:
        """``image`` (1 or B images) with a previous prediction's dense prompt (B, C, g...) added to its tokens
        (``PromptEncoder.previous_mask_embedding``): every prompt set gets its own tokens and first projections."""
        tokens = image.tokens + _token_major(mask_dense)
        return self._image_tokens(tokens, image_pe, image.grid)

    def _image_tokens(self, tokens: torch.Tensor, image_pe: torch.Tensor, grid: Tuple[int, int, int]) -> ImageTokens:
        through_layers, _ = self._upscaling_through_layers()
        upscaled = tokens @ through_layers[0].T
        return ImageTokens(tokens, *self.transformer.first_projections(tokens, image_pe), upscaled, grid)

    def forward(
        self,
        image: Union[torch.Tensor, ImageTokens],
        image_pe: torch.Tensor,
        sparse_prompts: torch.Tensor,
        dense_prompts: torch.Tensor,
        text_embedding: Optional[torch.Tensor] = None,
        mask_dense: Optional[torch.Tensor] = None,
        sparse_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """image: an embedding (B or 1, C, g...) or its ``ImageTokens``; image_pe (1, C, g...); sparse (B, n, C); dense
        (B or 1, C, g...) (SegVol's no-mask embedding); text (B, C); mask_dense (B, C, g...): a previous prediction's
        dense prompt, added to the no-mask one (``with_previous_mask``); sparse_mask (B, n) bool: False for a padding
        slot of ``sparse`` (prompt sets of different lengths in one batch; each decodes as it would alone, up to float
        summation order). An image of batch 1 serves every prompt set."""
        b = sparse_prompts.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompts], dim=1)
        if not isinstance(image, ImageTokens):
            image = self.image_tokens(image, image_pe, dense_prompts[:image.shape[0]])
        if mask_dense is not None:
            image = self.with_previous_mask(image, image_pe, mask_dense)
        if image.batch != b:
            image = image.expand(b)

        token_mask = None
        if sparse_mask is not None:
            token_mask = torch.cat([sparse_mask.new_ones(b, output_tokens.shape[0]), sparse_mask], dim=1)
        hs, _, steps = self.transformer(image, image_pe, tokens, token_mask)
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

        # Only mask 0 is returned, so only its hypernetwork is evaluated; the text term adds to its weights (both
        # are linear in the upscaled features, so they are summed before the product).
        weights = self.output_hypernetworks_mlps[0](mask_tokens_out[:, 0])
        if text_embedding is not None:
            weights = weights + self.txt_align_upscaled_embedding(text_embedding)
        return self._upscaled_masks(*self._first_upscaling(image, steps), weights, image.grid)

    def _upscaling_through_layers(self):
        """The first transposed convolution (as a (8 c1, C) matrix W) carried back through every decoder layer's
        final LayerNorm (gamma_k, beta_k; the image tokens change only there): (M_1..M_N, constants c_1..c_N, c_out).

        With z_k = tokens_{k-1} + update_k, tokens_k = LayerNorm_k(z_k) and the per-token 1/sigma_k (``KeysStep``):
        M_N = centre(W diag gamma_N), M_{k-1} = centre(M_k diag gamma_{k-1}) (centre: subtract each row's mean, so
        M z = M' (z - mean z) and no large mean is ever subtracted), and
        S_1 = M_1 tokens_0 + M_1 update_1,  S_k = S_{k-1} / sigma_{k-1} + M_k beta_{k-1} + M_k update_k,
        W tokens_N + bias = S_N / sigma_N + W beta_N + bias.
        M_1 tokens_0 depends on the image alone (``ImageTokens.upscaled``), and M_k update_k is a product with the
        update's few (heads x T) factors: the first upscaling of every prompt set costs L x heads x T x 8 c1 per
        layer instead of L x C x 8 c1. Kept by ``_derived`` when autograd is off."""
        up_conv1 = self.output_upscaling[0]
        norms = [layer.norm4 for layer in self.transformer.layers]
        out_biases = [layer.cross_attn_image_to_token.out_proj.bias for layer in self.transformer.layers]

        def centre(matrix: torch.Tensor) -> torch.Tensor:
            return matrix - matrix.mean(dim=1, keepdim=True)

        def layout():
            kernel = up_conv1.weight.permute(2, 3, 4, 1, 0).reshape(-1, up_conv1.in_channels)  # (8 c1, C)
            matrices = [centre(kernel * norms[-1].weight)]
            for norm in reversed(norms[:-1]):
                matrices.insert(0, centre(matrices[0] * norm.weight))
            constants = [out_biases[0] @ matrices[0].T]
            for k in range(1, len(norms)):
                constants.append((out_biases[k] + norms[k - 1].bias) @ matrices[k].T)
            out = norms[-1].bias @ kernel.T + up_conv1.bias.repeat(8)
            return matrices, constants + [out]

        parameters = [up_conv1.weight, up_conv1.bias] + [p for n in norms for p in (n.weight, n.bias)] + out_biases
        return self._derived("through_layers", (), parameters, layout)

    def _first_upscaling(self, image: ImageTokens, steps: List[KeysStep]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first transposed convolution of the decoder's final image tokens in token order (columns (child,
        channel)), from ``image.upscaled`` and each layer's factored update (``_upscaling_through_layers``), as
        (B, L, 8 c1) values and their per-token factor (B, L, 1): their product equals ``F.linear(tokens_N, kernel1,
        bias1)`` up to float summation order (``_upscaled_masks`` applies the factor where it normalises)."""
        matrices, constants = self._upscaling_through_layers()
        # S_N / sigma_N + c_out = (M_1 tokens_0 + sum_k (prod_{j<k} sigma_j)(M_k update_k + c_k)
        #                          + (prod_{j<=N} sigma_j) c_out) / prod_{j<=N} sigma_j:
        # every term but the image's own share becomes columns of one product (one pass over the (B, L, 8 c1) result)
        b = steps[0].update.weights.shape[0]
        ones = steps[0].rstd.new_ones(steps[0].rstd.shape)
        scale, weights, values = ones, [], []
        for k, (matrix, step) in enumerate(zip(matrices, steps)):
            weights += [step.update.weights * scale, scale]
            values += [step.update.values @ matrix.T, constants[k].expand(b, 1, -1)]
            scale = scale / step.rstd
        weights.append(scale)
        values.append(constants[-1].expand(b, 1, -1))
        total = torch.baddbmm(image.upscaled, torch.cat(weights, dim=2), torch.cat(values, dim=1))
        return total, 1.0 / scale

    def _upscaling_in_token_order(self, grid: Tuple[int, int, int]):
        """``output_upscaling``'s parameters after the first transposed convolution (``_upscaling_through_layers`` has
        that one) laid out for ``_upscaled_masks``: the spatial LayerNorm's weight and bias as (8L, c1) in (token,
        child, channel) order, the second transposed-convolution kernel as an (8 c2, c1) matrix with its bias repeated
        per child.

        The reordering copies about 4 M values (20-30 ms on CPU), so with autograd off it is kept (``_derived``).
        """
        up_conv1, norm, _, up_conv2, _ = self.output_upscaling
        gd, gh, gw = grid
        c1, c2 = up_conv1.out_channels, up_conv2.out_channels

        def token_order(parameter: torch.Tensor) -> torch.Tensor:
            return parameter.reshape(c1, gd, 2, gh, 2, gw, 2).permute(1, 3, 5, 2, 4, 6, 0).reshape(-1, c1)

        def layout():
            return (token_order(norm.weight), token_order(norm.bias),
                    up_conv2.weight.permute(2, 3, 4, 1, 0).reshape(8 * c2, c1), up_conv2.bias.repeat(8))

        return self._derived("token_order", (grid,), (norm.weight, norm.bias, up_conv2.weight, up_conv2.bias),
                             lambda: tuple(t.contiguous() for t in layout()))

    def _derived(self, name: str, key: tuple, parameters, layout: Callable[[], Any]):
        """``layout()``, tensors derived from ``parameters``: recomputed under autograd (training: gradients flow
        through it), else kept under ``name`` until ``key`` or a parameter changes (a new tensor, or an in-place
        update, which bumps the tensor's version counter)."""
        if torch.is_grad_enabled():
            return layout()
        stamp = key + tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in parameters)
        kept = self._kept.get(name)
        if kept is None or kept[0] != stamp:
            with torch.no_grad():
                kept = self._kept[name] = (stamp, layout())
        return kept[1]

    def _upscaled_masks(self, first: torch.Tensor, token_scale: torch.Tensor, weights: torch.Tensor,
                        grid: Tuple[int, int, int]):
        """first (B, L, 8 c1) times token_scale (B, L, 1): the first transposed convolution of the image
        tokens (``_first_upscaling``) in (gd, gh, gw) token order, columns (child, channel); weights (B, up2) -> masks
        (B, 1, 4gd, 4gh, 4gw).

        ``output_upscaling`` applied as matrix products: a transposed convolution with kernel 2 and stride 2 is one
        linear map per input voxel to its 2x2x2 children, so the tokens are upscaled in place (no layout change
        between the steps; the joint LayerNorm is order-free once its affine parameters follow the same order) and
        the children are put in spatial order only once, on the final one-channel masks. The LayerNorm over all of
        (c1, 2gd, 2gh, 2gw) needs only the mean and variance: they come from per-token sums combined in float64
        (parallel reductions; a one-row ``layer_norm`` runs on one core), and the normalisation and ``token_scale``
        are applied block by block with the affine step, so the normalised tokens are never written whole. The
        tokens go on in blocks of ``upscaling_block`` tokens of the whole batch (the second upscaling's 12 M
        activations per prompt set officially never exist at once: the blocks stay in the CPU cache and no large
        buffer is allocated).
        Same result as the convolutions up to float summation order (< 1e-6).
        """
        b, length, _ = first.shape
        gd, gh, gw = grid
        scale, shift, kernel2, bias2 = self._upscaling_in_token_order(grid)
        c1, c2 = first.shape[2] // 8, kernel2.shape[0] // 8
        _, norm, gelu1, _, gelu2 = self.output_upscaling
        count = length * 8 * c1
        factor64 = token_scale.reshape(b, length).double()
        # per-token sums in the tokens' precision (a float64 reduction would first copy them), combined in float64
        mean = (first.sum(-1).double() * factor64).sum(-1) / count  # (B,)
        squares = torch.linalg.vector_norm(first, dim=-1).double().square() * factor64.square()
        rstd = torch.rsqrt((squares.sum(-1) / count - mean.square()).clamp_min(0.0) + norm.eps)
        # normalised value = first * (factor * rstd) - mean * rstd, per token
        token_factor = (factor64 * rstd[:, None]).to(first.dtype).reshape(b, length, 1, 1)
        offset = (-mean * rstd).to(first.dtype).reshape(b, 1, 1, 1)
        first = first.reshape(b, length, 8, c1)
        weights = weights.unsqueeze(-1)
        blocks, step = [], max(1, self.upscaling_block // b)
        # split, not slices: under autograd each slice's backward writes zeros over the whole input (up to a fifth
        # of a 15-block training decode, profiled), while split's backward is one concatenation
        for first_block, factor_block, shift_block, scale_block in zip(
                first.split(step, dim=1), token_factor.split(step, dim=1), shift.split(8 * step),
                scale.split(8 * step)):
            n = first_block.shape[1]
            x = torch.addcmul(offset, first_block, factor_block)  # normalised (B, n, 8, c1)
            y = gelu1(torch.addcmul(shift_block, x.reshape(b, 8 * n, c1), scale_block))
            y = gelu2(F.linear(y, kernel2, bias2))  # (B, 8n, 8*c2): (child2, channel)
            blocks.append(torch.bmm(y.reshape(b, n * 64, c2), weights))  # (B, 64n, 1)
        masks = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        # (token d, h, w; child1 a, b, c; child2 a', b', c') -> voxel (4d + 2a + a', 4h + 2b + b', 4w + 2c + c')
        masks = masks.reshape(b, gd, gh, gw, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, 1, 4 * gd, 4 * gh, 4 * gw)
