"""Label-map utilities of the FH pseudo labels: nearest-neighbour resizing (``resize_labels``: no averaged ids at
borders) and the paper's cleaning rules (``clean_labels``: opening and closing per label, small components dropped,
ids renumbered in raster order), compiled with numba."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from numba import njit

from .graph import DEFAULT_MIN_FRACTION
from .kernels import find, join


# ----------------------------------------------------------------------------------------------
# label-map utilities
# ----------------------------------------------------------------------------------------------
def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (never averages, never invents ids).

    Voxel centres are aligned (``src = floor((dst + 0.5) * in / out)``, like
    ``torch.nn.functional.interpolate(mode="nearest-exact")``), so down- and up-sampling by
    integer factors are symmetric.  Output values are always a subset of the input values.
    """
    labels = np.asarray(labels)
    shape = tuple(int(s) for s in shape)
    if len(shape) != labels.ndim:
        raise ValueError(f"shape {shape} does not match a {labels.ndim}-D label map")
    if shape == labels.shape:
        return labels.copy()
    if any(s <= 0 for s in shape) or labels.size == 0:
        raise ValueError(f"cannot resize {labels.shape} to {shape}")
    index = []
    for n_in, n_out in zip(labels.shape, shape):
        src = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
        index.append(np.clip(src, 0, n_in - 1))
    return labels[np.ix_(*index)]


@njit(cache=True, nogil=True)
def _open_labels(lab, X, Y, Z):
    """Per-region binary opening with the 3-D cross, for all regions (>0) at once.

    Opening never leaves a region, so the regions cannot conflict.  Neighbours outside the
    volume are ignored (no erosion at the volume border).  Returns the opened map; voxels
    removed become 0, negative (blocked) voxels are kept.
    """
    YZ = Y * Z
    n = X * Y * Z
    core = np.zeros(n, dtype=np.bool_)  # eroded
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                p = (x * Y + y) * Z + z
                a = lab[p]
                if a <= 0:
                    continue
                ok = True
                if x > 0 and lab[p - YZ] != a:
                    ok = False
                elif x < X - 1 and lab[p + YZ] != a:
                    ok = False
                elif y > 0 and lab[p - Z] != a:
                    ok = False
                elif y < Y - 1 and lab[p + Z] != a:
                    ok = False
                elif z > 0 and lab[p - 1] != a:
                    ok = False
                elif z < Z - 1 and lab[p + 1] != a:
                    ok = False
                core[p] = ok
    out = lab.copy()
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                p = (x * Y + y) * Z + z
                if lab[p] <= 0 or core[p]:
                    continue
                # dilation of the core: a neighbour in the core has the same label (cores are inside)
                a = lab[p]
                keep = False
                if x > 0 and core[p - YZ] and lab[p - YZ] == a:
                    keep = True
                elif x < X - 1 and core[p + YZ] and lab[p + YZ] == a:
                    keep = True
                elif y > 0 and core[p - Z] and lab[p - Z] == a:
                    keep = True
                elif y < Y - 1 and core[p + Z] and lab[p + Z] == a:
                    keep = True
                elif z > 0 and core[p - 1] and lab[p - 1] == a:
                    keep = True
                elif z < Z - 1 and core[p + 1] and lab[p + 1] == a:
                    keep = True
                if not keep:
                    out[p] = 0
    return out


@njit(cache=True, nogil=True, inline="always")
def _touches(lab, p, x, y, z, X, Y, Z, a):
    """True when voxel p or one of its in-volume 6-neighbours has label a (p is in dilate(A))."""
    YZ = Y * Z
    if lab[p] == a:
        return True
    if x > 0 and lab[p - YZ] == a:
        return True
    if x < X - 1 and lab[p + YZ] == a:
        return True
    if y > 0 and lab[p - Z] == a:
        return True
    if y < Y - 1 and lab[p + Z] == a:
        return True
    if z > 0 and lab[p - 1] == a:
        return True
    if z < Z - 1 and lab[p + 1] == a:
        return True
    return False


@njit(cache=True, nogil=True)
def _close_labels(lab, X, Y, Z):
    """Per-region binary closing with the 3-D cross, filling only unlabelled (0) voxels.

    A 0-voxel p joins region A when p and all its in-volume 6-neighbours lie in dilate(A);
    among several candidate regions the lowest id wins.  Labelled voxels are never changed.
    """
    YZ = Y * Z
    out = lab.copy()
    cand = np.empty(6, dtype=lab.dtype)
    steps = np.array([-YZ, YZ, -Z, Z, -1, 1], dtype=np.int64)  # the cross: -x, +x, -y, +y, -z, +z
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                p = (x * Y + y) * Z + z
                if lab[p] != 0:
                    continue
                inside = (x > 0, x < X - 1, y > 0, y < Y - 1, z > 0, z < Z - 1)
                nc = 0
                for j in range(6):
                    if inside[j]:
                        cand[nc] = lab[p + steps[j]]
                        nc += 1
                best = 0
                for i in range(nc):
                    a = cand[i]
                    if a <= 0 or (best > 0 and a >= best):
                        continue
                    ok = True
                    if x > 0 and not _touches(lab, p - YZ, x - 1, y, z, X, Y, Z, a):
                        ok = False
                    elif x < X - 1 and not _touches(lab, p + YZ, x + 1, y, z, X, Y, Z, a):
                        ok = False
                    elif y > 0 and not _touches(lab, p - Z, x, y - 1, z, X, Y, Z, a):
                        ok = False
                    elif y < Y - 1 and not _touches(lab, p + Z, x, y + 1, z, X, Y, Z, a):
                        ok = False
                    elif z > 0 and not _touches(lab, p - 1, x, y, z - 1, X, Y, Z, a):
                        ok = False
                    elif z < Z - 1 and not _touches(lab, p + 1, x, y, z + 1, X, Y, Z, a):
                        ok = False
                    if ok:
                        best = a
                if best > 0:
                    out[p] = best
    return out


@njit(cache=True, nogil=True)
def _drop_small_components(lab, X, Y, Z, min_voxels, parent, size):
    """6-connected components of equal positive labels; components < min_voxels become 0.

    ``parent`` (= arange) and ``size`` (= ones) are the caller's union-find scratch arrays.
    """
    YZ = Y * Z
    n = X * Y * Z
    for p in range(n):  # raster order: x, then y, then z
        a = lab[p]
        if a <= 0:
            continue
        if p >= YZ and lab[p - YZ] == a:  # x > 0
            join(parent, size, p, p - YZ)
        if (p // Z) % Y > 0 and lab[p - Z] == a:
            join(parent, size, p, p - Z)
        if p % Z > 0 and lab[p - 1] == a:
            join(parent, size, p, p - 1)
    out = lab.copy()
    for p in range(n):
        if lab[p] > 0 and size[find(parent, p)] < min_voxels:
            out[p] = 0
    return out


@njit(cache=True, nogil=True)
def _relabel_first_seen(lab, table, offset):
    """Positive labels -> offset+1.. in raster order of first occurrence; others -> 0."""
    out = np.zeros(lab.shape[0], dtype=np.int32)
    count = 0
    for p in range(lab.shape[0]):
        a = lab[p]
        if a <= 0:
            continue
        if table[a] == 0:
            count += 1
            table[a] = offset + count
        out[p] = table[a]
    return out, count


def clean_labels(
    labels: np.ndarray,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    *,
    min_voxels: Optional[int] = None,
    relabel_offset: Optional[int] = None,
) -> np.ndarray:
    """The SegVol paper's cleaning of a pseudo-label map, done once and in linear time.

    Rules (``data_utils.py:97-125`` of the reference), applied to every positive id:

    1. ids covering fewer than ``min_fraction`` (0.1 %) of the voxels are dropped (set to 0);
    2. per-region binary opening, then closing, with the 3-D cross (scipy's default
       structuring element, one iteration).  Unlike scipy on a whole-volume mask, neighbours
       outside the volume are ignored, so regions are not eroded at the volume border; the
       closing only fills unlabelled voxels (it never takes voxels of another region; the
       lowest id wins a tie);
    3. 6-connected components of a region smaller than the same threshold are dropped.
       Surviving components keep their region id (as in the reference).

    ``0`` is unlabelled; negative values are *blocked* (left untouched, never filled, and not
    counted as any region).  ``min_voxels`` overrides ``min_fraction * labels.size``.  With
    ``relabel_offset`` set, surviving ids are renumbered ``offset+1 ..`` in raster order of
    first occurrence (negative values then become 0).  Returns int32, same shape.
    """
    lab = np.ascontiguousarray(labels, dtype=np.int32)
    shape = lab.shape
    if lab.ndim == 2:
        lab = lab[:, :, None]
    if lab.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D label map, got shape {shape}")
    X, Y, Z = lab.shape
    flat = lab.ravel()
    threshold = int(math.ceil(min_fraction * flat.size)) if min_voxels is None else int(min_voxels)
    if flat.size and flat.max() > 0:
        counts = np.bincount(np.maximum(flat, 0))
        small = counts < threshold
        small[0] = False
        if small.any():
            flat = np.where((flat > 0) & small[np.maximum(flat, 0)], 0, flat).astype(np.int32)
        flat = _open_labels(flat, X, Y, Z)
        flat = _close_labels(flat, X, Y, Z)
        idx_dtype = np.int32 if flat.size < 2**31 - 1 else np.int64
        parent = np.arange(flat.size, dtype=idx_dtype)
        size = np.ones(flat.size, dtype=idx_dtype)
        flat = _drop_small_components(flat, X, Y, Z, threshold, parent, size)
        del parent, size
    if relabel_offset is not None:
        table = np.zeros(int(max(flat.max(initial=0), 0)) + 1, dtype=np.int64)
        flat, _ = _relabel_first_seen(flat, table, int(relabel_offset))
    return flat.reshape(shape)
