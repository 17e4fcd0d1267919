"""Image-encoder forward on one 32x256x256 window: ours vs MONAI's ViT (the reference's encoder), same weights.

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


def run(args) -> dict:
    import torch

    variants = ["monai_vit", "ours", "ours_manual_attention"] + (["ours_bf16_autocast"] if args.extra else [])
    result = {"benchmark": "encoder", "input": [1, 1, 32, 256, 256], "device": args.device,
              "cpu_count": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "encoder.pt")
        _build_weights(weights)
        outputs = {}
        for variant in variants:
            outputs[variant] = os.path.join(tmp, f"{variant}.pt")
            result[variant] = in_child(_time_variant, variant=variant, weights=weights, output=outputs[variant],
                                       repeats=args.repeats, warmup=args.warmup, device=args.device,
                                       threads=args.threads)
        reference = torch.load(outputs["monai_vit"])
        for variant in variants[1:]:
            ours = torch.load(outputs[variant])
            result[variant]["max_abs_diff_vs_monai"] = float((ours - reference).abs().max())
            result[variant]["allclose_1e-3"] = bool(torch.allclose(ours, reference, atol=1e-3, rtol=1e-3))
            result[variant]["time_ratio_vs_monai"] = round(result[variant]["seconds"] / result["monai_vit"]["seconds"], 3)
    return result
