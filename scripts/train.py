#!/usr/bin/env python
"""Fine-tune SegVol (or train it from scratch) on labelled CTs; the same trainer as the MONAI Label train task.

    # fine-tune the official weights on a dataset folder, 20% held out for validation, publish into the app
    python scripts/train.py --data ../shared/data/openkbp-dev --out runs/hn --weights models/ \\
        --publish apps/segvol/model/segvol_finetuned.pt

    # train the small configuration from scratch on CPU, validation on another folder, 15 minutes
    # (--patch-lr-scale 10: CT soft-tissue contrasts are ~0.01 of the [0, 1] intensities; see docs/training.md)
    python scripts/train.py --data train/ --val val/ --init scratch --config small --freeze none \\
        --tokenizer ../shared/clip-tokenizer --out runs/small --minutes 15 --patch-lr-scale 10

    # teach new structures from a few cases, keeping five known ones (replay labels), the light way
    python scripts/train.py --data few/ --init runs/hn/best.pt --mode lora --keep "brainstem,spinal cord,mandible" \
        --tokenizer ../shared/clip-tokenizer --out runs/few --publish apps/segvol/model/segvol_finetuned.pt

    # resume an interrupted run: the same command again (``--resume auto`` is the default)
    # multi-GPU: --gpus 2 (spawns one DDP process per GPU), or torchrun --nproc_per_node 2 scripts/train.py ...

``--data``/``--val`` take a dataset folder (``dataset.json`` with ``labels`` and ``cases``, image and label files by
suffix, like ``../shared/data/openkbp-dev``; or Medical-Decathlon ``training`` lists) or a datalist JSON file (a list
of ``{"image", "label", "label_names"}``, or an object with ``labels`` and ``cases``/``training``). Label values are
named by ``labels``; every name is a text prompt (resolved to SegVol's spelling when it knows the category, e.g.
``LeftParotid`` -> ``parotid gland left``; new names are learned as they are). ``--pseudo-labels DIR`` adds FH
pseudo-label maps named like the images (``scripts/pseudo_labels.py``) to the loss with weight ``--pseudo-weight``.

Outputs in ``--out``: ``last.pt`` (model, optimizer, scheduler, epoch, vocabulary: resumable), ``best.pt`` (best
validation Dice), ``history.json``; ``--publish PATH`` copies each new best atomically (the app serves
``apps/segvol/model/segvol_finetuned.pt`` and reloads it without a restart). The last line on stdout is the result
as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    from segvol.modes import MODES
    from segvol.training.trainer import DEFAULT_FREEZE, FREEZABLE, TrainOptions

    defaults = TrainOptions(output_dir="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="training dataset folder or datalist JSON")
    data.add_argument("--cases", default=None, help="slice of the dataset's cases, e.g. ':30'")
    data.add_argument("--val", default=None, help="validation dataset folder or datalist JSON")
    data.add_argument("--val-cases", default=None, help="slice of the validation cases, e.g. '-10:'")
    data.add_argument("--val-split", type=float, default=0.2, help="held-out fraction when --val is not given")
    data.add_argument("--pseudo-labels", default=None, help="folder of FH pseudo-label maps (<case>.nii.gz)")
    data.add_argument("--repeats", type=int, default=defaults.repeats, help="views per case per epoch")
    model = parser.add_argument_group("model")
    model.add_argument("--out", required=True, help="output folder (checkpoints, history)")
    model.add_argument("--init", default="official",
                       help="official (the --weights), scratch, or a checkpoint path (official or project format)")
    model.add_argument("--weights", default=os.path.join(ROOT, "models"), help="official SegVol weights file/folder")
    model.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: next to the weights)")
    model.add_argument("--config", default="small", help="architecture for --init scratch: small, official or JSON")
    model.add_argument("--freeze", default=",".join(DEFAULT_FREEZE),
                       help=f"comma list of {', '.join(FREEZABLE)}, or 'none' (default: {','.join(DEFAULT_FREEZE)}, "
                            "as the SegVol maintainers advise for fine-tuning)")
    model.add_argument("--mode", default="", choices=("", "full", "decoder", "lora"),
                       help="what trains (overrides --freeze): full (everything), decoder (image and text encoders "
                            "frozen, image embeddings of fixed views cached), lora (decoder + low-rank adapters on "
                            "the image encoder's attention, merged into the published checkpoint)")
    model.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    model.add_argument("--mask-prompt", action="store_true",
                       help="give the network the previous-prediction prompt (SAM's mask input, in 3D) if it lacks "
                            "it, so a click corrects the answer before it (train with --corrective-prob > 0)")
    model.add_argument("--views-per-case", type=int, default=None,
                       help="fixed views per case (0: a new random view each time; default 8 in the decoder mode)")
    model.add_argument("--checkpointing", action="store_true",
                       help="gradient checkpointing of the image encoder's blocks (less memory, ~1/3 more compute)")
    model.add_argument("--keep", default="",
                       help="continual learning: comma list of structures the starting model knows and must keep; "
                            "cases without them get its predictions as replay labels")
    model.add_argument("--distill-weight", type=float, default=None,
                       help="continual learning: weight of the distillation term toward the starting model's answers "
                            "for the --keep structures (default 1.0 with --keep; 0: replay labels only)")
    model.add_argument("--publish", default=None, help="copy the best checkpoint here (atomically)")
    model.add_argument("--vocabulary", default=None, help="base vocabulary JSON (default: the built-in names)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=defaults.epochs)
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size)
    optim.add_argument("--lr", type=float, default=defaults.lr)
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    optim.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    optim.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="0 disables")
    optim.add_argument("--patch-lr-scale", type=float, default=1.0,
                       help="learning-rate multiplier of the image encoder's patch embedding (projection and position "
                            "embeddings); for --init scratch on CT, 10 lets the projection grow to the ~0.01 "
                            "soft-tissue contrasts of the [0, 1] intensities")
    optim.add_argument("--minutes", type=float, default=0, help="wall-time budget (0: none)")
    optim.add_argument("--seed", type=int, default=defaults.seed)
    optim.add_argument("--device", default="auto")
    optim.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="autocast on CUDA")
    optim.add_argument("--gpus", type=int, default=1, help="DDP processes, one per GPU")
    optim.add_argument("--resume", choices=("auto", "yes", "no"), default="auto",
                       help="auto: continue an unfinished run in --out; yes: continue even a finished one")
    prompts = parser.add_argument_group("views and prompts")
    prompts.add_argument("--zoom-out-prob", type=float, default=defaults.zoom_out_prob)
    prompts.add_argument("--pos-fraction", type=float, default=defaults.pos_fraction)
    prompts.add_argument("--box-jitter", type=float, default=defaults.box_jitter)
    prompts.add_argument("--window-box-prob", type=float, default=defaults.window_box_prob,
                         help="share of a crop's box prompts that are the box a zoom-in window gets (the "
                              "structure's whole box clipped to the crop) instead of the tight box of the part in view")
    prompts.add_argument("--max-positive", type=int, default=defaults.max_positive)
    prompts.add_argument("--max-negative", type=int, default=defaults.max_negative)
    prompts.add_argument("--boundary-fraction", type=float, default=defaults.boundary_fraction)
    prompts.add_argument("--combinations", default=",".join(defaults.combinations))
    prompts.add_argument("--max-categories", type=int, default=defaults.max_categories)
    prompts.add_argument("--corrective-prob", type=float, default=defaults.corrective_prob,
                         help="share of steps that also train on clicks at the model's own errors (the robot "
                              "annotator's rule, 1..--corrective-rounds simulated rounds)")
    prompts.add_argument("--corrective-rounds", type=int, default=defaults.corrective_rounds)
    prompts.add_argument("--pseudo-weight", type=float, default=defaults.pseudo_weight)
    prompts.add_argument("--loss-resolution", choices=("full", "low"), default=defaults.loss_resolution,
                         help="full: logits upsampled to the window (the reference); low: the decoder's grid "
                              "against area-averaged targets (several times cheaper on CPU)")
    val = parser.add_argument_group("validation")
    val.add_argument("--val-every", type=int, default=defaults.val_every)
    val.add_argument("--val-prompt", default=defaults.val_prompt, choices=("text", "text+box", "box"))
    val.add_argument("--val-mode", default=defaults.val_mode, choices=MODES)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(levelname)s %(message)s")
    logging.getLogger("segvol.engine").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from segvol.training import TrainOptions, load_dataset, run_training, split_cases
    from segvol.training.data import parse_case_slice
    from segvol.training.trainer import patch_embedding_lr_scale

    cases = load_dataset(args.data, parse_case_slice(args.cases), args.pseudo_labels)
    if args.val:
        train_cases, val_cases = cases, load_dataset(args.val, parse_case_slice(args.val_cases), args.pseudo_labels)
    else:
        train_cases, val_cases = split_cases(cases, args.val_split, args.seed)
    options = TrainOptions(
        output_dir=args.out, init=args.init, weights=args.weights, tokenizer=args.tokenizer, config=args.config,
        epochs=args.epochs, batch_size=args.batch_size, repeats=args.repeats, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, min_lr_ratio=args.min_lr_ratio,
        lr_scale=patch_embedding_lr_scale(args.patch_lr_scale),
        grad_clip=args.grad_clip or None, freeze=args.freeze, mode=args.mode, lora_rank=args.lora_rank,
        views_per_case=args.views_per_case, checkpointing=args.checkpointing, keep=args.keep,
        distill_weight=args.distill_weight, seed=args.seed,
        device=args.device,
        amp=None if args.amp == "auto" else args.amp == "on", zoom_out_prob=args.zoom_out_prob,
        pos_fraction=args.pos_fraction, box_jitter=args.box_jitter,
        window_box_prob=args.window_box_prob, max_positive=args.max_positive,
        max_negative=args.max_negative, boundary_fraction=args.boundary_fraction, combinations=args.combinations,
        max_categories=args.max_categories, corrective_prob=args.corrective_prob,
        corrective_rounds=args.corrective_rounds, mask_prompt=args.mask_prompt, pseudo_weight=args.pseudo_weight,
        val_every=args.val_every, loss_resolution=args.loss_resolution,
        val_prompt=args.val_prompt, val_mode=args.val_mode,
        time_budget_s=args.minutes * 60 if args.minutes > 0 else None,
        resume={"auto": "auto", "yes": True, "no": False}[args.resume], publish_path=args.publish,
        vocabulary=args.vocabulary, world_size=args.gpus, progress=False if args.quiet else None)
    result = run_training(options, train_cases, val_cases)
    summary = {k: v for k, v in result.to_json().items() if k != "history"}
    summary["last_epoch"] = result.history[-1] if result.history else None
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
