"""Few-shot continual fine-tuning: the training modes (full, decoder with cached embeddings, lora), LoRA merging,
and the replay labels that keep the old structures in the targets."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from _train_data import TINY, write_dataset

import segvol
from segvol.modeling.lora import LowRankAdapter, merge_adapters
from segvol.training import TrainOptions, load_dataset, run_training
from segvol.training.continual import add_replay_labels, missing_structures
from segvol.training.setup import freeze_parameters, with_adapters
from segvol.vocabulary import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    write_dataset(root / "old", 4, {1: "liver", 2: "spleen"}, seed=1)  # the starting model's structures
    write_dataset(root / "new", 3, {2: "zorblax gland"}, seed=2, start=10)  # a new structure, nothing else named
    return root


@pytest.fixture(scope="module")
def start(data, tmp_path_factory, tokenizer_dir):
    """A starting checkpoint that knows liver and spleen."""
    out = tmp_path_factory.mktemp("start")
    run_training(TrainOptions(output_dir=str(out), init="scratch", config=TINY.to_dict(), tokenizer=str(tokenizer_dir),
                              epochs=2, lr=2e-3, freeze=(), resume=False, progress=False, loss_resolution="low",
                              warmup_epochs=0.5), load_dataset(str(data / "old")))
    return out / "last.pt"


def options(tmp_path, tokenizer_dir, start, **overrides) -> TrainOptions:
    values = dict(output_dir=str(tmp_path / "run"), init=str(start), tokenizer=str(tokenizer_dir), epochs=2,
                  lr=2e-3, resume=False, progress=False, loss_resolution="low", warmup_epochs=0.5,
                  publish_path=str(tmp_path / "published.pt"), publish="last")
    values.update(overrides)
    return TrainOptions(**values)


def test_modes_set_what_trains():
    assert TrainOptions(output_dir="x", mode="full").freeze == ()
    decoder = TrainOptions(output_dir="x", mode="decoder")
    assert decoder.freeze == ("image_encoder", "text_encoder") and decoder.views_per_case == 8
    assert TrainOptions(output_dir="x", mode="lora").views_per_case == 0
    with pytest.raises(ValueError, match="mode"):
        TrainOptions(output_dir="x", mode="everything")
    torch.manual_seed(0)
    adapted = with_adapters(segvol.SegVol(TINY), rank=2, alpha=4.0)
    counts = freeze_parameters(adapted, ("image_encoder", "text_encoder"))
    adapters = sum(p.numel() for m in adapted.modules() if isinstance(m, LowRankAdapter) for p in m.parameters())
    assert counts["image_encoder"] == adapters > 0  # only the adapters train in the image encoder
    assert not any(p.requires_grad for n, p in adapted.image_encoder.named_parameters() if ".lora_" not in n)


def test_lora_merge_gives_the_outputs_of_the_unmerged_adapters():
    torch.manual_seed(0)
    base = segvol.SegVol(TINY).eval()
    adapted = with_adapters(base, rank=4, alpha=8.0).eval()
    image = torch.rand(2, 1, *TINY.image_size)
    with torch.no_grad():
        assert torch.equal(base.encode_image(image), adapted.encode_image(image))  # B starts at zero
        for module in adapted.modules():
            if isinstance(module, LowRankAdapter):
                module.lora_b.normal_(0, 0.2)
        unmerged = adapted.encode_image(image)
        merged_model = merge_adapters(adapted)
        merged = merged_model.encode_image(image)
    assert merged_model.config.lora_rank == 0 and not any(".lora_" in k for k in merged_model.state_dict())
    assert not torch.allclose(unmerged, base.encode_image(image), atol=1e-3)  # the adapters do change the output
    # tolerance: float32 rounding of W x + s B A x versus (W + s B A) x
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5), (merged - unmerged).abs().max()


def test_decoder_mode_never_changes_the_encoder_and_encodes_each_view_once(tmp_path, data, tokenizer_dir, start):
    before = segvol.load_model(str(start), tokenizer=str(tokenizer_dir)).state_dict()
    cases = load_dataset(str(data / "new"))
    result = run_training(options(tmp_path, tokenizer_dir, start, mode="decoder", views_per_case=2, epochs=4), cases)
    after = segvol.load_model(str(tmp_path / "run" / "last.pt"), tokenizer=str(tokenizer_dir)).state_dict()
    frozen = [k for k in before if k.startswith(("image_encoder.", "text_encoder.clip_text_model."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mask_decoder."))
    history = result.history
    assert result.steps == 12 and history[-1]["encoded"] <= 3 * 2 < result.steps  # 3 cases x 2 fixed views


def test_lora_mode_trains_adapters_and_publishes_them_merged(tmp_path, data, tokenizer_dir, start):
    before = segvol.load_model(str(start), tokenizer=str(tokenizer_dir)).state_dict()
    run_training(options(tmp_path, tokenizer_dir, start, mode="lora", lora_rank=2, epochs=2),
                 load_dataset(str(data / "new")))
    last = segvol.load_model(str(tmp_path / "run" / "last.pt"), tokenizer=str(tokenizer_dir))
    assert last.config.lora_rank == 2
    state = last.state_dict()
    assert all(torch.equal(before[k], state[k]) for k in before if k.startswith("image_encoder."))
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith("lora_b"))
    published = segvol.load_model(str(tmp_path / "published.pt"), tokenizer=str(tokenizer_dir))
    assert published.config.lora_rank == 0
    image = torch.rand(1, 1, *TINY.image_size)
    with torch.no_grad():
        assert torch.allclose(published.eval().encode_image(image), last.eval().encode_image(image), atol=1e-5)


def test_replay_labels_put_the_old_structures_in_the_targets(tmp_path, data, tokenizer_dir, start):
    from segvol.engine import SegVolEngine

    vocabulary = Vocabulary.load()

    def resolve(name):
        return vocabulary.resolve(name, allow_free_text=True)

    cases = load_dataset(str(data / "new"))
    assert missing_structures(cases[0], ["liver", "Spleen", "zorblax gland"], resolve) == ["liver", "Spleen"]
    engine = SegVolEngine(segvol.load_model(str(start), tokenizer=str(tokenizer_dir)), mode="zoom_out_zoom_in")
    replayed, which = add_replay_labels(cases, engine, ["liver", "spleen"], str(tmp_path), resolve)
    assert which == {c.id: ["liver", "spleen"] for c in cases}
    for case, original in zip(replayed, cases):
        assert case.label_names == {2: "zorblax gland", 3: "liver", 4: "spleen"}
        label = np.asarray(nib.load(case.label).dataobj)
        truth = np.asarray(nib.load(original.label).dataobj)
        assert np.array_equal(label[truth == 2], truth[truth == 2])  # the annotator's voxels are kept
        prediction = engine.segment(original.image, texts=["liver", "spleen"])
        for value, name in ((3, "liver"), (4, "spleen")):
            expected = (prediction.label == prediction.labels[name]) & (truth != 2)
            assert np.array_equal(label == value, expected), name
    # a case that names the structure already keeps its own label
    own = load_dataset(str(data / "old"))[:1]
    assert add_replay_labels(own, engine, ["liver"], str(tmp_path / "b"), resolve) == (own, {})
    # the trainer's targets hold the kept structures
    result = run_training(options(tmp_path, tokenizer_dir, start, mode="decoder", keep=("liver", "spleen"),
                                  epochs=1), cases)
    assert {"liver", "spleen", "zorblax gland"} <= set(result.vocabulary)


def test_the_trainer_distils_the_kept_structures_by_default(tmp_path, data, tokenizer_dir, start):
    result = run_training(options(tmp_path, tokenizer_dir, start, mode="lora", lora_rank=2, keep=("liver",),
                                  epochs=1), load_dataset(str(data / "old"))[:2])
    parts = result.history[-1]["parts"]
    assert any(part.startswith("distill_") for part in parts), parts
    plain = run_training(options(tmp_path / "b", tokenizer_dir, start, mode="lora", lora_rank=2, keep=("liver",),
                                 distill_weight=0.0, epochs=1), load_dataset(str(data / "old"))[:2])
    assert not any(part.startswith("distill_") for part in plain.history[-1]["parts"])


def test_distillation_pulls_the_kept_structures_toward_the_starting_model(tokenizer_dir):
    """The distillation term (step.py 3a): zero gradient while the student is the starting model; after the student's
    decoder drifts, descending the term alone brings its logits back toward the starting model's."""
    import copy

    from segvol.modeling.text_encoder import load_tokenizer
    from segvol.training.prompts import PromptConfig, sample_prompts
    from segvol.training.step import Batch, Distillation, Target, TrainStep

    torch.manual_seed(0)
    teacher = segvol.SegVol(TINY, load_tokenizer(str(tokenizer_dir))).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    mask = np.zeros(TINY.image_size, bool)
    mask[8:24, 16:40, 20:44] = True
    rng = np.random.default_rng(0)
    targets = [Target(0, "liver", mask, sample_prompts(mask, rng, PromptConfig(box_jitter=0.0))),
               Target(0, "zorblax gland", ~mask, sample_prompts(~mask, rng, PromptConfig(box_jitter=0.0)))]
    batch = Batch(images=torch.rand(1, 1, *TINY.image_size), targets=targets, combinations=("box+text",))
    freeze = ("image_encoder", "text_encoder")
    step = TrainStep(student, freeze, ("box+text",), 0.0, "low", distill=Distillation(teacher, frozenset({"liver"}),
                                                                                        1.0))
    _, parts = step(batch)
    assert set(parts) == {"box+text", "distill_box+text"}  # only the kept structure's target is distilled

    embedding = step.image_embeddings(batch, batch.images)
    teacher_image = step._teacher_image(batch.images, embedding)

    def distill_term():
        table = step.text_embeddings(["liver"])
        logits = step._decode(student, student.image_tokens(embedding), targets[:1], True, True, False, table)
        return step._distill_loss(teacher_image, targets, [0], "box+text", logits), logits

    loss, _ = distill_term()
    loss.backward()
    decoder = [p for p in student.mask_decoder.parameters()]
    assert max(float(p.grad.abs().max()) for p in decoder if p.grad is not None) < 1e-6
    with torch.no_grad():
        reference = torch.sigmoid(step._decode(teacher, teacher_image, targets[:1], True, True, False,
                                               teacher.encode_text(["liver"])))
        for p in student.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    optimizer = torch.optim.Adam(decoder, lr=1e-3)
    gaps = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, logits = distill_term()
        gaps.append(float((torch.sigmoid(logits.detach()) - reference).abs().mean()))
        loss.backward()
        optimizer.step()
    assert gaps[0] > 0.01 and gaps[-1] < 0.5 * gaps[0], gaps
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distillation_comes_with_structures_to_keep():
    with pytest.raises(ValueError, match="distill_weight"):
        TrainOptions(output_dir="x", distill_weight=0.5)
    assert TrainOptions(output_dir="x").distill_weight == 0.0
    assert TrainOptions(output_dir="x", keep=("liver",)).distill_weight == 1.0  # on by default in continual mode
    assert TrainOptions(output_dir="x", keep=("liver",), distill_weight=0.0).distill_weight == 0.0


def test_train_benchmark_reports_each_mode(tmp_path, tokenizer_dir, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from benchmark import main as benchmark_main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    assert benchmark_main(["train", "--config", str(config), "--steps", "2", "--variants",
                           "full,decoder,lora+ckpt,decoder+distill", "--lora-rank", "2", "--threads", "1",
                           "--tokenizer", str(tokenizer_dir)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {row["variant"]: row for row in report["variants"]}
    assert list(rows) == ["full", "decoder", "lora+ckpt", "decoder+distill"]
    assert rows["decoder+distill"]["trainable_parameters"] == rows["decoder"]["trainable_parameters"]
    for row in rows.values():
        assert row["steps"] == 3 and row["seconds_per_step"] > 0 and row["peak_rss_mb"] > 100
    assert rows["full"]["trainable_parameters"] > rows["lora+ckpt"]["trainable_parameters"] > \
        rows["decoder"]["trainable_parameters"] > 0


def test_a_checkpoint_without_the_previous_prediction_prompt_gains_it_for_fine_tuning(tmp_path, data, tokenizer_dir,
                                                                                       start):
    """``mask_prompt``: the starting network gets the module at zero (the same answers), corrective clicks train it,
    and the published checkpoint carries it (its configuration says so and it loads strictly)."""
    from segvol.training.setup import with_mask_prompt

    base = segvol.load_model(str(start), tokenizer=str(tokenizer_dir)).eval()
    assert not base.config.mask_prompt
    extended = with_mask_prompt(base).eval()
    assert extended.config.mask_prompt and with_mask_prompt(extended) is extended
    embedding = base.encode_image(torch.rand(1, 1, *TINY.image_size))
    boxes = torch.tensor([[1.0, 2, 2, 8, 12, 12]])
    with torch.no_grad():
        previous = torch.randn(1, 1, *TINY.low_res_size)
        assert torch.equal(extended.decode(embedding, None, boxes, None, previous), base.decode(embedding, None, boxes))

    run_training(options(tmp_path, tokenizer_dir, start, mode="decoder", mask_prompt=True, corrective_prob=1.0,
                         epochs=2), load_dataset(str(data / "new")))
    published = segvol.load_model(str(tmp_path / "published.pt"), tokenizer=str(tokenizer_dir))
    assert published.config.mask_prompt
    assert float(published.prompt_encoder.mask_embedding.layers[-1].weight.abs().sum()) > 0
