"""The prompts of one request, validated once: ``Prompts`` (texts, positive/negative points, one box) is the single
prompt type from a client to the decoder. The app's request parsing builds it (``apps/segvol/lib/prompts.py``), the
engine's ``segment(texts=..., box=..., points=...)`` keywords build it, and an ``ImageSession`` maps it once into the
native frame (``NativePrompts``, with the checks that need the image: inside the array, inside the body), where
zoom-in planning and the per-window prompts read it. Coordinates are voxel indices of the image array as stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BadPromptError, BadTextError
from .windows import union_box

OBJECT_LABEL = "object"  # the single label of a request with a box/points and no text
Point = Tuple[float, float, float, int]  # i, j, k, label (1 positive, 0 negative)


def check_texts(texts: Any) -> Tuple[str, ...]:
    """Category names -> stripped, de-duplicated tuple. None (and the empty tuple of a ``Prompts`` without text) means
    no text; an empty list or a non-string name is a ``BadTextError``."""
    if texts is None or texts == ():
        return ()
    if isinstance(texts, str):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise BadTextError(f"texts must be a list of category names, got {type(texts).__name__}") from None
    if not texts:
        raise BadTextError("the text list is empty: give at least one category name (or pass texts=None with a "
                           "box or points)")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise BadTextError(f"category names must be non-empty strings, got {text!r}")
    return tuple(dict.fromkeys(t.strip() for t in texts))  # duplicates would only repeat a label


def check_points(points: Any) -> Tuple[Point, ...]:
    """``[(i, j, k, label), ...]`` or ``(coords (N, 3), labels (N,))`` -> ``((i, j, k, label), ...)`` in the given
    order (the decoder sees them in that order)."""
    if points is None:
        return ()
    try:
        if isinstance(points, tuple) and len(points) == 2 and np.ndim(points[0]) == 2:
            coords = np.asarray(points[0], dtype=np.float64).reshape(-1, 3)
            labels = np.asarray(points[1], dtype=np.float64).reshape(-1)
        else:
            rows = np.asarray([list(p) for p in points], dtype=np.float64)
            if rows.size == 0:
                return ()
            if rows.ndim != 2 or rows.shape[1] != 4:
                raise ValueError
            coords, labels = rows[:, :3], rows[:, 3]
    except (TypeError, ValueError):
        raise BadPromptError("points must be [(i, j, k, label), ...] or (coords (N, 3), labels (N,)) with label "
                             "1 (positive) or 0 (negative)") from None
    if len(coords) != len(labels):
        raise BadPromptError(f"{len(coords)} point coordinates but {len(labels)} labels")
    if not np.isfinite(coords).all():
        raise BadPromptError("point coordinates must be finite numbers")
    if not np.isin(labels, (0, 1)).all():
        raise BadPromptError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels.tolist()))}")
    return tuple((*map(float, c), int(label)) for c, label in zip(coords, labels))


def check_box(box: Any) -> Optional[Tuple[float, ...]]:
    """``[i0, j0, k0, i1, j1, k1]`` (inclusive) -> a tuple of 6 finite numbers with low <= high, or None."""
    if box is None:
        return None
    try:
        values = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise BadPromptError(f"a box is 6 finite numbers [i0, j0, k0, i1, j1, k1], got {box!r}"[:200]) from None
    if values.size != 6 or not np.isfinite(values).all():
        raise BadPromptError(f"a box is 6 finite numbers [i0, j0, k0, i1, j1, k1], got {list(values)}")
    if np.any(values[:3] > values[3:]):
        raise BadPromptError(f"inverted box {values.tolist()}: need i0 <= i1, j0 <= j1, k0 <= k1")
    return tuple(float(v) for v in values)


def _plain(value: float):
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True)
class Prompts:
    """Texts (category names), points ``(i, j, k, label)`` (1 positive, 0 negative) and an inclusive box, checked on
    construction (``BadTextError``/``BadPromptError``). One box applies to every text; with no text the result is the
    single label ``"object"``."""

    texts: Tuple[str, ...] = ()
    points: Tuple[Point, ...] = ()
    box: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        object.__setattr__(self, "texts", check_texts(self.texts))
        object.__setattr__(self, "points", check_points(self.points))
        object.__setattr__(self, "box", check_box(self.box))

    @classmethod
    def from_clicks(cls, texts: Sequence[str] = (), positive: Sequence[Sequence[float]] = (),
                    negative: Sequence[Sequence[float]] = (), box=None, **extra):
        """Texts (empty: none), positive and negative clicks ``[i, j, k]`` and a box (positives first)."""
        points = [(*p, 1) for p in positive] + [(*p, 0) for p in negative]
        return cls(texts=tuple(texts) if texts else None, points=points or None, box=box, **extra)

    @property
    def positive(self) -> List[Tuple[float, ...]]:
        return [tuple(p[:3]) for p in self.points if p[3] == 1]

    @property
    def negative(self) -> List[Tuple[float, ...]]:
        return [tuple(p[:3]) for p in self.points if p[3] == 0]

    def is_empty(self) -> bool:
        """No text, no positive point and no box: nothing says what or where to segment."""
        return not (self.texts or self.positive or self.box)

    def to_json(self) -> dict:
        return {"texts": list(self.texts), "positive_points": [[_plain(v) for v in p] for p in self.positive],
                "negative_points": [[_plain(v) for v in p] for p in self.negative],
                "box": [_plain(v) for v in self.box] if self.box else None}


@dataclass
class NativePrompts:
    """The spatial prompts in the native frame: an inclusive box, points (N, 3) and labels (N,) 1/0, and what was
    dropped for lying outside the body."""

    box: Optional[np.ndarray]
    points: np.ndarray
    labels: np.ndarray
    dropped: List[str] = field(default_factory=list)

    @property
    def positive(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def extent(self) -> Optional[np.ndarray]:
        """Inclusive box around the user's box and positive points (negative points do not grow the ROI)."""
        boxes = [self.box]
        if len(self.positive):
            rounded = np.rint(self.positive).astype(np.int64)
            boxes.append(np.concatenate([rounded.min(0), rounded.max(0)]))
        return union_box(boxes)

    def any(self) -> bool:
        return self.box is not None or len(self.points) > 0


def to_native(prompts: Prompts, frames) -> NativePrompts:
    """Map the spatial prompts to the native frame of ``frames`` (``segvol.frames``): a box or point outside the
    array is a ``BadPromptError``; one outside the body (the foreground crop) is dropped and said so."""
    shape = np.asarray(frames.original_shape)
    dropped: List[str] = []
    native_box = None
    if prompts.box is not None:
        values = np.asarray(prompts.box)
        low, high = values[:3], values[3:]
        if np.any(low < 0) or np.any(high > shape - 1):
            raise BadPromptError(f"box {values.tolist()} is outside the image (valid indices 0..{list(shape - 1)})")
        native_box = frames.original_to_native_box(np.concatenate([np.floor(low), np.ceil(high)]))
        if native_box is None:
            dropped.append("box: outside the body (foreground) region")
    coords = np.asarray([p[:3] for p in prompts.points], dtype=np.float64).reshape(-1, 3)
    labels = np.asarray([p[3] for p in prompts.points], dtype=np.int64)
    if len(coords):
        outside = np.any(coords < 0, axis=1) | np.any(coords > shape - 1, axis=1)
        if outside.any():
            raise BadPromptError(f"point {coords[outside][0].tolist()} is outside the image "
                                 f"(valid indices 0..{list(shape - 1)})")
        model_points = frames.axis_map.points_to_model(coords)
        inside = frames.crop.contains(model_points)
        for point in coords[~inside]:
            dropped.append(f"point {point.tolist()}: outside the body (foreground) region")
        coords, labels = frames.crop.points_to_native(model_points[inside]), labels[inside]
    return NativePrompts(native_box, coords.reshape(-1, 3), labels.astype(np.int64), dropped)
