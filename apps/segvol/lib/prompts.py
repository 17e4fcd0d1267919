"""Parsing of the prompt fields clients send (OHIF vista3d points and label indices, Slicer clicks, ROI and segment
name, the project's own ``texts``/``box``) straight into the library's one prompt type, ``segvol.prompts.Prompts``
(which checks the numbers, once), held by ``PromptRequest`` with what the app echoes and numbers labels by
(``requested``, ``values``, ``segment_name``); the engine's session takes ``PromptRequest.prompts`` as it is.

All coordinates are voxel indices (i, j, k) of the image as stored in the file or DICOM series, which is what OHIF
and Slicer send. Malformed input raises ``BadPromptError``/``BadTextError``, which the app answers with HTTP 4xx.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import segvol.prompts
from segvol.errors import BadPromptError, BadTextError
from segvol.vocabulary import Vocabulary

from .validation import parse_bool

Point = Tuple[float, float, float]
Box = Tuple[float, float, float, float, float, float]  # i0, j0, k0, i1, j1, k1 (inclusive)

# Slicer names new segments "Segment_1", "Segment_2"...: such a name carries no meaning to use as a text prompt.
_GENERIC_SEGMENT = re.compile(r"^\s*(segment|label|background|foreground)?[\s_-]*\d*\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class PromptRequest:
    """A request's prompts, in the library's one prompt type (``segvol.prompts.Prompts``, validated on construction),
    and what the app echoes and numbers labels by."""

    prompts: segvol.prompts.Prompts
    requested: List[Any] = field(default_factory=list)  # what the client asked for, echoed in the response
    values: Dict[str, int] = field(default_factory=dict)  # text -> the label value its label_prompt index asks for
    segment_name: Optional["SegmentName"] = None  # how a client's segment name was treated (interactive faces)

    @classmethod
    def from_clicks(cls, texts: Sequence[str] = (), positive: Sequence[Point] = (), negative: Sequence[Point] = (),
                    box: Optional[Box] = None, **extra: Any) -> "PromptRequest":
        return cls(segvol.prompts.Prompts.from_clicks(texts, positive, negative, box), **extra)


def parse_point(value: Any, what: str) -> Point:
    """``[i, j, k]`` voxel coordinates as sent (fractions kept: the model takes them as they are); the numbers are
    checked once, by ``segvol.prompts.Prompts``."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise BadPromptError(f"{what} must be [i, j, k] voxel coordinates (three numbers), got {str(value)[:80]}")
    return tuple(value)  # type: ignore[return-value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_points(value: Any, what: str) -> List[Point]:
    if value in (None, "", []):
        return []
    if not isinstance(value, (list, tuple)):
        raise BadPromptError(f"{what} must be a list of [i, j, k] points, got {value!r}")
    return [parse_point(v, f"{what}[{n}]") for n, v in enumerate(value)]


def _six_numbers(value: Any, name: str, layout: str) -> Optional[List[float]]:
    """A request field of 6 voxel coordinates as sent, or None when absent."""
    if value in (None, "", []):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6 or not all(_is_number(v) for v in value):
        raise BadPromptError(f"{name} must be {layout} (six numbers), got {str(value)[:120]}")
    return list(value)


def parse_slicer_roi(value: Any) -> Optional[Box]:
    """Slicer's ``roi = [i0, i1, j0, j1, k0, k1]``; each pair may come reversed (RAS->IJK flips), so it is sorted."""
    numbers = _six_numbers(value, "roi", "[i0, i1, j0, j1, k0, k1]")
    if numbers is None:
        return None
    (i0, i1), (j0, j1), (k0, k1) = (sorted(numbers[a:a + 2]) for a in (0, 2, 4))
    return (i0, j0, k0, i1, j1, k1)


def parse_box(value: Any) -> Optional[Box]:
    """The project's own ``box = [i0, j0, k0, i1, j1, k1]`` (inclusive), for scripts and the Python client; an
    inverted box is refused by ``Prompts``."""
    numbers = _six_numbers(value, "box", "[i0, j0, k0, i1, j1, k1]")
    return None if numbers is None else tuple(numbers)  # type: ignore[return-value]


def label_prompt_indices(label_prompt: Any) -> List[Optional[int]]:
    """OHIF's ``label_prompt``: indices into the model's /info labels (one index alone, or a list) -> the indices,
    ``None`` kept where OHIF sends ``null`` (a label its model does not list). Booleans, fractions and words are
    refused rather than rounded or looked up. The HTTP checks and the infer tasks both read it with this."""
    if label_prompt in (None, "", []):
        return []
    if isinstance(label_prompt, (int, str)) and not isinstance(label_prompt, bool):
        label_prompt = [label_prompt]
    if not isinstance(label_prompt, (list, tuple)):
        raise BadTextError(f"label_prompt must be a list of label indices from /info, got {str(label_prompt)[:80]}")
    indices: List[Optional[int]] = []
    for number, value in enumerate(label_prompt):
        index = None if value is None else _as_index(value)
        if value is not None and index is None:
            raise BadTextError(f"label_prompt[{number}] must be a label index (an integer from /info), got "
                               f"{str(value)[:40]!r}")
        indices.append(index)
    return indices


def parse_label_prompt(request: dict, lookup: Callable[[int], str]) -> List[Tuple[str, int]]:
    """``label_prompt`` (``label_prompt_indices``) -> ``(text prompt, index)`` pairs; ``null`` entries skipped."""
    return [(lookup(index), index) for index in label_prompt_indices(request.get("label_prompt"))
            if index is not None]


def _as_index(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def parse_texts(request: dict, vocabulary: Vocabulary,
                lookup: Optional[Callable[[int], str]] = None) -> Tuple[List[str], Dict[str, int]]:
    """Explicit ``texts`` (names) and ``label_prompt`` (indices) -> text prompts, and the value each index asks for.

    ``lookup`` maps a ``label_prompt`` index to its text (default: the vocabulary's served indices). The values map
    a text to the index it was asked by, so the result gives it back under that index; a text asked by two indices
    (a name and its client alias) keeps the smaller one.
    """
    free_text = requested_free_text(request)
    texts: List[str] = []
    raw_texts = request.get("texts")
    if raw_texts not in (None, "", []):
        if isinstance(raw_texts, str):
            raw_texts = [raw_texts]
        if not isinstance(raw_texts, (list, tuple)) or not all(isinstance(t, str) for t in raw_texts):
            raise BadTextError(f"texts must be a list of names, got {raw_texts!r}")
        texts += [vocabulary.resolve(t, allow_free_text=free_text) for t in raw_texts]
    values: Dict[str, int] = {}
    for text, index in parse_label_prompt(request, lookup or (lambda i: vocabulary.by_index(i).name)):
        texts.append(text)
        values[text] = min(index, values.get(text, index))
    return list(dict.fromkeys(texts)), values


@dataclass
class SegmentName:
    """How a client's segment name (Slicer's ``label``, scribbles' ``selected_label_name``) was treated."""

    sent: Optional[str] = None
    text: Optional[str] = None  # the text prompt it gave, if any
    treated_as: str = "none"  # "vocabulary", "free text", "generic" (Segment_1...), "unknown" or "none"
    reason: Optional[str] = None  # why an unknown name was not used

    @property
    def warning(self) -> Optional[str]:
        if not self.reason:
            return None
        return (f"{self.reason}, so it was not sent to the model; the result comes from the clicks and the ROI. To use "
                "it as free text, set free_text (Slicer: Options, infer, this model) or start the server with "
                "--conf segment_name_free_text true")

    def to_json(self) -> dict:
        return {"name_used": self.text if self.text else None,
                "name_ignored": self.sent if self.sent and not self.text else None,
                "name_treated_as": self.treated_as}


def parse_segment_name(name: Any, vocabulary: Vocabulary, free_text: bool) -> SegmentName:
    """Slicer's current segment name as a text prompt.

    A vocabulary name (any spelling) gives its training text; a generic name ("Segment_1") gives none; any other name
    gives none either, with a warning, unless ``free_text`` is on: then it goes to the model as typed. The clicks and
    the ROI are used in every case, so an annotator's own segment name never costs them their prompts.
    """
    if name in (None, ""):
        return SegmentName()
    if not isinstance(name, str):
        raise BadTextError(f"label must be a segment name, got {name!r}")
    if _GENERIC_SEGMENT.match(name):
        return SegmentName(sent=name, treated_as="generic")
    category = vocabulary.find(name)
    if category is not None:
        return SegmentName(sent=name, text=category.name, treated_as="vocabulary")
    if free_text:
        return SegmentName(sent=name, text=name.strip(), treated_as="free text")
    suggestions = vocabulary.closest(name)
    hint = f" (closest known names: {', '.join(repr(s) for s in suggestions)})" if suggestions else ""
    return SegmentName(sent=name, treated_as="unknown", reason=f"segment name {name!r} is not in the vocabulary{hint}")


def vista_points(request: dict) -> Tuple[List[Point], List[Point]]:
    """OHIF vista3d: ``points`` with ``point_labels`` (1 foreground, 0 background)."""
    points = parse_points(request.get("points"), "points")
    labels = request.get("point_labels")
    if not points:
        return [], []
    if not isinstance(labels, (list, tuple)) or len(labels) != len(points):
        raise BadPromptError(f"point_labels must give one label (1 or 0) per point: {len(points)} points, "
                             f"labels {labels!r}")
    positive, negative = [], []
    for point, label in zip(points, labels):
        if label in (1, "1", True):
            positive.append(point)
        elif label in (0, "0", False):
            negative.append(point)
        else:
            raise BadPromptError(f"point_labels entries must be 1 (foreground) or 0 (background), got {label!r}")
    return positive, negative


def requested_free_text(request: dict) -> bool:
    return parse_bool(request.get("free_text"), "params.free_text", False)
