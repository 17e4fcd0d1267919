"""The zoom-out-zoom-in engine: geometry (with an oracle network), caching, multi-label, errors, CLI, end to end."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import segvol
from segvol.engine import ByteLRU, PackedMask, SegVolEngine
from segvol.errors import BadImageError, BadPromptError, BadRequestError, BadTextError, SegVolInputError
from segvol.frames import bounding_box
from segvol.session import _LAST_LABEL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_fixtures import OracleModel, flip_lps, map_box, map_index, permute, run_cli, synthetic_ct, to_ras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLE = SHARED / "data" / "totalseg-example"


TINY = segvol.SegVolConfig(image_size=(16, 32, 32), patch_size=(4, 8, 8))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing (tests read it from ../shared beside the repository)")
    return path


@pytest.fixture(scope="module")
def ct():
    return synthetic_ct()


def native_mask(prepared, mask):
    """A stored-order mask -> the native frame."""
    return prepared.frames.axis_map.to_model(mask)[prepared.frames.crop.slices]


@pytest.fixture
def oracle(ct):
    """An oracle whose text values are the synthetic objects' normalised intensities."""
    array, affine, truth = ct
    model = OracleModel()
    prepared, _ = SegVolEngine(model).prepare(array, affine)
    model.values = {name: float(np.median(prepared.native[native_mask(prepared, mask)]))
                    for name, mask in truth.items()}
    model.reset()
    return model


@pytest.fixture(scope="module")
def small_model():
    tokenizer = need(SHARED / "clip-tokenizer")
    torch.manual_seed(0)
    model = segvol.SegVol(segvol.SMALL, segvol.modeling.text_encoder.load_tokenizer(str(tokenizer))).eval()
    return model


def box_mask(shape, box):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b + 1) for a, b in zip(box[:3], box[3:]))] = True
    return mask


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ---------------------------------------------------------------------------------------------------------------
# geometry, with the oracle
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["ras", "lps", "permuted"])
def test_box_prompt_is_segmented_on_the_input_grid_in_any_orientation(ct, oracle, storage):
    array, affine, _ = ct
    box = [20, 20, 10, 60, 60, 40]
    stored, stored_affine = {"ras": (array, affine), "lps": flip_lps(array, affine),
                             "permuted": permute(array, affine)}[storage]
    stored_box = map_box(box, affine, stored_affine)
    result = SegVolEngine(oracle).segment(stored, affine=stored_affine, box=stored_box)
    assert result.label.shape == stored.shape and result.label.dtype == np.uint8
    assert np.array_equal(result.affine, stored_affine)
    assert result.labels == {"object": 1}
    truth = box_mask(stored.shape, stored_box) & (stored > -1000)  # the box, inside the body
    assert iou(result.label == 1, truth) > 0.9
    grown = box_mask(stored.shape, np.r_[np.subtract(stored_box[:3], 2), np.add(stored_box[3:], 2)])
    assert not (result.label.astype(bool) & ~grown).any()  # nothing outside the box (+2 voxels of blur)


def test_same_ct_in_three_storages_gives_the_same_segmentation_voxel_for_voxel(ct, small_model):
    """The real (small, random) network: RAS, LPS and axis-permuted storage of one CT, prompts given in each."""
    array, affine, _ = ct
    box, points = [20, 20, 10, 60, 60, 40], [[40, 40, 25, 1], [25, 30, 15, 0]]
    results = []
    for stored, stored_affine in [(array, affine), flip_lps(array, affine), permute(array, affine)]:
        stored_points = [list(map_index(p[:3], affine, stored_affine)[0]) + [p[3]] for p in points]
        result = SegVolEngine(small_model).segment(stored, affine=stored_affine, texts=["liver", "spleen"],
                                                   box=map_box(box, affine, stored_affine), points=stored_points)
        assert result.label.shape == stored.shape and np.array_equal(result.affine, stored_affine)
        results.append(to_ras(result.label, stored_affine))
    assert results[0].any()
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_zoom_in_runs_exactly_in_the_windows_holding_foreground_or_a_prompt(ct, oracle):
    array, affine, truth = ct
    oracle.config = TINY  # windows small against the volume, so that some are skipped
    engine = SegVolEngine(oracle, overlap=0.5)
    far_click = [75, 60, 45]  # a positive click far from the sphere: the ROI spans both, windows between skip
    result = engine.segment(array, affine=affine, texts=["sphere"], points=[far_click + [1]])
    prepared, _ = engine.prepare(array, affine)
    plan = result.plan
    zoom_out = engine.segment(array, affine=affine, texts=["sphere"], points=[far_click + [1]], mode="zoom_out")
    foreground = native_mask(prepared, zoom_out.label == 1)
    click = prepared.frames.original_to_native_points([far_click])
    expected = [i for i, w in enumerate(plan.windows)
                if foreground[w.native_slices].any() or w.contains(click).any()]
    assert plan.used == expected
    assert 0 < len(plan.used) < len(plan.windows) and result.stats["windows"]["skipped"] > 0
    core = plan.core
    for i in plan.used:  # every used window touches the core ROI (zoom-out foreground united with prompts)
        assert plan.windows[i].box_to_window(core) is not None
    assert result.stats["encoder_forwards"] == 1 + len(plan.used)
    assert len(oracle.encoded) == 1 + len(plan.used)  # the zoom_out-mode call reused the cached encoding
    assert np.array_equal(core, np.concatenate([np.minimum(bounding_box(foreground)[:3], np.rint(click[0])),
                                                np.maximum(bounding_box(foreground)[3:], np.rint(click[0]))]))


def test_prompts_reach_each_window_mapped_analytically(ct, oracle):
    array, affine, _ = ct
    stored, stored_affine = flip_lps(array, affine)
    box = [15, 18, 8, 70, 62, 44]
    points = [[40, 40, 25, 1], [30, 35, 20, 0], [60, 50, 40, 1]]
    engine = SegVolEngine(oracle, roi_margin=(0, 0, 0))
    result = engine.segment(stored, affine=stored_affine, box=box, points=points)
    prepared, _ = engine.prepare(stored, stored_affine)
    frames = prepared.frames
    native_box = frames.original_to_native_box(box)
    native_points = frames.original_to_native_points([p[:3] for p in points])
    labels = np.array([p[3] for p in points])
    # zoom-out call: the box and every point, mapped native -> zoom
    zoom_call = oracle.decodes_for(oracle.encoded[0]["id"])[0]
    assert np.array_equal(zoom_call["box"], frames.native_to_zoom_box(native_box))
    assert np.allclose(zoom_call["points"][0], frames.native_to_zoom_points(native_points), atol=1e-4)
    assert np.array_equal(zoom_call["points"][1], labels)
    assert len(result.plan.used) > 1
    for record, index in zip(oracle.encoded[1:], result.plan.used):
        window = result.plan.windows[index]
        assert np.array_equal(record["image"][0, 0].numpy(), window.extract(prepared.native))
        (call,) = oracle.decodes_for(record["id"])
        # the user's box clipped to the window, back in the stored array's indices
        window_box = call["box"].astype(int)
        expected_native = np.concatenate([np.maximum(native_box[:3], window.start),
                                          np.minimum(native_box[3:], np.asarray(window.stop) - 1)])
        assert np.array_equal(window.box_to_native(window_box), expected_native)
        # every point inside the window, positive and negative, at its exact position
        inside = window.contains(native_points)
        if inside.any():
            coords, point_labels = call["points"]
            assert np.array_equal(point_labels, labels[inside])
            back = frames.native_to_original_points(window.points_to_native(coords))
            assert np.allclose(back, np.array([p[:3] for p in points])[inside], atol=1e-4)
        else:
            assert call["points"] is None


def test_window_box_comes_from_the_zoom_out_prediction_without_a_user_box(ct, oracle):
    array, affine, _ = ct
    engine = SegVolEngine(oracle)
    result = engine.segment(array, affine=affine, texts=["cube"])
    prepared, _ = engine.prepare(array, affine)
    zoom_out = engine.segment(array, affine=affine, texts=["cube"], mode="zoom_out")
    foreground = native_mask(prepared, zoom_out.label == 1)
    assert result.plan.used
    for record, index in zip(oracle.encoded[1:], result.plan.used):
        window = result.plan.windows[index]
        (call,) = oracle.decodes_for(record["id"])
        expected = bounding_box(foreground[window.native_slices])
        assert np.array_equal(window.box_to_native(call["box"].astype(int)), expected + np.tile(window.start, 2))
        assert call["name"] == "cube"


def test_negative_click_removes_and_positive_click_adds(ct, oracle):
    array, affine, _ = ct
    box = [20, 20, 10, 60, 60, 40]
    engine = SegVolEngine(oracle)
    negative = [40, 40, 25]
    result = engine.segment(array, affine=affine, box=box, points=[negative + [0]])
    assert result.label[tuple(negative)] == 0 and result.label[22, 22, 12] == 1
    outside = [75, 40, 25]  # outside the box: a positive click there grows the object (the ROI follows it)
    result = engine.segment(array, affine=affine, box=box, points=[outside + [1]])
    assert result.label[tuple(outside)] == 1


def test_prompts_outside_the_body_are_dropped_or_refused(ct, oracle):
    array, affine, _ = ct
    engine = SegVolEngine(oracle)
    air = [0, 0, 0]
    result = engine.segment(array, affine=affine, box=[20, 20, 10, 60, 60, 40], points=[air + [1]])
    assert len(result.stats["prompts_dropped"]) == 1 and result.label.any()
    with pytest.raises(BadPromptError, match="outside the body"):
        engine.segment(array, affine=affine, points=[air + [1]])


# ---------------------------------------------------------------------------------------------------------------
# caching, multi-label, modes (real small network)
# ---------------------------------------------------------------------------------------------------------------
def test_several_texts_share_every_encoding_and_labels_follow_the_highest_probability(ct, small_model):
    array, affine, _ = ct
    names = ["liver", "spleen", "kidney"]
    result = SegVolEngine(small_model).segment(array, affine=affine, texts=names, return_probabilities=True)
    used = len(result.plan.used)
    assert used > 0 and result.stats["encoder_forwards"] == 1 + used  # not (1 + used) x 3
    assert result.labels == {"liver": 1, "spleen": 2, "kidney": 3}
    probabilities = np.stack([result.probabilities[n] for n in names])
    assert probabilities.shape == (3,) + array.shape and probabilities.dtype == np.float32
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    expected = np.where(probabilities.max(0) > 0.5, probabilities.argmax(0) + 1, 0)
    assert np.array_equal(result.label, expected)
    assert len(np.unique(result.label)) > 2  # overlapping categories really competed


def test_second_click_reuses_window_encodings(ct, small_model):
    array, affine, _ = ct
    box = [20, 20, 10, 60, 60, 40]
    engine = SegVolEngine(small_model)
    first = engine.segment(array, affine=affine, texts=["liver"], box=box)
    assert first.stats["encoder_forwards"] == 1 + len(first.plan.used)
    click = [40, 40, 25]
    second = engine.segment(array, affine=affine, texts=["liver"], box=box, points=[click + [1]],
                            return_probabilities=True)
    assert second.stats["encoder_forwards"] == 0
    prepared, _ = engine.prepare(array, affine)
    native_click = prepared.frames.original_to_native_points([click])
    holding = sum(second.plan.windows[i].contains(native_click).any() for i in second.plan.used)
    # the zoom-out decoder, plus only the windows whose prompts changed (the click's, and those whose
    # zoom-out-derived box moved); the others come from the decoder cache
    assert second.stats["decoded_prompts"] <= 1 + len(second.plan.used)
    assert second.stats["decoder_cache_hits"] + second.stats["decoded_prompts"] == 1 + len(second.plan.used)
    assert second.stats["decoder_calls"] < second.stats["decoded_prompts"]  # batched across windows
    assert holding >= 1
    cold = SegVolEngine(small_model).segment(array, affine=affine, texts=["liver"], box=box,
                                             points=[click + [1]], return_probabilities=True)
    if second.plan.grid == cold.plan.grid:  # incremental blending equals a cold run up to float rounding
        assert np.allclose(second.probabilities["liver"], cold.probabilities["liver"], atol=1e-5)


@pytest.mark.parametrize("storage", ["ras", "lps"])
def test_a_click_relabels_only_where_its_windows_reach_and_equals_a_full_labelling(ct, oracle, small_model, storage):
    """Each request of a session labels again only the box where a changed window or a category's zoom-out part
    reaches and keeps the rest of its last label. The label equals the one the same session labels in full (a twin
    session replaying the requests without its last label), voxel for voxel, in any storage order (the box is pasted
    back through the axis map), for the oracle (hard masks) and for random weights (soft probabilities)."""
    array, affine, _ = ct
    if storage == "lps":
        array, affine = flip_lps(array, affine)
    steps = [[], [[30, 40, 18, 1]], [[30, 40, 18, 1], [62, 36, 34, 0]],
             [[30, 40, 18, 1], [62, 36, 34, 0], [12, 20, 8, 1]]]
    for model, texts in ((oracle, ["sphere", "cube"]), (small_model, ["liver", "spleen"])):
        session = SegVolEngine(model).open(array, affine=affine)
        twin_engine = SegVolEngine(model)
        twin = twin_engine.open(array, affine=affine)
        partial = []
        for points in steps:
            call = dict(texts=texts, points=points or None)
            result = session.segment(**call)
            twin_engine.blends.pop((twin.token, _LAST_LABEL))
            full = twin.segment(**call)
            assert full.stats["relabelled_voxels"] == int(np.prod(full.stats["native_shape"]))
            assert np.array_equal(result.label, full.label), (storage, texts, points)
            partial.append(0 < result.stats["relabelled_voxels"] < int(np.prod(result.stats["native_shape"])))
        assert not partial[0] and any(partial[1:]), partial  # a first request labels everything
        assert result.label.any()
        result.label[:] = 0  # a caller writing into its result never changes the session's next one
        assert np.array_equal(session.segment(**call).label, full.label)


def test_a_request_failing_half_way_through_blending_leaves_no_trace(ct, oracle):
    """A click whose blending fails after updating some windows' sums in place (here: the window probability raises
    on its third call, after the first changed window's sums were updated) must not leave the session's next request
    blending on top of half-updated sums."""
    array, affine, _ = ct
    engine = SegVolEngine(oracle)
    session = engine.open(array, affine=affine)
    box = [2, 2, 2, 87, 77, 47]  # an ROI of 8 windows; the click below lies in 4 of them
    first = dict(texts=["sphere"], box=box, points=[[30, 40, 18, 1]])
    second = dict(texts=["sphere"], box=box, points=[[30, 40, 18, 1], [36, 46, 14, 0]])
    session.segment(**first)
    probability, calls = engine.window_probability, []

    def failing(window, logits):
        calls.append(window.start)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return probability(window, logits)

    engine.window_probability = failing
    with pytest.raises(RuntimeError):
        session.segment(**second)
    engine.window_probability = probability
    assert len(calls) == 3
    after_failure = session.segment(**second, return_probabilities=True)
    twin = SegVolEngine(oracle).open(array, affine=affine)
    twin.segment(**first)
    expected = twin.segment(**second, return_probabilities=True)
    assert np.array_equal(after_failure.label, expected.label) and expected.label.any()
    assert np.allclose(after_failure.probabilities["sphere"], expected.probabilities["sphere"], atol=1e-6)


def test_without_window_reuse_results_never_depend_on_earlier_calls(ct, small_model):
    array, affine, _ = ct
    engine = SegVolEngine(small_model, reuse_windows=False)
    call = dict(affine=affine, texts=["liver"], box=[20, 20, 10, 60, 60, 40])
    first = engine.segment(array, **call)
    engine.segment(array, affine=affine, texts=["spleen"], points=[[40, 40, 25, 1]])
    again = engine.segment(array, **call)
    cold = SegVolEngine(small_model).segment(array, **call)
    assert np.array_equal(first.label, again.label) and np.array_equal(first.label, cold.label)
    assert again.stats["encoder_forwards"] == 0


def test_zoom_out_mode_is_one_encoder_forward(ct, small_model):
    array, affine, _ = ct
    result = SegVolEngine(small_model, mode="zoom_out").segment(array, affine=affine, texts=["liver", "spleen"])
    assert result.stats["encoder_forwards"] == 1 and result.stats["windows"]["used"] == 0
    assert result.label.shape == array.shape


def test_byte_lru_is_bounded_in_bytes():
    cache = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3, 40)  # evicts "b", the least recently used
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and cache.nbytes == 80
    cache.put("huge", 4, 1000)
    assert "huge" not in cache and cache.nbytes <= 100


def test_packed_mask_regions_equal_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9, 37)) > 0.6
    packed = PackedMask(mask)
    assert packed.bits.nbytes * 7 < mask.nbytes
    for _ in range(100):
        low = [int(rng.integers(0, n)) for n in mask.shape]
        high = [int(rng.integers(a + 1, n + 1)) for a, n in zip(low, mask.shape)]
        assert np.array_equal(packed.region(low, high), mask[tuple(slice(a, b) for a, b in zip(low, high))])


def test_packed_mask_knows_whether_a_region_holds_a_voxel():
    rng = np.random.default_rng(1)
    shape = (6, 7, 45)
    for trial in range(400):
        mask = np.zeros(shape, bool)
        for _ in range(trial % 4):  # 0 to 3 single voxels: every byte edge gets tested
            mask[tuple(int(rng.integers(0, n)) for n in shape)] = True
        packed = PackedMask(mask)
        low = [int(rng.integers(0, n)) for n in shape]
        high = [int(rng.integers(a, n + 1)) for a, n in zip(low, shape)]  # empty ranges too
        expected = bool(mask[tuple(slice(a, b) for a, b in zip(low, high))].any())
        assert packed.any_in(low, high) == expected, (low, high, np.argwhere(mask))


def test_packed_mask_finds_the_tight_box_of_a_region():
    """The box read from the packed bytes equals the unpacked region's, for sparse and dense masks, at every byte
    edge, and is None for an empty region."""
    rng = np.random.default_rng(2)
    shape = (6, 7, 45)
    for trial in range(400):
        mask = rng.random(shape) < (0.4 if trial % 5 == 0 else 0.0)
        for _ in range(trial % 4):
            mask[tuple(int(rng.integers(0, n)) for n in shape)] = True
        packed = PackedMask(mask)
        low = [int(rng.integers(0, n)) for n in shape]
        high = [int(rng.integers(a, n + 1)) for a, n in zip(low, shape)]
        region = mask[tuple(slice(a, b) for a, b in zip(low, high))]
        expected = bounding_box(region) if region.size else None
        found = packed.box_in(low, high)
        assert (found is None) == (expected is None), (low, high, np.argwhere(mask))
        assert found is None or np.array_equal(found, expected), (low, high, found, expected)


def test_a_window_has_foreground_exactly_when_it_has_a_foreground_box():
    """Planning's quick test (packed bytes) against the tight box prompting uses, over a grid with ragged edges."""
    from segvol.windows import CategoryPlan, Grid

    rng = np.random.default_rng(2)
    shape = (40, 70, 90)
    for _ in range(20):
        mask = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 4))):
            centre = [int(rng.integers(0, n)) for n in shape]
            mask[tuple(slice(max(c - 2, 0), c + 3) for c in centre)] = True
        support = np.concatenate([np.zeros(3, int), np.asarray(shape) - 1])
        windows = Grid.over(((0, 0, 0), shape), shape, (16, 32, 32), 0.5).windows()

        quick, tight = (CategoryPlan("x", 1, zoom_logits=torch.zeros(1), support=support,
                                     foreground=PackedMask(mask), foreground_box=bounding_box(mask)) for _ in range(2))
        assert [quick.has_foreground(w) for w in windows] == [tight.foreground_box_in(w) is not None for w in windows]
        assert any(quick.has_foreground(w) for w in windows) and not all(quick.has_foreground(w) for w in windows)


def test_progress_is_logged_per_window_on_long_runs(ct, oracle, caplog):
    array, affine, _ = ct
    oracle.config = TINY
    engine = SegVolEngine(oracle)
    engine.progress_after_s = 0.0  # every run counts as long
    with caplog.at_level("INFO", logger="segvol.engine"):
        result = engine.segment(array, affine=affine, texts=["sphere", "cube"])
    lines = [r.getMessage() for r in caplog.records if "zoom-in window" in r.getMessage()]
    assert len(lines) == len(result.plan.used) > 1
    assert lines[-1].startswith(f"zoom-in window {len(result.plan.used)}/{len(result.plan.used)}")


def test_tiny_cache_still_segments_and_stays_within_bound(ct, small_model):
    array, affine, _ = ct
    engine = SegVolEngine(small_model, cache_mb=0.01, image_cache_mb=0.01)
    result = engine.segment(array, affine=affine, texts=["liver"])
    again = engine.segment(array, affine=affine, texts=["liver"])
    assert np.array_equal(result.label, again.label)
    assert again.stats["encoder_forwards"] == result.stats["encoder_forwards"]  # nothing could be cached
    for cache in (engine.embeddings, engine.decodes, engine.blends, engine.images):
        assert cache.nbytes <= cache.max_bytes


def test_file_input_is_read_once_and_written_label_matches(tmp_path, small_model):
    path = need(EXAMPLE / "example_ct_sm.nii.gz")
    engine = SegVolEngine(small_model)
    result = engine.segment(str(path), texts=["liver"], mode="zoom_out")
    image = nib.load(str(path))
    assert result.label.shape == image.shape and np.array_equal(result.affine, image.affine)
    import segvol.engine as engine_module

    original = engine_module.read_image
    engine_module.read_image = lambda *_: pytest.fail("a cached file was read again")
    try:
        engine.segment(str(path), texts=["spleen"], mode="zoom_out")
    finally:
        engine_module.read_image = original


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(texts=[]), BadTextError, "empty"),
    (dict(texts=[""]), BadTextError, "non-empty"),
    (dict(texts=["liver", 3]), BadTextError, "strings"),
    (dict(), BadRequestError, "nothing to segment"),
    (dict(texts=["sphere"], mode="fast"), BadRequestError, "mode"),
    (dict(points=[[90, 10, 10, 1]]), BadPromptError, "outside the image"),
    (dict(points=[[-1, 10, 10, 1]]), BadPromptError, "outside the image"),
    (dict(points=[[10, 10, 10, 2]]), BadPromptError, "labels"),
    (dict(points=[[10, 10, 1]]), BadPromptError, "points must be"),
    (dict(points=[[np.nan, 10, 10, 1]]), BadPromptError, "finite"),
    (dict(box=[30, 20, 10, 20, 60, 40]), BadPromptError, "inverted"),
    (dict(box=[20, 20, 10, 60, 60, 50]), BadPromptError, "outside the image"),
    (dict(box=[20, 20, 10, 60]), BadPromptError, "6 finite numbers"),
])
def test_bad_prompts_raise_typed_errors(ct, oracle, kwargs, error, message):
    array, affine, _ = ct
    with pytest.raises(error, match=message) as info:
        SegVolEngine(oracle).segment(array, affine=affine, **kwargs)
    assert isinstance(info.value, SegVolInputError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("image,message", [
    (np.full((20, 20, 20), np.nan), "NaN"),
    (np.zeros((20, 20, 20)), "constant"),
    (np.zeros((20, 20)), "3-D"),
    ("/nonexistent/ct.nii.gz", "not found"),
    (object(), "unsupported"),
])
def test_bad_images_raise_typed_errors(oracle, image, message):
    with pytest.raises(BadImageError, match=message):
        SegVolEngine(oracle).segment(image, box=[0, 0, 0, 5, 5, 5])


def test_bad_engine_options():
    with pytest.raises(BadRequestError):
        SegVolEngine(OracleModel(), mode="slow")
    with pytest.raises(BadRequestError):
        SegVolEngine(OracleModel(), overlap=1.0)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def test_segment_cli_image_and_folder(tmp_path, small_model):
    tokenizer = need(SHARED / "clip-tokenizer")
    checkpoint = segvol.save_checkpoint(str(tmp_path / "small.pt"), small_model)
    array, affine, _ = synthetic_ct()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (stored, stored_affine) in {"a": (array, affine), "b": flip_lps(array, affine)}.items():
        nib.save(nib.Nifti1Image(stored, stored_affine), str(inputs / f"{name}.nii.gz"))
    common = ["--checkpoint", checkpoint, "--tokenizer", str(tokenizer), "--device", "cpu"]
    status, lines = run_cli(common + ["--image", str(inputs / "b.nii.gz"), "--text", "liver", "spleen",
                                      "--box", "20", "20", "10", "60", "60", "40", "--point", "40", "40", "25", "+",
                                      "--point", "30", "35", "20", "-", "--out", str(tmp_path / "b_label.nii.gz")])
    assert status == 0 and len(lines) == 1
    line = lines[0]
    assert line["labels"] == {"liver": 1, "spleen": 2}
    assert line["encoder_forwards"] == 1 + line["windows_used"] and "zoom_out_encode" in line["seconds"]
    assert line["peak_rss_mb"] > 0 and "windows_skipped" in line
    written = nib.load(line["out"])
    assert written.shape == array.shape
    assert np.array_equal(written.affine, nib.load(str(inputs / "b.nii.gz")).affine)
    status, lines = run_cli(common + ["--input-dir", str(inputs), "--text", "liver", "--mode", "zoom_out",
                                      "--out", str(tmp_path / "labels")])
    assert status == 0 and [Path(l["image"]).name for l in lines] == ["a.nii.gz", "b.nii.gz"]
    assert all(Path(l["out"]).exists() and l["encoder_forwards"] == 1 for l in lines)
    status, lines = run_cli(common + ["--image", str(inputs / "a.nii.gz"), "--box", "5", "5", "5", "1", "1", "1"])
    assert status == 2 and lines[0]["type"] == "BadPromptError"


# ---------------------------------------------------------------------------------------------------------------
# end to end, official size with the parity weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_filled_model(filled_state_dict):
    tokenizer = need(SHARED / "clip-tokenizer")
    with torch.device("meta"):
        model = segvol.SegVol(segvol.OFFICIAL, segvol.modeling.text_encoder.load_tokenizer(str(tokenizer)))
    model.load_state_dict(filled_state_dict, strict=True, assign=True)
    return model.eval()


@pytest.mark.slow
def test_end_to_end_official_size_on_example_ct_sm(official_filled_model):
    """The official-size network (parity weights) on a real CT file: shapes, affine, and where zoom-in ran."""
    path = need(EXAMPLE / "example_ct_sm.nii.gz")
    image = nib.load(str(path))
    engine = SegVolEngine(official_filled_model)
    box, click = [40, 30, 5, 100, 85, 25], [70, 50, 15]
    result = engine.segment(str(path), texts=["liver"], box=box, points=[click + [1]])
    assert result.label.shape == image.shape and np.array_equal(result.affine, image.affine)
    assert result.labels == {"liver": 1} and result.label.any()
    plan = result.plan
    zoom_out = engine.segment(str(path), texts=["liver"], box=box, points=[click + [1]], mode="zoom_out")
    assert zoom_out.stats["encoder_forwards"] == 0  # the zoom-out encoding was cached
    prepared, _ = engine.prepare(str(path))
    foreground = native_mask(prepared, zoom_out.label == 1)
    native_box = prepared.frames.original_to_native_box(box)
    expected = [i for i, w in enumerate(plan.windows)
                if foreground[w.native_slices].any() or w.box_to_window(native_box) is not None]
    assert plan.used == expected and len(plan.used) >= 1
    assert all(plan.windows[i].box_to_window(plan.core) is not None for i in plan.used)
    assert result.stats["encoder_forwards"] == 1 + len(plan.used)
    assert set(result.stats["seconds"]) >= {"preprocess", "zoom_out_encode", "zoom_out_decode", "zoom_in_encode",
                                             "zoom_in_decode", "blend"}


def test_end_to_end_real_ct_with_official_window_size_runs_only_where_the_roi_is():
    """example_ct (112 slices) at the official window size, with the oracle: a box low in the volume is zoomed
    in by the windows that touch it only, and comes back on the file's grid."""
    path = need(EXAMPLE / "example_ct.nii.gz")
    image = nib.load(str(path))
    engine = SegVolEngine(OracleModel(segvol.OFFICIAL))
    box = [40, 30, 85, 100, 85, 110]
    result = engine.segment(str(path), box=box)
    assert result.label.shape == image.shape and np.array_equal(result.affine, image.affine)
    prepared, _ = engine.prepare(str(path))
    native_box = prepared.frames.original_to_native_box(box)
    plan = result.plan
    assert plan.used == [i for i, w in enumerate(plan.windows) if w.box_to_window(native_box) is not None]
    covered = np.zeros(prepared.frames.native_shape[0], bool)
    for i in plan.used:
        covered[plan.windows[i].native_slices[0]] = True
    assert not covered[:40].any() and covered[native_box[0]:native_box[3] + 1].all()
    truth = box_mask(image.shape, box) & (np.asarray(image.dataobj) > np.asarray(image.dataobj).min())
    assert iou(result.label == 1, truth) > 0.85


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_mixed_precision_matches_cpu(ct, small_model):
    array, affine, _ = ct
    call = dict(affine=affine, texts=["liver"], box=[20, 20, 10, 60, 60, 40], return_probabilities=True)
    cpu = SegVolEngine(small_model).segment(array, **call)
    import copy

    gpu_model = copy.deepcopy(small_model).cuda()
    gpu = SegVolEngine(gpu_model).segment(array, **call)
    assert gpu.stats["encoder_forwards"] == cpu.stats["encoder_forwards"]
    assert np.abs(gpu.probabilities["liver"] - cpu.probabilities["liver"]).mean() < 0.02
    assert (gpu.label == cpu.label).mean() > 0.98
