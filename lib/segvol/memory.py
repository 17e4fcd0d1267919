"""Process-wide allocator settings for interactive work (``keep_large_arrays``).

A click on a 512x512x200 CT allocates and frees arrays of the CT's size (the 52 MB label, its copy for the session,
blending and relabelling buffers). Two defaults make the fresh memory of each such array expensive on Linux:

* glibc's ``malloc`` serves every block above 32 MB from a new ``mmap`` and unmaps it on ``free``, so each click
  faults its large arrays in page by page again (measured: 0.03-0.05 s of a click's output stage alone);
* numpy asks for transparent huge pages on large arrays (``madvise(MADV_HUGEPAGE)``); where the kernel's THP
  ``defrag`` setting is ``madvise`` (a common default) such a fault may compact memory first and stall: single
  clicks took 0.15-0.28 s instead of 0.03 s to copy their label.

``keep_large_arrays`` turns both off for the process: large blocks come from malloc's heap and freed ones are kept for
the next request (up to ``trim_mb`` of free memory at the heap's top), and numpy uses ordinary pages. Labels are
unchanged; the process's resident memory after a session stays near its peak instead of falling back (a few
percent here: 4.4 -> 4.6 GB after the official model's first request and ten clicks). The server applies it at
start (``--conf keep_large_arrays``, default on); library users call it themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Dict

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_large_arrays(trim_mb: int = 1024) -> Dict[str, bool]:
    """Apply the settings above to this process. -> what was applied: ``{"malloc": bool, "numpy_hugepages_off":
    bool}`` (False where the platform has no such setting: another C library, an older numpy)."""
    if not 0 < int(trim_mb) < 2048:  # mallopt takes a C int of bytes
        raise ValueError(f"trim_mb must be in 1..2047, got {trim_mb}")
    applied = {"malloc": False, "numpy_hugepages_off": False}
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library) if library else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):  # glibc: musl's mallopt is a no-op
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        applied["malloc"] = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_mb) << 20))
    import numpy as np

    toggle = getattr(getattr(np.core, "multiarray", None), "_set_madvise_hugepage", None)
    if toggle is not None:
        toggle(False)
        applied["numpy_hugepages_off"] = True
    logger.debug("large-array settings applied: %s", applied)
    return applied
