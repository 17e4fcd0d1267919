"""Training prompts: per view and category, a jittered box and positive/negative points, and the six combinations.

As in the paper (``segvol-reference.md`` section 6.5), every category of a view is trained with six prompt
combinations decoded against the same image embedding: point+text, box+text, text, box, point, box+point. Unlike the
reference (section 9 item 23):

* the box is jittered (each face moves by up to ``box_jitter`` of the box's extent on that axis, at least one voxel
  when jitter is on) and always stays inside the view with min <= max;
* positive points are distinct voxels of the object;
* negative points come partly (``boundary_fraction``) from a ring just outside the object (``ring`` voxels wide),
  where a clinician clicks to correct a leak, and the rest from anywhere else in the view.

Coordinates are (d, h, w) voxel indices of the view, like every SegVol prompt. Point lists are padded to a common
length with label -1 (the prompt encoder's "not a point").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..frames import bounding_box

COMBINATIONS: Tuple[str, ...] = ("point+text", "box+text", "text", "box", "point", "box+point")
PAD_LABEL = -1


def combination_parts(name: str) -> Tuple[bool, bool, bool]:
    """'box+text' -> (text, box, points) flags."""
    parts = set(name.split("+"))
    unknown = parts - {"text", "box", "point"}
    if unknown or not parts:
        raise ValueError(f"unknown prompt combination {name!r}; use some of text, box, point joined by '+'")
    return "text" in parts, "box" in parts, "point" in parts


@dataclass
class PromptConfig:
    box_jitter: float = 0.1  # fraction of the box extent each face may move (0: the tight box)
    max_positive: int = 10  # positives per prompt: uniform in 1..max_positive (distinct voxels)
    max_negative: int = 10  # negatives per prompt: uniform in 0..max_negative
    boundary_fraction: float = 0.5  # share of negatives taken from the ring just outside the object
    ring: int = 3  # ring width in voxels
    # share of a crop's targets whose box prompt is the box a zoom-in window gets (the structure's whole box clipped
    # to the crop, jittered as the tight one) instead of the tight box of the part in view: what a session's windows
    # are given, looser than the part they show where a structure runs past the window
    window_box_prob: float = 0.0


@dataclass
class PromptSample:
    box: np.ndarray  # (6,) int64 inclusive [d0, h0, w0, d1, h1, w1]
    points: np.ndarray  # (N, 3) float32
    labels: np.ndarray  # (N,) int64, 1 positive / 0 negative


def jitter_box(box: np.ndarray, shape: Sequence[int], rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Move each face of an inclusive box by up to ``fraction`` of its extent; clipped, never inverted."""
    box = np.asarray(box, dtype=np.int64).copy()
    if fraction <= 0:
        return box
    upper = np.asarray(shape, dtype=np.int64) - 1
    for axis in range(3):
        extent = int(box[axis + 3] - box[axis] + 1)
        shift = max(1, int(round(fraction * extent)))
        low = int(box[axis]) + int(rng.integers(-shift, shift + 1))
        high = int(box[axis + 3]) + int(rng.integers(-shift, shift + 1))
        low = min(max(low, 0), int(upper[axis]))
        high = min(max(high, 0), int(upper[axis]))
        if high < low:
            low = high = (low + high) // 2
        box[axis], box[axis + 3] = low, high
    return box


def boundary_ring(mask: np.ndarray, box: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Voxels within ``width`` of the object but outside it, as (flat-index array in the view, count).

    Computed inside the box grown by ``width + 1`` only, so its cost does not grow with the view size."""
    shape = mask.shape
    low = np.maximum(box[:3] - width - 1, 0)
    high = np.minimum(box[3:] + width + 2, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    sub = mask[region]
    ring = ndimage.binary_dilation(sub, iterations=max(1, int(width))) & ~sub
    local = np.argwhere(ring) + low
    flat = np.ravel_multi_index(tuple(local.T), shape) if len(local) else np.zeros(0, dtype=np.int64)
    return flat, len(flat)


def sample_points(mask: np.ndarray, box: np.ndarray, rng: np.random.Generator, config: PromptConfig,
                  n_positive: Optional[int] = None, n_negative: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct positive voxels of ``mask`` and negatives (ring + elsewhere) -> coords (N, 3), labels (N,)."""
    shape = mask.shape
    inside = np.flatnonzero(mask)
    if n_positive is None:
        n_positive = 1 + int(rng.integers(0, max(config.max_positive, 1)))
    if n_negative is None:
        n_negative = int(rng.integers(0, config.max_negative + 1))
    n_positive = min(n_positive, inside.size)
    positives = rng.choice(inside, size=n_positive, replace=False) if n_positive else np.zeros(0, dtype=np.int64)
    negatives = np.zeros(0, dtype=np.int64)
    if n_negative:
        n_ring = int(round(n_negative * config.boundary_fraction))
        ring, count = boundary_ring(mask, box, config.ring) if n_ring else (np.zeros(0, dtype=np.int64), 0)
        from_ring = rng.choice(ring, size=min(n_ring, count), replace=False) if count else ring[:0]
        n_far = n_negative - len(from_ring)
        far = np.zeros(0, dtype=np.int64)
        if n_far:
            # rejection sampling of background voxels: cheap because objects are a small part of a view
            candidates = rng.integers(0, mask.size, size=4 * n_far + 16)
            candidates = candidates[~mask.reshape(-1)[candidates]]
            far = np.unique(candidates)[:n_far]
        negatives = np.concatenate([from_ring, far]).astype(np.int64)
    flat = np.concatenate([positives, negatives]).astype(np.int64)
    coords = (np.stack(np.unravel_index(flat, shape), axis=1).astype(np.float32) if flat.size
              else np.zeros((0, 3), np.float32))
    labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
    return coords, labels


def sample_prompts(mask: np.ndarray, rng: np.random.Generator, config: PromptConfig = PromptConfig()) -> PromptSample:
    """Box (jittered) and points for one non-empty object mask (D, H, W) bool."""
    mask = np.asarray(mask, dtype=bool)
    tight = bounding_box(mask)
    if tight is None:
        raise ValueError("cannot sample prompts for an empty mask")
    coords, labels = sample_points(mask, tight, rng, config)
    return PromptSample(box=jitter_box(tight, mask.shape, rng, config.box_jitter), points=coords, labels=labels)


def stack_points(samples: Sequence[PromptSample], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Points of several prompts -> (B, N, 3) float, (B, N) float labels, padded with label -1 at (0, 0, 0)."""
    length = max([len(s.labels) for s in samples] + [1])
    coords = np.zeros((len(samples), length, 3), np.float32)
    labels = np.full((len(samples), length), PAD_LABEL, np.float32)
    for row, sample in enumerate(samples):
        coords[row, :len(sample.labels)] = sample.points
        labels[row, :len(sample.labels)] = sample.labels
    return torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device)


def stack_boxes(samples: Sequence[PromptSample], device=None) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.box for s in samples]).astype(np.float32)).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# pseudo-label (FH) prompts, the reference's unsupervised term (section 6.6)
# ---------------------------------------------------------------------------------------------------------------------
def pseudo_target(pseudo: np.ndarray, rng: np.random.Generator, kind: str, config: PromptConfig,
                  coverage: float = 0.9) -> Optional[Tuple[np.ndarray, PromptSample]]:
    """One pseudo-label training target of a view: (mask, prompts) or None when the view has no region.

    ``kind='point'``: a random region and its points (4..10 positives, as the reference). ``kind='box'``: a random
    region's (jittered) box; every region with at least ``coverage`` of its voxels inside the box joins the target.
    """
    ids, inverse, counts = np.unique(pseudo.reshape(-1), return_inverse=True, return_counts=True)
    valid = np.flatnonzero(ids > 0)
    if valid.size == 0:
        return None
    chosen = int(valid[rng.integers(valid.size)])
    inverse = inverse.reshape(pseudo.shape)
    mask = inverse == chosen
    tight = bounding_box(mask)
    if kind == "point":
        coords, labels = sample_points(mask, tight, rng, config, n_positive=int(rng.integers(4, 11)))
        return mask, PromptSample(box=tight, points=coords, labels=labels)
    box = jitter_box(tight, pseudo.shape, rng, config.box_jitter)
    region = tuple(slice(int(a), int(b) + 1) for a, b in zip(box[:3], box[3:]))
    inside = np.bincount(inverse[region].reshape(-1), minlength=len(ids))
    members = np.flatnonzero((inside >= coverage * counts) & (ids > 0))
    target = np.isin(inverse, members) | mask
    return target, PromptSample(box=box, points=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.int64))


__all__ = [
    "COMBINATIONS", "PromptConfig", "PromptSample", "boundary_ring", "combination_parts", "jitter_box",
    "pseudo_target", "sample_points", "sample_prompts", "stack_boxes", "stack_points",
]
