"""Batch segmentation of many CTs, in-process or over a Dask cluster (``scripts/segment.py --input-dir``).

Every image is one task, ``segment_one(job, options)``, which is idempotent:

* it returns at once (``"status": "exists"``) when the output is already there, so a re-run, or Dask retrying a task
  whose worker died after writing, never writes an output twice;
* the label is written to ``<output folder>/.partial/<pid>-<hex>-<name>`` (fsynced) and renamed over the output:
  a reader (or a MONAI Label datastore scanning ``labels/<tag>/``) sees the previous state or the whole new file;
* the model is loaded once per worker process (``_engine``: a process-wide cache keyed by checkpoint, device,
  precision and engine options), on the worker's GPU when it has one (``device="auto"``).

``run_batch`` submits the jobs to ``scheduler`` (``"local"``: a ``LocalCluster`` with ``workers`` processes; an
address such as ``tcp://host:8786``: an existing cluster whose workers see the same files; None: in this process) and
yields one result dict per image as they finish. Dask reschedules the task of a worker that dies (up to
``distributed.scheduler.allowed-failures`` times) and ``retries`` re-runs a task that raised.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

from .io import PARTIAL_DIR, atomic_output, parse_temp_name, writer_alive

logger = logging.getLogger("segvol.batch")

_ENGINES: Dict[tuple, Any] = {}
_ENGINES_LOCK = threading.Lock()


def engine_key(options: Dict[str, Any]) -> tuple:
    return tuple((k, str(options.get(k))) for k in ("checkpoint", "tokenizer", "device", "precision", "mode",
                                                     "overlap", "reorient", "cache_dir", "calibration"))


def _engine(options: Dict[str, Any]):
    """The engine for ``options`` in this process, loaded on first use (one model per worker process)."""
    key = engine_key(options)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            import segvol
            from segvol.engine import SegVolEngine

            started = time.perf_counter()
            extra = {k: options[k] for k in ("cache_dir", "calibration") if options.get(k)}
            model = segvol.load_model(options["checkpoint"], device=options.get("device") or "auto",
                                      tokenizer=options.get("tokenizer"), precision=options.get("precision") or "fp32",
                                      **extra)
            engine = SegVolEngine(model, mode=options.get("mode") or "zoom_out_zoom_in",
                                  overlap=float(options.get("overlap", 0.5)),
                                  reorient=bool(options.get("reorient", True)),
                                  cache_mb=float(options.get("cache_mb", 1024)))
            engine.load_seconds = time.perf_counter() - started
            _ENGINES.clear()  # one model per process: a new configuration replaces the old one
            _ENGINES[key] = engine
            logger.info("worker %d loaded %s (%s) in %.1f s", os.getpid(), options["checkpoint"],
                        getattr(model, "precision_info", {"precision": "fp32"}), engine.load_seconds)
        return engine


def atomic_write_label(target: str, label, affine, header=None) -> None:
    from .io import write_label

    write_label(target, label, affine, header, atomic=True)


def write_probability(label_path: str, name: str, probability, affine) -> str:
    """``<label stem>_prob_<name>.nii.gz`` beside the label, float32, written atomically."""
    import nibabel as nib
    import numpy as np

    stem = label_path[:-7] if label_path.endswith(".nii.gz") else os.path.splitext(label_path)[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    target = f"{stem}_prob_{safe}.nii.gz"
    with atomic_output(target, temp_dir=os.path.join(os.path.dirname(os.path.abspath(target)), PARTIAL_DIR)) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(probability, dtype=np.float32), affine), tmp)
    return target


def write_result(target: str, result, engine, started: float, load_seconds: float) -> Dict[str, Any]:
    """Write one image's label (and probabilities) atomically -> its report fields (the JSON line of segment.py)."""
    import resource

    atomic_write_label(target, result.label, result.affine, result.header)
    for name, probability in (result.probabilities or {}).items():
        write_probability(target, name, probability, result.affine)
    stats = result.stats
    return {
        "labels": result.labels,
        "voxels": {name: int((result.label == value).sum()) for name, value in result.labels.items()},
        "seconds": {**stats["seconds"], "wall": round(time.perf_counter() - started, 3)},
        "encoder_forwards": stats["encoder_forwards"],
        "decoder_calls": stats["decoder_calls"],
        "decoded_prompts": stats["decoded_prompts"],
        "windows_used": stats["windows"]["used"],
        "windows_skipped": stats["windows"]["skipped"],
        "prompts_dropped": stats["prompts_dropped"],
        "device": str(engine.model.device),
        "precision": engine.precision,
        "model_load_seconds": round(load_seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def segment_one(job: Dict[str, Any], options: Dict[str, Any]) -> Dict[str, Any]:
    """Segment ``job["image"]`` into ``job["out"]`` (skipped when it exists unless ``options["overwrite"]``)."""
    from .errors import SegVolInputError

    image, target = job["image"], job["out"]
    line: Dict[str, Any] = {"image": image, "out": target, "worker_pid": os.getpid()}
    if os.path.exists(target) and not options.get("overwrite"):
        line["status"] = "exists"
        return line
    engine = _engine(options)
    start = time.perf_counter()
    try:
        result = engine.segment(image, texts=options.get("texts"), box=job.get("box"), points=job.get("points"),
                                return_probabilities=bool(options.get("probabilities")))
    except SegVolInputError as error:
        line.update({"status": "error", "error": str(error), "type": type(error).__name__})
        return line
    line.update({"status": "written", **write_result(target, result, engine, start,
                                                     getattr(engine, "load_seconds", 0.0))})
    journal = options.get("journal")
    if journal:  # one line per output actually written (audit: every output once)
        with open(journal, "a") as handle:
            handle.write(json.dumps({"image": image, "out": target, "pid": os.getpid(), "time": time.time()}) + "\n")
    return line


def _gpu_workers(client) -> int:
    try:
        found = client.run(lambda: __import__("torch").cuda.device_count())
        return sum(1 for n in found.values() if n)
    except Exception:  # pragma: no cover - a worker without torch
        return 0


def run_batch(jobs: List[Dict[str, Any]], options: Dict[str, Any], scheduler: Optional[str] = None,
              workers: int = 0, retries: int = 2, progress: bool = True) -> Iterator[Dict[str, Any]]:
    """Segment every job; yields result lines as they finish (``status``: written, exists, error, failed)."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), unit="image", desc="segvol", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    remove_dead_partials(jobs)  # what writers killed in an earlier run left behind
    try:
        if not scheduler:
            for job in jobs:
                try:
                    line = segment_one(job, options)
                except Exception as error:  # report and go on
                    line = {"image": job["image"], "out": job["out"], "status": "failed",
                            "error": f"{type(error).__name__}: {error}"}
                if bar is not None:
                    bar.update(1)
                yield line
            return
        yield from _run_dask(jobs, options, scheduler, workers, retries, bar)
        remove_dead_partials(jobs)  # a worker killed while writing left its temp file; every task is done now
    finally:
        if bar is not None:
            bar.close()


def remove_dead_partials(jobs: List[Dict[str, Any]]) -> List[str]:
    """Remove the temp files of these jobs' outputs (``.partial/<pid>-<hex>-<name>``) whose writer process is gone
    (``segvol.io.writer_alive``; a file of a live process, here or one a remote pid happens to match, is left).
    -> the removed paths."""
    removed = []
    for folder, names in _partials_by_folder(jobs).items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            path, parsed = os.path.join(folder, entry), parse_temp_name(entry)
            if parsed and parsed[1] in names and not writer_alive(parsed[0], path):
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass
    if removed:
        logger.info("removed %d temp file(s) of writers that died: %s", len(removed),
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


def _partials_by_folder(jobs: List[Dict[str, Any]]) -> Dict[str, set]:
    folders: Dict[str, set] = {}
    for job in jobs:
        out = os.path.abspath(job["out"])
        folders.setdefault(os.path.join(os.path.dirname(out), PARTIAL_DIR), set()).add(os.path.basename(out))
    return folders


def _run_dask(jobs, options, scheduler, workers, retries, bar) -> Iterator[Dict[str, Any]]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == "local":
        import torch

        gpus = torch.cuda.device_count()
        cpus = os.cpu_count() or 1
        # one model per worker: on CPU the model takes all the cores it is given, so few workers with several threads
        count = workers or (gpus if gpus else max(1, cpus // 4))
        count = max(1, min(count, len(jobs) or 1))
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None,
                               memory_limit=0)
        if gpus and not workers:
            logger.info("local cluster: %d GPU workers", count)
        client = Client(cluster)
        if not gpus:
            threads = max(1, cpus // count)
            client.run(lambda: __import__("torch").set_num_threads(threads))
    else:
        client = Client(scheduler)
    logger.info("dask scheduler %s: %d workers (%d with a GPU)", client.scheduler.address,
                len(client.scheduler_info().get("workers", {})), _gpu_workers(client))
    futures = {}
    try:
        for job in jobs:
            # a stable key per output: submitting the same output twice in one run makes one task
            key = f"segvol-{uuid.uuid5(uuid.NAMESPACE_URL, os.path.abspath(job['out'])).hex}"
            future = client.submit(segment_one, job, options, key=key, retries=retries, pure=False)
            futures[future] = job
        for future in as_completed(list(futures)):
            job = futures[future]
            try:
                line = future.result()
            except Exception as error:  # KilledWorker after repeated deaths, or an exception after the retries
                line = {"image": job["image"], "out": job["out"], "status": "failed",
                        "error": f"{type(error).__name__}: {error}"}
            if bar is not None:
                bar.update(1)
            yield line
    finally:
        for future in futures:
            future.cancel()
        try:  # every result is in: a slow shutdown (a loaded machine) must not fail the run
            client.close(timeout=60)
            if cluster is not None:
                cluster.close(timeout=60)
        except Exception as error:  # noqa: BLE001
            logger.warning("dask shutdown: %s: %s", type(error).__name__, error)
