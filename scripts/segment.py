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
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="SegVol weights (official or project format, or folder)")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: beside the checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="a NIfTI, NRRD or MetaImage file, or a DICOM series folder")
    source.add_argument("--input-dir", help="segment every image (image file / DICOM folder) in this folder")
    parser.add_argument("--text", nargs="+", default=None, help="category names, e.g. liver spleen")
    parser.add_argument("--box", nargs=6, type=float, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                        help="inclusive voxel box in the stored array's indices")
    parser.add_argument("--point", nargs=4, action="append", metavar=("I", "J", "K", "SIGN"), default=[],
                        help="a click: voxel indices and + (positive) or - (negative); repeatable")
    parser.add_argument("--mode", choices=["zoom_out", "zoom_out_zoom_in"], default="zoom_out_zoom_in")
    parser.add_argument("--overlap", type=float, default=0.5, help="zoom-in window overlap")
    parser.add_argument("--no-reorient", action="store_true",
                        help="feed the stored array order (the reference demo) instead of reorienting to RAS")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="label file (.nii.gz) for --image, or a folder for --input-dir "
                             "(default: <image name>_segvol.nii.gz beside each image)")
    parser.add_argument("--probabilities", action="store_true", help="also write one probability map per label")
    parser.add_argument("--verbose", action="store_true", help="log progress (per zoom-in window on long runs)")
    return parser.parse_args(argv)


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


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    import segvol
    from segvol.engine import SegVolEngine
    from segvol.errors import SegVolInputError
    from segvol.io import list_images, write_label

    try:
        points = parse_points(args.point) or None
        images = [args.image] if args.image else list_images(args.input_dir)
    except SegVolInputError as error:
        print(json.dumps({"error": str(error), "type": type(error).__name__}))
        return 2
    if args.input_dir and args.out:
        os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    model = segvol.load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    load_seconds = time.perf_counter() - start
    engine = SegVolEngine(model, mode=args.mode, overlap=args.overlap, reorient=not args.no_reorient)
    status = 0
    for image in images:
        line = {"image": image}
        try:
            start = time.perf_counter()
            result = engine.segment(image, texts=args.text, box=args.box, points=points,
                                    return_probabilities=args.probabilities)
            target = output_path(image, args.out, many=bool(args.input_dir))
            write_label(target, result.label, result.affine, result.header)
            if result.probabilities:
                for name, probability in result.probabilities.items():
                    _write_probability(target, name, probability, result.affine)
            stats = result.stats
            line.update({
                "out": target,
                "labels": result.labels,
                "voxels": {name: int((result.label == value).sum()) for name, value in result.labels.items()},
                "seconds": {**stats["seconds"], "wall": round(time.perf_counter() - start, 3)},
                "encoder_forwards": stats["encoder_forwards"],
                "decoder_calls": stats["decoder_calls"],
                "decoded_prompts": stats["decoded_prompts"],
                "windows_used": stats["windows"]["used"],
                "windows_skipped": stats["windows"]["skipped"],
                "prompts_dropped": stats["prompts_dropped"],
                "device": str(model.device),
                "model_load_seconds": round(load_seconds, 3),
                "peak_rss_mb": peak_rss_mb(),
            })
        except SegVolInputError as error:
            line.update({"error": str(error), "type": type(error).__name__})
            status = 2
        print(json.dumps(line), flush=True)
    return status


def _write_probability(label_path: str, name: str, probability, affine) -> None:
    import nibabel as nib
    import numpy as np

    stem = label_path[:-7] if label_path.endswith(".nii.gz") else os.path.splitext(label_path)[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    nib.save(nib.Nifti1Image(probability.astype(np.float32), affine), f"{stem}_prob_{safe}.nii.gz")


if __name__ == "__main__":
    sys.exit(main())
