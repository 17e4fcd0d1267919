"""Run a measurement in a fresh child process so each variant reports its own peak memory."""
from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Any, Callable, Dict, Sequence


def _child(queue, function, kwargs):
    try:
        result = function(**kwargs)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        queue.put(("ok", result))
    except BaseException as error:  # report, never hang the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))


def in_child(function: Callable[..., Dict[str, Any]], **kwargs) -> Dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, kwargs))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")
