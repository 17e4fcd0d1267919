"""Fine-tuning SegVol on labelled CTs: datalists and multi-view sampling (``data``), training prompts
(``prompts``), per-sample Dice + BCE (``losses``), warm-up + cosine schedule (``schedule``), validation through the
inference engine (``evaluate``), options and status (``options``), one step's batch and loss (``step``), how a run is
built (``setup``), DDP (``distributed``) and the loop with checkpoints, resume and publishing (``trainer.Trainer``).

    from segvol.training import TrainOptions, load_dataset, split_cases, run_training
    cases = load_dataset("../shared/data/openkbp-dev")
    train_cases, val_cases = split_cases(cases, 0.2)
    result = run_training(TrainOptions(output_dir="runs/hn", init="official", weights="models/"), train_cases,
                          val_cases)
"""
from .data import Case, CaseStore, cases_from_datastore, load_dataset, parse_label_names, split_cases
from .evaluate import evaluate
from .losses import dice_bce_loss, dice_loss, dice_score
from .options import DEFAULT_FREEZE, StopTraining, TrainOptions, TrainResult, TrainStatus
from .prompts import COMBINATIONS, PromptConfig, sample_prompts
from .schedule import WarmupCosine
from .setup import read_last
from .trainer import Trainer, run_training, train

__all__ = [
    "COMBINATIONS", "Case", "CaseStore", "DEFAULT_FREEZE", "PromptConfig", "StopTraining", "TrainOptions",
    "TrainResult", "TrainStatus", "Trainer", "WarmupCosine", "cases_from_datastore", "dice_bce_loss", "dice_loss",
    "dice_score", "evaluate", "load_dataset", "parse_label_names", "read_last", "run_training", "sample_prompts",
    "split_cases", "train",
]
