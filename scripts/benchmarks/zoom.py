"""Zoom-out-zoom-in on a 512x512x200 CT: the reference algorithm vs our engine (encoder forwards, seconds, RSS).

The CT is ``example_ct`` of ../shared/data/totalseg-example resampled (trilinear) to ``--shape`` (stored order),
and the model is the official configuration with the deterministic weights of ../shared/parity/fill.py, built in
memory. Each measurement runs in its own child process (so its peak RSS is its own), after the CT has been read:

* ``a_reference``: the reference algorithm for "liver" with a box: per category encode the zoom-out view, decode,
  grow the foreground ROI the reference's way, then a sliding window (overlap 0.5) over the whole ROI with every
  window encoded and the text re-encoded for every window, constant-weight logit averaging, hard paste;
* ``b_ours``: ``SegVolEngine.segment(ct, texts=["liver"], box=box)`` on a cold engine;
* ``c_ours_second_click``: then the same call plus a positive click inside the box (same engine, warm caches);
* ``d_ours_multi``: one ``segment`` call with ``--categories`` names (text only) on a cold engine, against
  ``a_reference_multi``: the reference algorithm run for each of those names (text only), one after the other.
  ``--reference-categories K < N`` times only the first K names and scales to N (flagged in the output).
* ``e_preview``: with ``--precisions`` (e.g. ``fp32,bf16,int8``), per precision in its own process: the whole
  zoom-out preview of ``PREVIEW_NAMES`` (21 organs) from the file on disk (read, preprocess, encode, decode, write
  the label), after one warm-up call on another image, plus the liver with its box; seconds, ratio to fp32, peak RSS
  and the Dice of each organ's final mask against fp32's (text-only: 21 organs; text + box: the liver).
  ``--skip a b d`` leaves the other variants out (``--skip a b d --precisions fp32,bf16,int8``: the preview only).
* ``f_clicks`` (``--clicks N``): an annotator's session as the server runs it: one ``ImageSession`` on the CT, text +
  box for the liver (the first request: reading, preprocessing, encoding), then N corrective clicks added one at a
  time by the robot annotator's rule (``segvol.interaction.error_click`` against the liver of ``example_seg`` on the
  resampled grid), each answered in zoom-out-zoom-in mode: seconds per click (p50, p95, max; the goal is p95 <= 1 s),
  the engine's stages, windows decoded and encoder forwards per click, beside the first request's seconds. The child
  applies ``segvol.memory.keep_large_arrays`` first, as the server does.
* ``g_goals`` (``--goals``): the issue's GPU targets, per precision of ``--precisions`` (default fp32), after a
  warm-up on another image and with cold caches: one organ ("liver", text only) and the 21 ``PREVIEW_NAMES`` on the
  CT in zoom-out-zoom-in mode, seconds (with and without reading and preprocessing the CT, CPU work; the targets
  are judged without it), windows, encoder forwards and peak GPU memory.

``--device cuda`` runs our engine (b, c, d, e, g) on the GPU (the reference, a, stays on CPU): on a lent GPU
machine, ``--skip a b d --device cuda --precisions fp32,bf16 --goals`` gives the GPU figures.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ._measure import in_child, percentile

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
EXAMPLE = SHARED / "data" / "totalseg-example"
# example_seg.nii.gz labels example_ct_sm, which is slices 82..111 of example_ct (same voxels, same grid otherwise).
SEG_SLICE_OFFSET = 82
NAMES = ["liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder", "aorta",
         "colon", "urinary_bladder", "esophagus", "duodenum"]


PREVIEW_NAMES = ["liver", "spleen", "kidney right", "kidney left", "stomach", "pancreas", "gallbladder", "aorta",
                 "colon", "urinary bladder", "esophagus", "duodenum", "inferior vena cava", "adrenal gland right",
                 "adrenal gland left", "small bowel", "lung upper lobe left", "heart", "portal vein and splenic vein",
                 "sacrum", "prostate or uterus"]


def add_arguments(parser) -> None:
    parser.add_argument("--precisions", default="",
                        help="e_preview: comma-separated precisions (fp32 first), e.g. fp32,bf16,int8")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default ~/.cache/segvol/openvino)")
    parser.add_argument("--calibration", nargs="*", default=None,
                        help="CT files for int8 calibration (default: the ibsi-sts-dev CTs)")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], help="CT shape (stored order)")
    parser.add_argument("--categories", type=int, default=10, help="names in the multi-category call (d)")
    parser.add_argument("--reference-categories", type=int, default=0,
                        help="names the reference is timed on for (d) (0: all); the rest is extrapolated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "d"], help="variants to leave out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for our engine (the reference: CPU)")
    parser.add_argument("--clicks", type=int, default=0, help="f_clicks: corrective clicks after text + box (0: skip)")
    parser.add_argument("--robot-dataset", default=None,
                        help="also write the CT and its liver label as a dataset folder here (for the robot "
                             "through a server: scripts/benchmark.py interactive --data DIR --server URL)")
    parser.add_argument("--goals", action="store_true",
                        help="g_goals: one organ and 21 organs in zoom-out-zoom-in mode, warm (the GPU targets)")


# ----------------------------------------------------------------------------------------------------------------
# shared helpers (run inside the children)
# ----------------------------------------------------------------------------------------------------------------
def _model(threads: int, device: str = "cpu"):
    import torch

    import segvol
    from segvol.modeling.text_encoder import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(SHARED / "parity"))
    from fill import fill_state_dict

    manifest = json.loads((SHARED / "parity" / "segvol_keys.json").read_text())["tensors"]
    tokenizer = load_tokenizer(str(SHARED / "clip-tokenizer"))
    with torch.device("meta"):
        model = segvol.SegVol(segvol.OFFICIAL, tokenizer, checkpoint_id="parity-fill")
    model.load_state_dict(fill_state_dict(manifest), strict=True, assign=True)
    return model.to(device).eval()


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _gpu_memory(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"gpu": torch.cuda.get_device_name(device),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)}


def _volume(path: str):
    from segvol.io import read_image

    return read_image(path)


def make_ct(folder: str, shape) -> dict:
    """Resample example_ct to ``shape``; -> {"path", "box" (liver, stored indices), "click"}."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    image = nib.load(str(EXAMPLE / "example_ct.nii.gz"))
    source = np.asarray(image.dataobj).astype(np.float32)
    resized = F.interpolate(torch.from_numpy(source)[None, None], size=tuple(shape), mode="trilinear",
                            align_corners=False)[0, 0].round().numpy().astype(np.int16)
    zooms = np.asarray(source.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] * zooms  # same field of view, finer voxels
    affine[:3, 3] = image.affine[:3, 3] + image.affine[:3, :3] @ (zooms / 2 - 0.5)
    path = os.path.join(folder, "ct_%dx%dx%d.nii.gz" % tuple(shape))
    nib.save(nib.Nifti1Image(resized, affine), path)
    seg = np.asarray(nib.load(str(EXAMPLE / "example_seg.nii.gz")).dataobj)
    liver = np.argwhere(seg == 5) + np.asarray([0, 0, SEG_SLICE_OFFSET])
    scale = np.asarray(shape) / np.asarray(source.shape)
    low = np.floor(liver.min(0) * scale).astype(int)
    high = np.minimum(np.ceil((liver.max(0) + 1) * scale).astype(int) - 1, np.asarray(shape) - 1)
    centre = np.round((liver.mean(0) + 0.5) * scale - 0.5).astype(int)
    return {"path": path, "box": [int(v) for v in list(low) + list(high)], "click": [int(v) for v in centre]}


def _rss_now_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2 ** 20, 1)


# ----------------------------------------------------------------------------------------------------------------
# (a) the reference algorithm, with our (bit-faithful) network and preprocessing
# ----------------------------------------------------------------------------------------------------------------
def _reference_windows(size: int, window: int, overlap: float = 0.5):
    """MONAI 0.9 ``dense_patch_slices`` starts on one axis (interval int(window * (1 - overlap)), last flush)."""
    if size <= window:
        return [0]
    interval = int(window * (1 - overlap)) or 1
    count = math.ceil((size - window) / interval) + 1
    return sorted({min(i * interval, size - window) for i in range(count)})


def reference_segment(model, prepared, name: str, zoom_box=None, counters=None) -> "object":
    """The reference demo's zoom-out-zoom-in for one category (inference_demo.py + monai_inferers_utils.py)."""
    import torch
    import torch.nn.functional as F

    counters = counters if counters is not None else {}
    counters.setdefault("encoder_forwards", 0)
    counters.setdefault("windows", 0)
    window = tuple(model.config.image_size)
    native = torch.from_numpy(prepared.native)

    def text_embedding():
        model.text_encoder.clear_cache()  # the reference runs CLIP on every forward
        return model.encode_text([name])

    def forward(image, box):
        counters["encoder_forwards"] += 1
        embedding = model.encode_image(image)
        boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32).reshape(1, 6)
        return model.upsample(model.decode(embedding, text_embedding(), boxes))

    logits = forward(prepared.zoom_out, zoom_box)
    global_logits = F.interpolate(logits, size=tuple(native.shape), mode="nearest")[0, 0]
    global_preds = torch.sigmoid(global_logits) > 0.5
    if not global_preds.any():
        return global_logits  # "Fail to detect foreground!": no zoom-in
    # logits2roi_coor: tight box of the prediction grown to about one window, clipped, no inward shift.
    found = torch.nonzero(global_preds)
    low, high = found.min(0).values.tolist(), found.max(0).values.tolist()
    for axis in range(3):
        pad = max(0, window[axis] - (high[axis] - low[axis] + 1))
        low[axis] = max(0, low[axis] - pad // 2)
        high[axis] = min(native.shape[axis], high[axis] + pad // 2)
    roi = tuple(slice(a, b + 1) for a, b in zip(low, high))
    image, preds = native[roi], global_preds[roi]
    if zoom_box is not None:  # the user's box cube, nearest-upsampled to native (prompt reflection)
        cube = torch.zeros(window, dtype=torch.float32)
        cube[zoom_box[0]:zoom_box[3] + 1, zoom_box[1]:zoom_box[4] + 1, zoom_box[2]:zoom_box[5] + 1] = 1
        cube = F.interpolate(cube[None, None], size=tuple(native.shape), mode="nearest")[0, 0][roi]
    shape = tuple(image.shape)
    pads = [max(w - s, 0) for w, s in zip(window, shape)]
    padding = []
    for pad in reversed(pads):
        padding += [pad // 2, pad - pad // 2]
    image = F.pad(image, padding)
    preds = F.pad(preds.float(), padding)
    padded = tuple(image.shape)
    starts = [_reference_windows(padded[a], window[a]) for a in range(3)]
    total = torch.zeros(padded)
    count = torch.zeros(padded)
    windows = [(d, h, w) for d in starts[0] for h in starts[1] for w in starts[2]]
    for start in windows:
        where = tuple(slice(s, s + w) for s, w in zip(start, window))
        if zoom_box is not None and len(windows) == 1:
            source = cube  # the user box (the reference does not pad this map: its bug, kept)
        else:
            source = preds[where]
        box = None
        if zoom_box is not None:
            nonzero = torch.nonzero(source > 0)
            box = [-1] * 6 if len(nonzero) == 0 else nonzero.min(0).values.tolist() + nonzero.max(0).values.tolist()
        total[where] += forward(image[where][None, None], box)[0, 0]
        count[where] += 1
        counters["windows"] += 1
    averaged = total / count
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape))
    global_logits[roi] = averaged[crop]
    return global_logits


def _run_reference(ct: dict, names, with_box: bool, threads: int) -> dict:
    import torch

    from segvol.preprocess import preprocess

    model = _model(threads)
    volume = _volume(ct["path"])
    counters: dict = {}
    start = time.perf_counter()
    with torch.inference_mode():
        prepared = preprocess(volume.array, volume.affine, model.config.image_size)
        zoom_box = None
        if with_box:
            native_box = prepared.frames.original_to_native_box(ct["box"])
            zoom_box = [int(v) for v in prepared.frames.native_to_zoom_box(native_box)]
        for name in names:
            reference_segment(model, prepared, name, zoom_box, counters)
    seconds = time.perf_counter() - start
    return {"categories": len(names), "seconds": round(seconds, 2), **counters}


# ----------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------
def _summary(result, seconds: float) -> dict:
    stats = result.stats
    return {"seconds": round(seconds, 2), "encoder_forwards": stats["encoder_forwards"],
            "decoder_calls": stats["decoder_calls"], "decoded_prompts": stats["decoded_prompts"],
            "windows": stats["windows"]["used"],
            "windows_skipped": stats["windows"]["skipped"], "stage_seconds": stats["seconds"]}


def _run_ours_single(ct: dict, threads: int, device: str) -> dict:
    from segvol.engine import SegVolEngine

    model = _model(threads, device)
    volume = _volume(ct["path"])
    engine = SegVolEngine(model)
    start = time.perf_counter()
    first = engine.segment(volume, texts=["liver"], box=ct["box"])
    b = _summary(first, time.perf_counter() - start)
    b["rss_mb_after"] = _rss_now_mb()
    start = time.perf_counter()
    second = engine.segment(volume, texts=["liver"], box=ct["box"], points=[ct["click"] + [1]])
    c = _summary(second, time.perf_counter() - start)
    c["new_windows_encoded"] = second.stats["encoder_forwards"]
    return {"b": b, "c": c, **_gpu_memory(device)}


def _run_ours_multi(ct: dict, names, threads: int, device: str) -> dict:
    from segvol.engine import SegVolEngine

    model = _model(threads, device)
    volume = _volume(ct["path"])
    engine = SegVolEngine(model)
    start = time.perf_counter()
    result = engine.segment(volume, texts=list(names))
    out = _summary(result, time.perf_counter() - start)
    out["categories"] = len(names)
    return {**out, **_gpu_memory(device)}


def liver_truth(shape):
    """The liver of example_seg (slices 82..111 of example_ct) on the grid ``make_ct`` resamples to (nearest)."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    seg = np.asarray(nib.load(str(EXAMPLE / "example_seg.nii.gz")).dataobj)
    full = np.zeros(nib.load(str(EXAMPLE / "example_ct.nii.gz")).shape, np.float32)
    full[:, :, SEG_SLICE_OFFSET:SEG_SLICE_OFFSET + seg.shape[2]] = seg == 5
    return F.interpolate(torch.from_numpy(full)[None, None], size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


def write_robot_dataset(folder: str, ct: dict, shape) -> str:
    """The CT and its liver (``liver_truth``) as a dataset folder the robot annotator reads (``dataset.json``)."""
    import shutil

    import nibabel as nib
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(ct["path"]).replace(".nii.gz", "")
    shutil.copy(ct["path"], os.path.join(folder, f"{name}_ct.nii.gz"))
    affine = nib.load(ct["path"]).affine
    nib.save(nib.Nifti1Image(liver_truth(shape).astype(np.uint8), affine), os.path.join(folder, f"{name}_seg.nii.gz"))
    spec = {"labels": {"1": "liver"}, "image_file_suffix": "_ct.nii.gz", "label_file_suffix": "_seg.nii.gz",
            "cases": [name]}
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump(spec, handle)
    return folder


def _run_clicks(ct: dict, clicks: int, threads: int, device: str) -> dict:
    import statistics

    from segvol.engine import SegVolEngine
    from segvol.interaction import error_click
    from segvol.io import spacing
    from segvol.memory import keep_large_arrays
    from segvol.prompts import Prompts

    keep_large_arrays()  # as the server does at start
    model = _model(threads, device)
    volume = _volume(ct["path"])
    truth = liver_truth(volume.array.shape)
    engine = SegVolEngine(model)
    start = time.perf_counter()
    session = engine.open(volume)
    result = session.segment(Prompts(texts=["liver"], box=ct["box"]))
    first = _summary(result, time.perf_counter() - start)
    points, rows = [], []
    for _ in range(clicks):
        click = error_click(truth, result.label > 0, spacing(volume.affine))
        if click is None:
            break
        points.append((*click.point, click.label))
        _synchronize(device)
        start = time.perf_counter()
        result = session.segment(Prompts(texts=["liver"], box=ct["box"], points=points))
        _synchronize(device)
        rows.append({**_summary(result, time.perf_counter() - start), "click": list(click.point),
                     "positive": click.positive})
    seconds = sorted(r["seconds"] for r in rows)
    p95 = percentile(seconds, 0.95) if seconds else None
    stages = {k: round(statistics.median(r["stage_seconds"].get(k, 0.0) for r in rows), 3)
              for k in (rows[0]["stage_seconds"] if rows else {})}
    return {"first_request": first, "clicks": rows,
            "click_seconds_p50": statistics.median(seconds) if seconds else None, "click_seconds_p95": p95,
            "click_seconds_max": seconds[-1] if seconds else None,
            "click_stage_seconds_median": stages, "click_p95_under_1s": p95 is not None and p95 <= 1.0,
            **_gpu_memory(device)}


def _run_goals(ct: dict, names, precision: str, threads: int, device: str) -> dict:
    """The GPU targets: one organ and ``names`` on the CT, zoom-out-zoom-in, after a warm-up, caches cleared."""
    from segvol import accel
    from segvol.engine import SegVolEngine

    model = _model(threads, device)
    backend = accel.accelerate(model, precision)
    engine = SegVolEngine(model)
    engine.segment(str(EXAMPLE / "example_ct_sm.nii.gz"), texts=["liver"])  # warm-up (kernels, threads)
    out = {}
    for key, texts in (("one_organ", ["liver"]), (f"organs_{len(names)}", list(names))):
        engine.clear_cache()
        model.text_encoder.clear_cache()
        _synchronize(device)
        start = time.perf_counter()
        result = engine.segment(ct["path"], texts=texts)
        _synchronize(device)
        out[key] = _summary(result, time.perf_counter() - start)
        # reading and preparing the CT is CPU work the GPU cannot speed up: the targets are judged without it
        out[key]["seconds_after_preprocess"] = round(out[key]["seconds"] - result.stats["seconds"]["preprocess"], 3)
    out["one_organ_under_1s"] = out["one_organ"]["seconds_after_preprocess"] < 1.0
    out[f"organs_{len(names)}_under_3s"] = out[f"organs_{len(names)}"]["seconds_after_preprocess"] < 3.0
    return {**out, **backend.describe(), **_gpu_memory(device)}


def _run_preview(ct: dict, names, precision: str, cache_dir, calibration, threads: int, output: str,
                 device: str) -> dict:
    import numpy as np

    from segvol import accel
    from segvol.engine import SegVolEngine
    from segvol.io import write_label

    model = _model(threads, device)
    start = time.perf_counter()
    backend = accel.accelerate(model, precision, cache_dir=cache_dir,
                               calibration=calibration if precision == "int8" else None)
    prepare = time.perf_counter() - start
    engine = SegVolEngine(model, mode="zoom_out")
    engine.segment(str(EXAMPLE / "example_ct_sm.nii.gz"), texts=["liver"])  # warm-up (first inference, threads)
    model.text_encoder.clear_cache()
    folder = os.path.dirname(output)
    _synchronize(device)
    start = time.perf_counter()
    result = engine.segment(ct["path"], texts=list(names))  # read + preprocess + encode + decode (cold caches)
    write_label(os.path.join(folder, f"preview_{precision}.nii.gz"), result.label, result.affine, result.header)
    seconds = time.perf_counter() - start
    boxed = engine.segment(ct["path"], texts=["liver"], box=ct["box"])
    np.savez_compressed(output, text=result.label, box=boxed.label)
    return {"seconds": round(seconds, 2), "stage_seconds": result.stats["seconds"],
            "encoder_forwards": result.stats["encoder_forwards"], "prepare_seconds": round(prepare, 1),
            "categories": len(names), **backend.describe(), **_gpu_memory(device)}


def _preview(args, ct: dict, folder: str) -> dict:
    import numpy as np

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    precisions = ["fp32"] + [p for p in precisions if p != "fp32"]
    calibration = args.calibration or sorted(str(p) for p in (SHARED / "data" / "ibsi-sts-dev").glob("*_image.nii.gz"))
    table, outputs = {}, {}
    for precision in precisions:
        outputs[precision] = os.path.join(folder, f"preview_{precision}.npz")
        try:
            table[precision] = in_child(_run_preview, ct=ct, names=PREVIEW_NAMES, precision=precision,
                                        cache_dir=args.cache_dir, calibration=calibration, threads=args.threads,
                                        device=args.device,
                                        output=outputs[precision])
        except RuntimeError as error:
            table[precision] = {"error": str(error)}
    reference = np.load(outputs["fp32"]) if "error" not in table["fp32"] else None
    for precision in precisions:
        row = table[precision]
        if "error" in row or reference is None:
            continue
        row["time_ratio_vs_fp32"] = round(row["seconds"] / table["fp32"]["seconds"], 3)
        ours = np.load(outputs[precision])
        dice = {}
        for value, name in enumerate(PREVIEW_NAMES, start=1):
            a, b = ours["text"] == value, reference["text"] == value
            total = int(a.sum() + b.sum())
            dice[name] = 1.0 if total == 0 else round(2 * int((a & b).sum()) / total, 5)
        row["mask_dice_vs_fp32_text"] = {"mean": round(sum(dice.values()) / len(dice), 5),
                                         "min": min(dice.values()), "per_organ": dice}
        a, b = ours["box"] == 1, reference["box"] == 1
        total = int(a.sum() + b.sum())
        row["mask_dice_vs_fp32_text+box"] = 1.0 if total == 0 else round(2 * int((a & b).sum()) / total, 5)
        row["under_4s"] = row["seconds"] < 4.0
    return table


def run(args) -> dict:
    import torch

    names = NAMES[: args.categories]
    result = {"benchmark": "zoom", "device": args.device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "threads": args.threads or torch.get_num_threads(), "model": "official configuration, fill.py weights"}
    with tempfile.TemporaryDirectory() as folder:
        ct = make_ct(folder, args.shape)
        result["ct"] = {"shape": list(args.shape), "liver_box": ct["box"], "click": ct["click"]}
        if args.robot_dataset:
            result["robot_dataset"] = write_robot_dataset(args.robot_dataset, ct, args.shape)
        if "a" not in args.skip:
            result["a_reference"] = in_child(_run_reference, ct=ct, names=["liver"], with_box=True,
                                             threads=args.threads)
        if "b" not in args.skip:
            single = in_child(_run_ours_single, ct=ct, threads=args.threads, device=args.device)
            peak = single.pop("peak_rss_mb")
            result["b_ours"], result["c_ours_second_click"] = single["b"], single["c"]
            result["b_ours"]["peak_rss_mb"] = result["c_ours_second_click"]["peak_rss_mb"] = peak
        if "d" not in args.skip:
            result["d_ours_multi"] = in_child(_run_ours_multi, ct=ct, names=names, threads=args.threads,
                                              device=args.device)
            timed = names[: args.reference_categories] if args.reference_categories else names
            reference = in_child(_run_reference, ct=ct, names=timed, with_box=False, threads=args.threads)
            if len(timed) < len(names):
                factor = len(names) / len(timed)
                reference["extrapolated_from_categories"] = len(timed)
                reference["seconds"] = round(reference["seconds"] * factor, 2)
                reference["encoder_forwards"] = int(round(reference["encoder_forwards"] * factor))
                reference["windows"] = int(round(reference["windows"] * factor))
                reference["categories"] = len(names)
            result["a_reference_multi"] = reference
        if args.clicks:
            result["f_clicks"] = in_child(_run_clicks, ct=ct, clicks=args.clicks, threads=args.threads,
                                          device=args.device)
        if args.goals:
            precisions = [p.strip() for p in (args.precisions or "fp32").split(",") if p.strip()]
            result["g_goals"] = {}
            for precision in precisions:
                try:
                    result["g_goals"][precision] = in_child(_run_goals, ct=ct, names=PREVIEW_NAMES,
                                                            precision=precision, threads=args.threads,
                                                            device=args.device)
                except RuntimeError as error:
                    result["g_goals"][precision] = {"error": str(error)}
        if args.precisions:
            result["load_average_before_e"] = list(os.getloadavg())
            result["e_preview"] = _preview(args, ct, folder)
            result["load_average_after_e"] = list(os.getloadavg())
    result["goals"] = _goals(result)
    return result


def _goals(result: dict) -> dict:
    goals = {}
    a, b, c = result.get("a_reference"), result.get("b_ours"), result.get("c_ours_second_click")
    if a and b:
        goals["b_forwards_le_a"] = b["encoder_forwards"] <= a["encoder_forwards"]
        goals["b_seconds_le_a"] = b["seconds"] <= a["seconds"]
    if c:
        goals["c_under_3s_without_new_window"] = c["encoder_forwards"] == 0 and c["seconds"] < 3.0
    d, a10 = result.get("d_ours_multi"), result.get("a_reference_multi")
    if d and a10:
        goals["d_time_ratio"] = round(d["seconds"] / a10["seconds"], 3)
        goals["d_le_quarter_of_a"] = d["seconds"] <= a10["seconds"] / 4
    peaks = [v.get("peak_rss_mb", 0) for v in result.values() if isinstance(v, dict)]
    goals["peak_rss_mb_max"] = max(peaks) if peaks else None
    goals["peak_rss_under_6gb"] = bool(peaks) and max(peaks) < 6 * 1024
    return goals
