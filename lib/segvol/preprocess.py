"""The one preprocessing path: stored CT array -> native volume + zoom-out view, as the reference computes them.

Steps (reference ``data_process/demo_data_process.py``; see ``segvol.frames`` for the frames):

1. orient: stored array -> model ``(D, H, W)`` array (RAS reorientation by default, then the reference's axis swap);
2. intensity: threshold = mean of all voxels; over the voxels above it take the 0.05/99.95 percentiles, mean and
   std; clip, z-score, then min-max to [0, 1] (``reference_normalize``);
3. crop: bounding box of the voxels > 0 (the body: everything above the minimum intensity) -> native volume;
4. zoom-out: ``nearest-exact`` resize of the native volume to ``config.image_size``.

The reference normalises before its axis swap; statistics are order-free (the mean and std are taken in float64,
percentiles sort), so orienting first gives the same numbers and makes the result independent of how the CT happened
to be stored. The reference's pad-before-crop step is a no-op (its crop removes the pad again) and is skipped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadImageError
from .frames import AxisMap, Crop, ImageFrames, Zoom


@dataclass
class PreparedImage:
    """One preprocessed CT, ready for any number of prompts.

    ``native`` (D', H', W') float32 in [0, 1]; ``zoom_out`` (1, 1, *image_size) float32; ``frames`` maps prompts and
    results between the original array and every other frame; ``key`` identifies the content (for caches).
    """

    key: str
    frames: ImageFrames
    native: np.ndarray
    zoom_out: torch.Tensor
    affine: Optional[np.ndarray] = None
    stats: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.native.nbytes + self.zoom_out.numel() * self.zoom_out.element_size())


def check_volume(array: np.ndarray) -> np.ndarray:
    """A 3-D, finite, non-constant array (trailing singleton axes dropped), or ``BadImageError``."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise BadImageError(f"expected a 3-D CT volume, got an array of shape {tuple(array.shape)}")
    if array.size == 0 or min(array.shape) < 1:
        raise BadImageError(f"the image is empty (shape {tuple(array.shape)})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise BadImageError(f"the image has a non-numeric type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise BadImageError("the image contains NaN or infinite values")
    return array


def reference_normalize(volume: np.ndarray) -> np.ndarray:
    """CT intensities -> float32 in [0, 1] exactly as the reference (ForegroundNormalization, then MinMax).

    Raises ``BadImageError`` for a constant volume (nothing above the mean: no body to segment).
    """
    # element-wise steps in torch (the same IEEE float32 operations, on every core); statistics in numpy, whose
    # float64 pairwise sums and percentile interpolation the reference used
    try:
        x = torch.from_numpy(np.ascontiguousarray(volume)).to(torch.float32)
    except TypeError:  # a type torch lacks (or a foreign byte order): numpy converts it
        x = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    threshold = np.float32(np.mean(x.numpy(), dtype=np.float64))
    foreground = torch.masked_select(x, x > float(threshold)).numpy()
    if foreground.size == 0:
        raise BadImageError("the image is constant: every voxel has the same intensity, there is nothing to segment")
    low, high = np.percentile(foreground, [0.05, 99.95])
    mean = np.float32(np.mean(foreground, dtype=np.float64))
    std = np.float32(np.std(foreground, dtype=np.float64))
    del foreground
    out = torch.clamp(x, float(np.float32(low)), float(np.float32(high)))  # new: the caller's volume is kept
    out -= float(mean)
    out /= float(max(std, np.float32(1e-8)))
    out -= out.min()
    out /= max(out.max(), torch.tensor(1e-8, dtype=torch.float32))
    return out.numpy()


def foreground_crop(normalized: np.ndarray) -> Crop:
    """Bounding box of the voxels > 0 (the reference's ``CropForeground`` with its defaults)."""
    start, stop = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero((normalized > 0).any(axis=others))
        if present.size == 0:
            raise BadImageError("the image has no foreground (every voxel is at the minimum intensity)")
        start.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return Crop(tuple(start), tuple(stop))


def zoom_out_view(native: np.ndarray, image_size: Sequence[int]) -> torch.Tensor:
    """Native (D', H', W') -> (1, 1, *image_size) with ``nearest-exact`` (the reference demo's resize)."""
    tensor = torch.from_numpy(np.ascontiguousarray(native, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(int(s) for s in image_size), mode="nearest-exact")


def content_key(array: np.ndarray, axis_map: AxisMap, image_size: Sequence[int]) -> str:
    """A digest of the voxels (and the orientation and window size they are prepared for).

    A Fortran-ordered array (a NIfTI volume as read) is hashed in its own order, without a copy, under a key of its
    own: the same voxels stored the other way only miss the cache once."""
    layout = "C"
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        array, layout = array.T, "F"
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()  # hardware-accelerated on x86: ~1 GB/s
    digest.update(f"{array.dtype.str}|{array.shape}|{layout}|{axis_map.axes}|{axis_map.flips}|"
                  f"{tuple(image_size)}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:32]


def preprocess(array: np.ndarray, affine: Optional[np.ndarray] = None, image_size: Sequence[int] = (32, 256, 256),
               reorient: bool = True, key: Optional[str] = None) -> PreparedImage:
    """Stored CT array (X, Y, Z) (+ its affine) -> ``PreparedImage``.

    ``reorient=True`` turns the array to RAS before the reference's axis swap (what the training data went
    through); ``False`` feeds the stored order, like the reference demo. Without an affine the array is taken as
    RAS already (both options then coincide).
    """
    array = check_volume(array)
    axis_map = AxisMap.from_affine(affine, array.shape, reorient=reorient)
    key = key or content_key(array, axis_map, image_size)
    model_array = axis_map.to_model(array)
    normalized = reference_normalize(model_array)
    del model_array
    crop = foreground_crop(normalized)
    native = np.ascontiguousarray(normalized[crop.slices])
    del normalized
    frames = ImageFrames(axis_map, crop, Zoom(crop.shape, tuple(int(s) for s in image_size)))
    return PreparedImage(key=key, frames=frames, native=native, zoom_out=zoom_out_view(native, image_size),
                         affine=None if affine is None else np.asarray(affine, dtype=np.float64))


def reference_crop_box(prepared: PreparedImage) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The crop box as the reference records it (in its padded frame: it pads to image_size before cropping)."""
    model_shape = prepared.frames.model_shape
    size = prepared.frames.zoom.zoom_shape
    pad = [max(s - n, 0) // 2 for s, n in zip(size, model_shape)]
    crop = prepared.frames.crop
    return (tuple(a + p for a, p in zip(crop.start, pad)), tuple(b + p for b, p in zip(crop.stop, pad)))
