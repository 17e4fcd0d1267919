"""FH segmentation proper: the parameters' defaults, the grid graph (``neighbour_offsets``: 6, 10, 18 or 26
neighbours), spacing-aware Gaussian smoothing and ``segment`` (sort the edges, union-find by the FH criterion or the
reference's threshold, merge small regions, number regions in raster order) on top of ``fh.kernels``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .kernels import below_percentile, fh_pass, flatten, min_size_pass, raster_labels, sorted_edges, threshold_pass

#: FH scale parameter ``k`` (intensity units x voxels), for intensities normalised to [0, 1].
DEFAULT_K = 0.05
#: Gaussian smoothing in millimetres (converted per axis with the spacing).
DEFAULT_SIGMA = 1.0
#: Minimum region size in voxels enforced by the second merging pass of :func:`segment`.
DEFAULT_MIN_SIZE = 1000
#: Percentile of the non-zero edge weights used as the global threshold by ``method="reference"``.
DEFAULT_PERCENTILE = 25.0
#: FH regions get ids ``FH_ID_OFFSET + 1 ..`` in :func:`pseudo_labels`; ground-truth ids must be lower.
FH_ID_OFFSET = 1000
#: Supported graph connectivities (10 is the reference's 8-in-plane + 2-through-plane graph).
CONNECTIVITIES = (6, 10, 18, 26)
#: Default fraction of the volume below which :func:`clean_labels` drops a region or component.
DEFAULT_MIN_FRACTION = 0.001
#: :func:`pseudo_labels` runs FH on a grid of at most this many voxels (the reference's 256x256x32).
DEFAULT_MAX_VOXELS = 256 * 256 * 32


# ----------------------------------------------------------------------------------------------
# graph helpers
# ----------------------------------------------------------------------------------------------
def neighbour_offsets(connectivity: int) -> np.ndarray:
    """Half of the neighbourhood (one offset per undirected edge direction), shape (D, 3).

    6/18/26: face / face+edge / face+edge+corner neighbours.  10: the reference's graph,
    (1,0,0), (0,1,0), (1,1,0), (1,-1,0), (0,0,1), i.e. 8-connectivity in the plane of axes
    0-1 plus the two neighbours along axis 2.
    """
    if connectivity == 10:
        return np.array([(1, 0, 0), (0, 1, 0), (1, 1, 0), (1, -1, 0), (0, 0, 1)], dtype=np.int64)
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    order = {6: 1, 18: 2, 26: 3}[connectivity]
    offsets = []
    for dx in (0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                off = (dx, dy, dz)
                if off == (0, 0, 0) or sum(map(abs, off)) > order:
                    continue
                first = next(v for v in off if v != 0)
                if first > 0:  # lexicographically positive: each undirected edge once
                    offsets.append(off)
    offsets.sort(key=lambda o: (sum(map(abs, o)), [-v for v in o]))
    return np.array(offsets, dtype=np.int64)


def _structure(connectivity: int) -> np.ndarray:
    """3x3x3 boolean structuring element equivalent to the graph (for tests and callers)."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1, 1, 1] = True
    for dx, dy, dz in neighbour_offsets(connectivity):
        s[1 + dx, 1 + dy, 1 + dz] = True
        s[1 - dx, 1 - dy, 1 - dz] = True
    return s


def _spacing3(spacing, ndim: int) -> Tuple[float, float, float]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in np.ravel(spacing))
    if len(sp) < ndim:
        raise ValueError(f"spacing {spacing!r} has fewer than {ndim} values")
    sp = sp[:ndim]
    if any(not (s > 0 and math.isfinite(s)) for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return sp


def smooth(volume: np.ndarray, spacing=None, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Gaussian smoothing with ``sigma`` in millimetres (``sigma / spacing[i]`` voxels on axis i).

    Returns a new float32 array (computed in float32 to bound memory).
    """
    img = np.asarray(volume)
    sp = _spacing3(spacing, img.ndim)
    out = np.array(img, dtype=np.float32, copy=True, order="C")
    if sigma and sigma > 0:
        sig = [sigma / s for s in sp]
        ndimage.gaussian_filter(out, sig, output=out)
    return out


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def segment(
    volume: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    k: float = DEFAULT_K,
    sigma: float = DEFAULT_SIGMA,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = 6,
    *,
    method: str = "fh",
    percentile: float = DEFAULT_PERCENTILE,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation of a 3-D (or 2-D) volume.

    Args:
        volume: intensities, any real dtype, shape (X, Y, Z) (a 2-D array is treated as Z=1).
            Used as given: ``k`` is in the volume's intensity units (times voxels).  The default
            ``k`` suits intensities normalised to [0, 1] (see :func:`normalize_intensity`).
        spacing: voxel size in mm per axis (default 1 mm isotropic); only used for smoothing.
        k: FH scale (default ``DEFAULT_K`` = 0.05): larger k, larger regions.
        sigma: Gaussian sigma in millimetres (default ``DEFAULT_SIGMA`` = 1.0); 0 disables it.
        min_size: minimum region size in voxels (default ``DEFAULT_MIN_SIZE`` = 1000), enforced
            by merging small regions into their neighbour across the lowest-weight edge.
        connectivity: 6 (default), 18 or 26; 10 for the reference's graph.
        method: ``"fh"`` (default, the adaptive criterion) or ``"reference"`` (merge all edges
            below the ``percentile``-th percentile of the non-zero weights, as the SegVol
            reference does; ``k`` is then ignored).
        percentile: threshold percentile for ``method="reference"`` (default 25).

    Returns:
        int32 array of the input shape with labels ``0 .. n-1`` (numbered in raster order of
        each region's first voxel; every voxel is labelled).  Each region is connected under
        ``connectivity``.
    """
    if method not in ("fh", "reference"):
        raise ValueError(f"method must be 'fh' or 'reference', got {method!r}")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    if k < 0 or min_size < 0 or sigma < 0:
        raise ValueError("k, sigma and min_size must be non-negative")
    arr = np.asarray(volume)
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[:, :, None]
        spacing = None if spacing is None else tuple(np.ravel(spacing)[:2]) + (1.0,)
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D volume, got shape {shape}")
    if arr.size == 0:
        return np.zeros(shape, dtype=np.int32)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"volume must be real-valued, got {arr.dtype}")

    img = smooth(arr, spacing, sigma).ravel()
    if not np.isfinite(img).all():
        raise ValueError("volume contains NaN or infinite values")
    X, Y, Z = (int(s) for s in arr.shape)
    n = X * Y * Z
    offs = neighbour_offsets(connectivity)
    doff = offs @ np.array([Y * Z, Z, 1], dtype=np.int64)
    ndir = len(offs)
    shift = max(1, int(math.ceil(math.log2(ndir))))
    mask = (1 << shift) - 1
    w_max = float(img.max()) - float(img.min())
    scale = 1.0 / w_max if w_max > 0 else 0.0

    # 1. stable parallel counting sort of the edges by quantised weight
    order, per_bin = sorted_edges(img, None, (X, Y, Z), offs, scale, shift)
    n_edges = order.shape[0]

    # 2. union-find.  Two interleaved (n, 2) 4-byte buffers: (parent, smoothed value) per voxel and
    # (size, Int(C)) per root, so a step costs one cache miss per voxel instead of two.
    idx_dtype, val_dtype = (np.int32, np.float32) if n < 2**31 - 1 else (np.int64, np.float64)
    node = np.empty((n, 2), dtype=idx_dtype)
    parent = node[:, 0]
    parent[:] = np.arange(n, dtype=idx_dtype)
    values = node.view(val_dtype)[:, 1]
    values[:] = img
    del img
    meta = np.zeros((n, 2), dtype=idx_dtype)
    size = meta[:, 0]
    size[:] = 1
    if method == "fh":
        internal = meta.view(val_dtype)[:, 1]
        fh_pass(order, n_edges, values, doff, shift, mask, parent, size, internal, float(k))
    else:
        n_below, extra = below_percentile(order, per_bin, values, doff, shift, mask, percentile)
        threshold_pass(order, n_below, doff, shift, mask, parent, size)
        threshold_pass(extra, extra.shape[0], doff, shift, mask, parent, size)
    del order

    # 3. min-size pass over the edges between components, in the same sorted order
    if min_size > 1:
        flatten(parent)
        border, _ = sorted_edges(values, parent, (X, Y, Z), offs, scale, shift)
        min_size_pass(border, border.shape[0], doff, shift, mask, parent, size, int(min_size))
        del border
    del values
    labels, _ = raster_labels(parent, size)
    return labels.reshape(shape)
