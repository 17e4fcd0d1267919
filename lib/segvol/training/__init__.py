"""Fine-tuning SegVol on labelled CTs: datalists and multi-view sampling (``data``), training prompts
(``prompts``), per-sample Dice + BCE (``losses``), warm-up + cosine schedule (``schedule``), validation through the
inference engine (``evaluate``) and the training loop with checkpoints, resume, publishing and DDP (``trainer``).

    from segvol.training import TrainOptions, load_dataset, split_cases, run_training
    cases = load_dataset("../shared/data/openkbp-dev")
    train_cases, val_cases = split_cases(cases, 0.2)
    result = run_training(TrainOptions(output_dir="runs/hn", init="official", weights="models/"), train_cases,
                          val_cases)
"""
from .data import Case, CaseStore, load_dataset, cases_from_datastore, parse_label_names, split_cases
from .evaluate import evaluate
from .losses import dice_bce_loss, dice_loss, dice_score
from .prompts import COMBINATIONS, PromptConfig, sample_prompts
from .schedule import WarmupCosine
from .trainer import DEFAULT_FREEZE, StopTraining, TrainOptions, TrainResult, read_last, run_training, train

__all__ = [
    "COMBINATIONS", "Case", "CaseStore", "DEFAULT_FREEZE", "PromptConfig", "StopTraining", "TrainOptions",
    "TrainResult", "WarmupCosine", "cases_from_datastore", "dice_bce_loss", "dice_loss", "dice_score", "evaluate",
    "load_dataset", "parse_label_names", "read_last", "run_training", "sample_prompts", "split_cases", "train",
]
