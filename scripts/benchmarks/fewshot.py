"""Few-shot continual fine-tuning: new structures from N labelled cases, per training mode, with forgetting measured.

    python scripts/benchmark.py fewshot                          # openkbp-dev, small configuration, CPU
    python scripts/benchmark.py fewshot --start-checkpoint runs/fewshot/start/last.pt --shots 5 --modes lora

On a dataset folder (default ../shared/data/openkbp-dev: ``--train-cases`` to learn from, ``--test-cases`` held out):

1. a starting model learns the ``--old`` structures only (the five target organs) from scratch on the training cases
   (``--start-minutes``, the settings of scripts/finetune_eval.py), or ``--start-checkpoint`` is used;
2. a reference: the starting model fine-tuned (``full`` mode) on every training case that holds the ``--new``
   structures (Esophagus, Larynx), labelled with the new structures only, ``--reference-steps`` steps;
3. for each mode (``--modes``: full, decoder, lora) and each N of ``--shots``: the starting model fine-tuned on the
   first N training cases holding the new structures, labelled with the new structures only (what a lab has),
   ``--steps`` steps, keeping the old structures through replay labels (``--keep``: the starting model's predictions,
   ``segvol.training.continual``) and the distillation term toward the starting model (``--distill``); at the largest
   N also each mode with replay labels only (what distillation buys) and ``full`` with neither (what replay buys);
4. every model's held-out Dice per structure (text + box, zoom-out-zoom-in).

Each fine-tuning runs in a child process of its own: its seconds and peak resident memory are its own. Output: one
JSON line: per run the new structures' mean Dice and its ratio to the reference's, the old structures' mean Dice and
its change from the starting model (forgetting), minutes and peak RSS; the goals (ratio >= 0.8 with the largest N,
old structures losing at most 0.02). Progress goes to stderr.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ._measure import in_child

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp-dev"
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"
OLD = "Brainstem,SpinalCord,Mandible,LeftParotid,RightParotid"
NEW = "Esophagus,Larynx"
GOAL_RATIO, GOAL_FORGETTING = 0.8, 0.02

log = logging.getLogger("benchmark.fewshot")


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder with dataset.json")
    parser.add_argument("--train-cases", default=":30", help="slice of the cases to learn from")
    parser.add_argument("--test-cases", default="-10:", help="slice of the held-out cases")
    parser.add_argument("--old", default=OLD, help="structures the starting model learns (dataset names)")
    parser.add_argument("--new", default=NEW, help="structures taught few-shot (dataset names)")
    parser.add_argument("--shots", default="1,3,5")
    parser.add_argument("--modes", default="full,decoder,lora")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each few-shot run")
    parser.add_argument("--reference-steps", type=int, default=450, help="steps of the all-cases reference")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the fine-tuning runs")
    parser.add_argument("--distill", type=float, default=1.0,
                        help="weight of the distillation term toward the starting model in the few-shot runs (0: "
                             "replay labels only); the largest N also runs each mode with replay labels only")
    parser.add_argument("--start-minutes", type=float, default=8.0, help="training budget of the starting model")
    parser.add_argument("--start-checkpoint", default=None, help="use this starting model instead of training one")
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes of the starting model (DDP over gloo on CPU)")
    parser.add_argument("--config", default="eval32", help="network of the starting model (see finetune_eval.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="CLIP tokenizer folder")
    parser.add_argument("--out", default=str(ROOT / "runs" / "fewshot"), help="output folder")


def names_of(text: str) -> List[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def values_present(path: str) -> set:
    from segvol.io import read_image

    return {int(v) for v in np.unique(np.asarray(read_image(path).array)) if v}


def restricted(case, keep_names: Sequence[str], folder: Path):
    """A copy of ``case`` whose label holds only ``keep_names`` (other values set to background, written under
    ``folder``): the labels a lab that annotated only those structures has."""
    from dataclasses import replace

    from segvol.io import read_image, write_label

    names = {value: name for value, name in case.label_names.items() if name in keep_names}
    label = read_image(case.label)
    array = np.where(np.isin(label.array, list(names)), label.array, 0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.id}.nii.gz"
    write_label(str(path), array, label.affine, label.header)
    return replace(case, label=str(path), label_names=names)


def fine_tune(output_dir: str, init: str, config_dict: dict, cases, mode: str, steps: int, keep: Sequence[str],
              lr: float, tokenizer: str, device: str, distill_weight: float = 0.0) -> Dict:
    """One fine-tuning run (in a child process): -> seconds and steps (the parent adds the peak RSS)."""
    from segvol.config import SegVolConfig
    from segvol.training import run_training

    from .curation import train_options

    options = train_options(output_dir, SegVolConfig.from_dict(config_dict), init, steps, len(cases), 0, tokenizer,
                            device, os.cpu_count() or 1, lr=lr, warmup_epochs=0.0, mode=mode, keep=keep,
                            distill_weight=distill_weight)
    tick = time.time()
    result = run_training(options, cases)
    return {"seconds": round(time.time() - tick, 1), "steps": result.steps}


def run(args) -> Dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    for noisy in ("segvol.engine", "segvol.training"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from segvol.training import TrainOptions, load_dataset, run_training
    from segvol.training.data import parse_case_slice
    from segvol.training.options import LAST
    from segvol.training.trainer import patch_embedding_lr_scale

    from .curation import TestSet, mean_of, network_config

    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")
    old, new = names_of(args.old), names_of(args.new)
    train = load_dataset(args.data, parse_case_slice(args.train_cases))
    test = load_dataset(args.data, parse_case_slice(args.test_cases))
    if {c.id for c in train} & {c.id for c in test}:
        raise SystemExit("the training and test cases overlap")
    config = network_config(args.config)
    tester = TestSet(test, config, args.tokenizer, "zoom_out_zoom_in", args.device)
    resolved_old = [tester.store.resolve(n) for n in old]
    resolved_new = [tester.store.resolve(n) for n in new]

    def summary(dice: Dict[str, float]) -> Dict:
        return {"old": mean_of({k: v for k, v in dice.items() if k in resolved_old}),
                "new": mean_of({k: v for k, v in dice.items() if k in resolved_new}), "per_structure": dice}

    # 1. the starting model: the old structures only
    start = args.start_checkpoint
    start_minutes = 0.0
    if not start:
        tick = time.time()
        cases = [restricted(c, old, out / "labels_old") for c in train]
        options = TrainOptions(
            output_dir=str(out / "start"), init="scratch", config=config.to_dict(), tokenizer=args.tokenizer,
            epochs=1000, lr=1e-3, weight_decay=1e-4, lr_scale=patch_embedding_lr_scale(10.0), warmup_epochs=1.0,
            freeze=(), seed=0, max_categories=8, combinations_per_step=3, corrective_prob=0.0, box_jitter=0.0,
            zoom_out_prob=0.2, loss_resolution="low", world_size=args.processes,
            ddp_backend="gloo" if args.processes > 1 else None, device=args.device,
            threads=1 if args.processes > 1 else 0, val_every=10 ** 6, publish="last", pseudo_weight=0.0,
            time_budget_s=args.start_minutes * 60, fit_budget=True, resume=False, progress=False)
        run_training(options, cases)
        start = str(out / "start" / LAST)
        start_minutes = round((time.time() - tick) / 60.0, 2)
    start_dice = summary(tester.dice(start))
    log.info("starting model: old %.3f, new %.3f", start_dice["old"], start_dice["new"])

    # the cases holding every new structure, in dataset order
    with_new = [c for c in train
                if {v for v, n in c.label_names.items() if n in new} <= values_present(c.label)]
    few = [restricted(c, new, out / "labels_new") for c in with_new]
    shots = [int(s) for s in args.shots.split(",") if s.strip()]
    if not few or max(shots) > len(few):
        raise SystemExit(f"only {len(few)} training cases hold {new}")

    def one_run(name: str, mode: str, cases, steps: int, keep: Sequence[str], distill: float = 0.0) -> Dict:
        tick = time.time()
        measured = in_child(fine_tune, output_dir=str(out / name), init=start, config_dict=config.to_dict(),
                            cases=cases, mode=mode, steps=steps, keep=list(keep), lr=args.lr,
                            tokenizer=args.tokenizer, device=args.device, distill_weight=distill)
        dice = summary(tester.dice(str(out / name / LAST)))
        row = {"run": name, "mode": mode, "cases": len(cases), "replay": bool(keep), "distill": distill, **measured,
               "minutes": round((time.time() - tick) / 60.0, 2), "dice_new": dice["new"], "dice_old": dice["old"],
               "old_change": round(dice["old"] - start_dice["old"], 4), "per_structure": dice["per_structure"]}
        log.info("%s: new %.3f, old %.3f (%+.3f), %.1f min, peak RSS %.0f MB", name, row["dice_new"], row["dice_old"],
                 row["old_change"], row["minutes"], row["peak_rss_mb"])
        return row

    # 2. the reference: every case with the new structures
    reference = one_run("reference_all_full", "full", few, args.reference_steps, old)
    # 3. the few-shot runs
    runs = []
    for mode in names_of(args.modes):
        for count in shots:
            row = one_run(f"{mode}_n{count}", mode, few[:count], args.steps, old, args.distill)
            row["ratio_to_reference"] = round(row["dice_new"] / reference["dice_new"], 3) \
                if reference["dice_new"] > 0 else None
            runs.append(row)
    ablation = one_run(f"full_n{max(shots)}_no_replay", "full", few[:max(shots)], args.steps, ())
    replay_only = [one_run(f"{mode}_n{max(shots)}_replay_only", mode, few[:max(shots)], args.steps, old, 0.0)
                   for mode in names_of(args.modes)] if args.distill > 0 else []
    largest = [r for r in runs if r["cases"] == max(shots)]
    goals = {r["mode"]: {"ratio_to_reference": r["ratio_to_reference"], "old_change": r["old_change"],
                         "met": bool(r["ratio_to_reference"] is not None and r["ratio_to_reference"] >= GOAL_RATIO
                                     and r["old_change"] >= -GOAL_FORGETTING)} for r in largest}
    return {"benchmark": "fewshot", "data": args.data, "config": args.config, "old": old, "new": new,
            "train_cases": len(train), "cases_with_new": len(few), "test_cases": len(test), "steps": args.steps,
            "lr": args.lr, "distill": args.distill,
            "start": {"checkpoint": start, "minutes": start_minutes, **start_dice},
            "reference": reference, "runs": runs, "no_replay": ablation, "replay_only": replay_only,
            "goals": goals,
            "minutes": round((time.time() - started) / 60.0, 2)}
