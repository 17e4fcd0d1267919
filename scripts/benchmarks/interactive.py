"""The robot annotator: Dice, NSD and seconds after a box and each corrective click, per structure (CVPR 2025 protocol).

    python scripts/benchmark.py interactive --data ../shared/data/openkbp-dev --cases=-10: \\
        --checkpoint base=models/ --checkpoint tuned=apps/segvol/model/segvol_finetuned.pt
    python scripts/benchmark.py interactive --datastore ./datastore --server http://127.0.0.1:8000

Protocols (``--starts``, both by default), per structure of every case:

* ``box``: the CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" protocol: the
  structure's 3D bounding box, then ``--clicks`` corrective clicks (5), each added to the earlier prompts;
* ``text``: SegVol's way: the structure's text prompt alone, then text + box, then the clicks.

A click goes to the voxel farthest (Euclidean, mm) from the boundary of the largest 26-connected error region:
positive on missed foreground, negative on over-segmentation (``segvol.interaction``). ``--noc`` keeps clicking up
to 20 interactions until the Dice reaches 0.90, so NoC@80/85/90 are known.

Inputs: ``--data`` a dataset folder laid out like ../shared/data/openkbp-dev (``dataset.json``), or ``--datastore`` a
MONAI Label local datastore (its final labels, named by their ``label_info``, else each value is the app's /info
index); ``--cases`` a slice; ``--structures`` label names to keep; ``--names`` a JSON file or ``Name=prompt,...``
mapping label names to text prompts (default: the vocabulary's spelling, else the name as free text);
``--checkpoint [label=]path`` one or more models side by side (in process), or ``--server URL`` to go through a
running server as the Python client does (``MONAILabelClient.infer`` on the ``segvol`` model, one ``client_id`` so
the server reuses its image session; images the server's datastore lacks are uploaded).

Output: one JSON line (per model and protocol: mean and per-structure Dice and NSD per step, DSC_AUC, NSD_AUC, final
DSC/NSD, NoC@80/85/90; latency of the first request on each image and of each click, server-reported and round
trip), the plot ``<out>/interactive.png`` (Dice per interaction, per structure and mean) and every step of every
structure in ``<out>/traces.json``. Progress goes to stderr.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"

log = logging.getLogger("benchmark.interactive")


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset folder with dataset.json (the layout of ../shared/data/openkbp-dev)")
    source.add_argument("--datastore", help="MONAI Label local datastore folder (its final labels)")
    parser.add_argument("--cases", default=":", help="Python slice of the cases, e.g. -10: (default: all)")
    parser.add_argument("--structures", default="", help="comma-separated label names to annotate (default: all)")
    parser.add_argument("--names", default="",
                        help="label name -> text prompt: a JSON file ({name: prompt}) or Name=prompt,Name=prompt")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="[label=]checkpoint file or folder, repeatable: models side by side (in process)")
    parser.add_argument("--server", default="", help="run through a SegVol Label server at this URL instead")
    parser.add_argument("--token", default=os.environ.get("SEGVOL_AUTH_TOKEN", ""),
                        help="the server's auth token (default $SEGVOL_AUTH_TOKEN)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="CLIP tokenizer folder (in process)")
    parser.add_argument("--starts", default="box,text", help="protocols: box (CVPR 2025), text (text, text+box)")
    parser.add_argument("--clicks", type=int, default=5, help="corrective clicks after the start steps")
    parser.add_argument("--noc", action="store_true", help="click on (up to 20 interactions) until Dice 0.90")
    parser.add_argument("--mode", default="zoom_out_zoom_in", help="zoom_out_zoom_in or zoom_out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "interactive"), help="folder for the plot and traces")


def parse_names(text: str) -> dict:
    if not text:
        return {}
    if os.path.isfile(text):
        with open(text) as handle:
            mapping = json.load(handle)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise SystemExit(f"--names {text}: expected a JSON object {{label name: text prompt}}")
        return mapping
    mapping = {}
    for item in text.split(","):
        name, separator, prompt = item.partition("=")
        if not separator or not name.strip() or not prompt.strip():
            raise SystemExit(f"--names: expected Name=prompt pairs separated by commas, got {item!r}")
        mapping[name.strip()] = prompt.strip()
    return mapping


def load_cases(args, vocabulary):
    from segvol.training.data import cases_from_datastore, load_dataset, parse_case_slice

    cases_slice = parse_case_slice(args.cases) or slice(None)
    if args.data:
        return load_dataset(args.data, cases_slice)
    from monailabel.datastore.local import LocalDatastore

    datastore = LocalDatastore(args.datastore, extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=False)
    # a label without label_info is read the way the app's own results are numbered: value = /info index
    by_index = {index: name for name, index in vocabulary.labels().items()}
    cases = cases_from_datastore(datastore, by_index, pseudo_tag="")[cases_slice]
    if not cases:
        raise SystemExit(f"{args.datastore}: no final labels to annotate")
    return cases


class ServerSegmenter:
    """One image on a running server through ``MONAILabelClient`` (what scripts and the Slicer plugin use): the
    ``segvol`` model with ``texts``, ``box``, ``points`` + ``point_labels`` and a fixed ``client_id``."""

    def __init__(self, client, image_id: str, folder: str):
        self.client, self.image_id, self.folder = client, image_id, folder

    def __call__(self, prompts):
        import numpy as np

        from segvol.io import read_image

        params = {"result_extension": ".nii.gz", "free_text": True,
                  "points": [list(p[:3]) for p in prompts.points], "point_labels": [p[3] for p in prompts.points]}
        if prompts.texts:
            params["texts"] = list(prompts.texts)
        if prompts.box is not None:
            params["box"] = [int(v) for v in prompts.box]
        tick = time.perf_counter()
        path, response = self.client.infer("segvol", self.image_id, params)
        round_trip = time.perf_counter() - tick
        try:
            mask = np.asarray(read_image(path).array) > 0
        finally:
            os.unlink(path)
        total = (response.get("latencies") or {}).get("total")
        return mask, {"server_s": None if total is None else float(total), "round_trip_s": round_trip}


def _server_cases(args, cases, folder):
    """-> (client, {case id: image id}); images the server's datastore does not list are uploaded."""
    from monailabel.client import MONAILabelClient

    from segvol.io import strip_image_suffix

    client = MONAILabelClient(args.server, tmpdir=folder, client_id="segvol-robot")
    if args.token:
        client.update_auth({"token_type": "Bearer", "access_token": args.token})
    listed = set(client.datastore().get("objects", {}))
    ids = {}
    for case in cases:
        image_id = strip_image_suffix(os.path.basename(case.image))
        if image_id not in listed:
            log.info("uploading %s to the server's datastore as %s", case.image, image_id)
            client.upload_image(case.image, image_id=image_id)
        ids[case.id] = image_id
    return client, ids


def run(args) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s] %(message)s")
    logging.getLogger("segvol.engine").setLevel(logging.WARNING)
    import torch

    from segvol.interaction import STARTS, annotate
    from segvol.vocabulary import Vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.server:
        from segvol.memory import keep_large_arrays

        keep_large_arrays()  # as the server does at start
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    unknown = [s for s in starts if s not in STARTS]
    if unknown:
        raise SystemExit(f"--starts: unknown {unknown}; use {list(STARTS)}")
    if args.server and args.checkpoint:
        raise SystemExit("--server runs the model the server serves: give --checkpoint only without --server")
    if not args.server and not args.checkpoint:
        raise SystemExit("give --checkpoint (in process) or --server URL")
    names = parse_names(args.names)
    vocabulary = Vocabulary.load()

    def resolve(name: str) -> str:
        return names.get(name) or vocabulary.resolve(name, allow_free_text=True)

    cases = load_cases(args, vocabulary)
    structures = [s.strip() for s in args.structures.split(",") if s.strip()] or None
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    models = {}
    with tempfile.TemporaryDirectory(prefix="segvol_robot_") as folder:
        if args.server:
            client, ids = _server_cases(args, cases, folder)
            models["server"] = annotate(cases, lambda case: ServerSegmenter(client, ids[case.id], folder), resolve,
                                        starts, args.clicks, args.noc, structures, progress=log.info)
            models["server"]["model"] = args.server
        for item in args.checkpoint:
            label, separator, path = item.partition("=")
            if not separator:
                label, path = os.path.basename(os.path.normpath(item)), item
            models[label] = _in_process(path, args, cases, resolve, starts, structures)
    traces = {label: report.pop("traces") for label, report in models.items()}
    with open(os.path.join(out, "traces.json"), "w") as handle:
        json.dump(traces, handle)
    plot_path = os.path.join(out, "interactive.png")
    plot(models, plot_path)
    return {"benchmark": "interactive", "data": args.data or args.datastore, "cases": len(cases),
            "protocol": {"starts": starts, "clicks": args.clicks, "noc": args.noc, "mode": args.mode,
                         "click_rule": "largest 26-connected error region, deepest voxel (EDT in mm)",
                         "nsd_tolerance_mm": 2.0, "auc": "trapezoid over the predictions after each click"},
            "models": models, "plot": plot_path, "traces": os.path.join(out, "traces.json"),
            "minutes": round((time.time() - started) / 60.0, 2)}


def _in_process(path, args, cases, resolve, starts, structures) -> dict:
    import segvol
    from segvol.engine import SegVolEngine
    from segvol.interaction import EngineSegmenter, annotate

    tick = time.perf_counter()
    model = segvol.load_model(path, device=args.device, tokenizer=args.tokenizer)
    engine = SegVolEngine(model, mode=args.mode)
    load_seconds = time.perf_counter() - tick
    report = annotate(cases, lambda case: EngineSegmenter(engine, case.image, args.mode), resolve, starts,
                      args.clicks, args.noc, structures, progress=log.info)
    report["model"] = {"checkpoint": os.path.abspath(path), "load_s": round(load_seconds, 2)}
    engine.clear_cache()
    return report


def plot(models: dict, path: str) -> None:
    """Dice per interaction: one panel per protocol, the mean (thick) and each structure (thin) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = sorted({s for report in models.values() for s in report["starts"]})
    if not starts:
        return
    figure, axes = plt.subplots(1, len(starts), figsize=(6.5 * len(starts), 4.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, start in zip(axes[0], starts):
        for number, (label, report) in enumerate(models.items()):
            result = report["starts"].get(start)
            if not result:
                continue
            colour = colours[number % len(colours)]
            steps = list(range(1, len(result["mean"]["dice"]) + 1))
            axis.plot(steps, result["mean"]["dice"], "o-", color=colour, linewidth=2.5, label=f"{label}: mean")
            for row in result["per_structure"].values():
                axis.plot(list(range(1, len(row["dice"]) + 1)), row["dice"], "-", color=colour, alpha=0.3,
                          linewidth=1)
        ticks = max((models[m]["starts"][start]["steps"] for m in models if start in models[m]["starts"]), key=len)
        axis.set_xticks(list(range(1, len(ticks) + 1)))
        axis.set_xticklabels([t.replace("click ", "c") for t in ticks], rotation=45, fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_xlabel("interaction")
        axis.set_ylabel("Dice")
        axis.set_title(f"{start} first (thin: each structure)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
