"""The training library on tiny synthetic CTs: prompts, losses, schedule, data frames, the loop, resume, freezing,
publishing, a new label name learned as a text prompt, pseudo labels and DDP (gloo, 2 CPU processes)."""
from __future__ import annotations

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from _train_data import TINY, write_dataset

import segvol
from segvol.training import (
    COMBINATIONS,
    PromptConfig,
    StopTraining,
    TrainOptions,
    WarmupCosine,
    dice_loss,
    load_dataset,
    read_last,
    run_training,
    sample_prompts,
    split_cases,
)
from segvol.training.data import CaseStore, ViewConfig, sample_view, view_rng
from segvol.training.prompts import boundary_ring, combination_parts, jitter_box, pseudo_target, stack_points
from segvol.vocabulary import Vocabulary

NAMES = {1: "zorblax gland", 2: "Brainstem"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root / "train", 4, NAMES, seed=1, pseudo=True)
    write_dataset(root / "val", 2, NAMES, seed=2, start=10)
    # the learning test: more variety, one named structure (the dark ball's value 2 has no name: it is ignored)
    write_dataset(root / "more", 12, {1: "zorblax gland"}, seed=3, start=20)
    write_dataset(root / "more_val", 2, {1: "zorblax gland"}, seed=2, start=10)
    return root


def options(tmp_path, tokenizer_dir, **overrides) -> TrainOptions:
    values = dict(output_dir=str(tmp_path / "run"), init="scratch", config=TINY.to_dict(),
                  tokenizer=str(tokenizer_dir), epochs=2, lr=2e-3, freeze=(), val_prompt="text", val_mode="zoom_out",
                  resume=False, progress=False, warmup_epochs=0.5, loss_resolution="low")
    values.update(overrides)
    return TrainOptions(**values)


# --------------------------------------------------------------------------------------------------------------------
# prompts, losses, schedule
# --------------------------------------------------------------------------------------------------------------------
def test_six_prompt_combinations():
    assert COMBINATIONS == ("point+text", "box+text", "text", "box", "point", "box+point")
    assert [combination_parts(c) for c in COMBINATIONS] == [
        (True, False, True), (True, True, False), (True, False, False), (False, True, False), (False, False, True),
        (False, True, True)]
    with pytest.raises(ValueError):
        combination_parts("mask+text")


def test_prompt_sampling_box_jitter_positive_and_boundary_negatives():
    mask = np.zeros((16, 32, 32), bool)
    mask[4:10, 8:20, 10:18] = True
    rng = np.random.default_rng(0)
    config = PromptConfig(box_jitter=0.2, max_positive=6, max_negative=10, boundary_fraction=1.0, ring=2)
    shifted = 0
    for _ in range(50):
        sample = sample_prompts(mask, rng, config)
        box = sample.box
        assert np.all(box[:3] <= box[3:]) and np.all(box[:3] >= 0) and np.all(box[3:] < mask.shape)
        shifted += int(not np.array_equal(box, [4, 8, 10, 9, 19, 17]))
        coords = sample.points.astype(int)
        positive, negative = coords[sample.labels == 1], coords[sample.labels == 0]
        assert 1 <= len(positive) <= 6 and len(np.unique(positive, axis=0)) == len(positive)
        assert mask[tuple(positive.T)].all()
        assert not mask[tuple(negative.T)].any()
        # every negative is within the 2-voxel ring around the object (boundary_fraction=1)
        for point in negative:
            lo, hi = np.maximum(point - 2, 0), point + 3
            assert mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()
    assert shifted > 40  # the box is jittered
    assert np.array_equal(jitter_box(np.array([4, 8, 10, 9, 19, 17]), mask.shape, rng, 0.0), [4, 8, 10, 9, 19, 17])
    ring, count = boundary_ring(mask, np.array([4, 8, 10, 9, 19, 17]), 1)
    assert count == int((np.pad(mask, 1)[:-2, 1:-1, 1:-1] | mask).sum()) or count > 0
    coords, labels = stack_points([sample_prompts(mask, rng, config), sample_prompts(mask, rng, config)])
    assert coords.shape[0] == 2 and labels.shape == coords.shape[:2] and set(labels.unique().tolist()) <= {-1, 0, 1}


def test_pseudo_label_targets():
    pseudo = np.zeros((16, 32, 32), np.int32)
    pseudo[2:6, 2:10, 2:10] = 1001
    pseudo[2:6, 12:14, 2:6] = 1002  # small region next to it: inside a box around both? only if covered
    pseudo[10:14, 20:30, 20:30] = 1003
    rng = np.random.default_rng(1)
    kinds = set()
    for _ in range(20):
        mask, prompts = pseudo_target(pseudo, rng, "box", PromptConfig(box_jitter=0.0))
        region_ids = set(np.unique(pseudo[mask]).tolist())
        box = prompts.box
        inside = pseudo[box[0]:box[3] + 1, box[1]:box[4] + 1, box[2]:box[5] + 1]
        for rid in region_ids:  # every region in the target is >= 90% inside the box
            assert (inside == rid).sum() >= 0.9 * (pseudo == rid).sum()
        kinds.add(len(region_ids))
        mask, prompts = pseudo_target(pseudo, rng, "point", PromptConfig())
        assert len(np.unique(pseudo[mask])) == 1 and (prompts.labels == 1).sum() >= 4
    assert pseudo_target(np.zeros((4, 4, 4), np.int32), rng, "box", PromptConfig()) is None


def test_dice_is_per_sample_not_per_slice():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, 2:4, 2:6, 2:6] = 1  # only 2 of 8 slices hold the object
    logits = torch.where(target > 0, 20.0, -20.0)
    assert float(dice_loss(logits, target)) < 1e-3  # a perfect prediction costs nothing, empty slices included
    half = logits.clone()
    half[0, 0, 3] = -20.0
    assert abs(float(dice_loss(half, target)) - (1 - (2 * 16 + 1) / (48 + 1))) < 1e-3
    assert dice_loss(torch.zeros(3, 1, 4, 4, 4), torch.ones(3, 1, 4, 4, 4)).shape == (3,)


def test_warmup_cosine_has_positive_lr_from_the_first_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = WarmupCosine(optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    rates = []
    for _ in range(100):
        rates.append(schedule.lr)
        schedule.step()
    assert rates[0] > 0 and rates[0] == pytest.approx(1e-3 / 11)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # warm-up rises to the peak
    assert max(rates) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then decays
    assert rates[-1] == pytest.approx(1e-5, rel=0.05)
    state = schedule.state_dict()
    again = WarmupCosine(optimizer, 5, 0)
    again.load_state_dict(state)
    assert again.lr == pytest.approx(schedule.lr)


def test_patch_embedding_lr_multiplier_holds_through_the_schedule():
    from segvol.modeling.segvol import SegVol
    from segvol.training.setup import parameter_groups as _parameter_groups
    from segvol.training.setup import patch_embedding_lr_scale

    assert patch_embedding_lr_scale(1) == {}
    model = SegVol(TINY)
    groups = _parameter_groups(model, 1e-3, patch_embedding_lr_scale(10))
    patch = {id(p) for p in model.image_encoder.patch_embedding.parameters()}
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert {id(p) for p in groups[1]["params"]} == patch
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups)
    schedule = WarmupCosine(optimizer, total_steps=20, warmup_steps=2)
    for _ in range(7):
        schedule.step()
        assert optimizer.param_groups[1]["lr"] == pytest.approx(10 * optimizer.param_groups[0]["lr"])
    assert schedule.lr == optimizer.param_groups[0]["lr"] < 1e-3  # the reported rate is the unscaled one
    slower = _parameter_groups(model, 1e-3, patch_embedding_lr_scale(0.1))
    assert [g["lr"] for g in slower] == [pytest.approx(1e-3), pytest.approx(1e-4)]


def test_evaluation_between_optimizer_steps_sees_the_updated_weights():
    """The trainer's AdamW is fused (it writes the parameters in place without bumping their version counters) and
    the decoder keeps layouts derived from its parameters while autograd is off, until a version changes: the
    validation between epochs must decode with the weights the steps made, as a fresh copy of the model does."""
    import copy

    from segvol.training.step import optimizer_step

    torch.manual_seed(0)
    model = segvol.SegVol(TINY)
    embedding = torch.randn(1, TINY.hidden_size, *TINY.grid_size)
    box = torch.tensor([[1.0, 2.0, 3.0, 9.0, 10.0, 11.0]])

    def decode(network):
        with torch.no_grad():
            return network.decode(embedding, boxes=box)

    class Runner(torch.nn.Module):  # what TrainStep is to the trainer: batch -> (loss, parts)
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return model.decode(embedding, boxes=box).square().mean(), {}

    decode(model)  # an evaluation before the step keeps the derived layouts
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    schedule = WarmupCosine(optimizer, total_steps=10, warmup_steps=0)
    before = decode(copy.deepcopy(model))
    optimizer_step(Runner(), None, optimizer, schedule, None, list(model.parameters()), None)
    fresh = decode(copy.deepcopy(model))
    assert not torch.allclose(fresh, before, atol=1e-3)  # the step moved the answer
    assert torch.allclose(decode(model), fresh, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def test_dataset_folder_and_views_follow_the_inference_frames(dataset):
    cases = load_dataset(str(dataset / "train"))
    assert [c.id for c in cases] == [f"case_{i}" for i in range(4)]
    assert cases[0].label_names == NAMES and cases[0].pseudo is None
    assert load_dataset(str(dataset / "train"), slice(1, 3))[0].id == "case_1"
    train, val = split_cases(cases, 0.25)
    assert len(train) == 3 and len(val) == 1 and not {c.id for c in train} & {c.id for c in val}
    vocabulary = Vocabulary.load()
    store = CaseStore(cases, TINY.image_size, lambda n: vocabulary.resolve(n, allow_free_text=True))
    case = store[0]
    assert case.texts == {1: "zorblax gland", 2: "brainstem"}  # known names take SegVol's spelling
    # the label follows the image through orientation and crop: the bright ball is where label 1 is
    assert case.prepared.native[case.label == 1].mean() > case.prepared.native[case.label == 0].mean() + 0.2
    assert case.prepared.native[case.label == 2].mean() < case.prepared.native[case.label == 0].mean()
    kinds = set()
    for index in range(12):
        view = sample_view(case, view_rng(0, 0, index), ViewConfig(intensity_prob=0.0))
        kinds.add(view.kind)
        assert view.image.shape == (1, *TINY.image_size) and view.label.shape == TINY.image_size
        assert view.texts and view.image[0][view.label == 1].mean() > view.image[0][view.label == 0].mean()
        if view.kind == "crop":  # each structure's whole box clipped to the crop holds the part in view
            assert set(view.window_boxes) == set(view.texts)
            for value, box in view.window_boxes.items():
                whole = np.argwhere(case.label == value)
                assert np.array_equal(case.object_boxes()[value], np.concatenate([whole.min(0), whole.max(0)]))
                part = np.argwhere(view.label.numpy() == value)
                assert np.all(box[:3] <= part.min(0)) and np.all(box[3:] >= part.max(0))
        else:
            assert view.window_boxes is None
    assert kinds == {"zoom_out", "crop"}
    # samples are a pure function of (seed, epoch, position): what resume relies on
    a = sample_view(case, view_rng(3, 1, 5), ViewConfig())
    b = sample_view(case, view_rng(3, 1, 5), ViewConfig())
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


def test_case_selection_of_the_command_lines():
    from segvol.training.data import parse_case_slice

    cases = list(range(40))
    assert cases[parse_case_slice(":30")] == cases[:30] and cases[parse_case_slice("-10:")] == cases[-10:]
    assert cases[parse_case_slice("5")] == [5] and cases[parse_case_slice("-1")] == [39]
    assert cases[parse_case_slice("::10")] == [0, 10, 20, 30]
    assert parse_case_slice("") is None and parse_case_slice(None) is None


def test_datalist_json_with_label_info(tmp_path, dataset):
    entries = [{"image": str(dataset / "train" / "case_0_ct.nii.gz"), "label": str(dataset / "train" /
                                                                                    "case_0_seg.nii.gz"),
                "label_names": [{"name": "ball", "idx": 1}, {"name": "background", "idx": 0}]}]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(entries))
    cases = load_dataset(str(path))
    assert cases[0].label_names == {1: "ball"} and cases[0].id == "case_0_ct"


# --------------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------------
def test_training_checkpoints_validates_and_publishes(tmp_path, dataset, tokenizer_dir):
    publish = tmp_path / "app_model" / "segvol_finetuned.pt"
    result = run_training(options(tmp_path, tokenizer_dir, epochs=2, publish_path=str(publish), pseudo_weight=0.1),
                          load_dataset(str(dataset / "train"), pseudo_dir=str(dataset / "train" / "fh")),
                          load_dataset(str(dataset / "val")))
    assert result.status == "finished" and result.epoch == 2 and result.steps == 8
    assert [h["epoch"] for h in result.history] == [1, 2]
    first = result.history[0]
    assert set(COMBINATIONS) <= set(first["parts"]) and "pseudo_point" in first["parts"]
    assert set(first["val"]["per_label"]) == {"zorblax gland", "brainstem"}
    assert first["lr"] > 0 and math.isfinite(first["loss"])
    meta = read_last(str(tmp_path / "run"))
    assert meta["status"] == "finished" and meta["epoch"] == 2 and meta["step"] == 8
    assert {"optimizer", "scheduler", "vocabulary", "history"} <= set(meta)
    assert "zorblax gland" in meta["vocabulary"]
    assert publish.is_file() and result.published == str(publish)
    model = segvol.load_model(str(publish), tokenizer=str(tokenizer_dir))
    assert model.config == TINY and "zorblax gland" in model.vocabulary
    assert not list(publish.parent.glob("*.tmp"))


def test_default_freeze_trains_decoder_and_dim_align_only(tmp_path, dataset, tokenizer_dir):
    torch.manual_seed(0)
    start = segvol.SegVol(TINY)
    path = tmp_path / "start.pt"
    segvol.save_checkpoint(str(path), start, vocabulary=[])
    before = {k: v.clone() for k, v in start.state_dict().items()}
    run_training(options(tmp_path, tokenizer_dir, init=str(path), epochs=1, freeze=("image_encoder", "text_encoder")),
                 load_dataset(str(dataset / "train"), slice(0, 2)))
    after = segvol.load_model(str(tmp_path / "run" / "last.pt"), tokenizer=str(tokenizer_dir)).state_dict()

    def changed(prefix):
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    assert not changed("image_encoder.") and not changed("text_encoder.clip_text_model.")
    assert changed("text_encoder.dim_align.") and changed("mask_decoder.") and changed("prompt_encoder.")
    assert not changed("mask_decoder.iou_prediction_head.")  # never used: frozen


def test_interrupted_training_resumes_where_it_stopped(tmp_path, dataset, tokenizer_dir):
    cases = load_dataset(str(dataset / "train"), slice(0, 3))
    reference = run_training(options(tmp_path / "a", tokenizer_dir, epochs=2), cases)

    def stop_mid_epoch(event, info):
        if event == "step" and info["global_step"] == 4:
            raise StopTraining

    interrupted = run_training(options(tmp_path / "b", tokenizer_dir, epochs=2), cases, callback=stop_mid_epoch)
    assert interrupted.status == "stopped" and interrupted.steps == 4
    meta = read_last(str(tmp_path / "b" / "run"))
    assert (meta["epoch"], meta["step_in_epoch"], meta["status"]) == (1, 1, "stopped")
    resumed = run_training(options(tmp_path / "b", tokenizer_dir, epochs=2, resume="auto"), cases)
    assert resumed.resumed_from == {"epoch": 1, "step": 4, "step_in_epoch": 1, "status": "stopped"}
    assert resumed.status == "finished" and resumed.steps == reference.steps == 6
    assert [h["epoch"] for h in resumed.history] == [1, 2]  # the saved epoch is not run again
    a = segvol.load_model(str(tmp_path / "a" / "run" / "last.pt"), tokenizer=str(tokenizer_dir)).state_dict()
    b = segvol.load_model(str(tmp_path / "b" / "run" / "last.pt"), tokenizer=str(tokenizer_dir)).state_dict()
    for key in a:  # the resumed run draws the same samples and continues the same schedule
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    # a finished run is not resumed by "auto": a new run starts
    again = run_training(options(tmp_path / "b", tokenizer_dir, epochs=1, resume="auto"), cases)
    assert again.resumed_from is None and again.steps == 3


def test_a_new_label_name_becomes_a_working_text_prompt(tmp_path, dataset, tokenizer_dir):
    from segvol.engine import SegVolEngine
    from segvol.training.evaluate import evaluate

    vocabulary = Vocabulary.load()
    assert vocabulary.find("zorblax gland") is None
    val = load_dataset(str(dataset / "more_val"))
    run_training(options(tmp_path, tokenizer_dir, epochs=20, repeats=2, zoom_out_prob=0.7, val_every=10),
                 load_dataset(str(dataset / "more")), val)
    model = segvol.load_model(str(tmp_path / "run" / "last.pt"), tokenizer=str(tokenizer_dir))
    assert "zorblax gland" in model.vocabulary
    vocabulary.extend(model.vocabulary)  # what the app's service does when it loads the checkpoint
    assert vocabulary.resolve("Zorblax_Gland") == "zorblax gland"
    store = CaseStore(val, TINY.image_size, lambda n: vocabulary.resolve(n, allow_free_text=True),
                      keep_original_label=True)
    trained = evaluate(model, store, prompt="text", mode="zoom_out")["per_label"]["zorblax gland"]
    torch.manual_seed(0)
    untrained = evaluate(segvol.SegVol(TINY, model.tokenizer), store, prompt="text",
                         mode="zoom_out")["per_label"]["zorblax gland"]
    assert trained > 0.35 and trained > untrained + 0.25, (trained, untrained)
    result = SegVolEngine(model).segment(str(dataset / "more_val" / "case_10_ct.nii.gz"), texts=["zorblax gland"],
                                         return_probabilities=True)
    truth = np.asarray(nib.load(str(dataset / "more_val" / "case_10_seg.nii.gz")).dataobj)
    probability = result.probabilities["zorblax gland"]
    assert result.labels == {"zorblax gland": 1} and result.label.any()
    assert probability[truth == 1].mean() > 0.3 > 0.05 > probability[truth == 2].mean()  # the bright ball, only


def test_ddp_two_cpu_processes(tmp_path, dataset, tokenizer_dir):
    result = run_training(options(tmp_path, tokenizer_dir, epochs=1, world_size=2, ddp_backend="gloo",
                                  device="cpu", prefetch=False),
                          load_dataset(str(dataset / "train")), load_dataset(str(dataset / "val"), slice(0, 1)))
    assert result.status == "finished" and result.steps == 2  # 4 cases over 2 processes
    assert os.path.isfile(tmp_path / "run" / "last.pt") and result.history[0]["val"]["per_label"]
