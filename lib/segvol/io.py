"""Reading CT images (NIfTI, NRRD and MetaImage files, DICOM series folders); writing labels on the input's grid.

Images are read with MONAI's ``LoadImage`` (the loader MONAI Label uses), so the array is "as stored" in the sense
clients use for their voxel indices, and the affine is MONAI's (RAS world). Labels are written as NIfTI with the
input's affine; for a NIfTI input its header (qform/sform codes, units) is kept too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .errors import BadImageError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read through ITK, what Slicer and many datastores save
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass
class Volume:
    """A 3-D image as stored (X, Y, Z for NIfTI) with its 4x4 voxel-to-RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    source: Optional[str] = None
    header: object = field(default=None, repr=False)  # nibabel header of a NIfTI source, kept for writing

    @property
    def shape(self):
        return tuple(self.array.shape)


def is_nifti(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(NIFTI_SUFFIXES)


def is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)


def is_dicom_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full) and (name.lower().endswith(DICOM_SUFFIXES) or _has_dicom_magic(full)):
            return True
    return False


def _has_dicom_magic(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str) -> Volume:
    """A NIfTI / NRRD / MetaImage file or a DICOM series folder -> ``Volume``; ``BadImageError`` when it cannot be
    read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BadImageError(f"image not found: {path!r}")
    if not (is_image_file(path) or is_dicom_folder(path)):
        raise BadImageError(f"{path!r} is neither an image file ({', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}) nor a "
                            "folder of DICOM files")
    from monai.transforms import LoadImage

    try:
        data, meta = LoadImage(image_only=False, dtype=None)(path)
    except Exception as error:  # MONAI and its readers raise many unrelated types
        raise BadImageError(f"could not read {path!r}: {error}") from error
    array = np.asarray(data)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    affine = np.asarray(meta.get("affine", getattr(data, "affine", np.eye(4))), dtype=np.float64)
    header = None
    if is_nifti(path):
        import nibabel as nib

        header = nib.load(path).header.copy()
    return Volume(array=array, affine=affine, source=path, header=header)


def write_label(path: str, label: np.ndarray, affine: np.ndarray, header=None) -> str:
    """Write a label map as NIfTI on the given affine (and header, when the input was NIfTI)."""
    import nibabel as nib

    label = np.asarray(label)
    dtype = np.uint8 if label.size == 0 or label.max() <= 255 else np.uint16
    image = nib.Nifti1Image(label.astype(dtype), np.asarray(affine, dtype=np.float64),
                            header=header.copy() if header is not None else None)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.set_qform(np.asarray(affine, dtype=np.float64), code=int(header["qform_code"]) if header is not None else 1)
    image.set_sform(np.asarray(affine, dtype=np.float64), code=int(header["sform_code"]) if header is not None else 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    nib.save(image, path)
    return path


def list_images(folder: str) -> List[str]:
    """Every image in a folder, sorted: image files (NIfTI, NRRD, MetaImage) and sub-folders holding a DICOM series
    (or the folder itself when it holds one)."""
    if not os.path.isdir(folder):
        raise BadImageError(f"not a folder: {folder!r}")
    found = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if is_image_file(full) or is_dicom_folder(full):
            found.append(full)
    if not found and is_dicom_folder(folder):
        found.append(folder)
    return found


def source_signature(path: str) -> Optional[str]:
    """A cheap identity of a file or DICOM folder (path, sizes, modification times) for caching reads."""
    try:
        path = os.path.realpath(path)
        if os.path.isfile(path):
            stat = os.stat(path)
            return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if os.path.isdir(path):
            parts = [path]
            for name in sorted(os.listdir(path)):
                stat = os.stat(os.path.join(path, name))
                parts.append(f"{name}|{stat.st_size}|{stat.st_mtime_ns}")
            return "\n".join(parts)
    except OSError:
        return None
    return None
