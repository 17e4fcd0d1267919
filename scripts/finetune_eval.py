#!/usr/bin/env python
"""Fine-tuning proof on real data: train a small SegVol on CPU within a time budget and report validation Dice.

    python scripts/finetune_eval.py                       # openkbp-dev: first 30 cases train, last 10 validate, 20 min
    python scripts/finetune_eval.py --train DIR --val DIR --minutes 20 --out runs/finetune_eval

``--train``/``--val`` are dataset folders laid out like ``../shared/data/openkbp-dev`` (``dataset.json`` with
``labels`` and ``cases``; image and label files by suffix). By default both are that folder, split into its first 30
cases (training) and its last 10 (validation); ``--train-cases``/``--val-cases`` take Python slices (``:30``, ``-10:``).

What it does (``--minutes`` bounds the training; the evaluations are timed and reported separately):

1. prepares every case once (the library's preprocessing: RAS orientation, intensity normalisation, body crop);
2. evaluates the **untrained** model (same seed and configuration) as the baseline, which also times an evaluation;
3. trains from scratch (``segvol.training``: zoom-out views + native crops, the six prompt combinations -- a random
   three of them per step --, Dice + BCE on the decoder's grid, AdamW + warm-up/cosine with 10x the rate on the
   patch embedding; nothing frozen) for
   ``--minutes``; the planned epochs (and the cosine decay) are fitted to the budget after each epoch; every
   ``--val-every``-th epoch is validated (text + box, zoom-out);
4. evaluates the final model per organ with text prompts and text + box prompts, each in zoom-out and in
   zoom-out-zoom-in mode, through the inference engine on the original voxel grid.

5. runs the robot annotator (``segvol.interaction``, what ``scripts/benchmark.py interactive`` runs) on the
   validation cases' five target organs: box first (the CVPR 2025 protocol) and text first (text, text + box), then
   ``--robot-clicks`` corrective clicks each (``--robot-noc``: on to 20 interactions for NoC@80/85/90); ``--robot-clicks
   0`` skips it.

6. with ``--precisions bf16,int8``: evaluates the same final model again with each fast image-encoder precision
   (``segvol.accel``; int8 calibrated on 2 views of each of the first ``--calibration-cases`` training CTs, never a
   validation case) and reports per organ the Dice difference from fp32. ``--eval-checkpoint last.pt`` skips the
   baseline and the training and evaluates that checkpoint (e.g. the ``run/last.pt`` of an earlier run).

``--init last.pt`` trains from that checkpoint instead of from scratch (its configuration, a new warm-up and cosine
schedule; the baseline is then that model): e.g. corrective-click training as a second phase of an earlier run.

Output: one JSON line on stdout (per-organ Dice, means over the five target organs -- brainstem, spinal cord,
mandible, left and right parotid -- for every prompt/mode, the baseline, timings and settings) and a learning-curve
plot ``<out>/learning_curve.png`` (training loss and per-organ validation Dice per epoch). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp-dev"
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"
TARGETS = {"brainstem": "brainstem", "spinal cord": "spinal cord", "bone mandible": "mandible",
           "parotid gland left": "parotid left", "parotid gland right": "parotid right"}
VARIANTS = [("text", "zoom_out"), ("text", "zoom_out_zoom_in"), ("text+box", "zoom_out"),
            ("text+box", "zoom_out_zoom_in")]
GOAL = 0.6

# Configurations that train in minutes on 2 CPU cores: SMALL's network (2 layers, 96 wide, 8x8x8 = 512 tokens).
# "eval64": a 64^3 window with 8^3 patches; the decoder's 4x upscaling gives logits at half the window's resolution.
# "eval32": a 32^3 window with 4^3 patches; the same token grid and cost, but logits at the window's full resolution,
# which matters for these organs of a few hundred 4 mm voxels (a perfect half-resolution mask scores about 0.78 Dice).
# Both encode prompt positions in the image grid's own axis order (``prompt_axis_swap=False``): trained from scratch,
# the official swap leaves box and point positions hard to relate to image positions. Both take the previous-prediction
# prompt (``mask_prompt``): trained with corrective clicks, it is what makes the robot's clicks raise the Dice.
_NETWORK = dict(hidden_size=96, num_layers=2, num_heads=4, mlp_dim=192, decoder_depth=2, decoder_heads=4,
                decoder_mlp_dim=128, iou_head_hidden_dim=32, text_hidden_size=64, text_intermediate_size=128,
                text_num_layers=2, text_num_heads=4, prompt_axis_swap=False, mask_prompt=True)
EVAL_CONFIGS = {"eval64": dict(image_size=(64, 64, 64), patch_size=(8, 8, 8), **_NETWORK),
                "eval32": dict(image_size=(32, 32, 32), patch_size=(4, 4, 4), **_NETWORK)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=None, help=f"training dataset folder (default {DEFAULT_DATA})")
    parser.add_argument("--val", default=None, help="validation dataset folder (default: the training folder)")
    parser.add_argument("--train-cases", default=None, help="slice of the training cases (default ':30' on the "
                        "default data, else all)")
    parser.add_argument("--val-cases", default=None, help="slice of the validation cases (default '-10:' on the "
                        "default data, else all)")
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="wall-time budget of the training (its per-epoch validation included); the trainer "
                             "fits its planned epochs and cosine decay to it and stops there")
    parser.add_argument("--out", default=str(ROOT / "runs" / "finetune_eval"), help="output folder")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="CLIP tokenizer folder")
    parser.add_argument("--config", default="eval32",
                        help="'eval32' (default), 'eval64', 'small' or a JSON file of SegVolConfig fields")
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint (its configuration; a new schedule) instead of from scratch, "
                        "e.g. an earlier run's run/last.pt; the baseline is then that model")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patch-lr-scale", type=float, default=10.0,
                        help="learning-rate multiplier of the patch embedding, projection and position embeddings "
                             "(default 10): soft-tissue contrasts are ~0.01 after the [0, 1] normalisation, and at "
                             "the base rate the projection cannot grow enough to see them in the budget (1: 0.51 "
                             "mean Dice, 10: 0.61)")
    parser.add_argument("--epochs", type=int, default=1000, help="upper bound; the budget decides")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--zoom-out-prob", type=float, default=0.2,
                        help="share of zoom-out views (the rest are native crops, which zoom-in inference uses)")
    parser.add_argument("--max-categories", type=int, default=8, help="categories trained per view")
    parser.add_argument("--box-jitter", type=float, default=0.0,
                        help="fraction of a box's extent each face may move in training (default 0: tight boxes, as "
                             "the validation gives; the trainer's 0.1 moves every face of these 6-10 voxel organs by "
                             "up to a voxel, and costs 0.035 mean Dice here)")
    parser.add_argument("--window-box-prob", type=float, default=0.0,
                        help="share of a crop's box prompts that are the box a zoom-in window gets (the structure's "
                             "whole box clipped to the crop) instead of the tight box of the part in view")
    parser.add_argument("--combinations-per-step", type=int, default=3,
                        help="decode a random k of the six prompt combinations per step (0: all six every step); "
                             "3 trains every combination equally often at half the cost per step, i.e. twice the "
                             "views in the budget")
    parser.add_argument("--corrective-prob", type=float, default=0.5,
                        help="share of steps that also train on clicks at the model's own errors (the robot's rule; "
                             "0.5: clicks raise the robot's Dice, 0: they barely move it, see docs/robot.md)")
    parser.add_argument("--corrective-rounds", type=int, default=5,
                        help="simulated click rounds of that term (1..N; 5, the robot's five clicks: docs/robot.md)")
    parser.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="give the network the previous-prediction prompt (SegVolConfig.mask_prompt: each click "
                             "corrects the answer before it; default: the configuration's own setting)")
    parser.add_argument("--robot-clicks", type=int, default=5,
                        help="corrective clicks of the robot annotator on the validation cases (0: no robot)")
    parser.add_argument("--robot-noc", action="store_true", help="robot: click on to 20 interactions (NoC@t)")
    parser.add_argument("--val-every", type=int, default=5, help="validate every N epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", default="",
                        help="also evaluate the final model with these image-encoder precisions, e.g. bf16,int8")
    parser.add_argument("--calibration-cases", type=int, default=4,
                        help="int8: training CTs calibrating the quantization (2 views each)")
    parser.add_argument("--eval-checkpoint", default=None,
                        help="evaluate this checkpoint (no baseline, no training), e.g. with --precisions")
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes (torch DDP over gloo on CPU, one thread each; default: 2 when the "
                             "machine has 2 cores): 1.9x the samples per minute of one process on 2 idle cores")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained baseline (quick experiments)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: time a training step with 1 thread and with all cores, take the "
                             "faster: on a busy machine one thread often wins)")
    parser.add_argument("--loss-resolution", choices=("low", "full"), default="low",
                        help="loss on the decoder's grid against area-averaged targets (low, ~3x cheaper on CPU) "
                             "or on upsampled logits (full, the reference)")
    return parser


def evaluate_all(model, store, texts, only_targets: bool = False) -> dict:
    from segvol.training import evaluate

    out = {}
    for prompt, mode in VARIANTS:
        result = evaluate(model, store, prompt=prompt, mode=mode, texts=texts if only_targets else None)
        per_label = {k: round(v, 4) for k, v in result["per_label"].items()}
        targets = [per_label[t] for t in texts if t in per_label]
        out[f"{prompt}/{mode}"] = {"per_organ": per_label,
                                   "mean_target": round(sum(targets) / len(targets), 4) if targets else None,
                                   "seconds": result["seconds"]}
    return out


def pick_threads(config, tokenizer, cores: int, log) -> int:
    """Time a representative training step (image encode + 24 prompt decodes, forward and backward) with one
    thread and with every core; on an oversubscribed machine the multi-threaded kernels can be several times slower."""
    import torch

    from segvol.modeling.segvol import SegVol
    from segvol.training.losses import dice_bce_loss

    if cores <= 1:
        return 1
    torch.manual_seed(0)
    model = SegVol(config)
    image = torch.rand(1, 1, *config.image_size)
    pairs = 24
    text = torch.randn(pairs, config.hidden_size)
    boxes = torch.tensor([[2.0, 3.0, 3.0, 20.0, 30.0, 30.0]]).expand(pairs, 6)
    target = (torch.rand(pairs, 1, *config.low_res_size) > 0.9).float()

    def step():
        embedding = model.encode_image(image)
        logits = model.decode(embedding.expand(pairs, -1, -1, -1, -1), text, boxes, None)
        dice_bce_loss(logits, target).mean().backward()

    timings = {}
    for threads in (1, cores):
        torch.set_num_threads(threads)
        step()
        tick = time.time()
        for _ in range(2):
            step()
        timings[threads] = (time.time() - tick) / 2
    best = min(timings, key=timings.get)
    log.info("step time by thread count: %s -> %d thread(s)", {k: round(v, 2) for k, v in timings.items()}, best)
    return best


def plot(history, baseline_mean, path: str, texts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history if h.get("loss") is not None]
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(epochs, losses, "o-", color="tab:red")
    left.set_xlabel("epoch")
    left.set_ylabel("Dice + BCE, sum over combinations")
    left.set_title("training loss")
    left.grid(alpha=0.3)
    validated = [h for h in history if h.get("val")]
    names = sorted({n for h in validated for n in h["val"]["per_label"]})
    for name in names:
        values = [(h["epoch"], h["val"]["per_label"][name]) for h in validated if name in h["val"]["per_label"]]
        style = "-" if name in texts else ":"
        right.plot([e for e, _ in values], [v for _, v in values], style, label=name)
    means = [(h["epoch"], sum(h["val"]["per_label"].get(t, 0.0) for t in texts) / len(texts)) for h in validated]
    right.plot([e for e, _ in means], [m for _, m in means], "k-", linewidth=2.5, label="mean of 5 target organs")
    if baseline_mean is not None:
        right.axhline(baseline_mean, color="grey", linestyle="--", label="untrained baseline (mean)")
    right.axhline(GOAL, color="green", linestyle="--", alpha=0.5, label=f"goal {GOAL}")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_ylabel("validation Dice (text + box, zoom-out)")
    right.set_title("validation Dice per organ")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    budget = float(args.minutes) * 60.0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    logging.getLogger("segvol.engine").setLevel(logging.WARNING)  # per-window progress lines
    log = logging.getLogger("finetune_eval")

    import torch

    cores = torch.get_num_threads()
    import segvol
    from segvol.config import SegVolConfig
    from segvol.modeling.segvol import SegVol
    from segvol.modeling.text_encoder import load_tokenizer
    from segvol.training import CaseStore, TrainOptions, load_dataset, run_training
    from segvol.training.data import parse_case_slice
    from segvol.training.trainer import patch_embedding_lr_scale, resolve_config
    from segvol.vocabulary import Vocabulary

    default_data = args.train is None and args.val is None
    train_dir = args.train or str(DEFAULT_DATA)
    val_dir = args.val or train_dir
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        missing = train_dir if not os.path.isdir(train_dir) else val_dir
        print(json.dumps({"error": f"dataset folder not found: {missing}"}))
        return 2
    train_slice = parse_case_slice(args.train_cases or (":30" if default_data else ":"))
    val_slice = parse_case_slice(args.val_cases or ("-10:" if default_data else ":"))
    train_cases = load_dataset(train_dir, train_slice)
    val_cases = load_dataset(val_dir, val_slice)
    overlap = {(os.path.realpath(c.image)) for c in train_cases} & {os.path.realpath(c.image) for c in val_cases}
    if overlap:
        log.warning("%d case(s) are in both the training and the validation set", len(overlap))
    config = SegVolConfig(**EVAL_CONFIGS[args.config]) if args.config in EVAL_CONFIGS else resolve_config(args.config)
    init = os.path.abspath(args.init) if args.init else "scratch"
    init_model = None
    if args.init:  # the starting checkpoint brings its own configuration
        init_model = segvol.load_model(init, device="cpu", tokenizer=args.tokenizer)
        config = init_model.config
    if args.mask_prompt is not None:
        config = dataclasses.replace(config, mask_prompt=args.mask_prompt)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ignore = os.path.join(out, ".gitignore")
    if not os.path.exists(ignore):  # checkpoints and plots never belong in a repository
        with open(ignore, "w") as handle:
            handle.write("*\n")

    # 1. prepare every case once (cached in memory for training and evaluation)
    vocabulary = Vocabulary.load()

    def resolve(name):
        return vocabulary.resolve(name, allow_free_text=True)

    texts = list(TARGETS)
    val_store = CaseStore(val_cases, config.image_size, resolve, keep_original_label=True)
    for index in range(len(val_store)):
        val_store[index]
    log.info("prepared %d validation cases in %.1fs", len(val_store), time.time() - started)

    threads = args.threads or pick_threads(config, args.tokenizer, cores, log)
    torch.set_num_threads(threads)

    if args.eval_checkpoint:
        return _evaluate_checkpoint(args, val_store, texts, train_cases, config, threads, started, log)

    # 2. the baseline: the untrained model (same seed -> the same initial weights as training starts from), or the
    # --init checkpoint
    torch.manual_seed(args.seed)
    baseline_model = init_model if init_model is not None else SegVol(config, load_tokenizer(args.tokenizer))
    tick = time.time()
    baseline = None if args.no_baseline else evaluate_all(baseline_model, val_store, texts, only_targets=True)
    eval_seconds = time.time() - tick
    del baseline_model, init_model
    if baseline is not None:
        log.info("baseline (%s): %s in %.1fs", args.init or "untrained",
                 {k: v["mean_target"] for k, v in baseline.items()}, eval_seconds)

    # 3. training: --minutes of wall time (loading, the baseline and the final evaluation are timed separately)
    train_budget = budget
    options = TrainOptions(
        output_dir=os.path.join(out, "run"), init=init, config=config.to_dict(), tokenizer=args.tokenizer,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        lr_scale=patch_embedding_lr_scale(args.patch_lr_scale),
        warmup_epochs=1.0, freeze=(), seed=args.seed, max_categories=args.max_categories,
        combinations_per_step=args.combinations_per_step, corrective_prob=args.corrective_prob,
        corrective_rounds=args.corrective_rounds, box_jitter=args.box_jitter,
        window_box_prob=args.window_box_prob, world_size=args.processes,
        ddp_backend="gloo" if args.processes > 1 else None, device="cpu", threads=threads if args.processes == 1 else 1,
        zoom_out_prob=args.zoom_out_prob, val_every=args.val_every,
        val_prompt="text+box", val_mode="zoom_out", time_budget_s=train_budget, fit_budget=True, resume=False,
        publish="best", pseudo_weight=0.0, progress=False, loss_resolution=args.loss_resolution)
    train_started = time.time()
    result = run_training(options, train_cases, val_cases)
    train_seconds = time.time() - train_started
    log.info("training: %s after %d epochs / %d steps in %.0fs", result.status, result.epoch, result.steps,
             train_seconds)

    # 4. the final model (last epoch: no selection on the validation set) through the engine
    model = segvol.load_model(os.path.join(options.output_dir, "last.pt"), device="cpu", tokenizer=args.tokenizer)
    tick = time.time()
    trained = evaluate_all(model, val_store, texts)
    final_seconds = time.time() - tick
    baseline_mean = baseline["text+box/zoom_out"]["mean_target"] if baseline else None
    plot_path = os.path.join(out, "learning_curve.png")
    plot(result.history, baseline_mean, plot_path, texts)

    headline = trained["text+box/zoom_out_zoom_in"]["mean_target"]
    best_zoom = max(trained[k]["mean_target"] or 0.0 for k in ("text+box/zoom_out", "text+box/zoom_out_zoom_in"))
    report = {
        "script": "finetune_eval",
        "minutes_budget_training": args.minutes,
        "minutes_training": round(train_seconds / 60.0, 2),
        "minutes_baseline_eval": round(eval_seconds / 60.0, 2),
        "minutes_final_eval": round(final_seconds / 60.0, 2),
        "minutes_total": round((time.time() - started) / 60.0, 2),
        "data": {"train": train_dir, "train_cases": len(train_cases), "val": val_dir, "val_cases": len(val_cases)},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()
                   if k not in ("text_template", "text_vocab_size", "text_max_positions")},
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "training": {"status": result.status, "init": init, "epochs": result.epoch, "steps": result.steps,
                     "seconds": round(train_seconds, 1), "lr": args.lr, "patch_lr_scale": args.patch_lr_scale,
                     "batch_size": args.batch_size,
                     "threads": threads, "processes": args.processes, "loss_resolution": args.loss_resolution,
                     "combinations_per_step": args.combinations_per_step or 6, "box_jitter": args.box_jitter,
                     "window_box_prob": args.window_box_prob,
                     "zoom_out_prob": args.zoom_out_prob, "corrective_prob": args.corrective_prob,
                     "corrective_rounds": args.corrective_rounds,
                     "final_loss": result.history[-1].get("loss") if result.history else None,
                     "best_val_epoch": result.best_epoch,
                     "best_val_mean_text_box_zoom_out": round(result.best_metric, 4)
                     if result.best_metric is not None else None},
        "target_organs": [TARGETS[t] for t in texts],
        "dice": trained,
        "baseline_untrained": baseline,
        "goal": {"mean_dice_text_box": GOAL, "reached_zoom_out_zoom_in": headline,
                 "reached_best_mode": round(best_zoom, 4), "met": bool(best_zoom >= GOAL),
                 "above_baseline_by": round(best_zoom - max(baseline[k]["mean_target"] or 0.0
                                                           for k in ("text+box/zoom_out",
                                                                     "text+box/zoom_out_zoom_in")), 4)
                 if baseline else None},
        "plot": plot_path,
    }
    report["robot"] = run_robot(args, model, val_cases, resolve, log)
    if args.precisions:
        report["precisions"] = evaluate_precisions(args, model, val_store, texts, trained, train_cases, config, log)
    print(json.dumps(report))
    return 0


def run_robot(args, model, cases, resolve, log):
    """The robot annotator on the validation cases' target organs (box first and text first): Dice per step and the
    challenge's summaries; None with ``--robot-clicks 0``."""
    if args.robot_clicks <= 0:
        return None
    from segvol.engine import SegVolEngine
    from segvol.interaction import EngineSegmenter, annotate

    tick = time.time()
    engine = SegVolEngine(model, mode="zoom_out_zoom_in", cache_mb=512, image_cache_mb=256)
    names = sorted({name for case in cases for name in case.label_names.values() if resolve(name) in TARGETS})
    report = annotate(cases, lambda case: EngineSegmenter(engine, case.image), resolve, clicks=args.robot_clicks,
                      noc=args.robot_noc, structures=names, progress=log.debug)
    engine.clear_cache()
    report.pop("traces")
    for start, result in report["starts"].items():
        log.info("robot, %s first: mean Dice per step %s; %s", start, result["mean"]["dice"],
                 {k: v for k, v in result["mean"].items() if k not in ("dice", "nsd")})
    report["minutes"] = round((time.time() - tick) / 60.0, 2)
    return report


def evaluate_precisions(args, model, val_store, texts, fp32: dict, train_cases, config, log) -> dict:
    """The final model evaluated with each fast encoder precision; per organ and variant the Dice minus fp32's."""
    from segvol import accel

    out = {}
    calibration = [c.image for c in train_cases[: args.calibration_cases]]
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip() and p.strip() != "fp32"]:
        tick = time.time()
        backend = accel.accelerate(model, precision, calibration=calibration if precision == "int8" else None)
        dice = evaluate_all(model, val_store, texts)
        deltas = {}
        for variant, row in dice.items():
            reference = fp32[variant]["per_organ"]
            deltas[variant] = {organ: round(value - reference[organ], 4) for organ, value in row["per_organ"].items()
                               if organ in reference}
        target_deltas = [deltas[v][t] for v in deltas for t in texts if t in deltas[v]]
        out[precision] = {"backend": backend.describe(), "dice": dice, "delta_vs_fp32": deltas,
                          "mean_delta_target": (round(sum(target_deltas) / len(target_deltas), 5) if target_deltas
                                                else None),
                          "mean_delta_by_variant": {v: round(sum(d[t] for t in texts if t in d) /
                                                             max(1, sum(1 for t in texts if t in d)), 5)
                                                    for v, d in deltas.items()},
                          "minutes": round((time.time() - tick) / 60.0, 2)}
        log.info("precision %s (%s): mean Dice change vs fp32 %s", precision, backend.describe(),
                 out[precision]["mean_delta_by_variant"])
        accel.accelerate(model, "fp32")
    return out


def _evaluate_checkpoint(args, val_store, texts, train_cases, config, threads, started, log) -> int:
    import segvol

    model = segvol.load_model(args.eval_checkpoint, device="cpu", tokenizer=args.tokenizer)
    tick = time.time()
    trained = evaluate_all(model, val_store, texts)
    robot = run_robot(args, model, val_store.cases, val_store.resolve, log)
    report = {"script": "finetune_eval", "checkpoint": os.path.abspath(args.eval_checkpoint), "threads": threads,
              "robot": robot, "val_cases": len(val_store), "target_organs": [TARGETS[t] for t in texts],
              "dice": trained,
              "minutes_eval": round((time.time() - tick) / 60.0, 2)}
    if args.precisions:
        report["precisions"] = evaluate_precisions(args, model, val_store, texts, trained, train_cases, config, log)
    report["minutes_total"] = round((time.time() - started) / 60.0, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
