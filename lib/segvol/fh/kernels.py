"""FH's compiled kernels (numba): the one neighbour loop that counts and scatters the grid graph's edges into a stable
parallel counting sort by weight bin (``sorted_edges``), the union-find passes (the FH criterion, the reference's
global threshold, the min-size merge), the exact percentile of the threshold method and raster-order relabelling."""
from __future__ import annotations

import math
import os

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# numba's default threading layer here is OpenMP, a second OpenMP runtime beside PyTorch's: once an FH kernel has
# run, its threads keep competing with PyTorch's for the rest of the process (measured on 2 cores: training steps
# 2.2x slower after one FH call). The workqueue layer keeps no such pool, and FH runs as fast with it (512x512x200:
# 29.5 s with omp, 29.9 s with workqueue). The layer is chosen at the first parallel launch; a user's
# NUMBA_THREADING_LAYER is respected.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_NBINS = 65536
_AHEAD = 32  # prefetch distance (edges) of the union-find loop
_NCHUNKS = 16  # fixed chunking of the parallel counting sort: results never depend on thread count


# ----------------------------------------------------------------------------------------------
# compiled kernels
# ----------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _bin(w, scale, nbins):
    # bin 0 holds exact zeros; bins 1..nbins-1 are uniform on sqrt(w / w_max)
    if w <= 0.0:
        return 0
    b = 1 + int(math.sqrt(w * scale) * (nbins - 2))
    if b > nbins - 1:
        b = nbins - 1
    return b


@njit(cache=True, parallel=True)
def _edge_pass(img, roots, X, Y, Z, dx, dy, dz, scale, nbins, nchunks, starts, shift, order):
    """The one loop over every voxel's forward neighbours (directions ``dx, dy, dz``), in ``nchunks`` fixed x slabs.

    Two modes: with an empty ``starts`` it counts the edges per (chunk, weight bin) and returns that histogram;
    with ``starts`` (each chunk's first slot per bin, from the histogram) it scatters the edge ids
    ``(p << shift) | d`` into ``order``, stably sorted by bin. With a non-empty ``roots`` only the edges whose
    endpoints have different roots count (the min-size pass's boundary edges)."""
    scatter = starts.shape[0] > 0
    boundary = roots.shape[0] > 0
    hist = np.zeros((1 if scatter else nchunks, nbins), dtype=np.int64)
    ndir = dx.shape[0]
    YZ = Y * Z
    for c in prange(nchunks):
        pos = starts[c].copy() if scatter else hist[0]
        x0 = c * X // nchunks
        x1 = (c + 1) * X // nchunks
        for x in range(x0, x1):
            for y in range(Y):
                base = (x * Y + y) * Z
                for z in range(Z):
                    p = base + z
                    v = img[p]
                    for d in range(ndir):
                        xx = x + dx[d]
                        yy = y + dy[d]
                        zz = z + dz[d]
                        if xx >= X or yy < 0 or yy >= Y or zz < 0 or zz >= Z:
                            continue
                        q = p + dx[d] * YZ + dy[d] * Z + dz[d]
                        if boundary and roots[q] == roots[p]:
                            continue
                        b = _bin(abs(v - img[q]), scale, nbins)
                        if scatter:
                            order[pos[b]] = (p << shift) | d
                            pos[b] += 1
                        else:
                            hist[c, b] += 1
    return hist


def _prefetch_codegen(context, builder, signature, args):
    from llvmlite import ir

    aryty, _ = signature.args
    ary, index = args
    array = context.make_array(aryty)(context, builder, ary)
    ptr = cgutils.get_item_pointer(context, builder, aryty, array, [index], wraparound=False)
    byte_ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [byte_ptr.type, i32, i32, i32])
    name = (
        "llvm.prefetch.p0"
        if getattr(__import__("llvmlite"), "opaque_pointers_enabled", False)
        else "llvm.prefetch.p0i8"
    )
    function = cgutils.get_or_insert_function(builder.module, fnty, name)
    # (address, write=1, locality=3: keep in all cache levels, data cache=1)
    builder.call(function, [byte_ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, array, index):
    """Software prefetch of ``array[index]`` (index: int64); a hint, never a fault."""
    if not isinstance(array, types.Array) or index != types.int64:
        return None
    return types.void(array, index), _prefetch_codegen


@njit(cache=True, nogil=True, inline="always")
def _prefetch_edge(edge, doff, shift, mask, parent):
    """Prefetch both voxels of edge id ``edge`` (``(p << shift) | d``)."""
    f = np.int64(edge)
    g = f >> shift
    _prefetch(parent, g)
    _prefetch(parent, g + doff[f & mask])


@njit(cache=True, nogil=True, inline="always")
def find(parent, x):
    # path halving
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, nogil=True, inline="always")
def union(parent, size, a, b):
    """Union by size (ties: the lower index becomes the root); returns the new root."""
    if size[a] < size[b] or (size[a] == size[b] and a > b):
        t = a
        a = b
        b = t
    parent[b] = a
    size[a] += size[b]
    return a


@njit(cache=True, nogil=True, inline="always")
def join(parent, size, p, q):
    """Merge the sets of voxels ``p`` and ``q`` (union by size) unless they are one already."""
    a = find(parent, p)
    b = find(parent, q)
    if a != b:
        union(parent, size, a, b)


@njit(cache=True, nogil=True)
def fh_pass(order, n_edges, img, doff, shift, mask, parent, size, internal, k):
    """Kruskal with the FH criterion on the exact float weights ``|img[p] - img[q]|``.

    ``parent``/``img`` and ``size``/``internal`` are column views of two interleaved buffers, so
    each union-find step touches one cache line per voxel and one per root.
    """
    for i in range(n_edges):
        # the loop is bound by cache misses in random order: prefetch the voxels of the edge
        # _AHEAD places ahead, and their parents (usually the roots) for the one _AHEAD/2 ahead
        if i + _AHEAD < n_edges:
            _prefetch_edge(order[i + _AHEAD], doff, shift, mask, parent)
            f = np.int64(order[i + _AHEAD // 2])
            g = f >> shift
            _prefetch(parent, np.int64(parent[g]))
            _prefetch(parent, np.int64(parent[g + doff[f & mask]]))
        e = np.int64(order[i])
        p = e >> shift
        q = p + doff[e & mask]
        if parent[p] == parent[q]:  # fast path: same set, no walk needed
            continue
        a = find(parent, p)
        c = find(parent, q)
        if a == c:
            continue
        w = abs(img[p] - img[q])
        sa = size[a]
        sc = size[c]
        ia = internal[a]
        ic = internal[c]
        if w <= ia + k / sa and w <= ic + k / sc:
            # union by size, ties: the lower index is the root
            if sa < sc or (sa == sc and a > c):
                t = a
                a = c
                c = t
            parent[c] = a
            size[a] = sa + sc
            internal[a] = max(ia, ic, w)


@njit(cache=True, nogil=True)
def threshold_pass(order, n_edges, doff, shift, mask, parent, size):
    for i in range(n_edges):
        if i + _AHEAD < n_edges:
            _prefetch_edge(order[i + _AHEAD], doff, shift, mask, parent)
        e = np.int64(order[i])
        p = e >> shift
        a = find(parent, p)
        b = find(parent, p + doff[e & mask])
        if a != b:
            union(parent, size, a, b)


@njit(cache=True, nogil=True)
def flatten(parent):
    for i in range(parent.shape[0]):
        parent[i] = find(parent, i)


@njit(cache=True, nogil=True)
def min_size_pass(order, n_edges, doff, shift, mask, parent, size, min_size):
    n = parent.shape[0]
    n_small = 0
    for i in range(n):
        if parent[i] == i and size[i] < min_size:
            n_small += 1
    if n_small == 0:
        return
    for i in range(n_edges):
        e = np.int64(order[i])
        p = e >> shift
        a = find(parent, p)
        b = find(parent, p + doff[e & mask])
        if a == b:
            continue
        small_a = size[a] < min_size
        small_b = size[b] < min_size
        if small_a or small_b:
            r = union(parent, size, a, b)
            n_small -= np.int64(small_a) + np.int64(small_b)
            if size[r] < min_size:
                n_small += 1
            if n_small == 0:
                return


@njit(cache=True, nogil=True)
def raster_labels(parent, scratch):
    """Label ``0..n-1`` in raster order of each component's first voxel (``scratch`` is clobbered)."""
    n = parent.shape[0]
    out = np.empty(n, dtype=np.int32)
    for i in range(n):
        scratch[i] = -1
    count = 0
    for i in range(n):
        r = find(parent, i)
        if scratch[r] < 0:
            scratch[r] = count
            count += 1
        out[i] = scratch[r]
    return out, count


def below_percentile(order, per_bin, values, doff, shift, mask, percentile):
    """Edges with weight strictly below ``np.percentile(non-zero weights, percentile)``.

    Returns ``(n, extra)``: the first ``n`` sorted edges (whole bins below the threshold's bin)
    and the ``extra`` edge ids of the threshold's bin(s) whose exact weight is below it.  The
    threshold is computed exactly as numpy does (linear interpolation between the sorted
    weights at ranks ``floor(r)`` and ``floor(r)+1``, ``r = (m-1) * percentile / 100``), from
    the exact float32 weights of the one or two bins that hold those ranks.
    """
    empty = order[:0]
    nonzero = per_bin[1:]
    total = int(nonzero.sum())
    if total == 0:
        return 0, empty
    rank = (total - 1) * float(percentile) / 100.0
    lo = int(math.floor(rank))
    hi = min(lo + 1, total - 1)
    cum = np.cumsum(nonzero)
    j_lo = 1 + int(np.searchsorted(cum, lo, side="right"))  # bins of the rank-lo / rank-hi weights
    j_hi = 1 + int(np.searchsorted(cum, hi, side="right"))
    before = int(cum[j_lo - 2]) if j_lo >= 2 else 0  # non-zero edges in bins 1 .. j_lo-1
    n_lo = int(per_bin[:j_lo].sum())
    n_hi = int(per_bin[: j_hi + 1].sum())
    ids = order[n_lo:n_hi].astype(np.int64)
    p = ids >> shift
    w = np.abs(values[p] - values[p + doff[ids & mask]]).astype(np.float64)
    ranked = np.sort(w)
    a, b = ranked[lo - before], ranked[hi - before]
    t = rank - lo
    threshold = b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t  # numpy's _lerp
    return n_lo, order[n_lo:n_hi][w < threshold]


def sorted_edges(img, roots, shape, offs, scale, shift):
    """Edge ids ``(p << shift) | d`` stably counting-sorted by weight bin, and the bin counts.

    With ``roots`` (flattened union-find parents), only edges between different roots.
    """
    X, Y, Z = shape
    dx, dy, dz = (np.ascontiguousarray(offs[:, i]) for i in range(3))
    nchunks = max(1, min(_NCHUNKS, X))
    roots = np.empty(0, dtype=np.int32) if roots is None else roots
    no_starts = np.empty((0, _NBINS), dtype=np.int64)
    no_order = np.empty(0, dtype=np.uint32)
    hist = _edge_pass(img, roots, X, Y, Z, dx, dy, dz, scale, _NBINS, nchunks, no_starts, shift, no_order)
    per_bin = hist.sum(axis=0)
    n_edges = int(per_bin.sum())
    starts = (np.cumsum(per_bin) - per_bin)[None, :] + (np.cumsum(hist, axis=0) - hist)
    del hist
    id_dtype = np.uint32 if (X * Y * Z) << shift <= 2**32 else np.uint64
    order = np.empty(n_edges, dtype=id_dtype)
    _edge_pass(img, roots, X, Y, Z, dx, dy, dz, scale, _NBINS, nchunks, starts, shift, order)
    return order, per_bin
