"""FH pseudo-mask segmentation: ours (numba) vs a faithful pure-Python re-implementation of the reference.

    python scripts/benchmark.py fh [--sizes 256x256x32,512x512x200] [--reference-limit-s 600]

Volumes are a real CT (``ibsi-sts-dev/STS_001_CT_image.nii.gz`` from ../shared/data, or the first
CT found there) resampled trilinearly to each size and normalised to [0, 1]; without the data a
smooth synthetic phantom is used.  Each variant runs in its own child process
(``_measure.in_child``), which reports wall seconds and its peak RSS; ``bytes_per_voxel`` is the
peak minus the RSS measured just before the call (volume loaded, kernels compiled), per voxel.

Variants:
  * ``ours``: ``segvol.fh.segment`` with its defaults (adaptive FH criterion, 6-connectivity);
  * ``ours_reference_mode``: ``segment(method="reference", connectivity=10, sigma=0.8 voxels,
    min_size=1000)``, our compiled version of the reference's thresholded algorithm;
  * ``reference_python``: the reference's algorithm in pure Python (section 5.2 of
    segvol-reference.md): 10-neighbourhood, argsort, 25th-percentile threshold, two Python
    union-find sweeps.  It runs only when its time, extrapolated per voxel from the largest
    volume it has run on so far (first a 64x64x32 calibration volume), is below
    ``--reference-limit-s`` and its memory (~230 B/voxel) below half of the available memory;
    otherwise it is reported as skipped with the extrapolated seconds.  Where it ran, the ARI
    between its labels and ``ours_reference_mode`` is reported (1.0 = identical partitions).
"""
from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ._measure import in_child

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PREFERRED = "ibsi-sts-dev/STS_001_CT_image.nii.gz"


# ----------------------------------------------------------------------------------------------
# the reference algorithm, re-implemented in plain Python for timing and agreement checks
# ----------------------------------------------------------------------------------------------
def reference_felzenszwalb(image: np.ndarray, sigma: float = 0.8, min_size: int = 1000,
                           percentile: float = 25.0) -> np.ndarray:
    """The SegVol reference's ``_felzenszwalb_python`` as it behaves (segvol-reference.md 5.2).

    Isotropic Gaussian in voxels, a 10-neighbourhood graph (axis 0, axis 1, the two diagonals of
    axes 0-1, axis 2), float64 weights ``|I_p - I_q|`` sorted with argsort, a global threshold at
    the 25th percentile of the non-zero weights (strict ``<``), then a min-size sweep over the
    sorted edges; union-find in pure Python whose roots point to the smaller index, with path
    compression.  Labels ``0..n-1`` via ``np.unique(return_inverse=True)``.  Deliberately slow.
    """
    from scipy import ndimage

    image = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), sigma=sigma)
    n = image.size
    idx = np.arange(n, dtype=np.int64).reshape(image.shape)
    pairs = [
        (idx[:-1, :, :], idx[1:, :, :]),  # down: axis 0
        (idx[:, :-1, :], idx[:, 1:, :]),  # right: axis 1
        (idx[:-1, :-1, :], idx[1:, 1:, :]),  # dright: (+1, +1, 0)
        (idx[:-1, 1:, :], idx[1:, :-1, :]),  # uright: (+1, -1, 0)
        (idx[:, :, :-1], idx[:, :, 1:]),  # front: axis 2
    ]
    first = np.concatenate([a.ravel() for a, _ in pairs])
    second = np.concatenate([b.ravel() for _, b in pairs])
    flat = image.ravel()
    weights = np.abs(flat[first] - flat[second])
    order = np.argsort(weights)
    first = first[order]  # one permuted copy at a time bounds the peak memory
    second = second[order]
    weights = weights[order]
    del order
    positive = weights[weights > 0]
    threshold = np.percentile(positive, percentile) if positive.size else 0.0
    del positive

    parent = np.arange(n, dtype=np.int64)
    size = np.ones(n, dtype=np.int64)

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            nxt = parent[x]
            parent[x] = root
            x = nxt
        return root

    def join(a, b):
        lo, hi = (a, b) if a < b else (b, a)
        parent[hi] = lo
        size[lo] += size[hi]

    chunk = 1 << 20  # Python ints are made chunk by chunk (a full tolist() would need ~36 B per edge)
    for start in range(0, first.size, chunk):
        stop = start + chunk
        for p, q, w in zip(first[start:stop].tolist(), second[start:stop].tolist(), weights[start:stop].tolist()):
            if w < threshold:
                a, b = find(p), find(q)
                if a != b:
                    join(a, b)
    for start in range(0, first.size, chunk):
        stop = start + chunk
        for p, q in zip(first[start:stop].tolist(), second[start:stop].tolist()):
            a, b = find(p), find(q)
            if a != b and (size[a] < min_size or size[b] < min_size):
                join(a, b)
    roots = parent.copy()
    while True:  # pointer jumping
        nxt = roots[roots]
        if np.array_equal(nxt, roots):
            break
        roots = nxt
    _, labels = np.unique(roots, return_inverse=True)
    return labels.reshape(image.shape).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _source_ct() -> Tuple[np.ndarray, Tuple[float, ...], str]:
    """(volume, spacing, description) of a real CT, or a synthetic phantom."""
    candidates = [DATA / PREFERRED] + [Path(p) for p in sorted(glob.glob(str(DATA / "*" / "*ct*.nii*")))]
    for path in candidates:
        if path.is_file() and "mask" not in path.name and "seg" not in path.name:
            import nibabel as nib

            image = nib.load(str(path))
            volume = np.asarray(image.dataobj, dtype=np.float32)
            if volume.ndim == 3:
                return volume, tuple(float(z) for z in image.header.get_zooms()[:3]), str(path.relative_to(DATA))
    rng = np.random.default_rng(0)
    shape = (96, 96, 48)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[(grid[0] ** 2 + grid[1] ** 2) < 0.8] = 40.0  # body
    for _ in range(12):  # organs
        centre = rng.uniform(-0.5, 0.5, 3)
        radius = rng.uniform(0.1, 0.3)
        volume[((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2] = rng.uniform(-100, 300)
    volume += rng.normal(0, 15, shape).astype(np.float32)
    return volume, (1.5, 1.5, 3.0), "synthetic phantom (../shared/data absent)"


def _resampled(volume: np.ndarray, spacing, shape) -> Tuple[np.ndarray, Tuple[float, ...]]:
    from scipy import ndimage

    from segvol.fh import normalize_intensity

    factors = [t / s for t, s in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=1, mode="nearest", grid_mode=True)
    return normalize_intensity(out), tuple(s / f for s, f in zip(spacing, factors))


# ----------------------------------------------------------------------------------------------
# child-process measurements
# ----------------------------------------------------------------------------------------------
#: the reference's arrays: 5 edges per voxel x (2 int64 ends + float64 weight + int64 argsort
#: + one permuted copy) = 200 B, plus parent/size (16 B) and the smoothed float64 volume (8 B)
REFERENCE_BYTES_PER_VOXEL = 230


def _available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0; else a no-op).

    ``ru_maxrss`` (what ``_measure`` reports as ``peak_rss_mb``) survives fork+exec, so a spawned
    child inherits the parent's RSS as its floor; VmHWM does not, and can be reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_ours(path: str, spacing, kwargs: Dict[str, Any], labels_out: str = "") -> Dict[str, Any]:
    from segvol import fh

    volume = np.load(path)
    t0 = time.perf_counter()
    fh.segment(np.zeros((8, 8, 8), np.float32), spacing, **kwargs)  # compile, or load the cache
    warmup = time.perf_counter() - t0
    result = _measured(lambda: fh.segment(volume, spacing, **kwargs), volume, labels_out)
    return {**result, "compile_or_cache_load_s": round(warmup, 3)}


def _measure_reference(path: str, labels_out: str = "") -> Dict[str, Any]:
    volume = np.load(path)
    return _measured(lambda: reference_felzenszwalb(volume), volume, labels_out)


def _measured(segment, volume: np.ndarray, labels_out: str) -> Dict[str, Any]:
    """Wall and CPU seconds, peak memory over the baseline and regions of ``segment()`` (-> a label map of
    ``volume``); the labels saved to ``labels_out`` when given."""
    baseline = _rss_mb()
    _reset_peak()
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    labels = segment()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_mb()
    if labels_out:
        np.save(labels_out, labels)
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "load_avg_1m_before": round(load, 2),
        "baseline_rss_mb": round(baseline, 1),
        "peak_during_call_mb": round(peak, 1),
        "bytes_per_voxel": round((peak - baseline) * 2**20 / volume.size, 1),
        "regions": int(labels.max()) + 1,
    }


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two label maps (1.0 = identical partitions)."""
    a = np.unique(a.ravel(), return_inverse=True)[1].astype(np.int64)
    b = np.unique(b.ravel(), return_inverse=True)[1].astype(np.int64)
    n = a.size
    pair = np.unique(a * (int(b.max()) + 1) + b, return_counts=True)[1].astype(np.float64)
    comb = lambda x: (x * (x - 1) / 2.0).sum()  # noqa: E731
    index = comb(pair)
    expected_a = comb(np.bincount(a).astype(np.float64))
    expected_b = comb(np.bincount(b).astype(np.float64))
    expected = expected_a * expected_b / (n * (n - 1) / 2.0)
    maximum = (expected_a + expected_b) / 2.0
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


# ----------------------------------------------------------------------------------------------
# sub-command
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="256x256x32,512x512x200", help="comma-separated XxYxZ volume sizes")
    parser.add_argument("--connectivity", type=int, default=6, help="graph connectivity for 'ours' (6, 10, 18, 26)")
    parser.add_argument(
        "--reference-limit-s",
        type=float,
        default=600.0,
        help="run the pure-Python reference only when its extrapolated time is below this (seconds)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the pure-Python reference entirely")


def _parse_sizes(text: str) -> List[Tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        dims = tuple(int(v) for v in item.lower().split("x"))
        if len(dims) != 3 or min(dims) < 2:
            raise SystemExit(f"bad size {item!r}: expected XxYxZ")
        sizes.append(dims)
    return sizes


def run(args) -> Dict[str, Any]:
    import numba

    sizes = _parse_sizes(args.sizes)
    source, spacing, description = _source_ct()
    result: Dict[str, Any] = {
        "benchmark": "fh",
        "data": description,
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "ours_params": {"method": "fh", "connectivity": args.connectivity, "k": None, "sigma_mm": None,
                        "min_size": None},
        "sizes": {},
    }
    from segvol import fh

    result["ours_params"].update(k=fh.DEFAULT_K, sigma_mm=fh.DEFAULT_SIGMA, min_size=fh.DEFAULT_MIN_SIZE)
    ours_kwargs = {"connectivity": args.connectivity}
    ref_kwargs = {"method": "reference", "connectivity": 10, "sigma": 0.8, "min_size": 1000}
    reference_us_per_voxel = None
    with tempfile.TemporaryDirectory(prefix="fh-bench-") as tmp:
        if not args.no_reference:
            # calibrate the pure-Python reference on a small volume to extrapolate
            small, _ = _resampled(source, spacing, (64, 64, 32))
            small_path = os.path.join(tmp, "calibration.npy")
            np.save(small_path, small)
            calibration = in_child(_measure_reference, path=small_path)
            reference_us_per_voxel = calibration["seconds"] / small.size * 1e6
            result["reference_python_us_per_voxel_64x64x32"] = round(reference_us_per_voxel, 2)
        for shape in sizes:
            key = "x".join(map(str, shape))
            volume, vox_spacing = _resampled(source, spacing, shape)
            path = os.path.join(tmp, f"{key}.npy")
            np.save(path, volume)
            del volume
            entry: Dict[str, Any] = {"voxels": int(np.prod(shape)), "spacing_mm": [round(s, 3) for s in vox_spacing]}
            entry["ours"] = in_child(_measure_ours, path=path, spacing=vox_spacing, kwargs=ours_kwargs)
            ours_ref_labels = os.path.join(tmp, f"{key}-ours-ref.npy")
            entry["ours_reference_mode"] = in_child(
                _measure_ours, path=path, spacing=None, kwargs=ref_kwargs, labels_out=ours_ref_labels
            )
            if args.no_reference:
                entry["reference_python"] = {"skipped": True, "reason": "--no-reference"}
            else:
                estimate = reference_us_per_voxel * np.prod(shape) / 1e6  # from the largest run so far
                memory_gb = REFERENCE_BYTES_PER_VOXEL * np.prod(shape) / 2**30
                available_gb = _available_gb()
                if estimate > args.reference_limit_s or memory_gb > 0.5 * available_gb:
                    why = (
                        f"extrapolated {estimate:.0f} s > --reference-limit-s {args.reference_limit_s:.0f}"
                        if estimate > args.reference_limit_s
                        else f"needs ~{memory_gb:.1f} GB, more than half of the {available_gb:.1f} GB available"
                    )
                    entry["reference_python"] = {
                        "skipped": True,
                        "reason": why,
                        "extrapolated_seconds": round(estimate, 1),
                        "estimated_peak_gb": round(memory_gb, 1),
                    }
                else:
                    ref_labels = os.path.join(tmp, f"{key}-ref.npy")
                    entry["reference_python"] = in_child(_measure_reference, path=path, labels_out=ref_labels)
                    entry["reference_python"]["extrapolated_seconds"] = round(estimate, 1)
                    reference_us_per_voxel = entry["reference_python"]["seconds"] / np.prod(shape) * 1e6
                    entry["agreement_ari_reference_mode_vs_python"] = round(
                        adjusted_rand_index(np.load(ours_ref_labels), np.load(ref_labels)), 4
                    )
                measured = "seconds" in entry["reference_python"]
                ref_seconds = entry["reference_python"]["seconds" if measured else "extrapolated_seconds"]
                key_speedup = "speedup_ours_vs_reference_python" + ("" if measured else "_extrapolated")
                entry[key_speedup] = round(ref_seconds / max(entry["ours"]["seconds"], 1e-9), 1)
            result["sizes"][key] = entry
    if reference_us_per_voxel is not None:
        result["reference_python_us_per_voxel_used_for_extrapolation"] = round(reference_us_per_voxel, 2)
    result["note"] = (
        "seconds are wall time of the call in a fresh child process (numba kernels loaded from the on-disk cache "
        "beforehand); cpu_seconds sums all threads; bytes_per_voxel = (peak RSS during the call (VmHWM, reset before "
        "it) - RSS before it) / voxels; peak_rss_mb is ru_maxrss of the child, which on Linux starts at the parent's "
        "RSS. "
        "reference_python is our pure-Python re-implementation of the reference algorithm; the original code was "
        "measured at 57-81 us/voxel (segvol-reference.md 5.5), slower than this one."
    )
    return result
