"""Every coordinate frame of the zoom-out-zoom-in pipeline, and the exact maps between them.

Frames, in pipeline order (all are voxel-index frames; a voxel's centre sits at its integer index):

1. **original**: indices ``(i, j, k)`` of the image array as stored in the file (what clients click on);
2. **model** ``(d, h, w)``: the array the reference feeds its network. By default the stored array is reoriented to
   RAS (no resampling: a signed axis permutation) and then the reference's ``swapaxes(-1, -3)`` is applied, so
   ``d`` runs inferior->superior, ``h`` posterior->anterior, ``w`` left->right. ``AxisMap`` holds this permutation;
   with ``reorient=False`` it is the bare axis swap (the reference demo's behaviour);
3. **native**: the model frame cropped to the foreground bounding box (``Crop``), at full resolution;
4. **zoom**: the native volume resized to ``config.image_size`` (32x256x256) with ``nearest-exact`` (``Zoom``);
5. **window**: one ``config.image_size`` sliding window over the native volume, zero-padded symmetrically where the
   native volume is smaller than the window (``Window``).

Points are float arrays ``(N, 3)``; boxes are ``[a0, a1, a2, b0, b1, b2]`` with inclusive integer voxel indices
(the reference's convention). Points map continuously (exact round trips); boxes map as *voxel sets*: the box in the
target frame holds exactly the voxels whose sampled source voxel lies in the source box (what rasterising, resizing
and taking the bounding box would give, computed analytically), never less than one voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

Triple = Tuple[int, int, int]


def as_points(points) -> np.ndarray:
    """Any (N, 3) sequence -> float64 array (N, 3) (N may be 0)."""
    array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return array


def as_box(box) -> np.ndarray:
    """Any 6-sequence -> int64 array [a0, a1, a2, b0, b1, b2]."""
    array = np.asarray(box, dtype=np.float64).reshape(6)
    return np.rint(array).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# original <-> model: a signed axis permutation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisMap:
    """original array (stored order) <-> model array (d, h, w) by a signed permutation of axes.

    ``axes[o]`` is the stored axis that model axis ``o`` reads; ``flips[o]`` says that model axis ``o`` runs backwards
    along it. Arrays move without resampling, so the model array holds exactly the stored voxels.
    """

    source_shape: Triple
    axes: Triple = (2, 1, 0)
    flips: Tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def from_affine(cls, affine: Optional[np.ndarray], shape: Sequence[int], reorient: bool = True) -> "AxisMap":
        """The reference's axis swap, preceded (``reorient=True``) by the permutation/flips that make the array RAS."""
        shape = tuple(int(s) for s in shape)
        if not reorient or affine is None:
            return cls(shape, (2, 1, 0), (False, False, False))
        import nibabel as nib

        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))  # stored axis -> RAS axis, sign
        ras_axes = [0, 0, 0]
        ras_flips = [False, False, False]
        for stored_axis, (ras_axis, sign) in enumerate(ornt):
            ras_axes[int(ras_axis)] = stored_axis
            ras_flips[int(ras_axis)] = bool(sign < 0)
        # Model axis o is RAS axis 2 - o (the reference's swapaxes(-1, -3) on an RAS array gives S, A, R).
        return cls(shape, tuple(ras_axes[2 - o] for o in range(3)), tuple(ras_flips[2 - o] for o in range(3)))

    @property
    def shape(self) -> Triple:
        """Shape of the model (d, h, w) array."""
        return tuple(self.source_shape[a] for a in self.axes)  # type: ignore[return-value]

    @property
    def is_identity_swap(self) -> bool:
        return self.axes == (2, 1, 0) and not any(self.flips)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """Stored array (..., X, Y, Z) -> C-contiguous model array (..., D, H, W) (a view of ``array`` when it is
        one already); leading axes are carried."""
        lead = array.ndim - 3
        order = tuple(range(lead)) + tuple(lead + a for a in self.axes)
        # C order makes the model array bit-identical whatever the storage order was.
        return reorder(array, order, [lead + o for o, f in enumerate(self.flips) if f], flip_first=False)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Model array (..., D, H, W) -> array in the stored order (..., X, Y, Z)."""
        lead = array.ndim - 3
        inverse = [0, 0, 0]
        for model_axis, stored_axis in enumerate(self.axes):
            inverse[stored_axis] = model_axis
        order = tuple(range(lead)) + tuple(lead + a for a in inverse)
        return reorder(array, order, [lead + o for o, f in enumerate(self.flips) if f], flip_first=True)

    def points_to_model(self, points) -> np.ndarray:
        points = as_points(points)
        out = points[:, list(self.axes)].copy()
        for o, (axis, flip) in enumerate(zip(self.axes, self.flips)):
            if flip:
                out[:, o] = self.source_shape[axis] - 1 - out[:, o]
        return out

    def points_to_original(self, points) -> np.ndarray:
        points = as_points(points)
        out = np.empty_like(points)
        for o, (axis, flip) in enumerate(zip(self.axes, self.flips)):
            out[:, axis] = self.source_shape[axis] - 1 - points[:, o] if flip else points[:, o]
        return out

    def box_to_model(self, box) -> np.ndarray:
        corners = self.points_to_model(as_box(box).reshape(2, 3))
        return np.concatenate([corners.min(0), corners.max(0)]).astype(np.int64)

    def box_to_original(self, box) -> np.ndarray:
        corners = self.points_to_original(as_box(box).reshape(2, 3))
        return np.concatenate([corners.min(0), corners.max(0)]).astype(np.int64)


def reorder(array: np.ndarray, order, flips=(), flip_first: bool = False) -> np.ndarray:
    """Transpose ``array`` by ``order`` and reverse the axes ``flips`` (of the input when ``flip_first``, else of
    the output), into a C-contiguous array (new, unless a pure permutation already gives one). Pure permutations use
    torch (a multi-threaded copy, about twice numpy's speed on large volumes); anything with flips, or a dtype torch
    lacks, uses one numpy copy."""
    if not flips:
        try:
            return _torch_permute(array, order)
        except (TypeError, RuntimeError):
            pass
    reverse = tuple(slice(None, None, -1) if axis in flips else slice(None) for axis in range(array.ndim))
    if flip_first:
        return np.ascontiguousarray(np.transpose(array[reverse], order))
    return np.ascontiguousarray(np.transpose(array, order)[reverse])


def _torch_permute(array: np.ndarray, order) -> np.ndarray:
    """One copy at most: none when the permuted array already is C-contiguous (a NIfTI volume read in its own
    Fortran order, permuted to the usual (2, 1, 0) model order), which then shares the input's memory."""
    import torch

    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    return torch.from_numpy(array).permute(*order).contiguous().numpy()


# --------------------------------------------------------------------------------------------------------------------
# model <-> native: the foreground crop
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """model frame -> native frame: the foreground bounding box ``[start, stop)`` of the model array."""

    start: Triple
    stop: Triple

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def points_to_native(self, points) -> np.ndarray:
        return as_points(points) - np.asarray(self.start, dtype=np.float64)

    def points_to_model(self, points) -> np.ndarray:
        return as_points(points) + np.asarray(self.start, dtype=np.float64)

    def box_to_native(self, box) -> Optional[np.ndarray]:
        """Model box -> native box clipped to the crop; None when it lies entirely outside."""
        box = as_box(box) - np.tile(np.asarray(self.start, dtype=np.int64), 2)
        return clip_box(box, self.shape)

    def box_to_model(self, box) -> np.ndarray:
        return as_box(box) + np.tile(np.asarray(self.start, dtype=np.int64), 2)

    def contains(self, points) -> np.ndarray:
        """(N,) bool: which model-frame points fall inside the crop."""
        native = self.points_to_native(points)
        return np.all((native >= -0.5) & (native < np.asarray(self.shape) - 0.5), axis=1)

    def paste(self, native: np.ndarray, model_shape: Sequence[int], fill=0) -> np.ndarray:
        """Native array (..., D', H', W') -> model-frame array (..., D, H, W) filled with ``fill`` outside the crop."""
        out = np.full(native.shape[:-3] + tuple(model_shape), fill, dtype=native.dtype)
        out[(Ellipsis,) + self.slices] = native
        return out


def clip_box(box, shape: Sequence[int]) -> Optional[np.ndarray]:
    """Intersect an inclusive box with ``[0, shape)``; None when the intersection is empty."""
    box = as_box(box)
    upper = np.asarray(shape, dtype=np.int64) - 1
    low = np.maximum(box[:3], 0)
    high = np.minimum(box[3:], upper)
    if np.any(high < low):
        return None
    return np.concatenate([low, high])


# --------------------------------------------------------------------------------------------------------------------
# native <-> zoom: the nearest-exact resize to config.image_size
# --------------------------------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def resample_box_axis(low: int, high: int, source: int, target: int) -> Tuple[int, int]:
    """Inclusive voxel range on an axis of ``source`` voxels -> the range of ``target`` voxels sampling it.

    With ``nearest-exact`` a target voxel ``t`` reads source voxel ``floor((t + 0.5) * source / target)``; the result
    holds every ``t`` whose source voxel is in ``[low, high]``, computed in exact integer arithmetic. When the
    range is thinner than one target voxel (no target voxel samples it), the target voxel containing its centre is
    returned instead: a prompt never vanishes.
    """
    # t >= low * target / source - 1/2   and   t < (high + 1) * target / source - 1/2
    first = _ceil_div(2 * low * target - source, 2 * source)
    last = _ceil_div(2 * (high + 1) * target - source, 2 * source) - 1
    first, last = max(first, 0), min(last, target - 1)
    if last < first:
        centre = (low + high + 1) * target // (2 * source)  # floor of the target position of the range's centre
        first = last = min(max(centre, 0), target - 1)
    return first, last


@dataclass(frozen=True)
class Zoom:
    """native frame (shape ``native_shape``) <-> zoom frame (shape ``zoom_shape``, config.image_size).

    Continuous map of voxel centres, the one ``nearest-exact`` sampling and trilinear ``align_corners=False``
    interpolation both use: ``z = (n + 0.5) * Z / N - 0.5``.
    """

    native_shape: Triple
    zoom_shape: Triple

    @property
    def scale(self) -> np.ndarray:
        """Zoom voxels per native voxel, per axis."""
        return np.asarray(self.zoom_shape, dtype=np.float64) / np.asarray(self.native_shape, dtype=np.float64)

    def points_to_zoom(self, points) -> np.ndarray:
        return (as_points(points) + 0.5) * self.scale - 0.5

    def points_to_native(self, points) -> np.ndarray:
        return (as_points(points) + 0.5) / self.scale - 0.5

    def box_to_zoom(self, box) -> np.ndarray:
        box = as_box(box)
        ranges = [resample_box_axis(int(box[a]), int(box[a + 3]), self.native_shape[a], self.zoom_shape[a])
                  for a in range(3)]
        return np.asarray([r[0] for r in ranges] + [r[1] for r in ranges], dtype=np.int64)

    def box_to_native(self, box) -> np.ndarray:
        """Zoom box -> the native voxels that a nearest-exact upsampling would label with it."""
        box = as_box(box)
        ranges = [resample_box_axis(int(box[a]), int(box[a + 3]), self.zoom_shape[a], self.native_shape[a])
                  for a in range(3)]
        return np.asarray([r[0] for r in ranges] + [r[1] for r in ranges], dtype=np.int64)

    def native_support(self, box) -> np.ndarray:
        """Zoom box -> native box holding every native voxel whose *trilinear* value can depend on the box's voxels.

        A native voxel interpolates the (up to) two zoom voxels around ``z = (n + 0.5) Z / N - 0.5`` on each axis,
        so it can only see a positive zoom voxel in ``[a, b]`` when ``floor(z)`` is in ``[a - 1, b]``. One extra
        voxel each side absorbs floating-point rounding.
        """
        box = as_box(box)
        out = []
        for a in range(3):
            n, z = self.native_shape[a], self.zoom_shape[a]
            low = int(np.floor((box[a] - 1 + 0.5) * n / z - 0.5)) - 1
            high = int(np.ceil((box[a + 3] + 1 + 0.5) * n / z - 0.5)) + 1
            out.append((max(low, 0), min(high, n - 1)))
        return np.asarray([r[0] for r in out] + [r[1] for r in out], dtype=np.int64)


    def interpolation_taps(self, axis: int, low: int, high: int, device=None):
        """Linear interpolation (``align_corners=False``) of native voxels ``low..high`` on ``axis`` from the zoom
        voxels: ``(first, second, weight)``, each of length ``high - low + 1``; native voxel ``low + r`` takes
        ``(1 - weight[r])`` of zoom voxel ``first[r]`` and ``weight[r]`` of ``second[r]`` (the same voxel at the
        clamped ends)."""
        import torch

        n, z = self.native_shape[axis], self.zoom_shape[axis]
        native = torch.arange(int(low), int(high) + 1, device=device, dtype=torch.float32)
        # float32 arithmetic in torch's order, so the result matches F.interpolate to rounding
        scale = torch.tensor(z, dtype=torch.float32, device=device) / torch.tensor(n, dtype=torch.float32,
                                                                                   device=device)
        source = (scale * (native + 0.5) - 0.5).clamp_(min=0.0)
        first = source.floor().long().clamp_(max=z - 1)
        second = (first + 1).clamp_(max=z - 1)
        return first, second, source - first

    def interpolation_matrix(self, axis: int, low: int, high: int, device=None):
        """(high - low + 1, Z) float32 matrix of ``interpolation_taps``: row ``r`` holds the weights native voxel
        ``low + r`` gives to the zoom voxels on ``axis`` (two per row; one at the clamped ends)."""
        import torch

        first, second, weight = self.interpolation_taps(axis, low, high, device)
        rows = torch.arange(len(first), device=device)
        matrix = torch.zeros(len(first), self.zoom_shape[axis], device=device, dtype=torch.float32)
        matrix.index_put_((rows, first), 1 - weight, accumulate=True)
        matrix.index_put_((rows, second), weight, accumulate=True)
        return matrix

    def upsample_region(self, logits, box):
        """Zoom-frame values ``logits`` (Z0, Z1, Z2) (a torch tensor) -> the native voxels of an inclusive ``box``.

        Trilinear interpolation with ``align_corners=False`` (what ``F.interpolate`` gives for the whole native volume,
        to float rounding), computed separably as three small matrix products and only where asked, on the tensor's
        device. The cost is proportional to the box, and about F.interpolate's for the whole volume.
        """
        box = as_box(box)
        planes, shape = self._in_plane(logits, box)
        slices = self.interpolation_matrix(0, box[0], box[3], logits.device).to(logits.dtype)
        return (slices @ planes).reshape(shape)

    def positive_region(self, logits, box) -> np.ndarray:
        """Where ``upsample_region(logits, box)`` is > 0 (to float rounding), as a bool array.

        On the CPU the native slices are interpolated one at a time from their two zoom slices
        (``interpolation_taps``), so the box's float values never exist at once and no product runs over the zero
        weights of the depth matrix (a click's zoom-out foreground: 0.16 -> 0.06 s for a whole-body support)."""
        import torch

        if logits.device.type != "cpu":
            return (self.upsample_region(logits, box) > 0).cpu().numpy()
        box = as_box(box)
        planes, shape = self._in_plane(logits, box)
        first, second, weight = self.interpolation_taps(0, box[0], box[3])
        lower = 1 - weight
        mask = torch.empty((shape[0], planes.shape[1]), dtype=torch.bool)
        values = torch.empty(planes.shape[1], dtype=planes.dtype)
        for row in range(shape[0]):
            torch.mul(planes[first[row]], lower[row], out=values)
            values.add_(planes[second[row]], alpha=float(weight[row]))
            torch.gt(values, 0, out=mask[row])
        return mask.reshape(shape).numpy()

    def _in_plane(self, logits, box: np.ndarray):
        """The in-plane steps of ``upsample_region`` for the inclusive ``box``: (every zoom slice interpolated onto the
        box's rows and columns (Z0, h * w), the box's shape (d, h, w)); the depth step is left to the caller.

        Columns are one matrix product (a gather along the last axis is slow), rows are row copies blended by their
        two taps (``lerp_axis``; as a product with the row matrix it cost 2/3 of a click's zoom-out foreground)."""
        w = self.interpolation_matrix(2, box[2], box[5], logits.device).to(logits.dtype)
        rows = self.interpolation_taps(1, box[1], box[4], logits.device)
        planes = lerp_axis(logits @ w.T, 1, rows)  # (Z0, h, w)
        return planes.reshape(planes.shape[0], -1), (int(box[3] - box[0] + 1), planes.shape[1], planes.shape[2])


def lerp_axis(values, axis: int, taps):
    """``values`` interpolated along ``axis`` by ``interpolation_taps``: each output index blends the two input
    indices of its taps (index copies and one lerp, no product over the zero weights of a matrix)."""
    import torch

    first, second, weight = taps
    shape = [1] * values.dim()
    shape[axis] = -1
    weight = weight.to(device=values.device, dtype=values.dtype)
    return torch.lerp(values.index_select(axis, first), values.index_select(axis, second), weight.view(shape))


# --------------------------------------------------------------------------------------------------------------------
# native <-> window
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One ``size`` window of the native volume starting at native voxel ``start``.

    Where the native volume is smaller than the window on an axis (``start`` is then 0), the window holds the whole
    axis centred in zero padding (``pad_before = (size - n) // 2``, the reference's symmetric pad), so the image
    and the prompts are padded together.
    """

    start: Triple
    size: Triple
    native_shape: Triple

    @property
    def pad_before(self) -> Triple:
        return tuple(max(s - n, 0) // 2 for s, n in zip(self.size, self.native_shape))  # type: ignore[return-value]

    @property
    def valid_shape(self) -> Triple:
        """Native voxels inside the window, per axis."""
        return tuple(min(s, n) for s, n in zip(self.size, self.native_shape))  # type: ignore[return-value]

    @property
    def stop(self) -> Triple:
        return tuple(a + v for a, v in zip(self.start, self.valid_shape))  # type: ignore[return-value]

    @property
    def native_slices(self) -> Tuple[slice, slice, slice]:
        """Where the window's valid voxels sit in the native volume."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def window_slices(self) -> Tuple[slice, slice, slice]:
        """Where the native voxels sit inside the (padded) window array."""
        return tuple(slice(p, p + v) for p, v in zip(self.pad_before, self.valid_shape))  # type: ignore[return-value]

    @property
    def offset(self) -> np.ndarray:
        """window coordinate = native coordinate - offset."""
        return np.asarray(self.start, dtype=np.float64) - np.asarray(self.pad_before, dtype=np.float64)

    def points_to_window(self, points) -> np.ndarray:
        return as_points(points) - self.offset

    def points_to_native(self, points) -> np.ndarray:
        return as_points(points) + self.offset

    def contains(self, points) -> np.ndarray:
        """(N,) bool: native points inside the window's valid voxels (half-voxel tolerance, as rounding would)."""
        points = as_points(points)
        return np.all((points >= np.asarray(self.start) - 0.5) & (points < np.asarray(self.stop) - 0.5), axis=1)

    def box_to_window(self, box) -> Optional[np.ndarray]:
        """Native box -> its part inside the window, in window coordinates; None when they do not meet."""
        box = as_box(box)
        low = np.maximum(box[:3], self.start)
        high = np.minimum(box[3:], np.asarray(self.stop) - 1)
        if np.any(high < low):
            return None
        shift = self.offset.astype(np.int64)
        return np.concatenate([low - shift, high - shift])

    def box_to_native(self, box) -> np.ndarray:
        return as_box(box) + np.tile(self.offset.astype(np.int64), 2)

    def extract(self, native: np.ndarray) -> np.ndarray:
        """Native array (D', H', W') -> window array ``size`` (zero outside the volume)."""
        if self.valid_shape == self.size:
            return np.ascontiguousarray(native[self.native_slices])
        out = np.zeros(self.size, dtype=native.dtype)
        out[self.window_slices] = native[self.native_slices]
        return out


# --------------------------------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFrames:
    """original -> model -> native -> zoom for one image; windows are made on demand with ``window(start)``."""

    axis_map: AxisMap
    crop: Crop
    zoom: Zoom

    @property
    def original_shape(self) -> Triple:
        return self.axis_map.source_shape

    @property
    def model_shape(self) -> Triple:
        return self.axis_map.shape

    @property
    def native_shape(self) -> Triple:
        return self.crop.shape

    def window(self, start: Sequence[int]) -> Window:
        return Window(tuple(int(s) for s in start), self.zoom.zoom_shape, self.native_shape)

    # points --------------------------------------------------------------------------------------------------------
    def original_to_native_points(self, points) -> np.ndarray:
        return self.crop.points_to_native(self.axis_map.points_to_model(points))

    def native_to_original_points(self, points) -> np.ndarray:
        return self.axis_map.points_to_original(self.crop.points_to_model(points))

    def native_to_zoom_points(self, points) -> np.ndarray:
        return self.zoom.points_to_zoom(points)

    def zoom_to_native_points(self, points) -> np.ndarray:
        return self.zoom.points_to_native(points)

    # boxes ---------------------------------------------------------------------------------------------------------
    def original_to_native_box(self, box) -> Optional[np.ndarray]:
        """Clipped to the foreground crop; None when the box misses it entirely."""
        return self.crop.box_to_native(self.axis_map.box_to_model(box))

    def native_to_original_box(self, box) -> np.ndarray:
        return self.axis_map.box_to_original(self.crop.box_to_model(box))

    def native_to_zoom_box(self, box) -> np.ndarray:
        return self.zoom.box_to_zoom(box)

    def zoom_to_native_box(self, box) -> np.ndarray:
        return self.zoom.box_to_native(box)

    # arrays --------------------------------------------------------------------------------------------------------
    def crop_in_original(self) -> Tuple[slice, slice, slice]:
        """Where the foreground crop lies in the original array (per stored axis)."""
        slices = [slice(None)] * 3
        for model_axis, (stored_axis, flip) in enumerate(zip(self.axis_map.axes, self.axis_map.flips)):
            start, stop, n = self.crop.start[model_axis], self.crop.stop[model_axis], self.original_shape[stored_axis]
            slices[stored_axis] = slice(n - stop, n - start) if flip else slice(start, stop)
        return tuple(slices)  # type: ignore[return-value]

    def paste_native_region(self, original: np.ndarray, region: np.ndarray, box) -> None:
        """Write ``region``, the native voxels of the inclusive native ``box``, into ``original`` (the original array
        shape) in place: what ``native_to_original_array`` puts there for a native array holding ``region``."""
        target = self.native_to_original_box(box)
        original[tuple(slice(a, b + 1) for a, b in zip(target[:3], target[3:]))] = self.axis_map.to_original(region)

    def native_to_original_array(self, native: np.ndarray, fill=0) -> np.ndarray:
        """Native (..., D', H', W') -> the original array shape, ``fill`` outside the foreground crop.

        The result keeps the native array's memory order (model axes, un-flipped) and is a transposed view of it: no
        transposing copy. For the usual axis swap it is Fortran-ordered, the order NIfTI stores and ITK's writer
        wants, so writing it needs no transpose either (a 512x512x200 label: 0.19 s less here and 0.19 s less in
        the writer)."""
        axes, flips = self.axis_map.axes, self.axis_map.flips
        lead = native.shape[:-3]
        # base[..., u0, u1, u2] is the original voxel whose stored axis axes[o] has index u_o
        base = np.full(lead + tuple(self.original_shape[a] for a in axes), fill, dtype=native.dtype)
        where, reverse = [], []
        for o, (axis, flip) in enumerate(zip(axes, flips)):
            start, stop, n = self.crop.start[o], self.crop.stop[o], self.original_shape[axis]
            where.append(slice(n - stop, n - start) if flip else slice(start, stop))
            reverse.append(slice(None, None, -1) if flip else slice(None))
        base[(Ellipsis, *where)] = native[(Ellipsis, *reverse)]
        inverse = [axes.index(k) for k in range(3)]
        return base.transpose(*range(len(lead)), *(len(lead) + o for o in inverse))


def bounding_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight inclusive box of a 3-D boolean mask; None when it is empty."""
    if mask.ndim != 3:
        raise ValueError("bounding_box expects a 3-D mask")
    ranges = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        if present.size == 0:
            return None
        ranges.append((int(present[0]), int(present[-1])))
    return np.asarray([r[0] for r in ranges] + [r[1] for r in ranges], dtype=np.int64)
