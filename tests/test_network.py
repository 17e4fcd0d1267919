"""Unit tests of the network's load-bearing quirks, on the small configuration (seconds on CPU)."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import segvol
from segvol.config import SMALL, SegVolConfig
from segvol.modeling.text_encoder import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model(tokenizer_dir):
    torch.manual_seed(0)
    model = segvol.SegVol(SMALL, load_tokenizer(str(tokenizer_dir))).eval()
    return model


def test_official_configuration_defaults():
    config = SegVolConfig()
    assert config.image_size == (32, 256, 256) and config.patch_size == (4, 16, 16)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.mlp_dim) == (768, 12, 12, 3072)
    assert config.grid_size == (8, 16, 16) and config.low_res_size == (32, 64, 64)
    with pytest.raises(ValueError, match="not divisible"):
        SegVolConfig(image_size=(30, 256, 256))


def test_prompt_position_encoding_keeps_the_official_axis_swap():
    """(d, h, w) voxel coordinates are normalised by (H, D, W) = (256, 32, 256), as the official weights expect."""
    encoder = segvol.SegVol(SegVolConfig(num_layers=1, text_num_layers=1)).prompt_encoder
    gaussian = encoder.pe_layer.positional_encoding_gaussian_matrix
    coords = torch.tensor([[[16.0, 128.0, 64.0]]])
    expected_u = torch.tensor([16.0 / 256, 128.0 / 32, 64.0 / 256])
    projected = 2 * math.pi * ((2 * expected_u - 1) @ gaussian)
    expected = torch.cat([projected.sin(), projected.cos()])
    assert torch.allclose(encoder.pe_layer.at_voxels(coords, (32, 256, 256))[0, 0], expected, atol=1e-5)

    dense = encoder.dense_positional_encoding()
    assert dense.shape == (1, 768, 8, 16, 16)
    i, j, k = 3, 5, 11  # grid index (d, h, w): features stacked as (h, d, w) fractions
    u = torch.tensor([(j + 0.5) / 16, (i + 0.5) / 8, (k + 0.5) / 16])
    projected = 2 * math.pi * ((2 * u - 1) @ gaussian)
    assert torch.allclose(dense[0, :, i, j, k], torch.cat([projected.sin(), projected.cos()]), atol=1e-5)


def test_prompt_positions_without_the_axis_swap_line_up_with_the_image_grid():
    """prompt_axis_swap=False (from-scratch configurations): a prompt at a token's centre is encoded exactly like that
    token's position, on an anisotropic grid; with the official swap it is not."""
    config = SegVolConfig(image_size=(16, 32, 48), patch_size=(4, 8, 8), hidden_size=32, num_layers=1, num_heads=2,
                          mlp_dim=64, text_hidden_size=32, text_intermediate_size=32, text_num_layers=1,
                          text_num_heads=2, prompt_axis_swap=False)
    encoder = segvol.SegVol(config).prompt_encoder
    dense = encoder.dense_positional_encoding()[0]  # (C, 4, 4, 6)
    for i, j, k in [(0, 0, 0), (1, 3, 5), (3, 2, 1)]:
        centre = torch.tensor([[[(i + 0.5) * 4, (j + 0.5) * 8, (k + 0.5) * 8]]])
        lined_up = encoder.pe_layer.at_voxels(centre, config.image_size, axis_swap=False)[0, 0]
        assert torch.allclose(lined_up, dense[:, i, j, k], atol=1e-5)
        swapped = encoder.pe_layer.at_voxels(centre, config.image_size, axis_swap=True)[0, 0]
        assert not torch.allclose(swapped, dense[:, i, j, k], atol=1e-2)
    # the flag reaches the encoder and survives a checkpoint round trip of the configuration
    assert encoder.axis_swap is False
    assert SegVolConfig.from_dict(config.to_dict()).prompt_axis_swap is False
    assert segvol.OFFICIAL.prompt_axis_swap is True


def test_gaussian_position_buffer_is_persistent(small_model):
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in small_model.state_dict()
    assert "text_encoder.clip_text_model.text_model.embeddings.position_ids" in small_model.state_dict()


def test_points_without_box_get_a_padding_point(small_model):
    encoder = small_model.prompt_encoder
    coords, labels = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[1]])
    sparse, dense = encoder((coords, labels), None, None, batch_size=1)
    assert sparse.shape == (1, 2, SMALL.hidden_size)
    assert torch.equal(sparse[0, 1], encoder.not_a_point_embed.weight[0])
    sparse_with_box, _ = encoder((coords, labels), torch.tensor([[[0.0, 0, 0, 5, 5, 5]]]), None, batch_size=1)
    assert sparse_with_box.shape == (1, 3, SMALL.hidden_size)  # point + 2 box corners, no padding
    assert dense.shape == (1, SMALL.hidden_size, *SMALL.grid_size)


def test_text_adds_a_similarity_map_to_the_mask(small_model):
    """Additive text term: logits(text) - logits(no text) = (Linear(text) @ upscaled), independent of the prompts."""
    torch.manual_seed(1)
    image = torch.rand(1, 1, *SMALL.image_size)
    embedding = small_model.encode_image(image)
    box = torch.tensor([[4.0, 10, 10, 20, 40, 40]])
    text = small_model.encode_text(["liver"])
    with torch.no_grad():
        with_text = small_model.decode(embedding, text, box.clone())
        without = small_model.decode(embedding, None, box.clone())
    assert not torch.allclose(with_text, without)
    decoder = small_model.mask_decoder
    # Recompute the upscaled features to check the additive form exactly.
    with torch.no_grad():
        sparse, dense = small_model.prompt_encoder(None, box.reshape(1, 1, 6), text, 1)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).unsqueeze(0)
        tokens = torch.cat([tokens, sparse], dim=1)
        pe = small_model.prompt_encoder.dense_positional_encoding()
        hs, src, _ = decoder.transformer(decoder.image_tokens(embedding, pe, dense), pe, tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(1, -1, *SMALL.grid_size)).flatten(2)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])
        expected = (hyper + decoder.txt_align_upscaled_embedding(text)).unsqueeze(1) @ upscaled
    assert torch.allclose(with_text.flatten(2), expected, atol=1e-4)


def test_upscaling_as_matrix_products_equals_the_transposed_convolutions():
    """The decoder applies ``output_upscaling`` as per-voxel linear maps; values and gradients must match the
    modules themselves, with every parameter (the LayerNorm's spatial affine included) randomised."""
    torch.manual_seed(3)
    config = SegVolConfig(image_size=(16, 32, 48), patch_size=(4, 8, 8), hidden_size=32, num_layers=1, num_heads=2,
                          mlp_dim=64, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32, text_hidden_size=32,
                          text_intermediate_size=32, text_num_layers=1, text_num_heads=2)
    decoder = segvol.SegVol(config).mask_decoder
    with torch.no_grad():
        for parameter in decoder.output_upscaling.parameters():
            parameter.normal_(0.0, 0.5)
    grid = config.grid_size  # (4, 4, 6): unequal sides catch axis mix-ups
    tokens = torch.randn(2, math.prod(grid), config.hidden_size)
    weights = torch.randn(2, config.upscaled_channels[1])
    conv1 = decoder.output_upscaling[0]
    ones = torch.ones(2, math.prod(grid), 1)  # the per-token factor _first_upscaling gives with its values

    def first_upscaling(tokens):  # the first transposed convolution as (child, channel) columns per token
        return F.linear(tokens, conv1.weight.permute(2, 3, 4, 1, 0).reshape(-1, conv1.in_channels),
                        conv1.bias.repeat(8))

    tokens.requires_grad_(True)
    upscaled = decoder.output_upscaling(tokens.transpose(1, 2).reshape(2, -1, *grid))
    expected = torch.einsum("bc,bcdhw->bdhw", weights, upscaled).unsqueeze(1)
    inputs = [tokens] + list(decoder.output_upscaling.parameters())
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs, retain_graph=True)
    # one block of tokens, and 20 blocks with a partial last one (the blocks' gradients are joined again)
    for block in (decoder.upscaling_block, 10):
        decoder.upscaling_block = block
        masks = decoder._upscaled_masks(first_upscaling(tokens), ones, weights, grid)
        assert masks.shape == (2, 1, *config.low_res_size)
        assert torch.allclose(masks, expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(masks.square().sum(), inputs)
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.allclose(grad, expected_grad, atol=1e-4, rtol=1e-4)
    expected = expected.detach()
    tokens = tokens.detach()
    # Without autograd the reordered LayerNorm parameters are cached; an in-place update (an optimizer step, a
    # load_state_dict) must be seen on the next call.
    with torch.no_grad():
        masks = decoder._upscaled_masks(first_upscaling(tokens), ones, weights, grid)
        assert torch.allclose(masks, expected, atol=1e-5, rtol=1e-5)
        decoder.output_upscaling[1].weight.mul_(-2.0)
        decoder.output_upscaling[1].bias.add_(1.0)
        upscaled = decoder.output_upscaling(tokens.transpose(1, 2).reshape(2, -1, *grid))
        expected = torch.einsum("bc,bcdhw->bdhw", weights, upscaled).unsqueeze(1)
        masks = decoder._upscaled_masks(first_upscaling(tokens), ones, weights, grid)
        assert torch.allclose(masks, expected, atol=1e-5, rtol=1e-5)


def _plain_decode(decoder, embedding, pe, dense, sparse, text):
    """SAM's two-way transformer and SegVol's upscaling written out with the modules' own forwards (every projection
    of the image tokens done, the transposed convolutions as convolutions): what the decoder's folded and factored
    products must equal."""
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
    keys = (embedding + dense).flatten(2).transpose(1, 2).expand(sparse.shape[0], -1, -1)
    key_pe = pe.flatten(2).transpose(1, 2)
    queries = tokens
    for layer in decoder.transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(queries, queries, queries)
        else:
            queries = queries + layer.self_attn(queries + tokens, queries + tokens, queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + layer.cross_attn_token_to_image(queries + tokens, keys + key_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + layer.cross_attn_image_to_token(keys + key_pe, queries + tokens, queries))
    transformer = decoder.transformer
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(queries + tokens,
                                                                                          keys + key_pe, keys))
    grid = tuple(embedding.shape[2:])
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(keys.shape[0], -1, *grid))
    weights = decoder.output_hypernetworks_mlps[0](queries[:, 1]) + decoder.txt_align_upscaled_embedding(text)
    return torch.einsum("bc,bcdhw->bdhw", weights, upscaled).unsqueeze(1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_folded_and_factored_decoder_equals_the_plain_computation(depth):
    """The decoder folds the projections of its thousands of image tokens into the few prompt tokens and carries the
    first upscaling through each layer's LayerNorm as low-rank updates; outputs and gradients must equal the plain
    computation, with every LayerNorm, bias and upscaling parameter randomised (a LayerNorm's mean and scale are
    where such algebra goes wrong), for several prompt sets sharing one image, with and without autograd."""
    torch.manual_seed(depth)
    config = SegVolConfig(image_size=(16, 32, 48), patch_size=(4, 8, 8), hidden_size=32, num_layers=1, num_heads=2,
                          mlp_dim=64, decoder_depth=depth, decoder_heads=4, decoder_mlp_dim=32, text_hidden_size=32,
                          text_intermediate_size=32, text_num_layers=1, text_num_heads=2)
    model = segvol.SegVol(config)
    decoder = model.mask_decoder
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "norm" in name or name.endswith("bias") or "output_upscaling" in name:
                parameter.normal_(0.5 if name.endswith("weight") else 0.0, 0.5)
    embedding = torch.randn(1, config.hidden_size, *config.grid_size) * 2.0 + 1.0  # tokens with a large mean
    text = torch.randn(3, config.hidden_size)
    boxes = torch.tensor([[2.0, 4, 4, 12, 20, 30], [0, 0, 0, 15, 31, 47], [5, 9, 10, 8, 14, 40]])
    points = (torch.tensor([[[5.0, 10, 12], [10, 20, 30], [1, 2, 40]]] * 3), torch.tensor([[1.0, 0.0, 1.0]] * 3))
    pe = model.prompt_encoder.dense_positional_encoding()
    dense = model.prompt_encoder.dense_embedding()
    sparse, _ = model.prompt_encoder(points, boxes.reshape(3, 1, 6), text, 3)
    with torch.no_grad():
        expected = _plain_decode(decoder, embedding, pe, dense, sparse, text)
        assert torch.allclose(model.decode(embedding, text, boxes, points), expected, atol=1e-4, rtol=1e-4)
        tokens = model.image_tokens(embedding)
        assert torch.allclose(model.decode(tokens, text, boxes, points), expected, atol=1e-4, rtol=1e-4)
        # the layers' upscaling matrices are kept without autograd: an in-place update (an optimizer step, a
        # load_state_dict) must be seen by the next decode
        decoder.transformer.layers[-1].norm4.weight.mul_(-1.5)
        decoder.transformer.layers[0].cross_attn_image_to_token.out_proj.bias.add_(0.3)
        expected = _plain_decode(decoder, embedding, pe, dense, sparse, text)
        assert torch.allclose(model.decode(embedding, text, boxes, points), expected, atol=1e-4, rtol=1e-4)
    ours = model.decode(embedding, text, boxes, points)
    plain = _plain_decode(decoder, embedding, pe, dense, model.prompt_encoder(points, boxes.reshape(3, 1, 6),
                                                                             text, 3)[0], text)
    parameters = [p for p in decoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(ours.square().mean(), parameters, allow_unused=True)
    expected_grads = torch.autograd.grad(plain.square().mean(), parameters, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:
            continue
        assert torch.allclose(grad, expected_grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("with_box", [True, False])
def test_prompt_sets_with_fewer_points_decode_in_one_batch_as_alone(small_model, with_box):
    """A click's zoom-in windows hold different numbers of the earlier clicks; decoded in one batch, the shorter
    point lists filled with absent slots (label -2), each set's logits equal its decode alone (to float summation
    order), with and without a box (without one the official padding point still comes after the real points), with
    autograd on (the training path) and off (kept image tokens)."""
    model = small_model
    torch.manual_seed(3)
    embedding = torch.randn(1, SMALL.hidden_size, *SMALL.grid_size)
    text = torch.randn(3, SMALL.hidden_size)
    size = torch.tensor(SMALL.image_size, dtype=torch.float32)
    coords = torch.rand(3, 4, 3) * (size - 1)
    labels = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, -2.0, -2.0], [0.0, -2.0, -2.0, -2.0]])
    counts = [4, 2, 1]
    boxes = torch.tensor([[1.0, 2, 3, 10, 20, 30], [0, 0, 0, 15, 31, 47], [4, 5, 6, 9, 12, 20]]) if with_box else None
    image = model.image_tokens(embedding)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            batched = model.decode(image if not grad else embedding, text, boxes, (coords, labels))
            for row, count in enumerate(counts):
                alone = model.decode(image if not grad else embedding, text[row:row + 1],
                                     None if boxes is None else boxes[row:row + 1],
                                     (coords[row:row + 1, :count], labels[row:row + 1, :count]))
                assert torch.allclose(batched[row:row + 1], alone, atol=1e-5, rtol=1e-5), (row, grad)
    # what an absent slot holds does not matter: moving it changes nothing
    moved = coords.clone()
    moved[1, 2:] = 5.0
    with torch.no_grad():
        assert torch.allclose(model.decode(image, text, boxes, (moved, labels))[1],
                              model.decode(image, text, boxes, (coords, labels))[1], atol=1e-6)


def test_upsampling_equals_trilinear_interpolation():
    """SegVol.upsample resizes slice by slice where the depth needs no interpolation: for the official window the
    same floats as trilinear interpolation (bit for bit), elsewhere the same to float rounding; gradients too."""

    torch.manual_seed(0)
    for config, exact in ((SegVolConfig(), True), (SMALL, False),
                          (SegVolConfig(image_size=(16, 64, 64), patch_size=(8, 8, 8)), True)):  # the trilinear path
        with torch.device("meta"):
            model = segvol.SegVol(config)
        for batch in (1, 3):
            low = (torch.randn(batch, 1, *config.low_res_size) * 4).requires_grad_(True)
            ours = model.upsample(low)
            reference = F.interpolate(low, size=config.image_size, mode="trilinear", align_corners=False)
            assert torch.equal(ours, reference) if exact else torch.allclose(ours, reference, atol=1e-5)
            weights = torch.randn_like(reference)
            (gradient,) = torch.autograd.grad((ours * weights).sum(), low)
            (expected,) = torch.autograd.grad((reference * weights).sum(), low)
            assert torch.allclose(gradient, expected, atol=1e-4)


def test_spatial_layernorm_spans_channels_and_space(small_model):
    norm = small_model.mask_decoder.output_upscaling[1]
    assert tuple(norm.normalized_shape) == (SMALL.hidden_size // 4, *(2 * g for g in SMALL.grid_size))
    official = segvol.SegVol(SegVolConfig(num_layers=1, text_num_layers=1)).mask_decoder.output_upscaling[1]
    assert tuple(official.weight.shape) == (192, 16, 32, 32)


def test_text_pooling_uses_the_first_end_of_text_token(small_model):
    clip = small_model.text_encoder.clip_text_model
    tokens = small_model.text_encoder.tokenize(["liver", "portal vein and splenic vein"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape[0] == 2 and (ids[0] == 49407).sum() > 1  # the short prompt is padded with EOT ids
    with torch.no_grad():
        pooled = clip(ids, mask)
        alone = clip(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    assert torch.allclose(pooled[0], alone[0], atol=1e-5)  # padding never changes the pooled state


def test_text_embeddings_are_cached_per_name(small_model, monkeypatch):
    small_model.text_encoder.clear_cache()
    calls = []
    original = small_model.text_encoder.forward
    monkeypatch.setattr(small_model.text_encoder, "forward", lambda names: calls.append(list(names)) or original(names))
    first = small_model.encode_text(["liver", "spleen"])
    second = small_model.encode_text(["spleen", "liver", "aorta"])
    assert calls == [["liver", "spleen"], ["aorta"]]
    assert torch.equal(first[0], second[1]) and torch.equal(first[1], second[0])
    with pytest.raises(ValueError, match="non-empty"):
        small_model.encode_text([])


def test_one_image_embedding_serves_many_prompt_sets(small_model):
    torch.manual_seed(2)
    embedding = small_model.encode_image(torch.rand(1, 1, *SMALL.image_size))
    names = ["liver", "spleen", "aorta"]
    boxes = torch.tensor([[2.0, 4, 4, 20, 30, 30], [0, 0, 0, 31, 63, 63], [10, 20, 20, 12, 40, 40]])
    with torch.no_grad():
        together = small_model.decode(embedding, small_model.encode_text(names), boxes)
        for index, name in enumerate(names):
            alone = small_model.decode(embedding, small_model.encode_text([name]), boxes[index:index + 1])
            assert torch.allclose(together[index], alone[0], atol=1e-5)
    assert together.shape == (3, 1, *SMALL.low_res_size)


def test_kept_image_tokens_decode_like_the_embedding_they_come_from(small_model):
    """``image_tokens`` (the decoder's prompt-independent part, kept by the engine per window) in place of the
    embedding: the same logits (to 1e-5) for one image shared by several prompt sets, for a batch of different images
    (``ImageTokens.cat``), with points, a box and text; with autograd on they are computed inside and gradients reach
    the embedding."""
    from segvol.modeling.mask_decoder import ImageTokens

    torch.manual_seed(3)
    embeddings = small_model.encode_image(torch.rand(2, 1, *SMALL.image_size)).detach()
    text = small_model.encode_text(["liver", "spleen"])
    boxes = torch.tensor([[2.0, 4, 4, 20, 30, 30], [0, 0, 0, 31, 63, 63]])
    points = (torch.tensor([[[5.0, 10, 12], [20, 40, 30]]] * 2), torch.tensor([[1.0, 0.0]] * 2))
    with torch.no_grad():
        shared = small_model.image_tokens(embeddings[:1])
        assert shared.batch == 1 and shared.tokens.shape == (1, math.prod(SMALL.grid_size), SMALL.hidden_size)
        assert torch.allclose(small_model.decode(shared, text, boxes, points),
                              small_model.decode(embeddings[:1], text, boxes, points), atol=1e-5)
        both = ImageTokens.cat([shared, small_model.image_tokens(embeddings[1:])])
        assert both.batch == 2
        assert torch.allclose(small_model.decode(both, text, boxes, points),
                              small_model.decode(embeddings, text, boxes, points), atol=1e-5)
        index = torch.tensor([1, 0, 1])  # training: several prompt sets per image, each image's tokens made once
        three = (torch.cat([text, text[:1]]), torch.cat([boxes, boxes[:1]]),
                 (torch.cat([points[0], points[0][:1]]), torch.cat([points[1], points[1][:1]])))
        assert torch.allclose(small_model.decode(both.select(index), *three),
                              small_model.decode(embeddings[index], *three), atol=1e-5)
    embedding = embeddings[:1].clone().requires_grad_(True)
    small_model.decode(embedding, text[:1], boxes[:1]).sum().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_forward_shapes_and_prompt_requirement(small_model):
    image = torch.rand(2, 1, *SMALL.image_size)
    with torch.no_grad():
        logits = small_model(image, text=["liver", "spleen"])
    assert logits.shape == (2, 1, *SMALL.image_size)
    with pytest.raises(ValueError, match="at least one prompt"):
        small_model(image)
    with pytest.raises(ValueError, match=r"image must be \(B, 1, 32, 64, 64\)"):
        small_model(torch.rand(1, 1, 16, 64, 64), text=["liver"])


def test_image_encoder_equals_monai_vit_with_the_same_weights():
    """Our encoder computes what MONAI's ViT (the reference's encoder) computes, with identical parameter names."""
    from monai.networks.nets import ViT

    config = SegVolConfig(image_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=96, num_layers=2,
                          num_heads=4, mlp_dim=192)
    torch.manual_seed(3)
    ours = segvol.SegVol(config).image_encoder.eval()
    torch.nn.init.normal_(ours.patch_embedding.position_embeddings, std=0.02)
    monai_vit = ViT(in_channels=1, img_size=config.image_size, patch_size=config.patch_size, hidden_size=96,
                    mlp_dim=192, num_layers=2, num_heads=4, proj_type="perceptron", classification=False,
                    dropout_rate=0.0).eval()
    result = monai_vit.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("cross_attn" in key for key in result.missing_keys)  # MONAI >= 1.2 cross-attention extras, unused
    image = torch.rand(2, 1, *config.image_size)
    with torch.no_grad():
        expected = monai_vit(image)[0].transpose(1, 2).reshape(2, 96, *config.grid_size)
        assert torch.allclose(ours(image), expected, atol=1e-5)


def test_library_has_no_hard_coded_cuda_calls():
    offenders = []
    for path in (ROOT / "lib").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.cuda\(\)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders


def test_mismatched_prompt_batches_are_rejected(small_model):
    embedding = torch.zeros(2, SMALL.hidden_size, *SMALL.grid_size)
    texts = small_model.encode_text(["liver", "spleen", "aorta"])
    with pytest.raises(ValueError, match="2 image embeddings for 3 prompt sets"):
        small_model.decode(embedding, texts)
    with pytest.raises(ValueError, match="disagree"):
        small_model.decode(embedding[:1], texts, boxes=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="points must be"):
        small_model.decode(embedding[:1], points=(torch.zeros(1, 2, 3), torch.zeros(1, 3)))


def test_previous_prediction_prompt_adds_its_dense_embedding_to_the_image_tokens(tokenizer_dir):
    """``mask_prompt`` networks: a previous prediction's low-res logits and the click maps, through
    ``MaskEmbedding``, add to the no-mask dense embedding of every image token. Starting at zero, the module changes
    nothing (a network given it answers as before until trained); trained, decoding kept image tokens with it equals
    decoding the embedding with that dense prompt added (to 1e-5), it takes gradients, and a shape or a network
    without it is refused."""
    torch.manual_seed(4)
    config = dataclasses.replace(SMALL, mask_prompt=True)
    model = segvol.SegVol(config, load_tokenizer(str(tokenizer_dir))).eval()
    embedding = model.encode_image(torch.rand(1, 1, *config.image_size)).detach()
    text = model.encode_text(["liver", "spleen"])
    boxes = torch.tensor([[2.0, 4, 4, 20, 30, 30], [0, 0, 0, 31, 63, 63]])
    points = (torch.tensor([[[5.0, 10, 12]]] * 2), torch.tensor([[1.0]] * 2))
    previous = torch.randn(2, 1, *config.low_res_size) * 10
    with torch.no_grad():
        plain = model.decode(embedding, text, boxes, points)
        assert torch.equal(model.decode(embedding, text, boxes, points, previous), plain)  # zero-initialised
        for parameter in model.prompt_encoder.mask_embedding.layers[-1].parameters():
            parameter.normal_(std=0.5)
        tokens = model.image_tokens(embedding)
        refined = model.decode(tokens, text, boxes, points, previous)
        assert (refined - plain).abs().max() > 1e-2
        dense = model.prompt_encoder.previous_mask_embedding(previous, points)
        assert dense.shape == (2, config.hidden_size, *config.grid_size)
        sparse, no_mask = model.prompt_encoder(points, boxes.reshape(2, 1, 6), text, 2)
        expected = model.mask_decoder(embedding.expand(2, -1, -1, -1, -1) + dense, model.prompt_encoder
                                      .dense_positional_encoding(), sparse, no_mask, text)
        assert torch.allclose(refined, expected, atol=1e-5)
        assert torch.allclose(model.decode(embedding, text, boxes, points, previous), refined, atol=1e-5)
    model.decode(embedding, text[:1], boxes[:1], None, previous[:1]).sum().backward()
    grads = [p.grad for p in model.prompt_encoder.mask_embedding.parameters()]
    assert all(g is not None for g in grads) and grads[0].abs().sum() > 0
    with pytest.raises(ValueError, match="previous logits must be"):
        model.decode(embedding, text[:1], boxes[:1], None, torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="previous predictions for 2 prompt sets"):
        model.decode(embedding, text, boxes, None, previous[:1])
    plain_model = segvol.SegVol(SMALL, load_tokenizer(str(tokenizer_dir))).eval()
    assert plain_model.prompt_encoder.mask_embedding is None
    assert not any("mask_embedding" in key for key in plain_model.state_dict())  # the official key set is unchanged
    with pytest.raises(ValueError, match="mask_prompt off"):
        plain_model.decode(embedding, text[:1], boxes[:1], None, previous[:1])


def test_click_maps_put_a_blob_at_each_click_on_the_low_resolution_grid():
    """Positive clicks draw in channel 0, negative ones in channel 1, padding draws nothing; a click is located on
    the low-resolution grid as the decoder's upsampling places it (window voxel 4k + 1.5 -> low-res voxel k for a 4x
    in-plane ratio), and the maps match a brute-force Gaussian."""
    from segvol.modeling.prompt_encoder import click_maps

    low, size = (8, 16, 16), (8, 64, 64)
    coords = torch.tensor([[[2.0, 9.5, 33.5], [5.0, 40.0, 10.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])
    maps = click_maps((coords, labels), 1, low, size, torch.zeros(1))
    assert maps.shape == (1, 2, *low)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in low], indexing="ij"), -1)

    def blob(point):
        centre = (torch.tensor(point) + 0.5) * torch.tensor([1.0, 0.25, 0.25]) - 0.5
        return torch.exp(-0.5 * ((grid - centre) ** 2).sum(-1))

    assert torch.allclose(maps[0, 0], blob([2.0, 9.5, 33.5]), atol=1e-6)
    assert torch.allclose(maps[0, 1], blob([5.0, 40.0, 10.0]), atol=1e-6)
    assert float(maps[0, 0, 2, 2, 8]) == 1.0  # (2, 9.5, 33.5) is the centre of low-resolution voxel (2, 2, 8)
    assert float(maps[0, 0, 2, 2, 9]) == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert torch.equal(click_maps(None, 2, low, size, torch.zeros(1)), torch.zeros(2, 2, *low))
    many = (torch.rand(2, 40, 3) * torch.tensor(size), torch.randint(0, 2, (2, 40)))  # drawn in chunks of 16
    drawn = click_maps(many, 2, low, size, torch.zeros(1))
    for b in range(2):
        for channel, value in enumerate((1, 0)):
            mine = [blob(p.tolist()) for p, l in zip(many[0][b], many[1][b]) if int(l) == value]
            assert torch.allclose(drawn[b, channel], torch.stack(mine).amax(0), atol=1e-6)
