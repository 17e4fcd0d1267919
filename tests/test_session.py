"""Image sessions: one image's state held by the caller (``engine.open``), prompts added request by request, the
encoder run only for what is new, and the same result as a fresh session given every prompt at once."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segvol
from segvol.engine import SegVolEngine
from segvol.errors import BadPromptError, BadRequestError, BadTextError
from segvol.prompts import Prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_fixtures import synthetic_ct  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def small_model():
    tokenizer = SHARED / "clip-tokenizer"
    if not tokenizer.exists():
        pytest.skip(f"{tokenizer} is missing (tests read it from ../shared beside the repository)")
    torch.manual_seed(0)
    model = segvol.SegVol(segvol.SMALL, segvol.modeling.text_encoder.load_tokenizer(str(tokenizer))).eval()
    return model


def starts(result):
    return {result.plan.windows[i].start for i in result.plan.used}


def test_text_then_box_then_clicks_encode_only_what_is_new_and_equal_a_fresh_session(small_model):
    array, affine, _ = synthetic_ct()
    box, positive, negative = [20, 20, 10, 60, 60, 40], [40, 40, 25, 1], [30, 35, 20, 0]
    session = SegVolEngine(small_model).open(array, affine=affine)

    text = session.segment(texts=["liver"])
    assert text.stats["encoder_forwards"] == 1 + len(text.plan.used)  # the zoom-out view and every used window
    assert session.zoom_out_embedding is not None and text.stats["seconds"]["preprocess"] >= 0
    encoded = starts(text)

    boxed = session.segment(texts=["liver"], box=box)
    assert boxed.stats["encoder_forwards"] == len(starts(boxed) - encoded)  # only windows not encoded before
    encoded |= starts(boxed)

    clicked = session.segment(texts=["liver"], box=box, points=[positive])
    assert clicked.stats["encoder_forwards"] == len(starts(clicked) - encoded)
    encoded |= starts(clicked)

    final = session.segment(Prompts(texts=["liver"], box=box, points=[positive, negative]), return_probabilities=True)
    assert final.stats["encoder_forwards"] == len(starts(final) - encoded) == 0  # a click changes no window set
    holding = sum(final.plan.windows[i].contains(session.prepared.frames.original_to_native_points(
        [negative[:3]])).any() for i in final.plan.used)
    assert final.stats["decoded_prompts"] == 1 + holding  # the zoom-out decoder and the windows the click is in

    fresh = SegVolEngine(small_model).open(array, affine=affine).segment(
        texts=["liver"], box=box, points=[positive, negative], return_probabilities=True)
    assert fresh.stats["encoder_forwards"] == 1 + len(fresh.plan.used)
    assert final.plan.grid == fresh.plan.grid and final.plan.used == fresh.plan.used
    assert np.array_equal(final.label, fresh.label) and final.label.any()
    assert np.allclose(final.probabilities["liver"], fresh.probabilities["liver"], atol=1e-5)


def test_sessions_of_one_image_share_encodings_but_not_state(small_model):
    array, affine, _ = synthetic_ct()
    engine = SegVolEngine(small_model)
    first = engine.open(array, affine=affine)
    one = first.segment(texts=["spleen"], box=[20, 20, 10, 60, 60, 40])
    second = engine.open(array, affine=affine)
    assert second.key == first.key and second.token != first.token
    two = second.segment(texts=["spleen"], box=[20, 20, 10, 60, 60, 40])
    assert two.stats["encoder_forwards"] == 0  # content-keyed embeddings of the engine
    assert np.array_equal(one.label, two.label)
    assert (first.token, "spleen") in engine.blends
    first.close()
    assert (first.token, "spleen") not in engine.blends and (second.token, "spleen") in engine.blends


def test_label_values_are_written_by_the_engine_in_any_request_order(small_model):
    array, affine, _ = synthetic_ct()
    box, click = [20, 20, 10, 60, 60, 40], [40, 40, 25, 1]
    texts = ["liver", "spleen"]
    default = SegVolEngine(small_model).open(array, affine=affine).segment(texts=texts, box=box, points=[click])
    assert default.labels == {"liver": 1, "spleen": 2} and set(np.unique(default.label)) > {0}
    lookup = np.array([0, 7, 300])
    session = SegVolEngine(small_model).open(array, affine=affine)
    # the same session asked with other values each time (its last label is reused only for the same numbering)
    for values, expected in [({"liver": 7, "spleen": 300}, lookup[default.label]),
                             ({"liver": 1, "spleen": 1}, (default.label > 0).astype(np.uint8)),
                             ({"liver": 7, "spleen": 300}, lookup[default.label])]:
        result = session.segment(texts=texts, box=box, points=[click], values=values)
        assert result.labels == values and np.array_equal(result.label, expected)
        assert result.label.dtype == (np.uint16 if max(values.values()) > 255 else np.uint8)
    preview = session.segment(texts=texts, box=box, points=[click], mode="zoom_out")
    valued = session.segment(texts=texts, box=box, points=[click], mode="zoom_out", values={"liver": 7, "spleen": 300})
    assert preview.label.any() and np.array_equal(valued.label, lookup[preview.label])
    with pytest.raises(BadRequestError, match="no label value for 'spleen'"):
        session.segment(texts=texts, box=box, values={"liver": 3})
    with pytest.raises(BadRequestError, match="1..65535"):
        session.segment(texts=texts, box=box, values={"liver": 3, "spleen": 0})


def test_prompts_are_validated_once_on_construction():
    assert Prompts(texts=[" liver ", "liver"]).texts == ("liver",)
    assert Prompts.from_clicks(positive=[(1, 2, 3)], negative=[(4, 5, 6)]).points == ((1, 2, 3, 1), (4, 5, 6, 0))
    prompts = Prompts.from_clicks(texts=[], positive=[(1, 2, 3)], box=(0, 0, 0, 5, 5, 5))
    assert prompts.texts == () and not prompts.is_empty()
    assert prompts.to_json() == {"texts": [], "positive_points": [[1, 2, 3]], "negative_points": [],
                                 "box": [0, 0, 0, 5, 5, 5]}
    assert Prompts(points=(np.zeros((2, 3)), np.array([1, 0]))).negative == [(0.0, 0.0, 0.0)]
    with pytest.raises(BadTextError, match="empty"):
        Prompts(texts=[])
    with pytest.raises(BadPromptError, match="inverted"):
        Prompts(box=[5, 0, 0, 1, 5, 5])
    with pytest.raises(BadPromptError, match="labels"):
        Prompts(points=[(1, 2, 3, 2)])


def test_the_service_keeps_a_bounded_set_of_sessions_per_image_and_client(tokenizer_dir, tmp_path):
    from _server import random_weights

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "segvol"))
    try:
        from lib.service import SegVolService
    finally:
        sys.path.pop(0)
    array, affine, _ = synthetic_ct()
    other = np.ascontiguousarray(array[::-1])
    weights = random_weights(tmp_path, tokenizer_dir, segvol.SMALL)
    service = SegVolService(weights=str(weights), device="cpu", mode="zoom_out", precision="fp32", max_sessions=2)

    def seen(image, client=None):
        with service.session(image, client) as session:
            return session

    def segment(image, client=None):
        with service.session(image, client) as session:
            return session.segment(texts=["liver"])

    first = seen(array)
    assert seen(array) is first  # the same image, no client: the same session
    assert seen(array, "annotator-2") is not first  # another client: its own state
    run = segment(array, "annotator-2")
    assert run.stats["encoder_forwards"] == 1
    run = segment(array)
    assert run.stats["encoder_forwards"] == 0  # the content-keyed zoom-out embedding is shared
    seen(other)  # a third session: the least recently used one ("annotator-2") goes
    assert len(service._sessions) == 2 and seen(array) is first
    segvol.save_checkpoint(str(weights / "segvol_label.pt"), segvol.SegVol(segvol.SMALL), vocabulary=[])
    assert seen(array) is not first and len(service._sessions) == 1  # another checkpoint: no session survives


def test_clicks_refine_the_previous_answer_of_a_mask_prompt_network(tokenizer_dir):
    """A network with the previous-prediction prompt (``mask_prompt``): a click added to the same prompts is decoded
    with the logits the session's last request gave (zoom-out, and each window the click is in; the other windows keep
    their answer), unlike a fresh session given every prompt at once; the same request again repeats its answer from
    the caches; a changed box starts afresh."""
    import dataclasses

    torch.manual_seed(5)
    config = dataclasses.replace(segvol.SMALL, mask_prompt=True)
    model = segvol.SegVol(config, segvol.modeling.text_encoder.load_tokenizer(str(tokenizer_dir))).eval()
    with torch.no_grad():
        for parameter in model.prompt_encoder.mask_embedding.layers[-1].parameters():
            parameter.normal_(std=0.5)  # a trained module: the previous answer changes the next one
    array, affine, _ = synthetic_ct()
    box, positive, negative = [20, 20, 10, 60, 60, 40], [40, 40, 25, 1], [30, 35, 20, 0]
    session = SegVolEngine(model).open(array, affine=affine)

    def holding(result, point):
        native = session.prepared.frames.original_to_native_points([point[:3]])
        return sum(result.plan.windows[i].contains(native).any() for i in result.plan.used)

    first = session.segment(texts=["liver"], box=box)
    assert first.stats["refined_prompts"] == 0
    clicked = session.segment(texts=["liver"], box=box, points=[positive], return_probabilities=True)
    assert clicked.stats["decoded_prompts"] == clicked.stats["refined_prompts"] == 1 + holding(clicked, positive)
    fresh = SegVolEngine(model).open(array, affine=affine).segment(texts=["liver"], box=box, points=[positive],
                                                                    return_probabilities=True)
    assert fresh.stats["refined_prompts"] == 0
    assert not np.allclose(clicked.probabilities["liver"], fresh.probabilities["liver"], atol=1e-3)

    again = session.segment(texts=["liver"], box=box, points=[positive])
    assert np.array_equal(again.label, clicked.label)
    assert again.stats["decoded_prompts"] == again.stats["refined_prompts"] == 1  # the zoom-out; windows from cache
    assert again.stats["decoder_cache_hits"] == holding(clicked, positive)

    second = session.segment(texts=["liver"], box=box, points=[positive, negative])
    assert second.stats["decoded_prompts"] == second.stats["refined_prompts"] == 1 + holding(second, negative)
    # clients group points by label (MONAI Label's foreground/background lists): a click need not come last
    other = [44, 38, 22, 1]
    third = session.segment(texts=["liver"], box=box, points=[positive, other, negative])
    assert third.stats["decoded_prompts"] == third.stats["refined_prompts"] == 1 + holding(third, other)

    moved = [22, 20, 10, 60, 60, 40]
    restarted = session.segment(texts=["liver"], box=moved, points=[positive, negative])
    assert restarted.stats["refined_prompts"] == 0
    alone = SegVolEngine(model).open(array, affine=affine).segment(texts=["liver"], box=moved,
                                                                    points=[positive, negative])
    assert np.array_equal(restarted.label, alone.label)
    assert session.segment(texts=["liver"], box=moved, points=[negative]).stats["refined_prompts"] == 0  # a point less


def test_a_click_in_a_window_the_earlier_answer_did_not_decode_is_refined_too(tokenizer_dir):
    """A click in a window the earlier answer never decoded (new to the category, or on a new grid; on the robot's
    head-and-neck runs about half the windows of a click) is decoded with the earlier answer as its previous
    prediction too: that answer's zoom-out logits on the window's voxels, averaged onto the decoder's grid."""
    import dataclasses

    import torch.nn.functional as F

    torch.manual_seed(5)
    config = dataclasses.replace(segvol.SMALL, mask_prompt=True)
    model = segvol.SegVol(config, segvol.modeling.text_encoder.load_tokenizer(str(tokenizer_dir))).eval()
    with torch.no_grad():
        for parameter in model.prompt_encoder.mask_embedding.layers[-1].parameters():
            parameter.normal_(std=0.5)
    array, affine, _ = synthetic_ct()
    box, positive = [20, 20, 10, 60, 60, 40], [40, 40, 25, 1]
    session = SegVolEngine(model).open(array, affine=affine)
    session.segment(texts=["liver"], box=box)
    earlier = session._interactions["liver"]
    # this small volume's windows are all the first answer's: forget them, as a new grid would
    earlier.windows.clear()
    clicked = session.segment(texts=["liver"], box=box, points=[positive], return_probabilities=True)
    native = session.prepared.frames.original_to_native_points([positive[:3]])
    holding = [clicked.plan.windows[i] for i in clicked.plan.used if clicked.plan.windows[i].contains(native).any()]
    assert holding and clicked.stats["refined_prompts"] == clicked.stats["decoded_prompts"] == 1 + len(holding)

    window = holding[0]
    zoom_logits = model.upsample(earlier.zoom_out)[0, 0]
    given = session._earlier_answer_in(zoom_logits, float(zoom_logits.min()), window)
    assert given.shape == (1, 1, *config.low_res_size)
    # what it must equal: the earlier zoom-out logits interpolated onto the whole native volume (as the label is
    # made), the window cut out of it (padding: the lowest logit), averaged onto the decoder's grid
    whole = F.interpolate(zoom_logits[None, None], size=session.prepared.frames.native_shape, mode="trilinear",
                          align_corners=False)[0, 0]
    expected = torch.full(tuple(window.size), float(zoom_logits.min()))
    expected[window.window_slices] = whole[window.native_slices]
    expected = F.adaptive_avg_pool3d(expected[None, None], config.low_res_size)
    assert torch.allclose(given, expected, atol=1e-4)
    # the same request from a fresh session (no earlier answer) decodes nothing with a previous prediction
    fresh = SegVolEngine(model).open(array, affine=affine).segment(texts=["liver"], box=box, points=[positive],
                                                                    return_probabilities=True)
    assert fresh.stats["refined_prompts"] == 0
    assert not np.allclose(clicked.probabilities["liver"], fresh.probabilities["liver"], atol=1e-3)
