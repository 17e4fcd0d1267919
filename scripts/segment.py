#!/usr/bin/env python
"""Segment CT images with SegVol from the command line (the same engine as the server).

    python scripts/segment.py --checkpoint models/SegVol_v1.pth --tokenizer models/clip \\
        --image ct.nii.gz --text liver spleen --box 40 30 80 100 85 110 --point 70 50 95 + --out label.nii.gz
    python scripts/segment.py ... --input-dir cts/ --text liver --out labels/

``--box`` and ``--point`` are voxel indices (i, j, k) of the image array as stored (what viewers and MONAI Label
clients send); ``--point`` is repeatable and ends with ``+`` (positive) or ``-`` (negative). ``--image`` is a NIfTI
(or NRRD / MetaImage) file or a DICOM series folder; with ``--input-dir`` every image of the folder is segmented in
turn (the model is loaded once) and ``--out`` is a folder. One JSON line per image on stdout: labels, seconds per
stage, image-encoder forwards, windows used and skipped, peak RSS. Bad input gives exit status 2 and a JSON line
with "error".

Batch runs (``--input-dir`` or ``--datastore``; ``segvol.batch``): outputs already there are skipped (``"status":
"exists"``; ``--overwrite`` redoes them), every label is written to a temp file and renamed into place, and a progress
bar goes to stderr. ``--scheduler`` distributes the images over Dask: ``--scheduler`` alone (or ``local``) starts a
local cluster (``--workers`` processes, one model each; one per GPU when there are GPUs), ``--scheduler
tcp://host:8786`` uses an existing cluster whose workers see the same files (GPU workers use their GPU with
``--device auto``). A worker that dies has its image re-run elsewhere. ``--datastore DIR --label-tag TAG`` segments
the images of a MONAI Label datastore (or those of ``--input-dir``) into ``DIR/labels/TAG/<image id>.nii.gz``, which
the datastore lists as label tag ``TAG`` (the layout ``pseudo_labels.py`` writes).

``--precision fp32|bf16|fp16|int8`` picks the image encoder's backend (``segvol.accel``; falls back to fp32 with a
log line where it cannot run; int8 needs ``--calibration`` CT files).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))


def parse_args(argv=None) -> argparse.Namespace:
    from segvol.modes import DEFAULT_MODE, MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="SegVol weights (official or project format, or folder)")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: beside the checkpoint)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", help="a NIfTI, NRRD or MetaImage file, or a DICOM series folder")
    source.add_argument("--input-dir", help="segment every image (image file / DICOM folder) in this folder")
    parser.add_argument("--datastore", default=None,
                        help="a MONAI Label datastore folder: write labels/<--label-tag>/<image id>.nii.gz there "
                             "(its own images are segmented unless --input-dir is given)")
    parser.add_argument("--label-tag", default="segvol", help="label tag for --datastore (default: segvol)")
    parser.add_argument("--scheduler", nargs="?", const="local", default=None,
                        help="Dask: 'local' (the default when the flag is given alone) or a scheduler address "
                             "tcp://host:8786; without the flag images run one after the other in this process")
    parser.add_argument("--workers", type=int, default=0,
                        help="local cluster workers (default: one per GPU, else one per 4 cores)")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of an image whose task raised (Dask)")
    parser.add_argument("--overwrite", action="store_true", help="batch: redo outputs that already exist")
    parser.add_argument("--journal", default=None, help="batch: append one JSON line per label written to this file")
    parser.add_argument("--no-progress", action="store_true", help="batch: no progress bar on stderr")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                        help="image encoder precision (segvol.accel; default exact fp32)")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default ~/.cache/segvol/openvino)")
    parser.add_argument("--calibration", nargs="*", default=None, help="CT files calibrating --precision int8")
    parser.add_argument("--text", nargs="+", default=None, help="category names, e.g. liver spleen")
    parser.add_argument("--box", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="inclusive voxel box in the stored array's indices")
    parser.add_argument("--point", nargs=4, action="append", metavar=("I", "J", "K", "SIGN"), default=[],
                        help="a click: voxel indices and + (positive) or - (negative); repeatable")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE.value)
    parser.add_argument("--overlap", type=float, default=0.5, help="zoom-in window overlap")
    parser.add_argument("--no-reorient", action="store_true",
                        help="feed the stored array order (the reference demo) instead of reorienting to RAS")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="label file (.nii.gz) for --image, or a folder for --input-dir "
                             "(default: <image name>_segvol.nii.gz beside each image)")
    parser.add_argument("--probabilities", action="store_true", help="also write one probability map per label")
    parser.add_argument("--verbose", action="store_true", help="log progress (per zoom-in window on long runs)")
    args = parser.parse_args(argv)
    if not (args.image or args.input_dir or args.datastore):
        parser.error("one of --image, --input-dir or --datastore is required")
    if args.datastore and args.image:
        parser.error("--datastore goes with --input-dir (or the datastore's own images), not --image")
    return args


def parse_points(raw):
    from segvol.errors import BadPromptError

    points = []
    for i, j, k, sign in raw:
        if sign not in ("+", "-", "1", "0", "pos", "neg"):
            raise BadPromptError(f"a point ends with + or -, got {sign!r}")
        try:
            coords = [float(i), float(j), float(k)]
        except ValueError:
            raise BadPromptError(f"point coordinates must be numbers, got {[i, j, k]}") from None
        points.append(coords + [1 if sign in ("+", "1", "pos") else 0])
    return points


def output_path(image: str, out, many: bool) -> str:
    from segvol.io import ITK_SUFFIXES, NIFTI_SUFFIXES

    name = os.path.basename(os.path.normpath(image))
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if out is None:
        return os.path.join(os.path.dirname(os.path.normpath(image)), f"{name}_segvol.nii.gz")
    if many or os.path.isdir(out):
        return os.path.join(out, f"{name}_segvol.nii.gz")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    import segvol
    from segvol.batch import run_batch, write_result
    from segvol.engine import SegVolEngine
    from segvol.errors import SegVolInputError
    from segvol.io import list_images

    try:
        points = parse_points(args.point) or None
        if args.image:
            images = [args.image]
        else:
            images = list_images(args.input_dir or args.datastore)
    except SegVolInputError as error:
        print(json.dumps({"error": str(error), "type": type(error).__name__}))
        return 2
    if not args.image:  # batch
        if args.datastore:
            out_dir = os.path.join(args.datastore, "labels", args.label_tag)
            jobs = [{"image": os.path.abspath(image), "out": os.path.join(out_dir, image_id(image) + ".nii.gz")}
                    for image in images]
        else:
            if args.out:
                os.makedirs(args.out, exist_ok=True)
            jobs = [{"image": image, "out": output_path(image, args.out, many=True)} for image in images]
        for job in jobs:
            job["box"], job["points"] = args.box, points
        if args.datastore:
            os.makedirs(out_dir, exist_ok=True)
        options = {"checkpoint": os.path.abspath(args.checkpoint),
                   "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None,
                   "device": args.device, **_accel(args), "mode": args.mode, "overlap": args.overlap,
                   "reorient": not args.no_reorient, "texts": args.text, "probabilities": args.probabilities,
                   "overwrite": args.overwrite, "journal": os.path.abspath(args.journal) if args.journal else None,
                   }
        status = 0
        for line in run_batch(jobs, options, scheduler=args.scheduler, workers=args.workers, retries=args.retries,
                              progress=not args.no_progress):
            if line.get("status") in ("error", "failed"):
                status = 2
            print(json.dumps(line), flush=True)
        return status
    start = time.perf_counter()
    model = segvol.load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer, **_accel(args))
    load_seconds = time.perf_counter() - start
    engine = SegVolEngine(model, mode=args.mode, overlap=args.overlap, reorient=not args.no_reorient)
    status = 0
    for image in images:
        line = {"image": image}
        try:
            start = time.perf_counter()
            result = engine.segment(image, texts=args.text, box=args.box, points=points,
                                    return_probabilities=args.probabilities)
            target = output_path(image, args.out, many=False)
            line.update({"out": target, **write_result(target, result, engine, start, load_seconds)})
        except SegVolInputError as error:
            line.update({"error": str(error), "type": type(error).__name__})
            status = 2
        print(json.dumps(line), flush=True)
    return status


def image_id(image: str) -> str:
    """A datastore image id: the file name without its image suffix (the folder name for a DICOM series)."""
    from segvol.io import ITK_SUFFIXES, NIFTI_SUFFIXES

    name = os.path.basename(os.path.normpath(image))
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _accel(args) -> dict:
    """load_model options for --precision (int8: calibrated on the --calibration CT files)."""
    options = {"precision": args.precision}
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    if args.precision == "int8":
        if not args.calibration:
            raise SystemExit("--precision int8 needs --calibration CT files (a few real CTs)")
        options["calibration"] = [os.path.abspath(p) for p in args.calibration]
    return options


if __name__ == "__main__":
    sys.exit(main())
