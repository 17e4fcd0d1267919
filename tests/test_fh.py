"""Tests of segvol.fh (3-D Felzenszwalb-Huttenlocher, pseudo-label cleaning) and scripts/pseudo_labels.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segvol import fh

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"


def _noisy_blobs(shape=(20, 18, 12), seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)
    volume = np.zeros(shape, np.float32)
    for level, centre, radius in ((1.0, (6, 6, 6), 4), (0.5, (14, 11, 5), 5), (0.8, (10, 4, 9), 3)):
        inside = ((grid - np.array(centre, np.float32)[:, None, None, None]) ** 2).sum(0) < radius**2
        volume[inside] = level
    return volume + rng.normal(0, 0.05, shape).astype(np.float32)


def _assert_connected(labels, connectivity):
    structure = fh._structure(connectivity)
    for label in np.unique(labels):
        _, count = ndimage.label(labels == label, structure=structure)
        assert count == 1, f"region {label} has {count} components under {connectivity}-connectivity"


# ----------------------------------------------------------------------------------------------
# segment(): FH invariants
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("connectivity", fh.CONNECTIVITIES)
@pytest.mark.parametrize("method", ["fh", "reference"])
def test_every_voxel_labelled_and_regions_connected(connectivity, method):
    volume = _noisy_blobs()
    labels = fh.segment(volume, (1.0, 1.2, 2.0), k=0.3, sigma=0.5, min_size=5, connectivity=connectivity, method=method)
    assert labels.shape == volume.shape and labels.dtype == np.int32
    n = labels.max() + 1
    assert labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(n)), "labels must be 0..n-1"
    _assert_connected(labels, connectivity)
    # numbered in raster order of first voxel
    _, first = np.unique(labels.ravel(), return_index=True)
    assert np.all(np.diff(first) > 0)


@pytest.mark.parametrize("min_size", [1, 10, 60, 500])
def test_min_size_respected(min_size):
    labels = fh.segment(_noisy_blobs(), None, k=0.05, sigma=0.3, min_size=min_size)
    sizes = np.bincount(labels.ravel())
    assert sizes.min() >= min(min_size, labels.size)


def test_min_size_larger_than_volume_gives_one_region():
    labels = fh.segment(_noisy_blobs((6, 5, 4)), None, min_size=10_000)
    assert labels.max() == 0


def test_deterministic_across_runs_and_thread_counts():
    import numba

    volume = _noisy_blobs((24, 20, 16), seed=3)
    first = fh.segment(volume, (0.8, 0.8, 2.5), k=0.2, min_size=20)
    assert np.array_equal(first, fh.segment(volume, (0.8, 0.8, 2.5), k=0.2, min_size=20))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = fh.segment(volume, (0.8, 0.8, 2.5), k=0.2, min_size=20)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(first, single)


def test_adaptive_criterion_separates_step_edge():
    # two flat halves, a step of 1.0: zero-weight edges merge each half, the step edge is kept
    volume = np.zeros((16, 12, 8), np.float32)
    volume[8:] = 1.0
    labels = fh.segment(volume, None, k=1.0, sigma=0.0, min_size=1)
    assert labels.max() == 1
    assert np.all(labels[:8] == labels[0, 0, 0]) and np.all(labels[8:] == labels[-1, 0, 0])
    assert labels[0, 0, 0] != labels[-1, 0, 0]
    # with noise and the default smoothing, both halves stay apart away from the step
    rng = np.random.default_rng(0)
    noisy = volume + rng.normal(0, 0.03, volume.shape).astype(np.float32)
    labels = fh.segment(noisy, (1.0, 1.0, 1.0), k=0.5, min_size=50)
    left, right = np.unique(labels[:5]), np.unique(labels[11:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]


def test_criterion_grows_with_k_and_merges_weak_step():
    # a weak step (0.05) between two large flat halves: merged when k/|C| exceeds it, split otherwise
    volume = np.zeros((16, 12, 8), np.float32)
    volume[8:] = 0.05
    half = volume.size // 2
    assert fh.segment(volume, None, k=0.04 * half, sigma=0, min_size=1).max() == 1
    assert fh.segment(volume, None, k=0.06 * half, sigma=0, min_size=1).max() == 0


def test_connectivity_options_on_diagonal_lines():
    volume = np.zeros((10, 10, 10), np.float32)
    for i in range(8):
        volume[1 + i, 1 + i, 2] = 1.0  # in-plane (axes 0-1) diagonal
    counts = {c: fh.segment(volume, None, k=0.5, sigma=0, min_size=1, connectivity=c).max() + 1
              for c in fh.CONNECTIVITIES}
    assert counts[6] == 1 + 8  # each diagonal voxel alone, background in one piece
    assert counts[10] == counts[18] == counts[26] == 2
    body = np.zeros((10, 10, 10), np.float32)
    for i in range(8):
        body[1 + i, 1 + i, 1 + i] = 1.0  # space diagonal: only 26-connectivity links it
    counts = {c: fh.segment(body, None, k=0.5, sigma=0, min_size=1, connectivity=c).max() + 1
              for c in fh.CONNECTIVITIES}
    assert counts[26] == 2 and counts[18] == counts[10] == counts[6] == 9


def test_neighbour_offsets():
    assert [len(fh.neighbour_offsets(c)) for c in fh.CONNECTIVITIES] == [3, 5, 9, 13]
    for c in fh.CONNECTIVITIES:
        assert fh._structure(c).sum() == c + 1
    with pytest.raises(ValueError):
        fh.segment(np.zeros((4, 4, 4)), connectivity=8)


def test_spacing_aware_smoothing():
    volume = np.zeros((9, 9, 9), np.float32)
    volume[4, 4, 4] = 1.0
    smoothed = fh.smooth(volume, (1.0, 1.0, 4.0), sigma=2.0)
    # 2 mm is 2 voxels in-plane but only 0.5 voxel along the 4 mm axis
    assert smoothed[4, 4, 5] < smoothed[4, 5, 4]
    assert np.isclose(smoothed.sum(), 1.0, atol=1e-4)


def test_edge_cases():
    assert fh.segment(np.ones((5, 5, 5)), min_size=1).max() == 0  # flat volume: one region
    flat2d = fh.segment(np.pad(np.ones((6, 6)), 3), None, k=0.5, sigma=0, min_size=1)
    assert flat2d.shape == (12, 12) and flat2d.max() == 1
    with pytest.raises(ValueError):
        fh.segment(np.full((4, 4, 4), np.nan))


def test_reference_mode_matches_pure_python_reference():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from benchmarks.fh import adjusted_rand_index, reference_felzenszwalb
    finally:
        sys.path.remove(str(REPO / "scripts"))
    volume = _noisy_blobs((16, 14, 8), seed=5)
    for min_size in (1, 40):
        expected = reference_felzenszwalb(volume, sigma=0.8, min_size=min_size)
        ours = fh.segment(volume, None, sigma=0.8, min_size=min_size, connectivity=10, method="reference")
        assert adjusted_rand_index(expected, ours) == 1.0
        assert np.array_equal(expected, ours)  # both number regions in raster order


# ----------------------------------------------------------------------------------------------
# cleaning, resizing, ground truth
# ----------------------------------------------------------------------------------------------
def test_clean_drops_small_regions_and_components():
    labels = np.zeros((40, 40, 20), np.int32)
    labels[2:30, 2:30, 2:18] = 5  # big
    labels[32:35, 32:35, 2:5] = 7  # 27 voxels < 0.1% of 32000 = 32 -> dropped
    labels[32:38, 2:8, 10:16] = 5  # a separate 216-voxel component of region 5: kept
    labels[36:38, 36:38, 18:20] = 5  # an 8-voxel component of region 5 -> dropped
    cleaned = fh.clean_labels(labels, min_fraction=0.001)
    assert not np.any(cleaned == 7)
    # the opening with the 3-D cross removes the cube's edges, the rest stays
    assert np.all(cleaned[33:37, 3:7, 11:15] == 5) and np.sum(cleaned[32:38, 2:8, 10:16] == 5) == 216 - 12 * 4 - 8
    assert np.all(cleaned[36:38, 36:38, 18:20] == 0)
    assert np.all(cleaned[3:29, 3:29, 3:17] == 5)
    assert set(np.unique(cleaned)) == {0, 5}


def test_clean_opening_and_closing_match_scipy_inside_the_volume():
    rng = np.random.default_rng(1)
    mask = ndimage.binary_dilation(rng.random((24, 24, 24)) > 0.93, iterations=2)
    mask[:3] = mask[-3:] = False
    mask[:, :3] = mask[:, -3:] = False
    mask[:, :, :3] = mask[:, :, -3:] = False
    labels = mask.astype(np.int32) * 3
    opened = ndimage.binary_opening(mask)
    expected = ndimage.binary_closing(opened) | opened
    cleaned = fh.clean_labels(labels, min_voxels=1)
    assert np.array_equal(cleaned == 3, expected)


def test_clean_spur_hole_border_and_blocked():
    labels = np.zeros((20, 20, 20), np.int32)
    labels[:10] = 4  # touches the volume border: must not be eroded there
    labels[10:14, 5, 5] = 4  # one-voxel spur: removed by the opening (but its root voxel)
    labels[3, 3, 3] = 0  # one-voxel hole: filled by the closing
    labels[15:, 15:, 15:] = -1  # blocked: untouched
    cleaned = fh.clean_labels(labels, min_voxels=1)
    assert np.all(cleaned[:10] == 4)
    assert np.all(cleaned[11:14, 5, 5] == 0) and cleaned[10, 5, 5] == 4
    assert cleaned[3, 3, 3] == 4
    assert np.all(cleaned[15:, 15:, 15:] == -1)


def test_resize_labels_is_nearest_and_never_invents_ids():
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array([0, 3, 17, 250], np.int32), size=(7, 9, 5))
    for shape in [(13, 4, 11), (3, 3, 3), (14, 18, 10), (7, 9, 5)]:
        out = fh.resize_labels(labels, shape)
        assert out.shape == shape and out.dtype == labels.dtype
        assert set(np.unique(out)) <= set(np.unique(labels))
    # integer up-sampling then down-sampling is the identity
    assert np.array_equal(fh.resize_labels(fh.resize_labels(labels, (14, 18, 10)), labels.shape), labels)
    boundary = np.zeros((4, 4, 4), np.int32)
    boundary[2:] = 17
    boundary[:2] = 5
    assert set(np.unique(fh.resize_labels(boundary, (7, 7, 7)))) == {5, 17}  # no averaged 11


def test_pseudo_labels_ground_truth_override_and_id_scheme():
    volume = _noisy_blobs((30, 28, 16), seed=4) * 1000 - 500
    gt = np.zeros(volume.shape, np.int32)
    gt[3:12, 3:12, 3:10] = 2
    gt[20:25, 5:10, 4:8] = 9
    out = fh.pseudo_labels(volume, (1.0, 1.0, 2.0), gt, k=0.1)
    assert out.dtype == np.int32 and out.shape == volume.shape
    assert np.array_equal(out[gt > 0], gt[gt > 0])
    fh_ids = np.unique(out[(gt == 0) & (out > 0)])
    assert fh_ids.size > 0 and fh_ids.min() > fh.FH_ID_OFFSET
    assert np.array_equal(fh_ids, fh.FH_ID_OFFSET + 1 + np.arange(fh_ids.size))
    assert not np.any(np.isin(out[gt == 0], [2, 9]))
    threshold = np.ceil(0.001 * volume.size)
    assert all(np.sum(out == i) >= threshold for i in fh_ids)
    # deterministic
    assert np.array_equal(out, fh.pseudo_labels(volume, (1.0, 1.0, 2.0), gt, k=0.1))
    # a (C, ...) binary stack: channel c -> id c+1; a smaller GT is resized with nearest
    stack = np.stack([gt == 2, gt == 9]).astype(np.uint8)
    out2 = fh.pseudo_labels(volume, (1.0, 1.0, 2.0), stack, k=0.1)
    assert np.array_equal(out2[gt == 2], np.full((gt == 2).sum(), 1)) and np.all(out2[gt == 9] == 2)
    small_gt = gt[::2, ::2, ::2]
    out3 = fh.pseudo_labels(volume, (1.0, 1.0, 2.0), small_gt, k=0.1)
    assert set(np.unique(out3[out3 <= fh.FH_ID_OFFSET])) <= {0, 2, 9}
    with pytest.raises(ValueError, match="collides"):
        fh.pseudo_labels(volume, None, np.full(volume.shape, fh.FH_ID_OFFSET))


def test_pseudo_labels_working_grid():
    assert fh.working_grid((512, 512, 200)) == (175, 175, 68)  # <= 256*256*32 voxels, same factor per axis
    assert fh.working_grid((122, 101, 112)) == (122, 101, 112)
    assert fh.working_grid((512, 512, 200), max_voxels=None) == (512, 512, 200)
    assert fh.working_grid((50, 40, 30), working_shape=(10, 10, 10)) == (10, 10, 10)
    volume = _noisy_blobs((32, 30, 16), seed=6)
    for kwargs in ({"working_shape": (16, 15, 8)}, {"max_voxels": 2000}):
        out = fh.pseudo_labels(volume, (1.0, 1.0, 2.0), normalize=False, k=0.3, **kwargs)
        assert out.shape == volume.shape
        assert out.max() > fh.FH_ID_OFFSET
        assert set(np.unique(out)) <= {0} | set(range(fh.FH_ID_OFFSET + 1, out.max() + 1))


# ----------------------------------------------------------------------------------------------
# real CT
# ----------------------------------------------------------------------------------------------
def test_real_ct_pseudo_labels():
    path = DATA / "totalseg-example" / "example_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"real CT not available: {path} is absent (../shared/data is not mounted)")
    import nibabel as nib

    image = nib.load(str(path))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    spacing = image.header.get_zooms()[:3]
    regions = fh.segment(fh.normalize_intensity(volume), spacing, min_size=1000)
    sizes = np.bincount(regions.ravel())
    assert sizes.min() >= 1000 and 5 <= sizes.size <= 2000
    labels = fh.pseudo_labels(volume, spacing)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert ids.min() > fh.FH_ID_OFFSET and 5 <= ids.size <= 1000
    assert counts.min() >= 0.001 * volume.size
    assert (labels == 0).mean() < 0.5
    # air and soft tissue end up in different regions
    air = labels[volume < -900]
    tissue = labels[(volume > 0) & (volume < 80)]
    assert np.bincount(air[air > 0]).argmax() != np.bincount(tissue[tissue > 0]).argmax()


# ----------------------------------------------------------------------------------------------
# scripts/pseudo_labels.py
# ----------------------------------------------------------------------------------------------
def _write_cases(folder: Path, n=2):
    import nibabel as nib

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    affines = []
    for i in range(n):
        volume = np.full((30, 28, 14), -800, np.int16)
        volume[4:24, 4:22, 2:12] = 40
        volume[8:16, 8:16, 4:9] = 300 + 100 * i
        volume = (volume + rng.normal(0, 10, volume.shape)).astype(np.int16)
        affine = np.diag([1.5, 1.2, 3.0, 1.0])
        affine[:3, 3] = [-10.0, 20.0, 5.0 + i]
        nib.save(nib.Nifti1Image(volume, affine), str(folder / f"case{i}.nii.gz"))
        affines.append(affine)
    return affines


def _run_script(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"))
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pseudo_labels.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def test_script_local_dask_cluster_then_skips(tmp_path):
    import nibabel as nib

    affines = _write_cases(tmp_path / "in")
    out = tmp_path / "out"
    result = _run_script("--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "computed 2, skipped 0, failed 0" in result.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["case0.nii.gz", "case1.nii.gz"], files  # no temporary leftovers
    mtimes = {}
    for i, affine in enumerate(affines):
        label = nib.load(str(out / f"case{i}.nii.gz"))
        data = np.asarray(label.dataobj)
        assert np.allclose(label.affine, affine)
        assert data.shape == (30, 28, 14) and np.issubdtype(data.dtype, np.integer)
        assert data.max() > 1000
        mtimes[i] = (out / f"case{i}.nii.gz").stat().st_mtime_ns
    again = _run_script("--input", str(tmp_path / "in"), "--output", str(out), "--synchronous")
    assert again.returncode == 0, again.stderr
    assert "computed 0, skipped 2, failed 0" in again.stdout
    assert all((out / f"case{i}.nii.gz").stat().st_mtime_ns == mtimes[i] for i in mtimes)


def test_script_datastore_with_ground_truth(tmp_path):
    import nibabel as nib

    store = tmp_path / "store"
    affines = _write_cases(store)
    (store / "labels" / "final").mkdir(parents=True)
    gt = np.zeros((30, 28, 14), np.uint8)
    gt[8:16, 8:16, 4:9] = 3
    nib.save(nib.Nifti1Image(gt, affines[0]), str(store / "labels" / "final" / "case0.nii.gz"))
    result = _run_script("--input", str(store), "--synchronous")
    assert result.returncode == 0, result.stderr
    out = store / "labels" / "fh"
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]
    labels = np.asarray(nib.load(str(out / "case0.nii.gz")).dataobj)
    assert np.all(labels[gt == 3] == 3)
    assert not np.any(labels[gt == 0] == 3)


def test_scribbles_select_the_touched_supervoxels_and_the_cache_keeps_the_last_boxes():
    volume = np.zeros((20, 24, 24), np.float32)
    volume[4:12, 4:14, 4:14] = 100.0  # a bright block in a dark volume
    volume[14:18, 16:22, 16:22] = 50.0  # a second, dimmer one
    foreground = np.zeros(volume.shape, bool)
    foreground[8, 6:9, 8] = True  # a stroke inside the first block
    background = np.zeros(volume.shape, bool)
    background[1, 1:4, 1] = True  # a stroke in the dark
    box = (slice(0, 20), slice(0, 24), slice(0, 24))
    cache = fh.SupervoxelCache(items=2)
    supervoxels = cache.supervoxels(volume, (1.0, 1.0, 1.0), box, k=0.05)
    assert cache.supervoxels(volume, (1.0, 1.0, 1.0), box, k=0.05) is supervoxels  # same content: kept
    label = fh.fill_from_scribbles(supervoxels, box, foreground, background)
    block = np.zeros(volume.shape, bool)
    block[4:12, 4:14, 4:14] = True
    touched = set(np.unique(supervoxels[foreground]).tolist()) - set(np.unique(supervoxels[background]).tolist())
    expected = np.array([[[v in touched for v in row] for row in plane] for plane in supervoxels]) | foreground
    assert np.array_equal(label.astype(bool), expected & ~background)
    assert not label[~block].any() and label.sum() > 4 * foreground.sum()  # the block's supervoxels, not the stroke
    # another scale and another content are computed; only the two used last are kept
    cache.supervoxels(volume, (1.0, 1.0, 1.0), box, k=0.5)
    cache.supervoxels(volume * 2, (1.0, 1.0, 1.0), box, k=0.05)
    assert len(cache) == 2
    assert cache.supervoxels(volume, (1.0, 1.0, 1.0), box, k=0.05) is not supervoxels


def test_fh_leaves_pytorch_its_threads():
    """FH's parallel kernels use numba's workqueue layer, not a second OpenMP runtime whose threads would keep
    competing with PyTorch's after the first FH call (training steps were 2.2x slower); a user's choice is kept."""
    import os
    import subprocess
    import sys

    script = ("import numpy as np, numba\nfrom segvol import fh\n"
              "fh.segment(fh.normalize_intensity(np.random.default_rng(0).random((8, 16, 16), dtype=np.float32)))\n"
              "print(numba.threading_layer())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "workqueue"
    env["NUMBA_THREADING_LAYER"] = "omp"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "omp"
