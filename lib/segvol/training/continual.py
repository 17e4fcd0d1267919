"""Continual learning: teach new structures without forgetting the ones the starting model knows.

A lab's few labelled cases of a new structure rarely carry the old structures' labels too. Trained on them alone,
the model learns that those voxels are "not the structure asked for" only for the new names and drifts on the old
ones. ``add_replay_labels`` gives each training case, for every structure of ``keep`` its label does not name, the
starting model's own prediction of it (text prompt, zoom-out-zoom-in) as an extra label value: the old structures
keep being trained toward what the starting model answered (pseudo-label replay). The annotator's voxels always win:
a replayed structure only takes voxels the case's label leaves at background.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..io import read_image, write_label
from .data import Case

logger = logging.getLogger("segvol.training")

REPLAY_DIR = "replay"


def missing_structures(case: Case, keep: Sequence[str], resolve: Callable[[str], str]) -> List[str]:
    """The names of ``keep`` the case's label does not name (compared through the vocabulary's spelling)."""
    present = {resolve(name) for name in case.label_names.values()}
    return [name for name in keep if resolve(name) not in present]


def add_replay_labels(cases: Sequence[Case], engine, keep: Sequence[str], output_dir: str,
                      resolve: Callable[[str], str]) -> Tuple[List[Case], Dict[str, List[str]]]:
    """-> (the cases, those missing a structure of ``keep`` replaced by a copy whose label is
    ``<output_dir>/replay/<case>.nii.gz``: the case's label plus one new value per missing structure, predicted by
    ``engine`` (the starting model's ``SegVolEngine``); {case id: the structures replayed})."""
    out: List[Case] = []
    replayed: Dict[str, List[str]] = {}
    folder = os.path.join(output_dir, REPLAY_DIR)
    for case in cases:
        missing = missing_structures(case, keep, resolve)
        if not missing:
            out.append(case)
            continue
        label = read_image(case.label)
        array = np.asarray(label.array).astype(np.int32)
        result = engine.segment(case.image, texts=[resolve(name) for name in missing])
        if result.label.shape != array.shape:
            raise ValueError(f"case {case.id}: the image {result.label.shape} and label {array.shape} grids differ")
        names = dict(case.label_names)
        value = max([int(v) for v in np.unique(array)] + list(names) + [0]) + 1
        for name in missing:
            predicted = result.label == result.labels[resolve(name)]
            array[predicted & (array == 0)] = value
            names[value] = name
            value += 1
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{case.id}.nii.gz")
        write_label(path, array, label.affine, label.header, atomic=True)
        out.append(replace(case, label=path, label_names=names))
        replayed[case.id] = missing
    if replayed:
        logger.info("replay labels from the starting model: %s", replayed)
    return out, replayed


__all__ = ["REPLAY_DIR", "add_replay_labels", "missing_structures"]
