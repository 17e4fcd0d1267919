"""The zoom-out label map (``segvol.merger.zoom_out_label``, what a zoom-out preview returns) against the definition:
per native voxel the category whose trilinearly upsampled zoom-out logit is the largest and above 0, the earlier
category on ties, and against ``merge_categories``' general (window-blending) path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvol.frames import Crop, ImageFrames, Zoom, bounding_box
from segvol.merger import merge_categories, uncovered_box, zoom_out_label
from segvol.windows import CategoryPlan


def smooth_logits(generator, count, zoom_shape, offset=-0.8):
    """Blobs that are positive here and there and negative elsewhere, like a decoder's zoom-out logits."""
    coarse = torch.randn((count, 1) + tuple(max(2, s // 4) for s in zoom_shape), generator=generator)
    logits = F.interpolate(coarse, size=zoom_shape, mode="trilinear", align_corners=False)[:, 0]
    return logits * 3 + offset


def plans_for(logits, zoom):
    plans = []
    for index in range(logits.shape[0]):
        plan = CategoryPlan(name=f"organ {index}", value=index + 1, zoom_logits=logits[index])
        box = bounding_box((logits[index] > 0).numpy())
        if box is not None:
            plan.support = zoom.native_support(box)
        plans.append(plan)
    return plans


def definition(logits, native_shape):
    upsampled = F.interpolate(logits[None], size=native_shape, mode="trilinear", align_corners=False)[0]
    scores = torch.cat([torch.zeros((1,) + tuple(native_shape)), upsampled])
    best, winner = scores.max(0)  # the first maximum: background (0) wins a tie at 0
    return torch.where(best > 0, winner, 0).numpy()


@pytest.mark.parametrize("native_shape,zoom_shape,count,block_bytes", [
    ((23, 40, 37), (8, 16, 16), 5, 4096),  # upsampling on every axis, many row blocks
    ((6, 50, 9), (8, 16, 16), 4, 2 ** 22),  # downsampling on two axes, one block
    ((31, 17, 64), (8, 16, 16), 1, 2 ** 16),  # one category
])
def test_zoom_out_label_is_the_argmax_of_the_upsampled_logits(native_shape, zoom_shape, count, block_bytes):
    generator = torch.Generator().manual_seed(sum(native_shape) + count)
    logits = smooth_logits(generator, count, zoom_shape)
    zoom = Zoom(native_shape, zoom_shape)
    label = zoom_out_label(zoom, plans_for(logits, zoom), block_bytes=block_bytes)
    expected = definition(logits, native_shape)
    assert label.dtype == np.uint8 and label.shape == native_shape
    assert (label > 0).any() and (label == 0).any()  # the case is not trivial
    np.testing.assert_array_equal(label, expected)


def test_ties_go_to_the_earlier_category_and_never_positive_categories_never_win():
    native_shape, zoom_shape = (20, 30, 30), (8, 16, 16)
    generator = torch.Generator().manual_seed(7)
    base = smooth_logits(generator, 2, zoom_shape)
    logits = torch.stack([torch.full(zoom_shape, -1.0), base[0], base[0].clone(), base[1]])  # 2 and 3 are equal
    zoom = Zoom(native_shape, zoom_shape)
    plans = plans_for(logits, zoom)
    assert plans[0].support is None
    label = zoom_out_label(zoom, plans, block_bytes=8192)
    assert 1 not in label and 3 not in label and 2 in label
    np.testing.assert_array_equal(label, definition(logits, native_shape))


def test_general_path_and_zoom_out_path_give_the_same_label():
    """``merge_categories`` without window states takes ``zoom_out_label``; asking for probabilities takes the
    general path, which compares sigmoid probabilities region by region: both labels must agree."""
    native_shape, zoom_shape = (26, 44, 41), (8, 16, 16)
    generator = torch.Generator().manual_seed(3)
    logits = smooth_logits(generator, 6, zoom_shape)
    crop = Crop((0, 0, 0), native_shape)
    frames = ImageFrames(None, crop, Zoom(native_shape, zoom_shape))
    plans = plans_for(logits, frames.zoom)
    states = {plan.name: None for plan in plans}
    fast, none = merge_categories(frames, plans, states, return_probabilities=False)
    general, probabilities = merge_categories(frames, plans, states, return_probabilities=True)
    assert none is None and set(probabilities) == {plan.name for plan in plans}
    np.testing.assert_array_equal(fast, general)


def test_more_than_255_categories_give_a_uint16_label():
    native_shape, zoom_shape = (10, 12, 12), (4, 8, 8)
    logits = torch.full((300,) + zoom_shape, -1.0)
    logits[299, 1:3, 2:6, 2:6] = 2.0
    zoom = Zoom(native_shape, zoom_shape)
    label = zoom_out_label(zoom, plans_for(logits, zoom))
    assert label.dtype == np.uint16 and set(np.unique(label)) == {0, 300}
    np.testing.assert_array_equal(label, definition(logits, native_shape))


def test_uncovered_box_is_the_bounding_box_of_the_voxels_no_cover_reaches():
    """Against a voxel mask: random supports and covers (windows inside, across and outside the support, touching
    faces, covering all of it)."""
    rng = np.random.default_rng(0)
    shape = np.asarray([14, 19, 23])
    for trial in range(300):
        low = rng.integers(0, shape // 2)
        support = np.concatenate([low, rng.integers(low, shape)])
        covers = []
        for _ in range(rng.integers(0, 9)):
            start = rng.integers(-3, shape)
            covers.append(np.concatenate([start, start + rng.integers(0, 12, size=3)]))
        if trial % 10 == 0:  # one cover over everything, or the support's own box
            covers.append(support.copy() if trial % 20 else np.asarray([-1, -1, -1, *shape]))
        covers = np.asarray(covers, dtype=np.int64).reshape(-1, 6)
        mask = np.zeros(shape, dtype=bool)
        mask[support[0]:support[3] + 1, support[1]:support[4] + 1, support[2]:support[5] + 1] = True
        for cover in covers:
            lo, hi = np.maximum(cover[:3], 0), np.maximum(cover[3:] + 1, 0)
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
        expected = bounding_box(mask)
        found = uncovered_box(support, covers)
        if expected is None:
            assert found is None, (support, covers)
        else:
            assert found is not None and np.array_equal(found, expected), (support, covers, found, expected)
