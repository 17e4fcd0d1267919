"""Preprocessing parity with the reference (../shared/parity goldens), orientation handling, bad images, and io."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segvol.errors import BadImageError, SegVolInputError
from segvol.io import Volume, list_images, read_image, write_label
from segvol.preprocess import preprocess, reference_crop_box, reference_normalize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EXAMPLE = SHARED / "data" / "totalseg-example"
DICOM = SHARED / "data" / "dicom"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing (tests read it from ../shared beside the repository)")
    return path


@pytest.fixture(scope="module")
def preprocess_goldens():
    goldens = torch.load(need(SHARED / "parity" / "goldens.pt"), map_location="cpu", weights_only=False)
    return goldens["preprocess"]


def load(case: str):
    image = nib.load(str(need(EXAMPLE / f"{case}.nii.gz")))
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("case", ["example_ct", "example_ct_sm"])
def test_preprocess_matches_reference(case, preprocess_goldens):
    golden = preprocess_goldens[case]
    array, affine = load(case)
    prepared = preprocess(array, affine, (32, 256, 256))
    assert prepared.native.dtype == np.float32
    assert prepared.native.shape == tuple(golden["native"].shape[1:])
    assert np.allclose(prepared.native, golden["native"][0].numpy(), atol=1e-6, rtol=0)
    assert prepared.zoom_out.shape == (1, 1, 32, 256, 256)
    assert torch.allclose(prepared.zoom_out[0], golden["zoom_out"], atol=1e-6, rtol=0)
    start, stop = reference_crop_box(prepared)
    assert list(start) == list(golden["fg_start"]) and list(stop) == list(golden["fg_end"])
    # the RAS goldens: reorienting or feeding the stored order coincide
    stored = preprocess(array, affine, (32, 256, 256), reorient=False)
    assert np.array_equal(stored.native, prepared.native)


def lps_and_permuted(array, affine):
    """The same CT stored as LPS (axes 0 and 1 flipped) and with its axes permuted (Z, X, Y), with their affines."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(array.shape[:2]) - 1
    lps = (array[::-1, ::-1, :].copy(), affine @ flip)
    permutation = (2, 0, 1)
    moved = np.eye(4)[:, list(permutation) + [3]]
    permuted = (np.transpose(array, permutation).copy(), affine @ moved)
    return lps, permuted


def test_same_ct_in_other_orientations_gives_identical_preprocessing():
    array, affine = load("example_ct_sm")
    reference = preprocess(array, affine, (32, 64, 64))
    for stored, stored_affine in lps_and_permuted(array, affine):
        # the two arrays are the same anatomy: world coordinates of a voxel agree
        assert nib.aff2axcodes(stored_affine) != ("R", "A", "S")
        other = preprocess(stored, stored_affine, (32, 64, 64))
        assert np.array_equal(other.native, reference.native)
        assert torch.equal(other.zoom_out, reference.zoom_out)
        assert other.frames.crop == reference.frames.crop
        assert other.key != reference.key  # a different stored array, a different cache identity
        # without reorientation the reference would see a different (flipped / transposed) volume
        stored_order = preprocess(stored, stored_affine, (32, 64, 64), reorient=False)
        assert stored_order.native.shape != reference.native.shape or not np.array_equal(stored_order.native,
                                                                                          reference.native)


def test_reference_normalize_is_the_reference_formula():
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, size=(20, 30, 40)).astype(np.float32)
    volume[:, :5] = -1000  # air
    flat = volume.ravel()
    fg = flat[flat > flat.mean()]
    low, high = np.percentile(fg, 0.05), np.percentile(fg, 99.95)
    z = (np.clip(volume, low, high) - fg.mean()) / fg.std()
    expected = (z - z.min()) / (z.max() - z.min())
    out = reference_normalize(volume)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == pytest.approx(1.0)
    assert np.allclose(out, expected, atol=1e-5)
    assert volume[0, 0, 0] == -1000  # the input is not modified


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 5, 6)), "constant"),
    (np.full((4, 5, 6), 7.0), "constant"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 3, np.nan, 1.0), "NaN"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 3, np.inf, 1.0), "infinite"),
    (np.zeros((4, 5)), "3-D"),
    (np.zeros((0, 5, 6)), "empty"),
    (np.zeros((2, 3, 4, 5)), "3-D"),
])
def test_bad_images_raise_a_typed_error(array, message):
    with pytest.raises(BadImageError, match=message) as info:
        preprocess(array)
    assert isinstance(info.value, SegVolInputError) and isinstance(info.value, ValueError)


def test_trailing_singleton_axis_is_dropped():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(6, 7, 8, 1)).astype(np.float32)
    assert preprocess(volume, image_size=(32, 64, 64)).frames.original_shape == (6, 7, 8)


# ---------------------------------------------------------------------------------------------------------------
# io
# ---------------------------------------------------------------------------------------------------------------
def test_read_nifti_as_stored_and_write_label_on_its_grid(tmp_path):
    path = need(EXAMPLE / "example_ct_sm.nii.gz")
    volume = read_image(str(path))
    image = nib.load(str(path))
    assert isinstance(volume, Volume)
    assert np.array_equal(volume.array, np.asarray(image.dataobj))
    assert np.array_equal(volume.affine, image.affine)
    label = (volume.array > 0).astype(np.uint8) * 3
    out = write_label(str(tmp_path / "sub" / "label.nii.gz"), label, volume.affine, volume.header)
    written = nib.load(out)
    assert written.shape == image.shape and np.array_equal(written.affine, image.affine)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), label)


@pytest.mark.parametrize("name", ["example_ct_sm", "STS_001", "scaled", "four_d", "big_endian"])
def test_read_nifti_gives_what_monai_gives_and_the_same_preprocessing(tmp_path, name):
    """NIfTI is read by nibabel in the file's (Fortran) order, without MONAI's C-order copy: the voxels, their type,
    the affine and the whole preprocessing are those of MONAI's ``LoadImage`` (which cannot read a big-endian file;
    ours gives it in the machine's byte order)."""
    from monai.transforms import LoadImage

    if name == "example_ct_sm":
        path = need(EXAMPLE / "example_ct_sm.nii.gz")
    elif name == "STS_001":  # stored LPS: the axis map flips two axes
        path = need(SHARED / "data" / "ibsi-sts-dev" / "STS_001_CT_image.nii.gz")
    else:
        rng = np.random.default_rng(4)
        array = rng.integers(-1000, 1500, size=(20, 24, 12)).astype(np.int16)
        header = nib.Nifti1Header(endianness=">") if name == "big_endian" else None
        image = nib.Nifti1Image(array[..., None] if name == "four_d" else array, np.diag([0.8, -0.8, 2.5, 1]),
                                header=header)
        if name == "scaled":
            image.header.set_slope_inter(0.5, -1024)
        path = tmp_path / f"{name}.nii.gz"
        nib.save(image, str(path))
    volume = read_image(str(path))
    assert volume.array.dtype.isnative
    if name == "big_endian":  # MONAI's reader refuses it (torch has no foreign byte order): nibabel's own values
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        data, meta = data.astype(data.dtype.newbyteorder("=")), {"affine": image.affine}
    else:
        data, meta = LoadImage(image_only=False, dtype=None)(str(path))
    expected = np.asarray(data)
    while expected.ndim > 3 and expected.shape[-1] == 1:
        expected = expected[..., 0]
    assert volume.array.dtype == expected.dtype and np.array_equal(volume.array, expected)
    assert np.array_equal(volume.affine, np.asarray(meta["affine"], dtype=np.float64))
    ours, theirs = preprocess(volume.array, volume.affine), preprocess(expected, volume.affine)
    assert np.array_equal(ours.native, theirs.native) and torch.equal(ours.zoom_out, theirs.zoom_out)
    assert ours.frames == theirs.frames


def test_read_dicom_series_matches_its_nifti_export():
    folder = need(DICOM / "STS_001" / "CT" / "image")
    nifti = need(SHARED / "data" / "ibsi-sts-dev" / "STS_001_CT_image.nii.gz")
    volume = read_image(str(folder))
    reference = nib.load(str(nifti))
    assert volume.shape == reference.shape
    assert np.allclose(volume.affine, reference.affine, atol=1e-3)
    assert np.array_equal(volume.array.astype(np.float32), np.asarray(reference.dataobj, dtype=np.float32))
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_read_nrrd_and_metaimage_like_the_nifti_they_came_from(tmp_path, suffix):
    import itk

    path = need(SHARED / "data" / "ibsi-sts-dev" / "STS_001_CT_image.nii.gz")  # LPS-stored: a real orientation test
    converted = str(tmp_path / ("ct" + suffix))
    itk.imwrite(itk.imread(str(path)), converted)
    volume, reference = read_image(converted), read_image(str(path))
    assert volume.shape == reference.shape
    assert np.allclose(volume.affine, reference.affine, atol=1e-4)
    assert np.array_equal(volume.array, reference.array)
    assert [Path(p).name for p in list_images(str(tmp_path))] == ["ct" + suffix]


def test_list_images_and_unreadable_inputs(tmp_path):
    found = list_images(str(need(EXAMPLE)))
    assert [Path(p).name for p in found] == ["example_ct.nii.gz", "example_ct_sm.nii.gz", "example_seg.nii.gz"]
    with pytest.raises(BadImageError, match="not found"):
        read_image(str(tmp_path / "missing.nii.gz"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadImageError, match="neither"):
        read_image(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(BadImageError, match="could not read"):
        read_image(str(tmp_path / "broken.nii.gz"))
