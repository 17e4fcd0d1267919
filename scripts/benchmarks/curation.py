"""Curation: the annotation loop simulated on a label budget, next-sample strategies side by side over seeds.

    python scripts/benchmark.py curation --preset small          # openkbp-dev, 2-core CPU, about 30 minutes
    python scripts/benchmark.py curation --preset full --device cuda
    python scripts/benchmark.py curation --data DIR --strategies random,random_fg --seeds 0,1,2 --rounds 4

The dataset folder (``dataset.json`` layout of ../shared/data/openkbp-dev) is split into a fixed test set (its last
``--test-cases`` cases) and a pool (the rest). For each seed, ``--initial`` pool cases drawn by the seed are labelled
and a starting model is trained on them from scratch (``--steps-initial`` steps; shared by every strategy of the
seed). Then, for each strategy, on a datastore of its own (the app's ``SegVolDatastore`` holding only the pool
images) and for each of ``--rounds`` rounds:

1. the strategy's scoring methods run on the datastore (the app's own ``lib.scoring`` code, with the current model
   served by the app's ``SegVolService``) and are timed per image;
2. the strategy (the app's own ``lib.activelearning`` code; ``random`` is MONAI Label's stock ``Random``) picks
   ``--per-round`` cases, one request at a time, as a client asks for its next sample; each pick's ground-truth
   label is saved as the image's final label through the datastore (``save_label`` with its ``label_info``);
3. incremental retraining: the library trainer the app's ``segvol_finetune`` task runs, on the datastore's final
   labels (``cases_from_datastore``), warm-started from the previous round's checkpoint, ``--steps-round`` steps;
4. the new model's test Dice per structure (text + box prompts, ``--eval-mode``) through the inference engine.

Each round checks its bookkeeping (the pick was unlabelled, exactly the picks were added as final labels, the
training set is exactly the labelled set and never holds a test case) and stops with an error otherwise.

Output: one JSON line: per strategy, mean test Dice vs number of labelled cases (mean and spread over seeds), its
area under the curve (normalised by the budget's width: the mean Dice over the budget) per seed with mean and
standard deviation, the labels' cost in foreground voxels (nnActive's foreground efficiency: AUC per million
labelled foreground voxels), final per-structure Dice and the scoring seconds per image; a plot
``<out>/curation.png`` (Dice vs labelled cases and vs labelled foreground voxels). Progress goes to stderr.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "segvol"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp-dev"
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"
STRATEGIES = ("random", "random_fg", "segvol_disagreement", "fh_novelty", "class_entropy")

log = logging.getLogger("benchmark.curation")

# "small": finetune_eval's eval32 network (2 layers, 32^3 window), CPU, 2 -> 10 labelled cases in 4 rounds.
# "full": the same loop at a larger budget on a GPU (the SMALL preset network, 5 -> 25 cases).
PRESETS: Dict[str, Dict[str, Any]] = {
    "small": dict(config="eval32", initial=2, per_round=2, rounds=4, test_cases=10, steps_initial=600,
                  steps_round=80, seeds="0,1,2", eval_mode="zoom_out_zoom_in", device="cpu"),
    "full": dict(config="small", initial=5, per_round=5, rounds=4, test_cases=10, steps_initial=2000,
                 steps_round=500, seeds="0,1,2", eval_mode="zoom_out_zoom_in", device="auto"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="settings the other options override (default small: ~30 min on a 2-core CPU)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder with dataset.json")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list among " + ", ".join(STRATEGIES))
    parser.add_argument("--seeds", default=None, help="comma list of seeds (initial sets, training, random picks)")
    parser.add_argument("--test-cases", type=int, default=None, help="the dataset's last N cases are the test set")
    parser.add_argument("--initial", type=int, default=None, help="labelled cases before the first round")
    parser.add_argument("--per-round", type=int, default=None, help="cases labelled per round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps-initial", type=int, default=None, help="training steps of the starting model")
    parser.add_argument("--steps-round", type=int, default=None, help="training steps of each round's retraining")
    parser.add_argument("--config", default=None,
                        help="network: eval32, eval64 (scripts/finetune_eval.py), a preset name or a JSON file")
    parser.add_argument("--eval-mode", default=None, choices=("zoom_out", "zoom_out_zoom_in"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="CLIP tokenizer folder")
    parser.add_argument("--out", default=str(ROOT / "runs" / "curation"), help="output folder (datastores, models)")


def settings_of(args) -> Dict[str, Any]:
    """The preset, overridden by every option given."""
    chosen = dict(PRESETS[args.preset])
    for key in chosen:
        value = getattr(args, key, None)
        if value is not None:
            chosen[key] = value
    chosen["seeds"] = [int(s) for s in str(chosen["seeds"]).split(",") if s.strip()]
    chosen["strategies"] = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(chosen["strategies"]) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}: choose among {', '.join(STRATEGIES)}")
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# the pieces of one loop
# ----------------------------------------------------------------------------------------------------------------
def network_config(name: str):
    from segvol.config import SegVolConfig
    from segvol.training.trainer import resolve_config

    sys.path.insert(0, str(ROOT / "scripts"))
    from finetune_eval import EVAL_CONFIGS

    return SegVolConfig(**EVAL_CONFIGS[name]) if name in EVAL_CONFIGS else resolve_config(name)


def train_options(output_dir: str, config, init: str, steps: int, labelled: int, seed: int, tokenizer: str,
                  device: str, threads: int, lr: float = 1e-3, warmup_epochs: Optional[float] = None, mode: str = "",
                  keep: Sequence[str] = (), distill_weight: float = 0.0):
    """The trainer's options for one retraining: ``steps`` views over the labelled cases (whole epochs), the
    settings scripts/finetune_eval.py chose for this network, no validation (the test set is never seen).
    ``warmup_epochs`` None: a tenth of the epochs, at most one; ``mode``/``keep``/``distill_weight``: the few-shot
    runs'."""
    from segvol.training import TrainOptions
    from segvol.training.trainer import patch_embedding_lr_scale

    epochs = max(1, math.ceil(steps / max(labelled, 1)))
    return TrainOptions(
        output_dir=output_dir, init=init, config=config.to_dict(), tokenizer=tokenizer, epochs=epochs,
        batch_size=1, lr=lr, weight_decay=1e-4, lr_scale=patch_embedding_lr_scale(10.0),
        warmup_epochs=min(1.0, 0.1 * epochs) if warmup_epochs is None else warmup_epochs, freeze=(), mode=mode,
        keep=tuple(keep), distill_weight=distill_weight, seed=seed, max_categories=8, combinations_per_step=3,
        corrective_prob=0.0, box_jitter=0.0, zoom_out_prob=0.2, loss_resolution="low", world_size=1, device=device,
        threads=threads, val_every=10 ** 6, publish="last", pseudo_weight=0.0, resume=False, fit_budget=False,
        progress=False)


def labelled_foreground(case) -> int:
    from segvol.io import read_image

    return int(np.count_nonzero(np.asarray(read_image(case.label).array)))


def label_info(case) -> List[Dict[str, Any]]:
    return [{"name": name, "idx": int(value)} for value, name in sorted(case.label_names.items())]


class TestSet:
    """The fixed test cases, prepared once; ``dice(checkpoint)`` -> {structure: mean Dice over the test cases}."""

    def __init__(self, cases, config, tokenizer: str, mode: str, device: str):
        from segvol.training import CaseStore
        from segvol.vocabulary import Vocabulary

        vocabulary = Vocabulary.load()
        self.store = CaseStore(cases, config.image_size, lambda n: vocabulary.resolve(n, allow_free_text=True),
                               keep_original_label=True)
        self.tokenizer, self.mode, self.device = tokenizer, mode, device

    def dice(self, checkpoint: str) -> Dict[str, float]:
        import segvol
        from segvol.training import evaluate

        model = segvol.load_model(checkpoint, device=self.device, tokenizer=self.tokenizer)
        result = evaluate(model, self.store, prompt="text+box", mode=self.mode)
        return {name: round(value, 4) for name, value in result["per_label"].items()}


def use_app_package() -> None:
    """The app's own ``lib`` package importable, as MONAI Label imports it (``apps/segvol`` on the path)."""
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))


def strategy_and_scorings(name: str, service, structures: Sequence[str]):
    """The app's strategy object and the scoring methods it reads (``random``: MONAI Label's stock one)."""
    use_app_package()
    from monailabel.tasks.activelearning.random import Random

    from lib.activelearning import (
        ClassEntropyStrategy,
        DisagreementStrategy,
        FHNoveltyStrategy,
        RandomForegroundStrategy,
    )
    from lib.scoring import ClassEntropyScoring, DisagreementScoring, FHNoveltyScoring, ForegroundScoring

    if name == "random":
        return Random(), []
    if name == "random_fg":
        return RandomForegroundStrategy(), [ForegroundScoring()]
    if name == "segvol_disagreement":
        return DisagreementStrategy(), [DisagreementScoring(service, structures)]
    if name == "fh_novelty":
        return FHNoveltyStrategy(), [FHNoveltyScoring()]
    return ClassEntropyStrategy(), [ClassEntropyScoring(service, structures)]


def make_datastore(folder: Path, pool) -> Any:
    """The app's local datastore holding the pool's images (copies named by case id), nothing else."""
    use_app_package()
    from lib.datastore import SegVolDatastore

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for case in pool:
        shutil.copyfile(case.image, folder / f"{case.id}.nii.gz")
    return SegVolDatastore(str(folder), extensions=("*.nii.gz",))


def save_final_label(datastore, case) -> None:
    datastore.save_label(case.id, case.label, "final", {"label_info": label_info(case)})


def run_loop(strategy_name: str, seed: int, pool, initial_ids: Sequence[str], start_checkpoint: str, start_dice,
             test: TestSet, settings: Dict[str, Any], config, out: Path, tokenizer: str, threads: int) -> Dict:
    """One strategy, one seed: rounds of score -> pick -> save final labels -> retrain -> test."""
    from segvol.training import cases_from_datastore, run_training
    from segvol.training.options import LAST

    use_app_package()
    from lib.service import SegVolService

    by_id = {case.id: case for case in pool}
    folder = out / f"seed{seed}" / strategy_name
    datastore = make_datastore(folder / "datastore", pool)
    for image_id in initial_ids:
        save_final_label(datastore, by_id[image_id])
    structures = sorted({name for case in pool for name in case.label_names.values()})
    labelled = list(initial_ids)
    foreground = sum(labelled_foreground(by_id[i]) for i in labelled)
    checkpoint = start_checkpoint
    rounds = [{"round": 0, "labelled": len(labelled), "added": list(labelled), "foreground_voxels": foreground,
               "dice": start_dice, "mean_dice": mean_of(start_dice)}]
    for number in range(1, settings["rounds"] + 1):
        service = SegVolService(checkpoint, tokenizer=tokenizer, device=settings["device"],
                                mode="zoom_out_zoom_in", cache_mb=512)
        strategy, scorings = strategy_and_scorings(strategy_name, service, structures)
        scoring_seconds, scored = 0.0, 0
        for scoring in scorings:
            summary = scoring({}, datastore)
            if summary.get("error") or summary.get("failed"):
                raise RuntimeError(f"{strategy_name}: scoring failed: {summary}")
            scoring_seconds += summary["seconds"]
            scored += summary["scored"]
        added = []
        for pick in range(settings["per_round"]):
            random.seed(hash_seed(seed, number, pick))  # MONAI Label's Random draws from the global generator
            chosen = strategy({"strategy": strategy_name, "seed": hash_seed(seed, number, pick)}, datastore)
            if not chosen:
                break
            image_id = chosen["id"]
            if image_id in labelled or image_id not in by_id:
                raise RuntimeError(f"{strategy_name} picked {image_id!r}, which is labelled or not in the pool")
            save_final_label(datastore, by_id[image_id])
            labelled.append(image_id)
            added.append(image_id)
            foreground += labelled_foreground(by_id[image_id])
        if sorted(datastore.get_labeled_images()) != sorted(labelled):
            raise RuntimeError(f"the datastore's final labels {datastore.get_labeled_images()} are not {labelled}")
        cases = cases_from_datastore(datastore, {})
        if sorted(case.id for case in cases) != sorted(labelled):
            raise RuntimeError("the training set is not the labelled set")
        options = train_options(str(folder / f"round{number}"), config, checkpoint, settings["steps_round"],
                                len(cases), seed * 1000 + number, tokenizer, settings["device"], threads)
        tick = time.time()
        result = run_training(options, cases)
        stopped(result)
        train_seconds = time.time() - tick
        checkpoint = os.path.join(options.output_dir, LAST)
        tick = time.time()
        dice = test.dice(checkpoint)
        rounds.append({"round": number, "labelled": len(labelled), "added": added, "foreground_voxels": foreground,
                       "dice": dice, "mean_dice": mean_of(dice), "steps": result.steps,
                       "train_seconds": round(train_seconds, 1), "test_seconds": round(time.time() - tick, 1),
                       "scoring_seconds": round(scoring_seconds, 2),
                       "scoring_seconds_per_image": round(scoring_seconds / scored, 3) if scored else None})
        log.info("seed %d %s round %d: +%s -> %d labelled, test Dice %.3f (scoring %.1fs, training %.0fs)", seed,
                 strategy_name, number, added, len(labelled), rounds[-1]["mean_dice"], scoring_seconds,
                 train_seconds)
    return {"strategy": strategy_name, "seed": seed, "rounds": rounds}


def stopped(result) -> None:
    """The trainer turns SIGINT/SIGTERM into a clean stop of its run; the benchmark then stops too."""
    if result.status == "stopped":
        raise SystemExit("interrupted")


def hash_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2 ** 31)
    return value


def mean_of(dice: Dict[str, float]) -> float:
    return round(float(np.mean(list(dice.values()))), 4) if dice else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------------------------
def area_under_curve(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid area of ``ys`` over ``xs`` divided by the width: the curve's mean value over the budget."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(xs) < 2 or xs[-1] <= xs[0]:
        return float(ys[0]) if len(ys) else float("nan")
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0) / (xs[-1] - xs[0]))


def summarise(runs: List[Dict]) -> Dict[str, Any]:
    """Per strategy: curves (mean/std over seeds), AUC per seed with mean and std, foreground cost, scoring cost."""
    out: Dict[str, Any] = {}
    for name in dict.fromkeys(run["strategy"] for run in runs):
        mine = [run for run in runs if run["strategy"] == name]
        labelled = [r["labelled"] for r in mine[0]["rounds"]]
        curves = np.array([[r["mean_dice"] for r in run["rounds"]] for run in mine])
        foreground = np.array([[r["foreground_voxels"] for r in run["rounds"]] for run in mine], dtype=float)
        aucs = [area_under_curve(labelled, curve) for curve in curves]
        efficiency = [auc / (fg[-1] / 1e6) for auc, fg in zip(aucs, foreground)]
        per_image = [r["scoring_seconds_per_image"] for run in mine for r in run["rounds"]
                     if r.get("scoring_seconds_per_image") is not None]
        structures = sorted({s for run in mine for s in run["rounds"][-1]["dice"]})
        out[name] = {
            "labelled": labelled,
            "dice_mean": [round(float(v), 4) for v in curves.mean(axis=0)],
            "dice_std": [round(float(v), 4) for v in curves.std(axis=0)],
            "auc_per_seed": [round(a, 4) for a in aucs],
            "auc_mean": round(float(np.mean(aucs)), 4),
            "auc_std": round(float(np.std(aucs)), 4),
            "final_dice_mean": round(float(curves[:, -1].mean()), 4),
            "foreground_voxels_mean": [int(v) for v in foreground.mean(axis=0)],
            "auc_per_million_foreground_voxels": round(float(np.mean(efficiency)), 4),
            "final_dice_per_structure": {s: round(float(np.mean([run["rounds"][-1]["dice"].get(s, np.nan)
                                                                 for run in mine])), 4) for s in structures},
            "scoring_seconds_per_image": round(float(np.mean(per_image)), 3) if per_image else 0.0,
        }
    return out


def plot(summary: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, row in summary.items():
        xs, mean, std = np.array(row["labelled"]), np.array(row["dice_mean"]), np.array(row["dice_std"])
        label = f"{name} (AUC {row['auc_mean']:.3f} ± {row['auc_std']:.3f})"
        left.plot(xs, mean, "o-", label=label)
        left.fill_between(xs, mean - std, mean + std, alpha=0.15)
        right.plot(np.array(row["foreground_voxels_mean"]) / 1e6, mean, "o-", label=name)
    left.set_xlabel("labelled cases")
    left.set_ylabel("test Dice (text + box), mean over structures")
    left.set_title("Dice vs labelled cases (mean ± std over seeds)")
    right.set_xlabel("labelled foreground voxels (millions)")
    right.set_title("Dice vs annotation cost")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------------
def run(args) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    for noisy in ("segvol.engine", "segvol.training", "lib.scoring", "monailabel", "lib.datastore", "lib.service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from segvol.training import load_dataset, run_training
    from segvol.training.options import LAST

    started = time.time()
    settings = settings_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if settings["device"] == "auto":
        settings["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cases = load_dataset(args.data)
    count = settings["test_cases"]
    if count < 1 or len(cases) - count < settings["initial"] + settings["per_round"] * settings["rounds"]:
        raise SystemExit(f"{len(cases)} cases cannot hold {count} test cases and a pool of "
                         f"{settings['initial']} + {settings['rounds']} x {settings['per_round']} labels")
    test_cases, pool = cases[-count:], cases[:-count]
    if {c.id for c in test_cases} & {c.id for c in pool}:
        raise SystemExit("case ids must be unique")
    config = network_config(settings["config"])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # datastores and checkpoints never belong in a repository
    test = TestSet(test_cases, config, args.tokenizer, settings["eval_mode"], settings["device"])
    log.info("curation: %d pool / %d test cases, strategies %s, seeds %s", len(pool), len(test_cases),
             settings["strategies"], settings["seeds"])

    runs: List[Dict] = []
    for seed in settings["seeds"]:
        initial = [pool[i].id for i in np.random.default_rng(seed).permutation(len(pool))[: settings["initial"]]]
        start_dir = out / f"seed{seed}" / "start"
        tick = time.time()
        options = train_options(str(start_dir), config, "scratch", settings["steps_initial"], len(initial), seed,
                                args.tokenizer, settings["device"], threads)
        stopped(run_training(options, [c for c in pool if c.id in initial]))
        start_checkpoint = str(start_dir / LAST)
        start_dice = test.dice(start_checkpoint)
        log.info("seed %d: starting model on %s: test Dice %.3f (%.0fs)", seed, initial, mean_of(start_dice),
                 time.time() - tick)
        for name in settings["strategies"]:
            runs.append(run_loop(name, seed, pool, initial, start_checkpoint, start_dice, test, settings, config,
                                 out, args.tokenizer, threads))
    summary = summarise(runs)
    plot_path = str(out / "curation.png")
    plot(summary, plot_path)
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    best = max(summary, key=lambda s: summary[s]["auc_mean"])
    return {"benchmark": "curation", "preset": args.preset, "data": str(args.data), "pool": len(pool),
            "test": [c.id for c in test_cases], "settings": {**settings, "threads": threads},
            "strategies": summary, "best_by_auc": best, "minutes": round((time.time() - started) / 60.0, 2),
            "plot": plot_path, "runs": str(out / "runs.json")}
