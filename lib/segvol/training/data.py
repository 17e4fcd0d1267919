"""Training data: datalists (dataset folders, datalist JSON, MONAI Label datastores) and multi-view sampling.

A *case* is a CT plus a multi-label map on the same voxel grid and the names of its label values; every name is a
text prompt. Cases are prepared with the one preprocessing path (``segvol.preprocess.preprocess``: orientation,
intensity normalisation, foreground crop, zoom-out view); the label map follows the image through the same frames
(``segvol.frames``), so training sees exactly the arrays inference sees:

* a **zoom-out view**: the whole foreground crop resized to ``image_size`` with ``nearest-exact`` (image and labels
  sampled at the same voxels: the engine's zoom-out frame);
* a **native crop**: one ``image_size`` window of the native volume (zero-padded symmetrically where the volume is
  smaller, exactly like an engine zoom-in window), centred on a labelled voxel with probability ``pos_fraction``
  (the reference's RandCropByPosNegLabel with pos=2, neg=1) and on any body voxel otherwise.

Dataset folders are laid out like ``../shared/data/openkbp-dev``: a ``dataset.json`` with ``labels``
(``{"1": "Brainstem", ...}``) and ``cases`` (ids, or objects with ``patient``/``id``), image and label files named
``<case><image_file_suffix>`` / ``<case><label_file_suffix>``. Medical-Decathlon style ``training``/``train`` lists of
``{"image", "label"}`` are accepted too.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..io import NIFTI_SUFFIXES, read_image, strip_image_suffix
from ..preprocess import PreparedImage, preprocess

logger = logging.getLogger("segvol.training")

BACKGROUND_NAMES = {"background", "bg", "_background_"}


# ---------------------------------------------------------------------------------------------------------------------
# datalists
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One training/validation sample: image and label files, and ``label_names`` {label value: name}."""

    id: str
    image: str
    label: str
    label_names: Dict[int, str]
    pseudo: Optional[str] = None  # FH pseudo-label map on the image grid (segvol.fh id scheme), when present

    def to_json(self) -> dict:
        return {"id": self.id, "image": self.image, "label": self.label,
                "label_names": {str(k): v for k, v in self.label_names.items()}, "pseudo": self.pseudo}

    @classmethod
    def from_json(cls, item: dict) -> "Case":
        return cls(id=item["id"], image=item["image"], label=item["label"],
                   label_names=parse_label_names(item.get("label_names", {})), pseudo=item.get("pseudo"))


def parse_label_names(labels: Any) -> Dict[int, str]:
    """``{"1": "liver"}`` / ``{"liver": 1}`` / ``[{"name", "idx"|"id"|"labelID"|"label"|"value"}]`` / ``["a", "b"]``
    -> ``{1: "liver"}`` (value 0 and background names dropped)."""
    out: Dict[int, str] = {}
    if not labels:
        return out
    if isinstance(labels, dict):
        for key, value in labels.items():
            if isinstance(value, str) and _is_int(key):
                out[int(key)] = value
            elif isinstance(key, str) and _is_int(value):
                out[int(value)] = key
            else:
                raise ValueError(f"label names must map values to names, got {key!r}: {value!r}")
    elif isinstance(labels, (list, tuple)):
        for position, item in enumerate(labels, 1):
            if isinstance(item, str):
                out[position] = item
                continue
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"label_info entries need a name, got {item!r}")
            value = next((item[k] for k in ("idx", "id", "labelID", "label", "value") if _is_int(item.get(k))), None)
            out[int(value) if value is not None else position] = item["name"]
    else:
        raise ValueError(f"unsupported label names {labels!r}")
    return {v: n.strip() for v, n in out.items() if v > 0 and n.strip() and n.strip().lower() not in BACKGROUND_NAMES}


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _case_id(item: Any) -> str:
    if isinstance(item, str):
        return item
    for key in ("patient", "id", "case", "name"):
        if isinstance(item, dict) and isinstance(item.get(key), str):
            return item[key]
    raise ValueError(f"cannot find the case id in {item!r} (expected a string or an object with 'patient'/'id')")


def parse_case_slice(text: Optional[str]) -> Optional[slice]:
    """A command line's case selection -> a slice of the case list: Python slice syntax (``:30``, ``-10:``,
    ``::2``) or one index (``5``, ``-1``); None for an empty selection (all cases)."""
    if not text:
        return None
    parts = [int(p) if p.strip() else None for p in text.split(":")]
    if len(parts) == 1:
        return slice(parts[0], parts[0] + 1 if parts[0] != -1 else None)
    return slice(*parts[:3])


def load_dataset(path: str, select: Optional[slice] = None, pseudo_dir: Optional[str] = None) -> List[Case]:
    """A dataset folder (with ``dataset.json``) or a datalist JSON file -> cases (``select`` slices the case list)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        spec_path = os.path.join(path, "dataset.json")
        if not os.path.isfile(spec_path):
            raise FileNotFoundError(f"{path!r} has no dataset.json (expected 'labels' and 'cases', "
                                    "see scripts/train.py)")
        base = path
    elif os.path.isfile(path):
        spec_path, base = path, os.path.dirname(os.path.abspath(path))
    else:
        raise FileNotFoundError(f"dataset not found: {path!r}")
    with open(spec_path) as handle:
        spec = json.load(handle)
    cases = datalist_from_spec(spec, base)
    if select is not None:
        cases = cases[select]
    if pseudo_dir:
        attach_pseudo_labels(cases, pseudo_dir)
    if not cases:
        raise ValueError(f"{spec_path}: no cases selected")
    return cases


def datalist_from_spec(spec: Any, base: str) -> List[Case]:
    """Parse a dataset.json / datalist (see the module docstring) with paths relative to ``base``."""
    default_names: Dict[int, str] = {}
    entries: List[Any]
    if isinstance(spec, list):
        entries = spec
    elif isinstance(spec, dict):
        default_names = parse_label_names(spec.get("labels", {}))
        entries = next((spec[k] for k in ("cases", "training", "train", "data") if isinstance(spec.get(k), list)), None)
        if entries is None:
            raise ValueError("dataset.json needs a 'cases' (or 'training'/'train') list")
    else:
        raise ValueError("a datalist is a list of cases or an object with 'labels' and 'cases'")
    image_suffix = spec.get("image_file_suffix", "") if isinstance(spec, dict) else ""
    label_suffix = spec.get("label_file_suffix", "") if isinstance(spec, dict) else ""
    cases = []
    for item in entries:
        if isinstance(item, dict) and "image" in item and "label" in item:
            image = _resolve(base, item["image"])
            label = _resolve(base, item["label"])
            case_id = item.get("id") or strip_image_suffix(os.path.basename(image))
        else:
            case_id = _case_id(item)
            if not image_suffix or not label_suffix:
                raise ValueError("dataset.json cases given by id need 'image_file_suffix' and 'label_file_suffix'")
            image = os.path.join(base, case_id + image_suffix)
            label = os.path.join(base, case_id + label_suffix)
        names = dict(default_names)
        if isinstance(item, dict) and item.get("label_names"):
            names = parse_label_names(item["label_names"])
        if not names:
            raise ValueError(f"case {case_id!r}: no label names (give 'labels' in dataset.json or 'label_names')")
        pseudo = _resolve(base, item["pseudo"]) if isinstance(item, dict) and item.get("pseudo") else None
        cases.append(Case(id=str(case_id), image=image, label=label, label_names=names, pseudo=pseudo))
    return cases


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def attach_pseudo_labels(cases: Sequence[Case], folder: str) -> int:
    """Set ``case.pseudo`` to ``<folder>/<case id or image name>.nii(.gz)`` where such a file exists; -> count."""
    found = 0
    for case in cases:
        stems = [case.id, strip_image_suffix(os.path.basename(case.image))]
        for stem in stems:
            hit = next((os.path.join(folder, stem + s) for s in NIFTI_SUFFIXES
                        if os.path.isfile(os.path.join(folder, stem + s))), None)
            if hit:
                case.pseudo = hit
                found += 1
                break
    return found


def cases_from_datastore(datastore, default_names: Dict[int, str], pseudo_tag: str = "fh") -> List[Case]:
    """The datastore's final labels -> cases. Label names come from the label's info (``label_info`` as Slicer and
    the DICOM SEG converter store it, or ``label_names``), else ``default_names`` (the app's /info label indices)."""
    cases = []
    for item in datastore.datalist():
        image, label = item["image"], item["label"]
        case_id = strip_image_suffix(os.path.basename(image))
        names = dict(default_names)
        try:
            info = datastore.get_label_info(case_id, "final") or {}
        except Exception:  # remote datastores may not keep label info
            info = {}
        for key in ("label_info", "label_names", "labels"):
            if info.get(key):
                try:
                    names = parse_label_names(info[key])
                    break
                except ValueError as error:
                    logger.warning("label %s: ignoring its %s (%s)", case_id, key, error)
        pseudo = None
        try:
            uri = datastore.get_label_uri(case_id, pseudo_tag) if pseudo_tag else ""
            pseudo = uri if uri and os.path.isfile(uri) else None
        except Exception:
            pseudo = None
        cases.append(Case(id=case_id, image=image, label=label, label_names=names, pseudo=pseudo))
    return cases


def split_cases(cases: Sequence[Case], val_split: float, seed: int = 0) -> Tuple[List[Case], List[Case]]:
    """Deterministic split: ``round(val_split * n)`` validation cases (at least one training case is kept)."""
    cases = list(cases)
    n_val = int(round(max(0.0, min(float(val_split), 1.0)) * len(cases)))
    n_val = min(n_val, len(cases) - 1) if len(cases) > 1 else 0
    if n_val <= 0:
        return cases, []
    order = np.random.default_rng(seed).permutation(len(cases))
    val = {int(i) for i in order[:n_val]}
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


# ---------------------------------------------------------------------------------------------------------------------
# prepared cases
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedCase:
    """A case through the preprocessing: ``prepared`` (native image, zoom-out view, frames), the label map in the
    native frame, the prompt text of every label value present, and (validation) the label on the original grid."""

    case: Case
    prepared: PreparedImage
    label: np.ndarray  # native frame, int32
    texts: Dict[int, str]  # label value -> text prompt, only values present in the label map
    pseudo: Optional[np.ndarray] = None  # native frame, int32 (0 = unlabelled)
    original_label: Optional[np.ndarray] = None  # original grid (kept for validation)
    _zoom: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _foreground: Optional[np.ndarray] = field(default=None, repr=False)
    _boxes: Optional[Dict[int, np.ndarray]] = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        total = self.prepared.nbytes + self.label.nbytes
        total += self.pseudo.nbytes if self.pseudo is not None else 0
        total += self.original_label.nbytes if self.original_label is not None else 0
        return int(total)

    def zoom_label(self, which: str = "label") -> torch.Tensor:
        """The label (or pseudo) map in the zoom-out frame: nearest-exact, the same voxels the image view samples."""
        if which not in self._zoom:
            source = self.label if which == "label" else self.pseudo
            size = tuple(self.prepared.zoom_out.shape[-3:])
            tensor = torch.from_numpy(source.astype(np.float32))[None, None]
            self._zoom[which] = F.interpolate(tensor, size=size, mode="nearest-exact")[0, 0].round().to(torch.int32)
        return self._zoom[which]

    def foreground(self) -> np.ndarray:
        """Flat indices of the labelled voxels (native frame), for positive crop centres."""
        if self._foreground is None:
            self._foreground = np.flatnonzero(np.isin(self.label, list(self.texts)))
        return self._foreground

    def object_boxes(self) -> Dict[int, np.ndarray]:
        """Label value -> the whole structure's inclusive native box (d0, h0, w0, d1, h1, w1), for every text."""
        if self._boxes is None:
            from scipy import ndimage

            found = ndimage.find_objects(np.where(np.isin(self.label, list(self.texts)), self.label, 0))
            self._boxes = {value: np.asarray([s.start for s in found[value - 1]] + [s.stop - 1 for s in
                                                                                     found[value - 1]], np.int64)
                           for value in self.texts if value - 1 < len(found) and found[value - 1] is not None}
        return self._boxes


def model_frame(prepared: PreparedImage, array: np.ndarray, what: str) -> np.ndarray:
    """An array on the original image grid -> the native frame (orientation + foreground crop)."""
    if tuple(array.shape) != tuple(prepared.frames.original_shape):
        raise ValueError(f"{what} has shape {tuple(array.shape)} but the image has {prepared.frames.original_shape}")
    return np.ascontiguousarray(prepared.frames.axis_map.to_model(array)[prepared.frames.crop.slices])


def _read_labels(path: str) -> np.ndarray:
    array = np.asarray(read_image(path).array)
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    return array.astype(np.int32)


def prepare_case(case: Case, image_size: Sequence[int], resolve: Callable[[str], str], reorient: bool = True,
                 keep_original_label: bool = False) -> PreparedCase:
    """Read and preprocess one case. ``resolve`` turns a label name into its text prompt (vocabulary spelling)."""
    volume = read_image(case.image)
    prepared = preprocess(volume.array, volume.affine, image_size, reorient=reorient)
    original = _read_labels(case.label)
    label = model_frame(prepared, original, f"label {case.label}")
    present = set(np.unique(label).tolist()) - {0}
    unnamed = sorted(v for v in present if v not in case.label_names)
    if unnamed:
        logger.warning("case %s: label values %s have no name and are ignored", case.id, unnamed)
    texts = {v: resolve(case.label_names[v]) for v in sorted(present) if v in case.label_names}
    pseudo = None
    if case.pseudo:
        try:
            pseudo = model_frame(prepared, _read_labels(case.pseudo), f"pseudo labels {case.pseudo}")
        except (ValueError, OSError) as error:
            logger.warning("case %s: pseudo labels ignored (%s)", case.id, error)
    return PreparedCase(case=case, prepared=prepared, label=label, texts=texts, pseudo=pseudo,
                        original_label=original if keep_original_label else None)


class CaseStore:
    """Prepared cases by index, loaded on first use and kept in a byte-bounded LRU (thread-safe)."""

    def __init__(self, cases: Sequence[Case], image_size: Sequence[int], resolve: Callable[[str], str],
                 reorient: bool = True, cache_mb: float = 4096, keep_original_label: bool = False):
        self.cases = list(cases)
        self.image_size = tuple(int(s) for s in image_size)
        self.resolve = resolve
        self.reorient = reorient
        self.keep_original_label = keep_original_label
        self.max_bytes = int(cache_mb * 2 ** 20)
        self._items: "OrderedDict[int, PreparedCase]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> PreparedCase:
        with self._lock:
            item = self._items.get(index)
            if item is not None:
                self._items.move_to_end(index)
                return item
        item = prepare_case(self.cases[index], self.image_size, self.resolve, self.reorient, self.keep_original_label)
        with self._lock:
            if index not in self._items:
                self._items[index] = item
                self._bytes += item.nbytes
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return item

    def names(self) -> Dict[str, str]:
        """{label name: text prompt} over every case's declared names."""
        out: Dict[str, str] = {}
        for case in self.cases:
            for name in case.label_names.values():
                out.setdefault(name, self.resolve(name))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class View:
    """One training input of ``image_size``: image (1, D, H, W) in [0, 1], label and pseudo maps (D, H, W) int32,
    and the text prompt of each label value present in the view."""

    image: torch.Tensor
    label: torch.Tensor
    texts: Dict[int, str]
    pseudo: Optional[torch.Tensor] = None
    kind: str = "zoom_out"
    case_id: str = ""
    # crops: per label value, the whole structure's box clipped to the crop, in crop voxels: the box the engine gives
    # a zoom-in window (the user's box clipped to it), often looser than the tight box of the part in view
    window_boxes: Optional[Dict[int, np.ndarray]] = None


@dataclass
class ViewConfig:
    zoom_out_prob: float = 0.5  # the reference's OneOf([zoom-out, crop]) with equal weights
    pos_fraction: float = 2.0 / 3.0  # crops centred on a labelled voxel (RandCropByPosNeg pos=2, neg=1)
    min_voxels: int = 2  # a category is trained in a view only with at least this many voxels there
    intensity_prob: float = 0.1  # each of: scale by 1 +- 0.1, shift by +- 0.1 (the reference's augmentation)


def sample_view(case: PreparedCase, rng: np.random.Generator, config: ViewConfig = ViewConfig()) -> View:
    """A zoom-out view or a native crop of one prepared case (see the module docstring)."""
    size = tuple(int(s) for s in case.prepared.zoom_out.shape[-3:])
    kind = "zoom_out" if rng.random() < config.zoom_out_prob else "crop"
    if kind == "zoom_out":
        image = case.prepared.zoom_out[0].clone()
        label = case.zoom_label("label")
        pseudo = case.zoom_label("pseudo") if case.pseudo is not None else None
        texts = _present(label, case.texts, config.min_voxels)
        if not texts:
            kind = "crop"  # every structure vanished in the resize: fall back to a positive crop
    window_boxes = None
    if kind == "crop":
        image, label, pseudo, texts, window = _crop(case, size, rng, positive=rng.random() < config.pos_fraction,
                                                    min_voxels=config.min_voxels)
        if not texts and case.foreground().size:
            # a negative crop with no structure trains nothing supervised: take a positive one instead
            image, label, pseudo, texts, window = _crop(case, size, rng, positive=True, min_voxels=config.min_voxels)
        boxes = case.object_boxes()
        window_boxes = {value: window.box_to_window(boxes[value]) for value in texts if value in boxes}
    image = _augment(image, rng, config.intensity_prob)
    return View(image=image, label=label, texts=texts, pseudo=pseudo, kind=kind, case_id=case.case.id,
                window_boxes=window_boxes)


def _present(label: torch.Tensor, texts: Dict[int, str], min_voxels: int) -> Dict[int, str]:
    if not texts:
        return {}
    counts = torch.bincount(label.flatten().clamp(min=0).long(), minlength=max(texts) + 1)
    return {v: t for v, t in texts.items() if int(counts[v]) >= min_voxels}


def _crop(case: PreparedCase, size, rng: np.random.Generator, positive: bool, min_voxels: int):
    native_shape = case.prepared.native.shape
    foreground = case.foreground()
    if positive and foreground.size:
        centre = np.unravel_index(int(foreground[rng.integers(foreground.size)]), native_shape)
    else:
        centre = tuple(int(rng.integers(n)) for n in native_shape)
    start = tuple(int(min(max(c - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, size, native_shape))
    window = case.prepared.frames.window(start)
    image = torch.from_numpy(window.extract(case.prepared.native))[None]
    label = torch.from_numpy(window.extract(case.label))
    pseudo = torch.from_numpy(window.extract(case.pseudo)) if case.pseudo is not None else None
    return image, label, pseudo, _present(label, case.texts, min_voxels), window


def _augment(image: torch.Tensor, rng: np.random.Generator, probability: float) -> torch.Tensor:
    if probability <= 0:
        return image
    if rng.random() < probability:
        image = image * float(1.0 + rng.uniform(-0.1, 0.1))
    if rng.random() < probability:
        image = image + float(rng.uniform(-0.1, 0.1))
    return image


def view_rng(seed: int, epoch: int, index: int, rank: int = 0) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, epoch, position), so a resumed run draws what an
    uninterrupted one would have drawn."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(rank)])


def step_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of one step's step-level draws (``step.build_batch``): the same on every rank."""
    return np.random.default_rng([int(seed), int(epoch), int(step), 7919])


def fixed_view_rng(seed: int, case: int, variant: int) -> np.random.Generator:
    """The generator of a case's fixed view number ``variant`` (``TrainOptions.views_per_case``): the same view in
    every epoch, so a frozen image encoder's embedding of it can be computed once."""
    return np.random.default_rng([int(seed), int(case), int(variant), 104729])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), 7919]).permutation(n)


__all__ = [
    "Case", "CaseStore", "PreparedCase", "View", "ViewConfig", "attach_pseudo_labels", "cases_from_datastore",
    "datalist_from_spec", "epoch_order", "fixed_view_rng", "load_dataset", "parse_case_slice", "parse_label_names",
    "prepare_case", "sample_view", "split_cases", "step_rng", "view_rng",
]
