#!/usr/bin/env python
"""Compute SegVol FH pseudo-label maps for every image of a folder, in parallel with Dask.

    python scripts/pseudo_labels.py --input IMAGES_DIR --output LABELS_DIR
    python scripts/pseudo_labels.py --input DATASTORE_DIR            # -> DATASTORE_DIR/labels/fh/
    python scripts/pseudo_labels.py --input DIR --output OUT --scheduler tcp://host:8786
    python scripts/pseudo_labels.py --input DIR --output OUT --synchronous   # no Dask, in-process

Input: a folder of NIfTI images (``--pattern``, default ``*.nii.gz,*.nii``; not recursive), or a
MONAI Label local datastore (a folder with ``.datastore.json`` or ``labels/final``): its images,
with ``labels/final/<image>`` as ground truth when present; the pseudo labels then go to the
datastore's own label tag folder ``labels/<--tag>/`` (default ``labels/fh/``), which the MONAI
Label datastore picks up as the label tag ``fh``.  A plain folder may name a ground-truth folder
with ``--ground-truth DIR`` (same file names).

Output: one ``<image id>.nii.gz`` int16/int32 label map per image, with the image's affine (see
``segvol.fh.pseudo_labels`` for the id scheme: 0 unlabelled, ground-truth ids unchanged, FH
regions from 1001).  Existing outputs are skipped (``--overwrite`` recomputes them).  Each file
is written to ``<output>/.partial/`` first, flushed, then renamed into place, so an interrupt
never leaves a half-written label map.

Parallelism: a local Dask cluster (``--workers`` processes, one thread each; numba then uses
``cpu_count // workers`` threads per task) unless ``--scheduler ADDRESS`` names an existing
cluster, whose workers must have this project's ``segvol`` package installed.  A task that
raises is retried ``--retries`` times; a task whose worker dies is rescheduled by Dask on
another worker (up to ``distributed.scheduler.allowed-failures``).  A case that still fails is
reported and the others go on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------
def image_id(filename: str) -> str:
    from segvol.io import strip_image_suffix

    return strip_image_suffix(filename)


def is_datastore(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ".datastore.json")) or os.path.isdir(
        os.path.join(folder, "labels", "final")
    )


def find_cases(
    input_dir: str,
    output_dir: Optional[str],
    patterns: List[str],
    ground_truth_dir: Optional[str],
    tag: str,
    use_gt: bool,
) -> Tuple[List[Dict[str, Optional[str]]], str]:
    """[{image, output, ground_truth}], output folder."""
    input_dir = os.path.abspath(input_dir)
    if not os.path.isdir(input_dir):
        raise SystemExit(f"--input {input_dir} is not a folder")
    datastore = is_datastore(input_dir)
    if output_dir is None:
        if not datastore:
            raise SystemExit("--output is required unless --input is a MONAI Label datastore")
        output_dir = os.path.join(input_dir, "labels", tag)
    if datastore and ground_truth_dir is None:
        ground_truth_dir = os.path.join(input_dir, "labels", "final")
    output_dir = os.path.abspath(output_dir)
    cases = []
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if name.startswith(".") or not os.path.isfile(path) or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        case_id = image_id(name)
        gt = None
        if use_gt and ground_truth_dir:
            from segvol.io import NIFTI_SUFFIXES

            for ext in NIFTI_SUFFIXES:
                candidate = os.path.join(ground_truth_dir, case_id + ext)
                if os.path.isfile(candidate):
                    gt = candidate
                    break
        cases.append({"image": path, "output": os.path.join(output_dir, case_id + ".nii.gz"), "ground_truth": gt})
    return cases, output_dir


# ----------------------------------------------------------------------------------------------
# one case (runs on a Dask worker or in-process)
# ----------------------------------------------------------------------------------------------
def _squeeze3(array, what: str):
    """``segvol.io.read_image`` already drops trailing singleton axes: what is left must be 3-D."""
    if array.ndim != 3:
        raise ValueError(f"{what} must be 3-D, got shape {array.shape}")
    return array


def write_label_atomic(labels, reference, output_path: str) -> None:
    """Save ``labels`` on the reference ``segvol.io.Volume``'s grid (affine and NIfTI header) with
    ``segvol.io.write_label``: int16 (int32 when needed), temp file in ``.partial/``, fsync, rename."""
    import numpy as np

    from segvol.io import write_label

    dtype = np.int16 if labels.size == 0 or (labels.min() >= -32768 and labels.max() <= 32767) else np.int32
    write_label(output_path, labels, reference.affine, reference.header, dtype=dtype, atomic=True)


def process_case(
    case: Dict[str, Optional[str]], params: Dict[str, Any], numba_threads: Optional[int] = None
) -> Dict[str, Any]:
    """Compute and write one pseudo-label map; returns a small summary."""
    import numpy as np

    from segvol import fh
    from segvol.io import read_image, spacing

    if numba_threads:
        import numba

        numba.set_num_threads(max(1, min(int(numba_threads), numba.config.NUMBA_NUM_THREADS)))
    start = time.perf_counter()
    image = read_image(case["image"])  # the project's one image reader and spacing rule (segvol.io)
    volume = _squeeze3(np.asarray(image.array, dtype=np.float32), "image")
    ground_truth = None
    if case.get("ground_truth"):
        ground_truth = _squeeze3(np.asarray(read_image(case["ground_truth"]).array), "ground truth")
    labels = fh.pseudo_labels(volume, spacing(image.affine), ground_truth, **params)
    del volume, ground_truth
    write_label_atomic(labels, image, case["output"])
    fh_ids = np.unique(labels[labels > params.get("fh_offset", fh.FH_ID_OFFSET)])
    return {
        "image": os.path.basename(case["image"]),
        "regions": int(fh_ids.size),
        "seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of NIfTI images, or a MONAI Label local datastore")
    parser.add_argument("--output", help="output folder (default for a datastore: <input>/labels/<tag>)")
    parser.add_argument("--tag", default="fh", help="datastore label tag (folder under labels/) (default: fh)")
    parser.add_argument("--pattern", default="*.nii.gz,*.nii", help="comma-separated image file patterns")
    parser.add_argument("--ground-truth", help="folder of ground-truth label maps named like the images")
    parser.add_argument(
        "--no-ground-truth", action="store_true", help="ignore ground truth (also a datastore's labels/final)"
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (default: start a local cluster)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="local cluster worker processes (default: CPU count, at most one per image)",
    )
    parser.add_argument(
        "--memory-limit", default="auto", help="local cluster memory limit per worker (Dask syntax, default auto)"
    )
    parser.add_argument("--synchronous", action="store_true", help="run in this process without Dask (debugging)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failing case (default 2)")
    parser.add_argument(
        "--k", type=float, default=None, help="FH scale k for [0,1] intensities (default segvol.fh.DEFAULT_K)"
    )
    parser.add_argument(
        "--sigma", type=float, default=None, help="Gaussian sigma in mm (default segvol.fh.DEFAULT_SIGMA)"
    )
    parser.add_argument("--connectivity", type=int, default=6, choices=(6, 10, 18, 26))
    parser.add_argument("--method", default="fh", choices=("fh", "reference"))
    parser.add_argument(
        "--min-fraction", type=float, default=None, help="cleaning threshold, fraction of the volume (default 0.001)"
    )
    parser.add_argument("--working-shape", default=None, help="run FH on this XxYxZ grid (e.g. 256x256x32)")
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=None,
        help="run FH on a uniformly shrunk grid for volumes with more voxels (default 256*256*32; 0: native)",
    )
    return parser.parse_args(argv)


def _params(args) -> Dict[str, Any]:
    params: Dict[str, Any] = {"connectivity": args.connectivity, "method": args.method}
    if args.k is not None:
        params["k"] = args.k
    if args.sigma is not None:
        params["sigma"] = args.sigma
    if args.min_fraction is not None:
        params["min_fraction"] = args.min_fraction
    if args.max_voxels is not None:
        params["max_voxels"] = args.max_voxels or None
    if args.working_shape:
        params["working_shape"] = tuple(int(v) for v in args.working_shape.lower().split("x"))
        if len(params["working_shape"]) != 3:
            raise SystemExit("--working-shape must be XxYxZ")
    return params


def _run_synchronous(todo, params, bar) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    done, failed = [], []
    for case in todo:
        try:
            done.append(process_case(case, params))
        except Exception as error:  # report and go on
            failed.append((case["image"], f"{type(error).__name__}: {error}"))
        bar.update(1)
    return done, failed


def _run_dask(todo, params, args, bar) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    numba_threads = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cpus = os.cpu_count() or 1
        workers = args.workers if args.workers > 0 else cpus
        workers = max(1, min(workers, len(todo)))
        numba_threads = max(1, cpus // workers)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.memory_limit,
            dashboard_address=None,
        )
        client = Client(cluster)
    done, failed = [], []
    futures = {}
    try:
        for case in todo:
            future = client.submit(
                process_case,
                case,
                params,
                numba_threads,
                key=f"pseudo-labels-{uuid.uuid4().hex}",
                retries=args.retries,
                pure=False,
            )
            futures[future] = case
        for future in as_completed(list(futures)):
            case = futures[future]
            try:
                done.append(future.result())
            except Exception as error:  # includes KilledWorker after repeated worker deaths
                failed.append((case["image"], f"{type(error).__name__}: {error}"))
            bar.update(1)
    finally:
        for future in futures:
            future.cancel()
        client.close()
        if cluster is not None:
            cluster.close()
    return done, failed


def main(argv=None) -> int:
    args = parse_args(argv)
    patterns = [p.strip() for p in args.pattern.split(",") if p.strip()]
    cases, output_dir = find_cases(
        args.input, args.output, patterns, args.ground_truth, args.tag, not args.no_ground_truth
    )
    params = _params(args)
    if os.path.abspath(output_dir) == os.path.abspath(args.input):
        raise SystemExit("--output must differ from --input")
    os.makedirs(output_dir, exist_ok=True)
    todo = [c for c in cases if args.overwrite or not os.path.exists(c["output"])]
    skipped = len(cases) - len(todo)
    print(
        f"{len(cases)} images in {args.input}; {skipped} already done, {len(todo)} to compute -> {output_dir}",
        flush=True,
    )
    done: List[Dict[str, Any]] = []
    failed: List[Tuple[str, str]] = []
    if todo:
        from tqdm import tqdm

        with tqdm(total=len(todo), unit="image", desc="pseudo labels", file=sys.stderr) as bar:
            try:
                if args.synchronous:
                    done, failed = _run_synchronous(todo, params, bar)
                else:
                    done, failed = _run_dask(todo, params, args, bar)
            except KeyboardInterrupt:
                print("interrupted: finished outputs are complete, nothing half-written", file=sys.stderr)
                return 130
    from segvol.io import PARTIAL_DIR

    partial = os.path.join(output_dir, PARTIAL_DIR)
    if os.path.isdir(partial) and not os.listdir(partial):
        os.rmdir(partial)
    for image, message in failed:
        print(f"FAILED {image}: {message}", file=sys.stderr)
    print(f"computed {len(done)}, skipped {skipped}, failed {len(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
