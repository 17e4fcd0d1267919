"""SegVol pseudo labels from FH: percentile intensity normalisation for FH (``normalize_intensity``, not the model's
``preprocess.reference_normalize``), the working grid FH runs on and ``pseudo_labels`` (FH regions around the ground
truth, cleaned at native resolution, ids from ``FH_ID_OFFSET + 1``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .graph import DEFAULT_K, DEFAULT_MAX_VOXELS, DEFAULT_MIN_FRACTION, DEFAULT_SIGMA, FH_ID_OFFSET, _spacing3, segment
from .labels import clean_labels, resize_labels


def normalize_intensity(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the [lower, upper] percentiles and scale to [0, 1] (float32).

    Percentiles are computed on a strided subsample (at most ~2M voxels) so the cost stays
    linear and deterministic.
    """
    arr = np.asarray(volume, dtype=np.float32)
    step = max(1, int(round((arr.size / 2e6) ** (1.0 / max(arr.ndim, 1)))))
    sample = arr[tuple(slice(None, None, step) for _ in range(arr.ndim))]
    lo, hi = (float(v) for v in np.percentile(sample, [lower, upper]))
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = np.clip(arr, lo, hi)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def _gt_label_map(ground_truth: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    gt = np.asarray(ground_truth)
    if gt.ndim == len(shape) + 1:
        # (C, ...) stack of binary masks -> channel c gets id c+1; later channels win overlaps
        stack = gt
        if stack.shape[1:] != shape:
            stack = np.stack([resize_labels(c, shape) for c in stack])
        out = np.zeros(shape, dtype=np.int32)
        for c in range(stack.shape[0]):
            out[stack[c] > 0] = c + 1
        return out
    if gt.ndim != len(shape):
        raise ValueError(f"ground truth of shape {gt.shape} does not fit a volume of shape {shape}")
    if np.issubdtype(gt.dtype, np.floating):
        if not np.all(np.isfinite(gt)) or not np.all(gt == np.round(gt)):
            raise ValueError("ground-truth label map must hold integer ids (resize it with nearest)")
    gt = gt.astype(np.int32)
    if gt.shape != shape:
        gt = resize_labels(gt, shape)
    return np.maximum(gt, 0)


def working_grid(
    shape: Sequence[int], working_shape=None, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS
) -> Tuple[int, ...]:
    """The grid :func:`pseudo_labels` runs FH on (see its ``working_shape`` and ``max_voxels``)."""
    shape = tuple(int(s) for s in shape)
    if working_shape is not None:
        wshape = tuple(int(s) for s in working_shape)
        if len(wshape) != len(shape) or min(wshape) < 1:
            raise ValueError(f"bad working_shape {working_shape!r} for a volume of shape {shape}")
        return wshape
    n = int(np.prod(shape))
    if not max_voxels or n <= max_voxels:
        return shape
    factor = (float(max_voxels) / n) ** (1.0 / len(shape))
    return tuple(max(1, int(round(s * factor))) for s in shape)


def pseudo_labels(
    volume: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    ground_truth: Optional[np.ndarray] = None,
    *,
    k: float = DEFAULT_K,
    sigma: float = DEFAULT_SIGMA,
    min_size: Optional[int] = None,
    connectivity: int = 6,
    method: str = "fh",
    min_fraction: float = DEFAULT_MIN_FRACTION,
    fh_offset: int = FH_ID_OFFSET,
    working_shape: Optional[Sequence[int]] = None,
    max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
    normalize: bool = True,
) -> np.ndarray:
    """SegVol pseudo-label map: FH regions, cleaned, with ground truth taking precedence.

    Steps: intensities are clipped to their 0.5-99.5 percentiles and scaled to [0, 1]
    (``normalize``); FH regions are computed by :func:`segment`, on a coarser grid for volumes
    over ``max_voxels`` (the image is anti-aliased and resampled linearly, the labels come back
    with :func:`resize_labels`, i.e. nearest); voxels of the ground truth are removed from the FH
    map; the remainder is cleaned by :func:`clean_labels` (drop < ``min_fraction`` of the
    volume, opening + closing, drop small components); finally the ground truth is written
    on top.  Deterministic.

    Id scheme (int32 output, same shape as ``volume``):
      * ``0``: unlabelled (dropped by the cleaning);
      * ``1 .. fh_offset``: ground-truth ids, unchanged (a label map's ids, or channel c of a
        (C, ...) binary stack -> id c+1; later channels win overlaps).  GT voxels are never
        cleaned or eroded;
      * ``fh_offset+1 .. fh_offset+n``: FH regions, numbered in raster order of their first
        voxel.  ``fh_offset`` defaults to ``FH_ID_OFFSET`` = 1000; a ground truth with an id
        ``>= fh_offset`` raises ``ValueError``.

    Args:
        volume: CT (any units; see ``normalize``), 3-D (X, Y, Z).
        spacing: voxel size in mm (default 1 mm isotropic).
        ground_truth: optional integer label map (any shape; resized with nearest) or (C, ...)
            binary stack.
        k, sigma, connectivity, method: passed to :func:`segment` (defaults 0.05, 1.0 mm, 6, "fh").
        min_size: FH minimum region size in voxels; default ``ceil(min_fraction * N)`` on the
            grid FH runs on, so the FH pass itself leaves no region that the cleaning would drop.
        min_fraction: cleaning threshold as a fraction of the volume (default 0.001).
        fh_offset: first FH id minus one.
        working_shape: run FH on this grid instead of the native one.
        max_voxels: without ``working_shape``, volumes with more voxels than this run FH on a
            grid shrunk by the same factor on every axis to fit (default ``DEFAULT_MAX_VOXELS``
            = 256*256*32, the reference's FH grid size; ``None``: always native).  This keeps
            the meaning of ``k`` and ``min_size`` (in voxels) comparable across resolutions and
            bounds the cost (~1 s); the cleaning always runs at the native resolution.
        normalize: apply :func:`normalize_intensity` first (default True; the default ``k``
            assumes [0, 1] intensities).
    """
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {arr.shape}")
    shape = arr.shape
    sp = _spacing3(spacing, 3)
    img = normalize_intensity(arr) if normalize else np.asarray(arr, dtype=np.float32)
    gt = None
    if ground_truth is not None:
        gt = _gt_label_map(ground_truth, shape)
        if gt.size and int(gt.max()) >= fh_offset:
            raise ValueError(f"ground-truth id {int(gt.max())} collides with FH ids (> {fh_offset}); raise fh_offset")

    work_sp = sp
    wshape = working_grid(shape, working_shape, max_voxels)
    if wshape != shape:
        factors = [w / s for w, s in zip(wshape, shape)]
        if min(factors) < 1:  # anti-aliasing before down-sampling (as skimage.transform.rescale)
            img = ndimage.gaussian_filter(img, [max(0.0, (1 / f - 1) / 2) for f in factors], output=np.float32)
        img = ndimage.zoom(img, factors, order=1, mode="nearest", grid_mode=True)
        work_sp = tuple(s / f for s, f in zip(sp, factors))
    if min_size is None:
        min_size = int(math.ceil(min_fraction * img.size))
    regions = segment(img, work_sp, k=k, sigma=sigma, min_size=min_size, connectivity=connectivity, method=method)
    del img
    if regions.shape != shape:
        regions = resize_labels(regions, shape)
    regions += 1  # 1..n: 0 is reserved for "unlabelled"
    if gt is not None:
        regions[gt > 0] = -1  # blocked: GT wins, FH regions are cleaned around it
    threshold = int(math.ceil(min_fraction * regions.size))
    out = clean_labels(regions, min_voxels=threshold, relabel_offset=fh_offset)
    if gt is not None:
        out[gt > 0] = gt[gt > 0]
    return out
