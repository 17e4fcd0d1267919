"""Training state that stays true when a run dies.

The train task writes ``<app>/model/<run>/train_stats.json`` with ``status`` RUNNING and the identity of the training
process (``pid``, its start time ``pid_start`` and ``host``). A RUNNING record whose process is gone (killed with
SIGKILL, out of memory, the server killed with its process group) is reported ``FAILED`` with a ``reason`` when the
stats are read, and rewritten so at server start (``recover``), which also removes the temp files an interrupted
writer leaves behind (``last.pt.tmp``, ``best.pt.tmp``, ``segvol_finetuned.pt.<pid>.tmp``, ...). Temp files of a run
whose process is still alive (a training subprocess that outlived a killed server) are left alone.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional

from segvol.io import atomic_write_json, parse_temp_name, process_alive, writer_alive

logger = logging.getLogger(__name__)

STATS = "train_stats.json"
DIED = "the training process died (pid {pid}): killed or crashed before the run ended; resume it by starting the " \
       "same run again"


def process_identity() -> Dict[str, Any]:
    """This process, as ``train_stats.json`` records it."""
    return {"pid": os.getpid(), "pid_start": _start_time(os.getpid()), "host": socket.gethostname()}


def _start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:  # gone, or no psutil
        return None


def run_is_dead(stats: Dict[str, Any]) -> bool:
    """A RUNNING record whose training process is gone (on this host; another host's run cannot be judged)."""
    if str(stats.get("status", "")).upper() != "RUNNING":
        return False
    if stats.get("host") and stats["host"] != socket.gethostname():
        return False
    if "pid" not in stats:
        return True  # written before pids were recorded: nothing can still be running it after a restart
    return not process_alive(stats.get("pid"), stats.get("pid_start"))


def mark_failed(stats: Dict[str, Any], reason: Optional[str] = None) -> Dict[str, Any]:
    """A copy of a dead run's stats with status FAILED and the reason."""
    out = dict(stats)
    out.update({"status": "FAILED", "reason": reason or DIED.format(pid=stats.get("pid", "unknown")),
                "failed_ts": int(time.time())})
    return out


def read_stats(path: str) -> Dict[str, Any]:
    try:
        with open(path) as handle:
            stats = json.load(handle)
        return stats if isinstance(stats, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stats(path: str, stats: Dict[str, Any]) -> None:
    """Atomic (``segvol.io.atomic_write_json``: temp file in the same folder, fsync, rename)."""
    atomic_write_json(path, stats)


def _live_runs(model_dir: str) -> List[str]:
    live = []
    for path in glob.glob(os.path.join(model_dir, "*", STATS)):
        stats = read_stats(path)
        if str(stats.get("status", "")).upper() == "RUNNING" and not run_is_dead(stats):
            live.append(os.path.dirname(path))
    return live


def recover(model_dir: str) -> Dict[str, Any]:
    """At server start: RUNNING runs whose process is gone become FAILED (persisted), and temp files left by
    interrupted writers are removed. -> {"failed": [run folders], "removed": [temp files]}."""
    summary: Dict[str, List[str]] = {"failed": [], "removed": []}
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        return summary
    for path in sorted(glob.glob(os.path.join(model_dir, "*", STATS))):
        stats = read_stats(path)
        if run_is_dead(stats):
            failed = mark_failed(stats, DIED.format(pid=stats.get("pid", "unknown")) + " (found at server start)")
            try:
                write_stats(path, failed)
            except OSError as error:
                logger.warning("could not mark %s failed: %s", path, error)
                continue
            summary["failed"].append(os.path.dirname(path))
            logger.warning("training run %s was RUNNING but its process (pid %s) is gone: marked FAILED",
                           os.path.dirname(path), stats.get("pid"))
    live = set(_live_runs(model_dir))
    candidates = glob.glob(os.path.join(model_dir, "*.tmp")) + glob.glob(os.path.join(model_dir, "*", "*.tmp"))
    for path in sorted(candidates):
        folder = os.path.dirname(path)
        if folder in live:
            continue  # a live run's checkpoint being written
        parsed = parse_temp_name(path)
        if parsed and parsed[0] != os.getpid() and writer_alive(parsed[0], path):
            continue  # its writer still runs (e.g. a publish by a training process that outlived the server)
        if not parsed and live and folder == model_dir:
            continue  # an unowned temp file at the top while some run is alive: leave it
        try:
            os.unlink(path)
            summary["removed"].append(path)
        except OSError:
            pass
    if summary["removed"]:
        logger.info("removed %d temp file(s) left by interrupted writes: %s", len(summary["removed"]),
                    ", ".join(os.path.relpath(p, model_dir) for p in summary["removed"]))
    return summary
