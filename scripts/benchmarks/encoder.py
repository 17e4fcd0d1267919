"""Image-encoder forward on one 32x256x256 window: every precision side by side (and, with --monai, vs MONAI's ViT).

Precisions (default, ``--precisions``): the official configuration with ``fill.py`` weights encodes the zoom-out
view of ``example_ct`` (real CT) with each encoder backend of ``segvol.accel``; per variant: median seconds, ratio to
fp32, peak RSS, largest absolute difference of the embedding from fp32, and the Dice of the final masks (the float32
decoder on that embedding) against fp32's for text + box and text-only prompts over ``--names``. Variants are
``precision[/runtime]``: ``fp32`` (PyTorch, exact), ``fp32/openvino``, ``bf16`` (OpenVINO bf16 on a CPU with native
bfloat16, else its fp32 fallback), ``bf16/torch`` (PyTorch autocast), ``int8`` (OpenVINO + NNCF, calibrated on
``--calibration`` CTs, 2 views each). Converted models are cached in ``--cache-dir`` (conversion time reported once).

With ``--monai`` (the earlier comparison, random weights):

Each variant runs in its own child process (so peak memory is its own) with the machine's threads, under
``torch.inference_mode``, after warm-up forwards; seconds are the median of ``--repeats`` forwards. Variants:

* ``monai_vit``: ``monai.networks.nets.ViT`` with the official configuration (what the reference runs);
* ``ours``: our encoder (fused ``scaled_dot_product_attention``), float32 — the default path;
* ``ours_manual_attention``: our encoder with attention computed like MONAI's (softmax of the full score matrix),
  to show what the fused attention alone gives;
* ``ours_bf16_autocast`` (with ``--extra``): bfloat16 autocast, reported for information (outside the parity
  tolerance, not used by default).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from ._measure import in_child


def add_arguments(parser) -> None:
    parser.add_argument("--precisions", default="fp32,fp32/openvino,bf16,bf16/torch,int8",
                        help="comma-separated variants precision[/runtime] ('' to skip)")
    parser.add_argument("--names", default="liver,spleen,kidney right,kidney left,stomach,aorta",
                        help="categories decoded for the mask Dice")
    parser.add_argument("--calibration", nargs="*", default=None,
                        help="CT files for int8 calibration (default: the four ibsi-sts-dev CTs)")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default ~/.cache/segvol/openvino)")
    parser.add_argument("--monai", action="store_true", help="also run the ours-vs-MONAI comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--extra", action="store_true", help="also time the bf16-autocast variant")


def _build_weights(path: str) -> None:
    import torch

    from segvol.config import OFFICIAL
    from segvol.modeling.image_encoder import ImageEncoder

    torch.manual_seed(0)
    encoder = ImageEncoder(OFFICIAL)
    torch.nn.init.normal_(encoder.patch_embedding.position_embeddings, std=0.02)
    torch.save(encoder.state_dict(), path)


def _time_variant(variant: str, weights: str, output: str, repeats: int, warmup: int, device: str,
                  threads: int) -> dict:
    import torch

    from segvol.config import OFFICIAL

    if threads:
        torch.set_num_threads(threads)
    state = torch.load(weights, weights_only=True)
    if variant == "monai_vit":
        from monai.networks.nets import ViT

        model = ViT(in_channels=1, img_size=OFFICIAL.image_size, patch_size=OFFICIAL.patch_size, hidden_size=768,
                    mlp_dim=3072, num_layers=12, num_heads=12, proj_type="perceptron", classification=False,
                    dropout_rate=0.0)
        model.load_state_dict(state, strict=False)

        def forward(x):
            return model(x)[0]
    else:
        from segvol.modeling import image_encoder as module

        if variant == "ours_manual_attention":
            def manual(q, k, v):
                scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
                return scores.softmax(dim=-1) @ v

            module.F.scaled_dot_product_attention = manual  # type: ignore[attr-defined]
        model = module.ImageEncoder(OFFICIAL)
        model.load_state_dict(state)

        def forward(x):
            return model(x).flatten(2).transpose(1, 2)

    model = model.to(device).eval()
    torch.manual_seed(1)
    image = torch.rand(1, 1, *OFFICIAL.image_size, device=device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=variant == "ours_bf16_autocast")
    seconds = []
    with torch.inference_mode(), autocast:
        for index in range(warmup + repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = forward(image)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if index >= warmup:
                seconds.append(time.perf_counter() - start)
    torch.save(out.float().cpu(), output)
    return {"seconds": round(statistics.median(seconds), 3), "seconds_all": [round(s, 3) for s in seconds],
            "threads": torch.get_num_threads()}


def _dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else round(2.0 * int((a & b).sum()) / total, 5)


def _time_precision(variant: str, names, calibration, cache_dir, output: str, repeats: int, warmup: int,
                    threads: int) -> dict:
    import numpy as np
    import torch

    from segvol import accel
    from segvol.io import read_image
    from segvol.preprocess import preprocess

    from .zoom import EXAMPLE, _model

    precision, _, runtime = variant.partition("/")
    model = _model(threads)
    volume = read_image(str(EXAMPLE / "example_ct.nii.gz"))
    prepared = preprocess(volume.array, volume.affine, model.config.image_size)
    views = None
    if precision == "int8":
        views = accel.calibration_views(calibration, model.config.image_size, per_image=2)
    start = time.perf_counter()
    backend = accel.accelerate(model, precision, cache_dir=cache_dir, calibration=views, runtime=runtime or None)
    prepare = time.perf_counter() - start
    image = torch.from_numpy(np.ascontiguousarray(prepared.zoom_out)).reshape(1, 1, *model.config.image_size)
    seconds = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            embedding = model.encode_image(image).float()
            if index >= warmup:
                seconds.append(time.perf_counter() - start)
        text = model.encode_text(list(names))
        # text + a box around the body (the whole zoom view minus a margin) and text only
        size = model.config.image_size
        box = torch.tensor([[2, 8, 8, size[0] - 3, size[1] - 9, size[2] - 9]], dtype=torch.float32)
        masks = {}
        for prompt, boxes in (("text+box", box.repeat(len(names), 1)), ("text", None)):
            low = model.decode(embedding, text, boxes)
            masks[prompt] = (model.upsample(low)[:, 0] > 0).cpu()
    torch.save({"embedding": embedding.cpu(), "masks": masks}, output)
    return {"seconds": round(statistics.median(seconds), 3), "seconds_all": [round(s, 3) for s in seconds],
            "prepare_seconds": round(prepare, 1), "threads": torch.get_num_threads(), **backend.describe()}


def _precisions(args, result: dict, tmp: str) -> None:
    import torch

    from .zoom import SHARED

    variants = [v.strip() for v in args.precisions.split(",") if v.strip()]
    if not variants:
        return
    if variants[0] != "fp32":
        variants = ["fp32"] + [v for v in variants if v != "fp32"]
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    calibration = args.calibration or sorted(str(p) for p in (SHARED / "data" / "ibsi-sts-dev").glob("*_image.nii.gz"))
    table = {}
    outputs = {}
    for variant in variants:
        outputs[variant] = os.path.join(tmp, variant.replace("/", "_") + ".pt")
        try:
            table[variant] = in_child(_time_precision, variant=variant, names=names, calibration=calibration,
                                      cache_dir=args.cache_dir, output=outputs[variant], repeats=args.repeats,
                                      warmup=args.warmup, threads=args.threads)
        except RuntimeError as error:
            table[variant] = {"error": str(error)}
    reference = torch.load(outputs["fp32"], weights_only=True)
    for variant in variants:
        row = table[variant]
        if "error" in row:
            continue
        ours = torch.load(outputs[variant], weights_only=True)
        row["time_ratio_vs_fp32"] = round(row["seconds"] / table["fp32"]["seconds"], 3)
        row["max_abs_diff_vs_fp32"] = float((ours["embedding"] - reference["embedding"]).abs().max())
        for prompt, masks in ours["masks"].items():
            dice = [_dice(m, r) for m, r in zip(masks, reference["masks"][prompt])]
            row[f"mask_dice_vs_fp32_{prompt}"] = {"mean": round(sum(dice) / len(dice), 5), "min": min(dice)}
    result["precisions"] = table
    result["precision_setup"] = {"model": "official configuration, fill.py weights", "image": "example_ct zoom-out",
                                 "names": names, "calibration": [os.path.basename(c) for c in calibration]}


def run(args) -> dict:
    import torch

    from segvol import accel

    result = {"benchmark": "encoder", "input": [1, 1, 32, 256, 256], "device": args.device,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "openvino": accel.openvino_available(),
              "cpu_bf16_native": accel.cpu_bf16_native(), "load_average_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        _precisions(args, result, tmp)
    result["load_average_after"] = list(os.getloadavg())
    if not args.monai:
        return result
    variants = ["monai_vit", "ours", "ours_manual_attention"] + (["ours_bf16_autocast"] if args.extra else [])
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "encoder.pt")
        _build_weights(weights)
        outputs = {}
        for variant in variants:
            outputs[variant] = os.path.join(tmp, f"{variant}.pt")
            result[variant] = in_child(_time_variant, variant=variant, weights=weights, output=outputs[variant],
                                       repeats=args.repeats, warmup=args.warmup, device=args.device,
                                       threads=args.threads)
        reference = torch.load(outputs["monai_vit"], weights_only=True)
        for variant in variants[1:]:
            ours = torch.load(outputs[variant], weights_only=True)
            result[variant]["max_abs_diff_vs_monai"] = float((ours - reference).abs().max())
            result[variant]["allclose_1e-3"] = bool(torch.allclose(ours, reference, atol=1e-3, rtol=1e-3))
            ratio = result[variant]["seconds"] / result["monai_vit"]["seconds"]
            result[variant]["time_ratio_vs_monai"] = round(ratio, 3)
    return result
