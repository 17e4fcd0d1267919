"""Training memory and speed per mode: peak memory and seconds per step at batch 1, side by side.

    python scripts/benchmark.py train                                  # official configuration, CPU
    python scripts/benchmark.py train --device cuda --variants full,full+ckpt,decoder,lora,lora+ckpt
    python scripts/benchmark.py train --variants decoder+distill,lora+ckpt+distill   # continual learning's cost
    python scripts/benchmark.py train --config small --steps 10

Each variant runs the project trainer (``segvol.training.run_training``, what ``scripts/train.py`` and the app's
train task run) in a child process of its own, from scratch with the chosen configuration (weights do not change
memory or time), on one synthetic CT (a body with two labelled balls), batch 1, the trainer's default prompt
combinations (all six per step, no corrective clicks, full-resolution loss). Variants are ``mode[+ckpt]``: ``full``
(every part trains), ``decoder`` (image and text encoders frozen; each case's fixed views are encoded once and
their embeddings reused), ``lora`` (frozen encoders plus rank ``--lora-rank`` adapters on the image encoder's
attention); ``+ckpt`` adds gradient checkpointing of the image encoder's blocks; ``+distill`` starts from a checkpoint
(the same random network, saved first) and keeps "liver" with the distillation term toward it (a second, frozen
network in memory; few-shot continual learning's default).

Per variant: trainable parameters, the first step's seconds (model warm-up, the decoder mode's encoding), the median
seconds of the later steps, peak resident memory of the process (RSS: model, optimizer state, activations) and on
CUDA the peak allocated and reserved memory. One JSON line.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from ._measure import in_child

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"


def add_arguments(parser) -> None:
    parser.add_argument("--variants", default="full,full+ckpt,decoder,lora,lora+ckpt",
                        help="comma list of mode[+ckpt] (modes: full, decoder, lora)")
    parser.add_argument("--config", default="official", help="official (default), small, or a JSON file")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant (the first is reported apart)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="CLIP tokenizer folder")


def write_case(folder: str) -> str:
    """One synthetic CT and its label (a body cylinder with a bright and a dark ball) as a dataset folder."""
    import json

    import nibabel as nib
    import numpy as np

    shape = (192, 192, 80)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = (x - 96) ** 2 + (y - 96) ** 2 < 80 ** 2
    image[body] = 40.0
    label = np.zeros(shape, np.uint8)
    for value, (cx, cy, cz), hu in ((1, (70, 90, 40), 300.0), (2, (125, 100, 38), -200.0)):
        ball = (x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) * 2.0) ** 2 < 18 ** 2
        image[ball], label[ball] = hu, value
    image += rng.normal(0, 10, shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), os.path.join(folder, "case_0_ct.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, "case_0_seg.nii.gz"))
    spec = {"labels": {"1": "liver", "2": "spleen"}, "image_file_suffix": "_ct.nii.gz",
            "label_file_suffix": "_seg.nii.gz", "cases": [{"patient": "case_0"}]}
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(spec, handle)
    return folder


def measure(variant: str, config: str, steps: int, lora_rank: int, device: str, threads: int, tokenizer: str):
    import torch

    from segvol.training import StopTraining, TrainOptions, load_dataset, run_training

    if threads:
        torch.set_num_threads(threads)
    mode, *extras = variant.split("+")
    with tempfile.TemporaryDirectory() as folder:
        cases = load_dataset(write_case(folder))
        init, keep = "scratch", ()
        if "distill" in extras:
            from segvol.checkpoint import save_checkpoint
            from segvol.modeling.segvol import SegVol
            from segvol.training.setup import resolve_config

            init, keep = save_checkpoint(os.path.join(folder, "start.pt"), SegVol(resolve_config(config))), ("liver",)
        ticks = []

        def on_event(event, info):
            if event == "step":
                ticks.append(time.perf_counter())
                if len(ticks) > steps:
                    raise StopTraining

        options = TrainOptions(output_dir=os.path.join(folder, "run"), init=init, config=config, keep=keep,
                               tokenizer=tokenizer, mode=mode, lora_rank=lora_rank, checkpointing="ckpt" in extras,
                               epochs=1, repeats=steps + 1, device=device, resume=False, progress=False,
                               corrective_prob=0.0, prefetch=False, pseudo_weight=0.0)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        run_training(options, cases, callback=on_event)
        seconds = [b - a for a, b in zip([started] + ticks[:-1], ticks)]
        out = {"variant": variant, "steps": len(seconds), "seconds_first_step": round(seconds[0], 2),
               "seconds_per_step": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
               "trainable_parameters": trainable_count(options)}
        out["trainable_parameters_m"] = round(out["trainable_parameters"] / 1e6, 2)
        if device.startswith("cuda"):
            out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            out["cuda_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
        return out


def trainable_count(options) -> int:
    """What the options train, counted on a model built on the meta device (no memory)."""
    import dataclasses

    import torch

    from segvol.modeling.segvol import SegVol
    from segvol.training.setup import freeze_parameters, resolve_config

    config = resolve_config(options.config)
    if options.mode == "lora":
        config = dataclasses.replace(config, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha)
    with torch.device("meta"):
        model = SegVol(config)
    return int(sum(freeze_parameters(model, options.freeze).values()))


def run(args) -> dict:
    import torch

    threads = args.threads or torch.get_num_threads()
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        mode, *extras = variant.split("+")
        if mode not in ("full", "decoder", "lora") or not set(extras) <= {"ckpt", "distill"}:
            raise SystemExit(f"unknown variant {variant!r}: mode[+ckpt][+distill], modes full, decoder, lora")
        rows.append(in_child(measure, variant=variant, config=args.config, steps=args.steps,
                             lora_rank=args.lora_rank, device=args.device, threads=threads,
                             tokenizer=args.tokenizer))
    return {"benchmark": "train", "config": args.config, "device": args.device, "threads": threads,
            "batch_size": 1, "variants": rows}
