"""The robot annotator: where a user clicks to correct a prediction, and the iterative box + clicks protocol.

The click rule is the CVPR 2025 challenge's ("Foundation Models for Interactive 3D Biomedical Image Segmentation",
``anchors.md`` section 8.1): take the largest 26-connected region of the error (prediction XOR truth), and click its
voxel farthest from the region's boundary (Euclidean distance in millimetres; the array's edge counts as boundary);
the click is positive when that region is missed foreground, negative when it is over-segmentation. Ties go to the
first such voxel in raster order (the challenge draws one at random with a fixed seed).

``run_protocol`` follows one structure through a protocol with any segmenter (the library in process, or the server
the clients use): the start steps (``box``: the CVPR protocol's 3D box; ``text``: SegVol's text alone, then text +
box), then clicks, each added to every earlier prompt, and records Dice, NSD at 2 mm and seconds per step. The
trainer's corrective clicks use ``error_click`` too, so the model learns from the clicks it is measured with.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .frames import bounding_box
from .metrics import click_auc, dice_score, interactions_to_reach, surface_dice
from .prompts import Prompts

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
STARTS = ("box", "text")  # the CVPR protocol (box first), SegVol's (text, then text + box)
NOC_THRESHOLDS = (0.80, 0.85, 0.90)
NOC_CAP = 20


@dataclass(frozen=True)
class Click:
    """A corrective click: voxel index ``point`` of the mask's array, ``positive`` (missed foreground) or negative
    (over-segmentation), the size of the error region it corrects and its depth in that region (mm)."""

    point: Tuple[int, int, int]
    positive: bool
    region_voxels: int
    depth_mm: float

    @property
    def label(self) -> int:
        return 1 if self.positive else 0


def error_click(truth: np.ndarray, prediction: np.ndarray,
                spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Optional[Click]:
    """The click a user makes on ``prediction`` to correct it towards ``truth`` (boolean 3-D masks of one shape;
    ``spacing`` in mm per axis); None when the prediction is exact."""
    truth = np.asarray(truth, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise ValueError(f"error_click needs two 3-D masks of one shape, got {truth.shape} and {prediction.shape}")
    box = bounding_box(truth | prediction)
    if box is None:
        return None
    region = tuple(slice(int(a), int(b) + 1) for a, b in zip(box[:3], box[3:]))
    error = truth[region] ^ prediction[region]
    components, count = ndimage.label(error, structure=CONNECTIVITY_26)
    if count == 0:
        return None
    sizes = np.bincount(components.reshape(-1))
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    # The distance transform runs on the largest region's own bounding box, padded by one background voxel so that
    # the box's faces (and the array's edges) count as the region's boundary.
    inner_region = ndimage.find_objects(components, max_label=largest)[largest - 1]
    component = np.pad(components[inner_region] == largest, 1)
    depth = ndimage.distance_transform_edt(component, sampling=[float(s) for s in spacing])
    flat = int(np.argmax(depth))
    local = np.asarray(np.unravel_index(flat, depth.shape)) - 1
    point = tuple(int(v) for v in local + [s.start for s in inner_region] + box[:3])
    return Click(point=point, positive=bool(truth[point]), region_voxels=int(sizes[largest]),
                 depth_mm=float(depth.reshape(-1)[flat]))


# ---------------------------------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------------------------------
Segmenter = Callable[[Prompts], Tuple[np.ndarray, Dict[str, float]]]  # prompts -> (mask, {"server_s", "round_trip_s"})


@dataclass
class Step:
    """One interaction: its name (``text``, ``box``, ``text+box``, ``click 3``), the click made (None for start
    steps), and the result's Dice, NSD and seconds (as the segmenter reports them, and the caller's round trip)."""

    name: str
    dice: float
    nsd: float
    server_s: Optional[float]
    round_trip_s: float
    click: Optional[Click] = None

    def to_json(self) -> dict:
        out = {"step": self.name, "dice": round(self.dice, 4), "nsd": round(self.nsd, 4),
               "server_s": None if self.server_s is None else round(self.server_s, 3),
               "round_trip_s": round(self.round_trip_s, 3)}
        if self.click is not None:
            out["click"] = {**asdict(self.click), "point": list(self.click.point),
                            "depth_mm": round(self.click.depth_mm, 2)}
        return out


@dataclass
class Trace:
    """The steps of one structure under one protocol, with the challenge's summaries."""

    start: str
    text: Optional[str]
    steps: List[Step] = field(default_factory=list)
    start_steps: int = 1

    @property
    def click_steps(self) -> List[Step]:
        return self.steps[self.start_steps:]

    def summary(self, clicks: int = 5, thresholds: Sequence[float] = NOC_THRESHOLDS, cap: int = NOC_CAP) -> dict:
        """DSC_AUC/NSD_AUC over the first ``clicks`` clicks, final Dice/NSD after them, NoC@t over every step."""
        standard = self.steps[:self.start_steps + clicks]
        after_clicks = standard[self.start_steps:]
        dice = [s.dice for s in self.steps]
        return {
            "dsc_auc": round(click_auc([s.dice for s in after_clicks]), 4),
            "nsd_auc": round(click_auc([s.nsd for s in after_clicks]), 4),
            "final_dice": round(standard[-1].dice, 4), "final_nsd": round(standard[-1].nsd, 4),
            **{f"noc@{round(t * 100)}": interactions_to_reach(dice, t, cap) for t in thresholds},
        }


def start_prompts(start: str, text: Optional[str], box: Sequence[int]) -> List[Tuple[str, Prompts]]:
    """The protocol's steps before any click: ``box`` -> [box]; ``text`` -> [text, text + box]."""
    if start == "box":
        return [("box", Prompts(box=box))]
    if start == "text":
        if not text:
            raise ValueError("the text-first protocol needs the structure's text prompt")
        return [("text", Prompts(texts=[text])), ("text+box", Prompts(texts=[text], box=box))]
    raise ValueError(f"unknown protocol start {start!r}; use one of {STARTS}")


def run_protocol(segment: Segmenter, truth: np.ndarray, spacing: Sequence[float], start: str = "box",
                 text: Optional[str] = None, clicks: int = 5, noc: bool = False,
                 thresholds: Sequence[float] = NOC_THRESHOLDS, cap: int = NOC_CAP, tolerance_mm: float = 2.0,
                 progress: Optional[Callable[[Step], None]] = None) -> Trace:
    """Follow one structure (``truth``: boolean mask on the image grid) through a protocol.

    ``clicks`` corrective clicks follow the start steps; with ``noc`` the robot keeps clicking until the Dice reaches
    every threshold or ``cap`` interactions were made, so NoC@t is known. A text-first start sends the box with every
    click, the box-first start sends it alone (no text) as the challenge does. A click is skipped (the robot stops)
    when the prediction is exact."""
    truth = np.asarray(truth, dtype=bool)
    box = bounding_box(truth)
    if box is None:
        raise ValueError("the structure is empty: nothing to annotate")
    box = [int(v) for v in box]
    plan = start_prompts(start, text, box)
    trace = Trace(start=start, text=text, start_steps=len(plan))

    def record(name: str, prompts: Prompts, click: Optional[Click]) -> np.ndarray:
        tick = time.perf_counter()
        mask, timing = segment(prompts)
        round_trip = timing.get("round_trip_s", time.perf_counter() - tick)
        mask = np.asarray(mask, dtype=bool)
        step = Step(name, dice_score(mask, truth), surface_dice(mask, truth, spacing, tolerance_mm),
                    timing.get("server_s"), round_trip, click)
        trace.steps.append(step)
        if progress is not None:
            progress(step)
        return mask

    mask = None
    for name, prompts in plan:
        mask = record(name, prompts, None)
    final = plan[-1][1]
    points: List[Tuple[int, int, int, int]] = []
    number = 0
    while True:
        number += 1
        interactions = len(trace.steps)
        if number > clicks and not (noc and interactions < cap and trace.steps[-1].dice < max(thresholds)):
            break
        click = error_click(truth, mask, spacing)
        if click is None:
            break
        points.append((*click.point, click.label))
        prompts = Prompts(texts=final.texts or None, box=final.box, points=points)
        mask = record(f"click {number}", prompts, click)
    return trace


# ---------------------------------------------------------------------------------------------------------------------
# many cases: the robot's report
# ---------------------------------------------------------------------------------------------------------------------
class EngineSegmenter:
    """The library in process: one ``ImageSession`` per image, reused by every step of every structure on it (as the
    server keeps one per image and client). ``__call__(prompts) -> (mask, timings)``."""

    def __init__(self, engine, image, mode: Optional[str] = None):
        self.session = engine.open(image)
        self.mode = mode

    def __call__(self, prompts: Prompts) -> Tuple[np.ndarray, Dict[str, float]]:
        tick = time.perf_counter()
        result = self.session.segment(prompts, mode=self.mode)
        mask = result.label > 0
        return mask, {"server_s": float(result.stats["seconds"]["total"]), "round_trip_s": time.perf_counter() - tick}

    def close(self) -> None:
        self.session.close()


def _percentiles(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"n": int(array.size), "p50": round(float(np.percentile(array, 50)), 3),
            "p95": round(float(np.percentile(array, 95)), 3), "max": round(float(array.max()), 3)}


def _summary_mean(traces: Sequence[Trace], clicks: int) -> dict:
    rows = [t.summary(clicks) for t in traces]
    out: Dict[str, object] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
        if key.startswith("noc@"):
            out[f"{key}_unknown"] = len(rows) - len(values)  # runs that stopped before reaching it (no --noc)
    return out


def annotate(cases, open_case: Callable, resolve: Callable[[str], str], starts: Sequence[str] = STARTS,
             clicks: int = 5, noc: bool = False, structures: Optional[Sequence[str]] = None,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the robot over ``cases`` (``segvol.training.Case``: image, label file, ``{value: name}``) with each protocol
    start; ``open_case(case)`` gives the case's segmenter (called with ``Prompts``; closed with ``close()`` when it
    has one); ``resolve(name)`` the text prompt of a label name; ``structures`` keeps only those label names.

    -> ``{"starts": {start: {"mean": ..., "per_structure": {name: ...}}}, "latency": ..., "traces": [...]}``: the
    mean Dice/NSD curve per step, the challenge's summaries (DSC_AUC, NSD_AUC, final DSC/NSD, NoC@80/85/90), and
    the seconds of the first request on each image and of every click (server-reported and round trip)."""
    from .io import read_image, spacing

    traces: Dict[str, Dict[str, List[Trace]]] = {start: {} for start in starts}
    rows = []
    first, click_server, click_round_trip = [], [], []
    for number, case in enumerate(cases, start=1):
        label = read_image(case.label)
        label_array = np.rint(np.asarray(label.array)).astype(np.int32)
        voxel_mm = spacing(label.affine)
        present = set(np.unique(label_array).tolist())
        wanted = [(value, name) for value, name in sorted(case.label_names.items())
                  if value in present and (structures is None or name in structures)]
        if not wanted:
            continue
        segmenter = open_case(case)
        started_case = True
        try:
            for value, name in wanted:
                truth = label_array == value
                for start in starts:
                    trace = run_protocol(segmenter, truth, voxel_mm, start=start, text=resolve(name), clicks=clicks,
                                         noc=noc)
                    traces[start].setdefault(name, []).append(trace)
                    for index, step in enumerate(trace.steps):
                        if started_case and index == 0:
                            first.append(step.server_s if step.server_s is not None else step.round_trip_s)
                            started_case = False
                        elif step.click is not None:
                            if step.server_s is not None:
                                click_server.append(step.server_s)
                            click_round_trip.append(step.round_trip_s)
                    rows.append({"case": case.id, "structure": name, "start": start,
                                 "steps": [s.to_json() for s in trace.steps], "summary": trace.summary(clicks)})
                    if progress is not None:
                        progress(f"case {number}/{len(cases)} {case.id} {name} ({start} first): Dice "
                                 + " ".join(f"{s.dice:.3f}" for s in trace.steps))
        finally:
            close = getattr(segmenter, "close", None)
            if close is not None:
                close()
    report: Dict[str, object] = {"starts": {}}
    for start, by_name in traces.items():
        every = [t for group in by_name.values() for t in group]
        if not every:
            continue
        report["starts"][start] = {
            "steps": [s.name for s in max(every, key=lambda t: len(t.steps)).steps],
            "mean": {"dice": mean_curve(every, "dice"), "nsd": mean_curve(every, "nsd"), "structures": len(every),
                     **_summary_mean(every, clicks)},
            "per_structure": {name: {"dice": mean_curve(group, "dice"), "nsd": mean_curve(group, "nsd"),
                                     "cases": len(group), **_summary_mean(group, clicks)}
                              for name, group in sorted(by_name.items())},
        }
    report["latency"] = {"first_request_s": _percentiles(first), "click_server_s": _percentiles(click_server),
                         "click_round_trip_s": _percentiles(click_round_trip)}
    report["traces"] = rows
    return report


def mean_curve(traces: Sequence[Trace], metric: str = "dice") -> List[Optional[float]]:
    """Mean of ``metric`` per step index over traces (a trace that stopped early, its prediction exact or its
    thresholds reached, carries its last value forward)."""
    if not traces:
        return []
    length = max(len(t.steps) for t in traces)
    curve = []
    for index in range(length):
        values = [getattr(t.steps[min(index, len(t.steps) - 1)], metric) for t in traces]
        curve.append(round(float(np.mean(values)), 4))
    return curve


__all__ = ["Click", "EngineSegmenter", "NOC_CAP", "NOC_THRESHOLDS", "STARTS", "Step", "Trace", "annotate",
           "error_click", "mean_curve", "run_protocol", "start_prompts"]
