"""The robot annotator's rules (``segvol.interaction``) and measures (``segvol.metrics``) against brute force, the
protocol's bookkeeping with a scripted segmenter, and the corrective-click training term."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _train_data import TINY

from segvol.interaction import Trace, error_click, mean_curve, run_protocol
from segvol.metrics import click_auc, dice_score, interactions_to_reach, surface_dice
from segvol.prompts import Prompts


def cube(shape, low, high):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


# --------------------------------------------------------------------------------------------------------------------
# click placement
# --------------------------------------------------------------------------------------------------------------------
def test_empty_prediction_gets_a_positive_click_at_the_cube_centre():
    truth = cube((30, 30, 30), (10, 8, 12), (19, 17, 21))  # 9 voxels a side: centre (14, 12, 16)
    click = error_click(truth, np.zeros_like(truth))
    assert click.positive and click.label == 1
    assert click.point == (14, 12, 16)
    assert click.region_voxels == 9 ** 3
    assert click.depth_mm == pytest.approx(5.0)


def test_over_segmentation_gets_a_negative_click_in_the_extra_region():
    truth = cube((40, 40, 40), (5, 5, 5), (15, 15, 15))
    prediction = truth | cube((40, 40, 40), (20, 20, 20), (32, 32, 32))  # a leak larger than anything missed
    prediction[5:7, 5:15, 5:15] = False  # a thin missed slab, smaller than the leak
    click = error_click(truth, prediction)
    assert not click.positive and click.label == 0
    assert prediction[click.point] and not truth[click.point]
    assert all(20 <= v < 32 for v in click.point)
    assert click.point == (25, 25, 25)  # the first of the leak's deepest voxels in raster order


def test_a_perfect_prediction_gets_no_click():
    truth = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    assert error_click(truth, truth.copy()) is None
    assert error_click(np.zeros_like(truth), np.zeros_like(truth)) is None


def test_the_largest_region_counts_26_connected():
    truth = np.zeros((20, 20, 20), bool)
    # a diagonal chain of single voxels (26-connected only): 8 voxels, larger than the 2x2x1 block
    for step in range(8):
        truth[2 + step, 2 + step, 2 + step] = True
    truth[15:17, 15:17, 15] = True
    click = error_click(truth, np.zeros_like(truth))
    assert click.region_voxels == 8
    assert click.point[0] == click.point[1] == click.point[2] and 2 <= click.point[0] < 10


def test_anisotropic_spacing_moves_the_click():
    """A 7-voxel cube joined to a flat 9x9x3 slab: in voxels the cube is deeper (4 vs 2), with 4 mm slices along the
    last axis the slab is (5 mm vs 4 mm)."""
    truth = cube((40, 40, 40), (2, 2, 2), (9, 9, 9))
    truth |= cube((40, 40, 40), (20, 2, 4), (29, 11, 7))
    truth |= cube((40, 40, 40), (8, 5, 5), (21, 6, 6))  # a one-voxel bridge: one region
    isotropic = error_click(truth, np.zeros_like(truth))
    assert isotropic.point == (5, 5, 5)
    anisotropic = error_click(truth, np.zeros_like(truth), spacing=(1.0, 1.0, 4.0))
    assert anisotropic.point == (24, 6, 5)
    assert anisotropic.depth_mm == pytest.approx(5.0)


def brute_force_click(truth, prediction, spacing):
    """Every voxel of the largest 26-connected error region, its distance (mm) to the nearest voxel outside it (the
    array's outside included), the maximum."""
    error = truth ^ prediction
    shape = error.shape
    labels = -np.ones(shape, int)
    regions = []
    for start in zip(*np.nonzero(error)):
        if labels[start] >= 0:
            continue
        stack, members = [start], []
        labels[start] = len(regions)
        while stack:
            voxel = stack.pop()
            members.append(voxel)
            for delta in itertools.product((-1, 0, 1), repeat=3):
                near = tuple(v + d for v, d in zip(voxel, delta))
                if all(0 <= n < s for n, s in zip(near, shape)) and error[near] and labels[near] < 0:
                    labels[near] = len(regions)
                    stack.append(near)
        regions.append(members)
    largest = max(regions, key=len)
    inside = np.zeros([s + 2 for s in shape], bool)
    for voxel in largest:
        inside[tuple(v + 1 for v in voxel)] = True
    outside = np.argwhere(~inside) - 1
    best, best_depth = None, -1.0
    for voxel in sorted(largest):
        depth = np.sqrt((((outside - np.asarray(voxel)) * np.asarray(spacing)) ** 2).sum(1)).min()
        if depth > best_depth + 1e-9:
            best, best_depth = voxel, depth
    return tuple(int(v) for v in best), best_depth, len(largest)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_click_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 10, 8)
    truth = rng.random(shape) < 0.45
    prediction = rng.random(shape) < 0.45
    spacing = (1.0, 0.7, 2.5)
    click = error_click(truth, prediction, spacing)
    point, depth, size = brute_force_click(truth, prediction, spacing)
    assert click.region_voxels == size
    assert click.depth_mm == pytest.approx(depth)
    assert click.point == point
    assert click.positive == bool(truth[point])


# --------------------------------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------------------------------
def brute_force_nsd(prediction, truth, spacing, tolerance):
    def boundary(mask):
        padded = np.pad(mask, 1)
        out = []
        for voxel in np.argwhere(mask):
            v = voxel + 1
            neighbours = [padded[tuple(v + d)] for d in np.vstack([np.eye(3, dtype=int), -np.eye(3, dtype=int)])]
            if not all(neighbours):
                out.append(voxel)
        return np.asarray(out, dtype=float) * np.asarray(spacing)

    a, b = boundary(prediction), boundary(truth)
    distance_ab = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    close = (distance_ab.min(1) <= tolerance).sum() + (distance_ab.min(0) <= tolerance).sum()
    return close / (len(a) + len(b))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_surface_dice_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 16, 12)
    spacing = (0.8, 1.1, 2.5)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * np.asarray(spacing)
    centre = np.asarray(shape) * np.asarray(spacing) / 2
    truth = np.linalg.norm(grid - centre, axis=-1) < 6.0
    shifted = centre + rng.uniform(-3, 3, 3)
    prediction = (np.linalg.norm(grid - shifted, axis=-1) < rng.uniform(4, 8)) | (rng.random(shape) < 0.01)
    value = surface_dice(prediction, truth, spacing, tolerance_mm=2.0)
    assert value == pytest.approx(brute_force_nsd(prediction, truth, spacing, 2.0), abs=1e-6)
    assert dice_score(prediction, truth) == pytest.approx(
        2 * (prediction & truth).sum() / (prediction.sum() + truth.sum()))


def test_surface_dice_edge_cases():
    truth = cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # touches the array's edge: still a boundary there
    assert surface_dice(truth, truth, (1, 1, 1)) == 1.0
    assert surface_dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert surface_dice(np.zeros_like(truth), truth) == 0.0
    assert surface_dice(truth, brute := cube((10, 10, 10), (0, 0, 0), (5, 4, 4)), (1, 1, 1), 0.5) == pytest.approx(
        brute_force_nsd(truth, brute, (1, 1, 1), 0.5))


def test_auc_and_noc():
    values = [0.5, 0.6, 0.7, 0.75, 0.9]
    assert click_auc(values) == pytest.approx(np.trapz(values))
    assert click_auc([0.4]) == 0.0
    assert interactions_to_reach([0.5, 0.82, 0.9], 0.8) == 2
    assert interactions_to_reach([0.5, 0.7], 0.8) is None  # stopped early: unknown
    assert interactions_to_reach([0.5] * 20, 0.8) == 20  # capped
    assert interactions_to_reach([0.5] * 19 + [0.95], 0.9, cap=20) == 20


# --------------------------------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------------------------------
class ScriptedSegmenter:
    """Predicts a fixed under-segmentation, then adds a ball of radius 2 around each positive click and removes one
    around each negative click: a model that follows every click, to check the robot's bookkeeping."""

    def __init__(self, start_mask):
        self.start_mask = start_mask
        self.calls = []

    def __call__(self, prompts: Prompts):
        self.calls.append(prompts)
        mask = self.start_mask.copy()
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in mask.shape], indexing="ij"), -1)
        for point in prompts.points:
            ball = np.linalg.norm(grid - np.asarray(point[:3]), axis=-1) <= 2
            mask = mask | ball if point[3] == 1 else mask & ~ball
        return mask, {"server_s": 0.01, "round_trip_s": 0.02}


def test_protocols_accumulate_clicks_and_record_every_step():
    truth = cube((24, 24, 24), (4, 4, 4), (16, 16, 16))
    start = cube((24, 24, 24), (4, 4, 4), (10, 16, 16)) | cube((24, 24, 24), (18, 18, 18), (20, 20, 20))
    segmenter = ScriptedSegmenter(start)
    trace = run_protocol(segmenter, truth, (1.0, 1.0, 1.0), start="text", text="liver", clicks=3)
    assert [s.name for s in trace.steps] == ["text", "text+box", "click 1", "click 2", "click 3"]
    assert segmenter.calls[0].texts == ("liver",) and segmenter.calls[0].box is None
    assert segmenter.calls[1].box == (4.0, 4.0, 4.0, 15.0, 15.0, 15.0)
    assert [len(c.points) for c in segmenter.calls] == [0, 0, 1, 2, 3]
    assert all(c.texts == ("liver",) and c.box is not None for c in segmenter.calls[2:])
    for step, call in zip(trace.steps[2:], segmenter.calls[2:]):
        assert call.points[-1][:3] == step.click.point  # the click made is the prompt sent
    assert trace.steps[2].click.positive  # the largest error is the missed half
    dice = [s.dice for s in trace.steps]
    assert dice[2] > dice[1]
    summary = trace.summary(clicks=3)
    assert summary["final_dice"] == pytest.approx(dice[-1], abs=1e-4)
    assert summary["dsc_auc"] == pytest.approx(np.trapz(dice[2:]), abs=1e-3)

    box_first = run_protocol(ScriptedSegmenter(start), truth, (1, 1, 1), start="box", text="liver", clicks=2)
    assert [s.name for s in box_first.steps] == ["box", "click 1", "click 2"]


def test_noc_mode_clicks_on_until_the_threshold_or_the_cap():
    truth = cube((24, 24, 24), (4, 4, 4), (16, 16, 16))
    never = run_protocol(lambda p: (np.zeros_like(truth), {}), truth, (1, 1, 1), start="box", clicks=5, noc=True)
    assert len(never.steps) == 20  # the cap
    assert never.summary()["noc@80"] == 20
    perfect = run_protocol(lambda p: (truth.copy(), {}), truth, (1, 1, 1), start="box", clicks=5, noc=True)
    assert len(perfect.steps) == 1  # exact at once: nothing to click
    assert perfect.summary()["noc@90"] == 1


def test_mean_curve_carries_a_finished_trace_forward():
    from segvol.interaction import Step

    long = Trace("box", None, [Step("box", 0.2, 0.1, None, 0.1), Step("click 1", 0.6, 0.5, None, 0.1)])
    short = Trace("box", None, [Step("box", 1.0, 1.0, None, 0.1)])
    assert mean_curve([long, short]) == [0.6, 0.8]


# --------------------------------------------------------------------------------------------------------------------
# corrective-click training
# --------------------------------------------------------------------------------------------------------------------
def test_corrective_click_term_uses_clicks_on_the_models_errors(monkeypatch, tokenizer_dir):
    from segvol.modeling.segvol import SegVol
    from segvol.modeling.text_encoder import load_tokenizer
    from segvol.training import PromptConfig, step
    from segvol.training.data import View

    torch.manual_seed(0)
    model = SegVol(TINY, load_tokenizer(str(tokenizer_dir)))
    label = torch.zeros(TINY.image_size, dtype=torch.int32)
    label[4:10, 8:20, 8:20] = 1
    view = View(image=torch.rand(1, *TINY.image_size), label=label, texts={1: "liver"})
    rngs = [np.random.default_rng(0)]
    batch = step.build_batch([view], rngs, PromptConfig(), 8, 0, corrective_prob=1.0, corrective_rounds=2)
    assert batch.corrective is not None and batch.corrective[0] in step.CORRECTIVE_STARTS
    assert step.build_batch([view], rngs, PromptConfig(), 8, 0).corrective is None  # off by default

    seen = []
    real_click = step.error_click

    def recording_click(truth, prediction, spacing=(1.0, 1.0, 1.0)):
        click = real_click(truth, prediction, spacing)
        seen.append((click, truth.copy(), prediction.copy()))
        return click

    monkeypatch.setattr(step, "error_click", recording_click)
    module = step.TrainStep(model, freeze=(), combinations=("text",), pseudo_weight=0.0, loss_resolution="low")
    batch.corrective = ("box", 2)
    loss, parts = module(batch)
    assert "corrective" in parts and np.isfinite(parts["corrective"])
    assert len(seen) == 2  # one click per simulated round
    for click, truth, prediction in seen:
        assert truth[click.point] != prediction[click.point]  # on the model's own mistake
        assert click.positive == bool(truth[click.point])
    loss.backward()
    encoder = model.prompt_encoder  # the clicks reach the point prompts
    for kind in {encoder.POSITIVE if c.positive else encoder.NEGATIVE for c, _, _ in seen}:
        assert float(encoder.point_embeddings[kind].weight.grad.abs().sum()) > 0


def test_ranks_with_one_step_generator_draw_the_same_step():
    """DDP ranks sample their own views and prompts but the same step-level draws (the combinations and the
    corrective-click term), so no rank waits for another's corrective rounds; the step generator is a pure function
    of (seed, epoch, step)."""
    from segvol.training import PromptConfig, step
    from segvol.training.data import View, step_rng, view_rng

    label = torch.zeros(TINY.image_size, dtype=torch.int32)
    label[4:10, 8:20, 8:20] = 1
    view = View(image=torch.rand(1, *TINY.image_size), label=label, texts={1: "liver"})
    combinations = ("text", "box", "point", "box+text", "point+text", "box+point")
    drawn = set()
    for index in range(40):
        batches = [step.build_batch([view], [view_rng(0, 1, index, rank)], PromptConfig(), 8, 0, combinations,
                                    per_step=3, corrective_prob=0.5, step_rng=step_rng(0, 1, index))
                   for rank in (0, 1)]
        assert batches[0].combinations == batches[1].combinations
        assert batches[0].corrective == batches[1].corrective
        drawn.add(batches[0].corrective is not None)
        # each rank's own prompts still differ
        assert not np.array_equal(batches[0].targets[0].prompts.points, batches[1].targets[0].prompts.points)
    assert drawn == {True, False}  # both kinds of step occur
    # without a step generator, each rank's first view generator decides (the old behaviour)
    own = [step.build_batch([view], [view_rng(0, 1, i, 1)], PromptConfig(), 8, 0, corrective_prob=0.5).corrective
           for i in range(40)]
    shared = [step.build_batch([view], [view_rng(0, 1, i, 1)], PromptConfig(), 8, 0, corrective_prob=0.5,
                               step_rng=step_rng(0, 1, i)).corrective for i in range(40)]
    assert own != shared


def test_corrective_rounds_feed_each_prediction_to_a_mask_prompt_network(monkeypatch, tokenizer_dir):
    """With the previous-prediction prompt (``mask_prompt``), every corrective round after the first and the decode
    the loss is taken on get the low-res logits of the prediction the newest click was placed on (what a session
    gives the network), and the loss trains the module that reads them."""
    import dataclasses

    from segvol.modeling.segvol import SegVol
    from segvol.modeling.text_encoder import load_tokenizer
    from segvol.training import PromptConfig, step
    from segvol.training.data import View

    torch.manual_seed(0)
    model = SegVol(dataclasses.replace(TINY, mask_prompt=True), load_tokenizer(str(tokenizer_dir)))
    label = torch.zeros(TINY.image_size, dtype=torch.int32)
    label[4:10, 8:20, 8:20] = 1
    view = View(image=torch.rand(1, *TINY.image_size), label=label, texts={1: "liver"})
    batch = step.build_batch([view], [np.random.default_rng(0)], PromptConfig(), 8, 0, corrective_prob=1.0)
    batch.corrective = ("box+text", 3)
    calls = []
    real_decode = model.decode

    def recording_decode(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        calls.append((args[4] if len(args) > 4 else kwargs.get("previous"), out))
        return out

    monkeypatch.setattr(model, "decode", recording_decode)
    module = step.TrainStep(model, freeze=(), combinations=(), pseudo_weight=0.0, loss_resolution="low")
    loss, parts = module(batch)
    assert len(calls) == 4  # three gradient-free rounds, then the decode with every click
    assert calls[0][0] is None
    for (previous, _), (_, earlier) in zip(calls[1:], calls[:-1]):
        assert previous is earlier
    assert not calls[2][1].requires_grad and calls[3][1].requires_grad
    loss.backward()
    last = model.prompt_encoder.mask_embedding.layers[-1]
    assert float(last.weight.grad.abs().sum()) > 0


def test_corrective_clicks_start_from_the_box_a_window_gets(monkeypatch, tokenizer_dir):
    """A crop cuts a structure as a zoom-in window does, and the engine gives a window the user's whole box clipped
    to it, often looser than the part in view: a crop carries that box per structure (``View.window_boxes``), its
    targets keep it, and the corrective rounds start from it (the six prompt combinations keep the tight box)."""
    from segvol.frames import Window, bounding_box
    from segvol.modeling.segvol import SegVol
    from segvol.training import PromptConfig, step
    from segvol.training.data import View

    size = TINY.image_size
    # a structure bent like an L, cut by the crop: the part in view is one arm, the whole box spans both
    whole_native_box = np.asarray([2, 10, 0, 30, 40, 9])
    clipped = Window(start=(0, 0, 0), size=size, native_shape=(64, 64, 64)).box_to_window(whole_native_box)
    label = torch.zeros(size, dtype=torch.int32)
    label[2:size[0], 10:14, 0:4] = 1  # the arm inside the crop
    tight = bounding_box(label.numpy() == 1)
    assert np.all(clipped[:3] <= tight[:3]) and np.all(clipped[3:] >= tight[3:]) and not np.array_equal(clipped, tight)
    view = View(image=torch.rand(1, *size), label=label, texts={1: "liver"}, kind="crop", window_boxes={1: clipped})
    batch = step.build_batch([view], [np.random.default_rng(0)], PromptConfig(box_jitter=0.0), 8, 0,
                             corrective_prob=1.0)
    assert np.array_equal(batch.targets[0].window_box, clipped)
    assert np.array_equal(batch.targets[0].prompts.box, tight)  # the combinations' box
    batch.corrective = ("box", 2)

    from segvol.modeling.text_encoder import load_tokenizer

    torch.manual_seed(0)
    model = SegVol(TINY, load_tokenizer(str(tokenizer_dir)))
    boxes_seen = []
    real_decode = model.decode

    def recording_decode(image, text=None, boxes=None, points=None, previous=None):
        boxes_seen.append(boxes.reshape(-1, 6).clone())
        return real_decode(image, text, boxes, points, previous)

    monkeypatch.setattr(model, "decode", recording_decode)
    module = step.TrainStep(model, freeze=(), combinations=(), pseudo_weight=0.0, loss_resolution="low")
    module(batch)
    assert len(boxes_seen) >= 2  # at least one gradient-free round and the decode the loss is taken on
    assert all(torch.equal(b[0], torch.as_tensor(clipped, dtype=torch.float32)) for b in boxes_seen)


def test_a_share_of_the_box_prompts_are_the_box_a_window_gets():
    """``window_box_prob``: that share of a crop's targets get the box a zoom-in window gets as their box prompt (what
    the combinations decode), the rest the tight box of the part in view; zoom-out views (no window box) keep theirs,
    and a run without it keeps its random stream (no extra draw)."""
    from segvol.frames import bounding_box
    from segvol.training import PromptConfig, step
    from segvol.training.data import View

    size = TINY.image_size
    label = torch.zeros(size, dtype=torch.int32)
    label[2:size[0], 10:14, 0:4] = 1
    tight = bounding_box(label.numpy() == 1)
    loose = tight.copy()
    loose[4] += 6  # the whole structure runs on past the part in view
    crop = View(image=torch.rand(1, *size), label=label, texts={1: "liver"}, kind="crop", window_boxes={1: loose})
    zoom_out = View(image=torch.rand(1, *size), label=label, texts={1: "liver"}, kind="zoom_out")

    def boxes(view, share, seeds=range(40)):
        config = PromptConfig(box_jitter=0.0, window_box_prob=share)
        return [step.build_batch([view], [np.random.default_rng(seed)], config, 8, 0).targets[0].prompts
                for seed in seeds]

    assert all(np.array_equal(p.box, loose) for p in boxes(crop, 1.0))
    assert all(np.array_equal(p.box, tight) for p in boxes(crop, 0.0))
    assert all(np.array_equal(p.box, tight) for p in boxes(zoom_out, 1.0))
    half = [np.array_equal(p.box, loose) for p in boxes(crop, 0.5)]
    assert 8 <= sum(half) <= 32, sum(half)  # about half of 40 (binomial: outside 8..32 has p < 1e-4)
    # the points are the ones sampled for the target either way
    for with_share, without in zip(boxes(crop, 0.5), boxes(crop, 0.0)):
        assert np.array_equal(with_share.points, without.points)
    # without the option nothing else is drawn: two views sharing a generator get what sample_prompts gives in turn
    from segvol.training.prompts import sample_prompts

    config = PromptConfig(box_jitter=0.0)
    shared = np.random.default_rng(1)
    batch = step.build_batch([crop, crop], [shared, shared], config, 8, 0)
    replay = np.random.default_rng(1)
    expected = [sample_prompts(label.numpy() == 1, replay, config) for _ in range(2)]
    assert all(np.array_equal(t.prompts.points, e.points) for t, e in zip(batch.targets, expected))
