"""Incremental retraining: final labels saved through the datastore API count toward a threshold; reaching it queues
one training run through MONAI Label's own train queue (one worker: runs never overlap).

The count lives in ``<app>/model/retrain_state.json`` (written atomically under a lock), so a restart keeps it.
``on_save_label`` does not tell which tag was saved, so a save counts when the image's *final* label carries a
fresh timestamp (``ts``, set by the datastore on every save: within the last two minutes) newer than the last one
counted for that image; saves of other tags (e.g. ``original`` predictions) leave it unchanged, as does a save for an
image without a final label. Datastores without label info count every save.

When the threshold is reached and no run is already waiting in the queue, one run is queued and the count restarts
from zero; if a run is already waiting (not yet started), nothing more is queued: that run will read the datastore,
new labels included, when it starts.

Labels that reach the datastore without a save request (DICOM SEGs another viewer stored into the PACS, noticed by
``lib.dicomweb``) count once each through ``on_external_labels``; a later non-final save for such an image does not
count (its final label's info says ``origin: pacs``). ``status()`` is what ``/info`` shows as ``retrain``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from segvol.io import atomic_write_json

logger = logging.getLogger(__name__)
MISSING = object()


class RetrainCounter:
    FRESH_S = 120  # a final label saved by this request carries the current time

    def __init__(self, path: str, threshold: int, model: str = "segvol_finetune"):
        self.path = path
        self.threshold = int(threshold)
        self.model = model
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def read(self) -> Dict[str, Any]:
        try:
            with open(self.path) as handle:
                state = json.load(handle)
            if isinstance(state, dict):
                state.setdefault("count", 0)
                state.setdefault("seen", {})
                state.setdefault("queued", [])
                return state
        except (OSError, ValueError):
            pass
        return {"count": 0, "total": 0, "seen": {}, "queued": []}

    def _write(self, state: Dict[str, Any]) -> None:
        atomic_write_json(self.path, state)

    def on_save_label(self, datastore, image_id: str, label_id: str,
                      queue: Callable[[], Optional[Dict[str, Any]]], pending: Callable[[], bool]) -> Dict[str, Any]:
        """Count a final-label save; queue a run (``queue()``) when the threshold is reached and ``pending()`` says no
        run is waiting. -> a summary merged into the save-label response."""
        if not self.enabled:
            return {}
        with self._lock:
            state = self.read()
            stamp = _final_stamp(datastore, label_id or image_id)
            key = str(label_id or image_id)
            if stamp is MISSING:  # another tag was saved for an image without a final label
                return {"retrain": {"counted": False, "count": state["count"], "threshold": self.threshold}}
            if stamp is not None and (state["seen"].get(key) == stamp or time.time() - stamp > self.FRESH_S):
                # the final label did not change: another tag was saved (or the same final within one second)
                return {"retrain": {"counted": False, "count": state["count"], "threshold": self.threshold}}
            if stamp is not None:
                state["seen"][key] = stamp
            state["count"] = int(state["count"]) + 1
            state["total"] = int(state.get("total", 0)) + 1
            summary: Dict[str, Any] = {"counted": True, "count": state["count"], "threshold": self.threshold,
                                       "queued": False}
            self._maybe_queue(state, summary, queue, pending)
            self._write(state)
            return {"retrain": summary}

    def _maybe_queue(self, state: Dict[str, Any], summary: Dict[str, Any],
                     queue: Callable[[], Optional[Dict[str, Any]]],
                     pending: Callable[[], bool]) -> None:
        """At the threshold: queue one run (or rely on the one waiting) and restart the count."""
        if state["count"] >= self.threshold:
            if pending():
                summary["queued"] = False
                summary["reason"] = "a training run is already waiting in the queue; it will use these labels"
                state["count"] = 0
            else:
                task = queue()
                if task:
                    state["count"] = 0
                    record = {"id": task.get("id") if isinstance(task, dict) else None, "ts": int(time.time()),
                              "labels": state["total"]}
                    state["queued"] = (state["queued"] + [record])[-50:]
                    summary.update({"queued": True, "task": record["id"]})
                    logger.info("retrain threshold %d reached: queued training run %s", self.threshold,
                                record["id"])
                else:
                    summary["reason"] = "the train request was not accepted"
            summary["count"] = state["count"]

    def on_external_labels(self, labels: List[Tuple[str, str]], queue: Callable[[], Optional[Dict[str, Any]]],
                           pending: Callable[[], bool]) -> Dict[str, Any]:
        """Final labels that reached the datastore without a save request (``[(image id, source id)]``, e.g. DICOM
        SEGs another viewer stored into the PACS, ``lib.dicomweb``): each counts once, as a save would."""
        if not self.enabled or not labels:
            return {}
        with self._lock:
            state = self.read()
            summary: Dict[str, Any] = {"counted": len(labels), "queued": False, "threshold": self.threshold}
            for _ in labels:
                state["count"] = int(state["count"]) + 1
                state["total"] = int(state.get("total", 0)) + 1
                state["external"] = int(state.get("external", 0)) + 1
                if not summary.get("queued"):
                    self._maybe_queue(state, summary, queue, pending)
                elif state["count"] >= self.threshold:  # already queued one for this batch: that run reads them
                    state["count"] = 0
            summary["count"] = state["count"]
            self._write(state)
            return {"retrain": summary}

    def status(self, pending: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        """What ``/info`` shows: ``count`` toward ``threshold`` (0: automatic retraining off), ``total`` labels counted
        (``external`` of them from the PACS), ``queued`` (a run this counter queued is still waiting), ``last_queued``
        (``{id, ts, labels}`` of the last run it queued)."""
        state = self.read()
        runs = state.get("queued") or []
        waiting = False
        if pending is not None and runs:
            try:
                waiting = bool(pending())
            except Exception:
                waiting = False
        return {"enabled": self.enabled, "count": int(state.get("count", 0)), "threshold": self.threshold,
                "total": int(state.get("total", 0)), "external": int(state.get("external", 0)), "queued": waiting,
                "runs_queued": len(runs), "last_queued": runs[-1] if runs else None}


def _final_stamp(datastore, label_id: str):
    """The final label's save time; ``MISSING`` when the image has no final label; None when unknown."""
    try:
        info = datastore.get_label_info(label_id, "final")
    except Exception:  # a datastore without label info: every save counts
        return None
    if not info:
        return MISSING
    if info.get("origin") == "pacs":  # converted from a SEG found in the PACS (counted when it was noticed)
        return MISSING
    stamp = info.get("ts")
    return int(stamp) if isinstance(stamp, (int, float)) else None


def train_pending(model: str) -> bool:
    """True when a train task of MONAI Label's queue has been submitted but has not started yet."""
    from monailabel.utils.async_tasks.utils import tasks

    return any(t.get("status") == "SUBMITTED" and (t.get("request") or {}).get("model") in (model, None)
               for t in tasks("train"))
