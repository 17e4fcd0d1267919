"""Files: the one home of the project's rules for reading images, writing labels and writing any file atomically.

It owns which names are images (the suffix lists, ``strip_image_suffix``), how an image is read (MONAI's
``LoadImage``, the loader MONAI Label uses, so the array is "as stored" in the sense clients use for their voxel
indices and the affine is MONAI's RAS world), what a voxel's spacing is (``spacing``: the affine's column norms), the
one label writer (``write_label``: NIfTI on the input's affine, a NIfTI input's header kept, optionally atomic) and
the atomic writes every module uses (``atomic_output``, ``atomic_write_bytes``, ``atomic_write_json``,
``atomic_copy``, ``replace_durably``, ``fsync_dir``): temp file beside the target, fsync, rename, fsync the folder, so
a reader, a ``kill -9`` or a power cut sees the previous file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, List, Optional, Tuple, Union

import numpy as np

from .errors import BadImageError

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # the longer first: a folder holding both is read as .nii.gz
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read through ITK, what Slicer and many datastores save
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
PARTIAL_DIR = ".partial"  # where atomic label writes keep their temp files (the name's ending kept for nibabel)


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


def strip_image_suffix(name: str) -> str:
    """``case_1.nii.gz`` -> ``case_1`` (any image suffix, case-insensitive; other names lose their last extension)."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def spacing(affine: np.ndarray) -> tuple:
    """Voxel spacing (mm) along the array's three axes: the norms of the affine's first three columns."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def is_nifti(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(NIFTI_SUFFIXES)


def is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_SUFFIXES)


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
    if is_nifti(path):
        return _read_nifti(path)
    from monai.transforms import LoadImage

    try:
        data, meta = LoadImage(image_only=False, dtype=None)(path)
    except Exception as error:  # MONAI and its readers raise many unrelated types
        raise BadImageError(f"could not read {path!r}: {error}") from error
    array = np.asarray(data)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    affine = np.asarray(meta.get("affine", getattr(data, "affine", np.eye(4))), dtype=np.float64)
    return Volume(array=array, affine=affine, source=path, header=None)


def _read_nifti(path: str) -> Volume:
    """NIfTI through nibabel, as MONAI's reader gives it (the stored array, scaled, and ``img.affine``) but in the
    file's own (Fortran) order: the usual RAS axis map then needs no copy at all, where MONAI's C-order copy took
    about a second for a 512x512x200 CT."""
    import nibabel as nib

    try:
        image = nib.load(path, mmap=False)
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many unrelated types for damaged files
        raise BadImageError(f"could not read {path!r}: {error}") from error
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not array.dtype.isnative:  # a big-endian file: torch only takes the machine's byte order
        array = array.astype(array.dtype.newbyteorder("="))
    return Volume(array=array, affine=np.array(image.affine, dtype=np.float64), source=path,
                  header=image.header.copy())


def label_dtype(label: np.ndarray) -> np.dtype:
    """The smallest of uint8 / uint16 / int16 / int32 that holds every value of ``label``."""
    if label.size == 0:
        return np.dtype(np.uint8)
    low, high = int(label.min()), int(label.max())
    if low >= 0:
        return np.dtype(np.uint8 if high <= 255 else np.uint16 if high <= 65535 else np.int32)
    return np.dtype(np.int16 if low >= -32768 and high <= 32767 else np.int32)


def _fortran_order(array: np.ndarray) -> np.ndarray:
    """The same array in Fortran order, NIfTI's order on disk: nibabel then writes it without reordering slab by
    slab (1.7 s of a 2.1 s write for a 512x512x200 label); the copy is torch's, on every core."""
    if array.flags.f_contiguous or array.ndim < 2:
        return array
    from .frames import reorder

    return reorder(array, tuple(range(array.ndim - 1, -1, -1))).T


def write_label(path: str, label: np.ndarray, affine: np.ndarray, header=None, dtype=None, atomic: bool = False,
                temp_dir: Optional[str] = None) -> str:
    """Write a label map as NIfTI on the given affine (and header, when the input was NIfTI).

    ``dtype``: default ``label_dtype(label)``. ``atomic``: through ``atomic_output`` (``temp_dir``: where the temp
    file goes, default beside ``path``)."""
    if atomic:  # nibabel picks the format by the name's ending: the temp file keeps it, in a .partial folder
        folder = os.path.dirname(os.path.abspath(path))
        with atomic_output(path, temp_dir=temp_dir or os.path.join(folder, PARTIAL_DIR)) as tmp:
            write_label(tmp, label, affine, header, dtype)
        return path
    import nibabel as nib

    label = np.asarray(label)
    dtype = label_dtype(label) if dtype is None else np.dtype(dtype)
    image = nib.Nifti1Image(_fortran_order(label.astype(dtype, copy=False)), np.asarray(affine, dtype=np.float64),
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


# ---------------------------------------------------------------------------------------------------- atomic writes
def fsync_dir(folder: str, strict: bool = False) -> None:
    """Make a rename in ``folder`` durable; errors are ignored unless ``strict``."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


def fsync_file(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def replace_durably(tmp: str, path: str, strict: bool = False) -> None:
    """Rename a written (and fsynced) temp file over ``path`` and fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)), strict=strict)


# ---------------------------------------------------------------------------------------------------------------------
# processes: the one rule for "is the process that wrote this still running" in the whole project
# ---------------------------------------------------------------------------------------------------------------------
def process_alive(pid: Any, start: Any = None) -> bool:
    """True when process ``pid`` runs (a zombie does not) and, when ``start`` is known (its ``create_time``), is the
    one that started then rather than a later process given the same pid."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        import psutil

        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if start is not None and abs(process.create_time() - float(start)) > 1.0:
            return False  # the pid was reused by another process
        return True
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except PermissionError:
            return True
        except OSError:
            return False
    except Exception:  # psutil.NoSuchProcess, AccessDenied on a foreign process...
        return False


def writer_alive(pid: int, path: str) -> bool:
    """True when process ``pid`` runs and may have written ``path``: it started before the file was last written. A
    pid taken by a new process after a restart (a fresh container numbers its processes from 1 again) is not the
    writer of a temp file older than itself."""
    try:
        written = os.path.getmtime(path)
    except OSError:
        return False
    try:
        import psutil

        return process_alive(pid) and psutil.Process(pid).create_time() <= written + 1.0
    except ImportError:
        return process_alive(pid)
    except Exception:  # gone meanwhile
        return False


def temp_name(path: str, temp_dir: Optional[str] = None) -> str:
    """``<path>.<hex>.<pid>.tmp`` (or ``<temp_dir>/<pid>-<hex>-<name>``): the temp file of an atomic write of
    ``path``, unique per call (threads of one process may write the same file), with the writer's pid (what cleaning
    reads, ``parse_temp_name``, to spare a live writer's file)."""
    if temp_dir is None:
        return f"{path}.{os.urandom(4).hex()}.{os.getpid()}.tmp"
    return os.path.join(temp_dir, f"{os.getpid()}-{os.urandom(4).hex()}-{os.path.basename(path)}")


_SUFFIXED_TEMP = re.compile(r"^(?P<name>.+?)(?:\.[0-9a-f]{8})?\.(?P<pid>\d+)\.tmp$")
_PREFIXED_TEMP = re.compile(r"^(?P<pid>\d+)-[0-9a-f]{8}-(?P<name>.+)$")


def parse_temp_name(filename: str) -> Optional[Tuple[int, str]]:
    """(writer's pid, name of the file it becomes) of a temp file ``temp_name`` gives (also ``<name>.<pid>.tmp``),
    or None for any other name."""
    base = os.path.basename(filename)
    match = _SUFFIXED_TEMP.match(base) or _PREFIXED_TEMP.match(base)
    return (int(match.group("pid")), match.group("name")) if match else None


@contextlib.contextmanager
def atomic_output(path: str, temp_dir: Optional[str] = None, fsync: bool = True) -> Iterator[str]:
    """``with atomic_output(path) as tmp: <write tmp>``: on success ``tmp`` is fsynced and renamed over ``path``
    and the folder fsynced; on any error (or interrupt) ``tmp`` is removed and ``path`` is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if temp_dir is not None:
        os.makedirs(temp_dir, exist_ok=True)
    tmp = temp_name(path, temp_dir)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        replace_durably(tmp, path)
    finally:
        if os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> str:
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        out.write(data)
    return path


def atomic_write_json(path: str, payload: Any, indent: Optional[int] = 1) -> str:
    """``payload`` as JSON (non-JSON values through ``str``), written atomically."""
    return atomic_write_bytes(path, json.dumps(payload, indent=indent, default=str).encode())


def atomic_copy(source: Union[str, BinaryIO], destination: str) -> str:
    """Copy a file (a path, or an open binary file read from its start) atomically to ``destination``."""
    with atomic_output(destination) as tmp, open(tmp, "wb") as out:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
        else:
            source.seek(0)
            shutil.copyfileobj(source, out, 16 << 20)
    return destination
