"""Coordinate frames (segvol.frames) and zoom-in planning (segvol.windows): every map, round trips, borders."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvol.frames import AxisMap, Crop, ImageFrames, Window, Zoom, bounding_box, clip_box, resample_box_axis
from segvol.windows import Grid, axis_starts, gaussian_weight, grow_roi, union_box

RNG = np.random.default_rng(0)


def signed_permutation_affine(axes, signs, zooms=(0.8, 1.3, 3.0)):
    """An affine whose stored axis i points along world axis axes[i] with sign signs[i] (anisotropic voxels)."""
    affine = np.zeros((4, 4))
    for stored, (world, sign) in enumerate(zip(axes, signs)):
        affine[world, stored] = sign * zooms[stored]
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    affine[3, 3] = 1
    return affine


ORIENTATIONS = [(p, s) for p in itertools.permutations(range(3)) for s in itertools.product((1, -1), repeat=3)]


@pytest.mark.parametrize("axes,signs", ORIENTATIONS[::5] + [((0, 1, 2), (-1, -1, 1))])
def test_axis_map_matches_nibabel_ras_then_reference_swap(axes, signs):
    shape = (5, 7, 4)
    array = RNG.normal(size=shape).astype(np.float32)
    affine = signed_permutation_affine(axes, signs)
    axis_map = AxisMap.from_affine(affine, shape)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    expected = np.swapaxes(np.asarray(canonical.dataobj), -1, -3)
    model = axis_map.to_model(array)
    assert model.flags.c_contiguous and model.shape == axis_map.shape
    assert np.array_equal(model, expected)
    assert np.array_equal(axis_map.to_original(model), array)
    # every voxel index maps to the voxel holding the same value
    points = np.argwhere(np.ones(shape, bool))
    mapped = axis_map.points_to_model(points).astype(int)
    assert np.array_equal(model[tuple(mapped.T)], array[tuple(points.T)])
    assert np.allclose(axis_map.points_to_original(mapped), points)


def test_axis_map_without_reorientation_is_the_reference_swap():
    affine = signed_permutation_affine((1, 0, 2), (-1, 1, -1))
    axis_map = AxisMap.from_affine(affine, (3, 4, 5), reorient=False)
    array = np.arange(60).reshape(3, 4, 5)
    assert np.array_equal(axis_map.to_model(array), np.swapaxes(array, -1, -3))
    ras = AxisMap.from_affine(np.diag([2.0, 0.7, 5.0, 1.0]), (3, 4, 5))
    assert ras == axis_map == AxisMap.from_affine(None, (3, 4, 5))


def test_axis_map_oblique_affine_picks_closest_axes():
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, -0.9, 2.5])  # ~LPS, tilted
    axis_map = AxisMap.from_affine(affine, (6, 5, 4))
    assert axis_map.axes == (2, 1, 0) and axis_map.flips == (False, True, True)


def test_axis_map_boxes_round_trip_and_stay_ordered():
    axis_map = AxisMap.from_affine(signed_permutation_affine((2, 0, 1), (-1, 1, -1)), (9, 11, 13))
    box = np.array([1, 2, 3, 7, 9, 12])
    model_box = axis_map.box_to_model(box)
    assert np.all(model_box[:3] <= model_box[3:])
    assert np.array_equal(axis_map.box_to_original(model_box), box)
    mask = np.zeros((9, 11, 13), bool)
    mask[1:8, 2:10, 3:13] = True
    assert np.array_equal(bounding_box(axis_map.to_model(mask)), model_box)


def test_crop_round_trips_clips_and_pastes():
    crop = Crop((2, 3, 4), (10, 13, 9))
    assert crop.shape == (8, 10, 5)
    points = RNG.uniform(0, 20, size=(10, 3))
    assert np.allclose(crop.points_to_model(crop.points_to_native(points)), points)
    assert np.array_equal(crop.box_to_native([0, 0, 0, 30, 30, 30]), [0, 0, 0, 7, 9, 4])  # clipped at both ends
    assert np.array_equal(crop.box_to_native([3, 4, 5, 5, 6, 7]), [1, 1, 1, 3, 3, 3])
    assert crop.box_to_native([11, 0, 0, 12, 5, 5]) is None  # entirely outside
    assert list(crop.contains([[2, 3, 4], [9, 12, 8], [1, 3, 4], [10, 5, 5]])) == [True, True, False, False]
    native = np.ones(crop.shape, np.uint8)
    pasted = crop.paste(native, (12, 15, 10))
    assert pasted.sum() == native.sum() and pasted[crop.slices].all()


def test_clip_box_and_union():
    assert np.array_equal(clip_box([-3, 2, 0, 4, 9, 2], (5, 6, 7)), [0, 2, 0, 4, 5, 2])
    assert clip_box([6, 0, 0, 8, 1, 1], (5, 6, 7)) is None
    assert np.array_equal(union_box([[0, 5, 5, 1, 6, 6], None, [3, 1, 2, 4, 2, 9]]), [0, 1, 2, 4, 6, 9])
    assert union_box([None]) is None


@pytest.mark.parametrize("source,target", [(30, 32), (112, 32), (97, 256), (122, 256), (512, 256), (490, 256),
                                           (7, 64), (64, 32), (3, 32), (256, 256), (1, 32)])
def test_zoom_boxes_equal_rasterise_resize_bbox(source, target):
    """native -> zoom (downsampling or upsampling) boxes are exactly what nearest-exact resizing a cube gives."""
    for _ in range(25):
        low = int(RNG.integers(0, source))
        high = int(RNG.integers(low, source))
        line = torch.zeros(1, 1, source)
        line[..., low:high + 1] = 1
        resized = F.interpolate(line, size=target, mode="nearest-exact")[0, 0]
        hit = torch.nonzero(resized)[:, 0]
        first, last = resample_box_axis(low, high, source, target)
        if len(hit):
            assert (first, last) == (int(hit.min()), int(hit.max())), (low, high)
        else:  # the box is thinner than one target voxel: it keeps the voxel holding its centre
            assert first == last and 0 <= first < target
            centre = (low + high + 1) / 2 * target / source
            assert first <= centre <= first + 1


def test_zoom_box_three_axes_and_back():
    zoom = Zoom((30, 96, 121), (32, 256, 256))
    box = np.array([3, 10, 20, 20, 50, 100])
    cube = torch.zeros(1, 1, 30, 96, 121)
    cube[..., 3:21, 10:51, 20:101] = 1
    resized = F.interpolate(cube, size=(32, 256, 256), mode="nearest-exact")[0, 0].numpy() > 0
    zoom_box = zoom.box_to_zoom(box)
    assert np.array_equal(zoom_box, bounding_box(resized))
    back = F.interpolate(torch.from_numpy(resized.astype(np.float32))[None, None], size=(30, 96, 121),
                         mode="nearest-exact")[0, 0].numpy() > 0
    assert np.array_equal(zoom.box_to_native(zoom_box), bounding_box(back))
    assert np.array_equal(zoom.box_to_native(zoom_box), box)  # a round trip through a finer grid is exact


def test_zoom_points_round_trip_and_voxel_centres():
    zoom = Zoom((112, 97, 122), (32, 256, 256))
    points = RNG.uniform(0, 90, size=(20, 3))
    assert np.allclose(zoom.points_to_native(zoom.points_to_zoom(points)), points)
    # the first and last voxel centres map inside the first and last zoom voxels' extents
    ends = zoom.points_to_zoom([[0, 0, 0], [111, 96, 121]])
    assert np.all(ends[0] >= -0.5) and np.all(ends[1] <= np.array([31.5, 255.5, 255.5]))
    # a point's zoom voxel (rounded) is the one nearest-exact samples from the point's native voxel
    native = np.array([[50, 40, 60]])
    z = np.floor(zoom.points_to_zoom(native) + 0.5).astype(int)[0]
    source = np.floor((z + 0.5) * np.array([112, 97, 122]) / np.array([32, 256, 256])).astype(int)
    assert np.all(np.abs(source - native[0]) <= np.ceil(np.array([112, 97, 122]) / np.array([32, 256, 256])))


@pytest.mark.parametrize("native_shape", [(30, 96, 121), (200, 490, 300), (10, 20, 7)])
def test_upsample_region_matches_interpolate_and_support_is_conservative(native_shape):
    zoom = Zoom(native_shape, (32, 64, 64))
    logits = torch.full((32, 64, 64), -4.0)
    logits[10:13, 20:22, 40:45] = 3.0  # a positive blob
    full = F.interpolate(logits[None, None], size=native_shape, mode="trilinear", align_corners=False)[0, 0]
    box = [1, 2, 3, native_shape[0] - 2, native_shape[1] - 1, native_shape[2] - 3]
    region = zoom.upsample_region(logits, box)
    assert torch.allclose(region, full[1:-1, 2:, 3:-2], atol=1e-5)
    support = zoom.native_support(np.array([10, 20, 40, 12, 21, 44]))
    positive = bounding_box((full > 0).numpy())
    assert np.all(support[:3] <= positive[:3]) and np.all(support[3:] >= positive[3:])


@pytest.mark.parametrize("native_shape", [(30, 96, 121), (200, 490, 300), (10, 20, 7)])
def test_positive_region_is_where_the_trilinear_logits_are_positive(native_shape):
    zoom = Zoom(native_shape, (32, 64, 64))
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn((32, 64, 64), generator=generator)  # signs change between neighbouring zoom voxels
    full = F.interpolate(logits[None, None], size=native_shape, mode="trilinear", align_corners=False)[0, 0]
    box = [1, 2, 3, native_shape[0] - 1, native_shape[1] - 1, native_shape[2] - 3]  # the clamped last slice included
    mask = zoom.positive_region(logits, box)
    expected = full[1:, 2:, 3:-2]
    assert mask.shape == tuple(expected.shape) and mask.dtype == bool
    clear = expected.abs() > 1e-5  # float rounding decides only values this close to 0
    assert np.array_equal(mask[clear.numpy()], (expected > 0)[clear].numpy())
    assert clear.float().mean() > 0.99


def test_window_padded_points_boxes_and_extract():
    native_shape = (20, 300, 100)  # smaller than the window on axes 0 and 2: padded symmetrically
    window = Window((0, 40, 0), (32, 256, 256), native_shape)
    assert window.pad_before == (6, 0, 78) and window.valid_shape == (20, 256, 100)
    assert window.stop == (20, 296, 100)
    points = np.array([[0, 40, 0], [19, 295, 99], [5.5, 100.25, 50]])
    in_window = window.points_to_window(points)
    assert np.allclose(in_window[0], [6, 0, 78]) and np.allclose(in_window[1], [25, 255, 177])
    assert np.allclose(window.points_to_native(in_window), points)
    assert list(window.contains([[0, 40, 0], [0, 39, 0], [0, 296, 0], [19, 295, 99]])) == [True, False, False, True]
    # boxes are clipped to the window's valid voxels
    assert np.array_equal(window.box_to_window([2, 0, 10, 30, 100, 20]), [8, 0, 88, 25, 60, 98])
    round_trip = window.box_to_native(window.box_to_window([2, 50, 10, 15, 100, 20]))
    assert np.array_equal(round_trip, [2, 50, 10, 15, 100, 20])
    assert window.box_to_window([0, 0, 0, 19, 39, 99]) is None
    native = RNG.normal(size=native_shape).astype(np.float32)
    extracted = window.extract(native)
    assert extracted.shape == (32, 256, 256)
    assert np.array_equal(extracted[window.window_slices], native[window.native_slices])
    assert extracted.sum() == pytest.approx(native[window.native_slices].sum(), rel=1e-4)


def test_image_frames_chain_round_trips_on_a_non_ras_anisotropic_image():
    shape = (40, 50, 30)
    axis_map = AxisMap.from_affine(signed_permutation_affine((1, 2, 0), (-1, 1, -1)), shape)
    assert axis_map.shape == (50, 40, 30)
    crop = Crop((2, 3, 1), (45, 37, 28))  # in the model frame
    frames = ImageFrames(axis_map, crop, Zoom(crop.shape, (32, 256, 256)))
    points = np.array([[10, 20, 15], [35, 44, 9]], dtype=float)
    native = frames.original_to_native_points(points)
    assert np.allclose(frames.native_to_original_points(native), points)
    assert np.allclose(frames.zoom_to_native_points(frames.native_to_zoom_points(native)), native)
    box = np.array([8, 10, 5, 30, 40, 25])
    model_box = axis_map.box_to_model(box)
    assert np.all(model_box[:3] >= crop.start) and np.all(model_box[3:] < crop.stop)
    native_box = frames.original_to_native_box(box)
    assert np.array_equal(frames.native_to_original_box(native_box), box)  # inside the crop: exact
    clipped = frames.original_to_native_box([0, 0, 0, 39, 49, 29])  # the whole image: clipped to the crop
    assert np.array_equal(clipped, [0, 0, 0, *np.subtract(crop.shape, 1)])
    labels = np.zeros(crop.shape, np.uint8)
    labels[tuple(slice(a, b + 1) for a, b in zip(native_box[:3], native_box[3:]))] = 1
    original = frames.native_to_original_array(labels)
    assert original.shape == shape
    assert np.array_equal(bounding_box(original > 0), box)



@pytest.mark.parametrize("axes, signs", [((2, 1, 0), (1, 1, 1)), ((1, 2, 0), (-1, 1, -1)), ((0, 1, 2), (1, -1, 1))])
def test_native_to_original_array_is_a_view_in_native_memory_order_and_pastes_a_region(axes, signs):
    """Every native voxel lands where the point mapping sends it (random values, any signed permutation); the result
    shares the native array's memory order, so the usual axis swap gives a Fortran-ordered array (what NIfTI and
    ITK's writer store); ``paste_native_region`` writes a native box where the whole mapping would."""
    shape = (20, 24, 18)
    axis_map = AxisMap.from_affine(signed_permutation_affine(axes, signs), shape)
    crop = Crop((1, 2, 3), tuple(n - 2 for n in axis_map.shape))
    frames = ImageFrames(axis_map, crop, Zoom(crop.shape, (32, 64, 64)))
    native = np.random.default_rng(0).integers(1, 250, size=crop.shape).astype(np.uint8)
    original = frames.native_to_original_array(native, fill=0)
    assert original.shape == shape and (original > 0).sum() == native.size
    where = np.argwhere(native > 0)
    mapped = frames.native_to_original_points(where.astype(float)).astype(int)
    assert np.array_equal(original[tuple(mapped.T)], native[tuple(where.T)])
    if axis_map.is_identity_swap:
        assert original.flags.f_contiguous
    box = np.array([2, 3, 1, 9, 11, 7])
    region = np.full(tuple(box[3:] - box[:3] + 1), 255, np.uint8)
    pasted = original.copy(order="K")
    frames.paste_native_region(pasted, region, box)
    expected = native.copy()
    expected[tuple(slice(a, b + 1) for a, b in zip(box[:3], box[3:]))] = 255
    assert np.array_equal(pasted, frames.native_to_original_array(expected))

# ---------------------------------------------------------------------------------------------------------------
# ROI growth, window grid, blending weight
# ---------------------------------------------------------------------------------------------------------------
def test_grow_roi_grows_to_a_window_and_shifts_inward_at_borders():
    shape, window, margin = (100, 400, 300), (32, 256, 256), (4, 32, 32)
    # a small object in the middle: exactly one window, centred on it
    start, stop = grow_roi([50, 200, 150, 55, 210, 160], shape, window, margin)
    assert tuple(b - a for a, b in zip(start, stop)) == window
    assert start[0] <= 50 and stop[0] > 55 and abs((start[1] + stop[1]) / 2 - 205.5) <= 1
    # at the border: shifted inward, never smaller than a window
    start, stop = grow_roi([0, 390, 0, 3, 399, 5], shape, window, margin)
    assert start == (0, 144, 0) and stop == (32, 400, 256)
    # a large object: core + margin, clipped to the volume, and to what the core's windows cover
    start, stop = grow_roi([10, 20, 30, 90, 380, 290], shape, window, margin)
    assert start == (6, 9, 0) and stop == (95, 393, 300)
    # the margin never adds a window: a core just under one window stays one window
    start, stop = grow_roi([10, 0, 0, 40, 10, 10], shape, window, margin)
    assert (start[0], stop[0]) == (10, 42)
    for roi_start, roi_stop, size in zip(start, stop, window):
        assert len(axis_starts(roi_start, roi_stop, size, 0.5)) == 1
    # an axis shorter than the window: the whole axis (the window is padded)
    start, stop = grow_roi([3, 20, 30, 5, 40, 50], (20, 400, 100), window, margin)
    assert start[0] == 0 and stop[0] == 20 and start[2] == 0 and stop[2] == 100


@pytest.mark.parametrize("length,window,overlap", [(256, 256, 0.5), (300, 256, 0.5), (512, 256, 0.5),
                                                   (490, 256, 0.5), (200, 32, 0.5), (97, 32, 0.25), (96, 32, 0.0)])
def test_axis_starts_count_like_reference_and_cover_evenly(length, window, overlap):
    starts = axis_starts(10, 10 + length, window, overlap)
    stride = int(window * (1 - overlap))
    expected = 1 if length <= window else int(np.ceil((length - window) / stride)) + 1
    assert len(starts) == expected
    assert starts[0] == 10 and starts[-1] + window == 10 + length
    gaps = np.diff(starts)
    assert np.all(gaps <= stride) and (len(gaps) == 0 or gaps.max() - gaps.min() <= 1)


def test_grid_windows_and_coverage():
    grid = Grid.over(((0, 20, 0), (60, 300, 50)), (60, 400, 50), (32, 256, 256), 0.5)
    assert grid.starts == ((0, 14, 28), (20, 44), (0,))
    assert len(grid.windows()) == 6
    assert grid.covers([0, 20, 0, 59, 299, 49])
    assert not grid.covers([0, 10, 0, 59, 299, 49])
    gapped = Grid(((0, 50), (0,), (0,)), (32, 64, 64), (100, 64, 64))
    assert gapped.covers([0, 0, 0, 31, 63, 63]) and not gapped.covers([0, 0, 0, 40, 63, 63])


def test_an_earlier_grid_is_kept_only_when_it_covers_the_grown_roi():
    """Found by the robot annotator: a session kept an earlier grid that covered the new core (box, foreground) but
    put it at the windows' edges without context, and text + box scored 0.500 instead of a fresh request's 0.521
    (brainstem 0.546 vs 0.625). An earlier grid now has to cover the ROI a fresh request would use."""
    from segvol.prompts import NativePrompts
    from segvol.windows import CategoryPlan, plan_zoom_in

    shape, window, margin = (64, 200, 200), (32, 64, 64), (4, 8, 8)
    prompts = NativePrompts(box=np.array([10, 100, 100, 20, 130, 130]), points=np.zeros((0, 3)),
                            labels=np.zeros(0, np.int64))

    def plan(earlier=(), cached=lambda w: False):
        return plan_zoom_in([CategoryPlan("x", 1, zoom_logits=torch.zeros(1))], prompts, shape, window, margin, 0.5,
                            earlier, cached)

    fresh = plan()
    edge = Grid(((0,), (67,), (67,)), window, shape)  # ends exactly at the core's far faces: no margin there
    covering = Grid(((0,), (60, 100), (60, 100)), window, shape)
    assert edge.covers(fresh.core) and not edge.covers(np.concatenate([fresh.roi[0], np.asarray(fresh.roi[1]) - 1]))
    assert fresh.grid not in (edge, covering)
    cached_starts = {w.start for g in (edge, covering) for w in g.windows()}
    kept = plan([covering], lambda w: w.start in cached_starts)
    assert kept.reused_grid and kept.grid == covering
    refused = plan([edge], lambda w: w.start in cached_starts)
    assert not refused.reused_grid and refused.grid == fresh.grid


def test_gaussian_weight_peaks_in_the_middle_and_never_vanishes():
    window = Window((0, 0, 0), (32, 64, 64), (32, 64, 64))
    weight = gaussian_weight(window)
    assert weight.shape == (32, 64, 64)
    assert weight.max() == pytest.approx(1.0, abs=2e-3) and weight.min() > 0
    assert np.allclose(weight, weight[::-1, ::-1, ::-1])
    assert weight[16, 32, 32] > weight[2, 32, 32] > weight[0, 0, 0]
    padded = Window((0, 0, 0), (32, 64, 64), (20, 64, 10))
    assert gaussian_weight(padded).shape == (20, 64, 10)
