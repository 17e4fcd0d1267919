"""A durable local datastore: MONAI Label's ``LocalDatastore`` with crash-safe writes, a self-repairing index and
per-label sidecars, safe for several processes at once (the server and MONAI Label's scoring and training
subprocesses, which rebuild the app and hold their own copy of the index).

What it guarantees (``docs/deploying.md``, "Where data lives and how to back it up"):

* Every image, label, sidecar and index write goes to a temp file in the destination folder
  (``.<name>.segvol-tmp-<pid>-<hex>``), is flushed and fsynced, renamed over the destination (``os.replace``) and the
  folder is fsynced: a kill at any instant leaves the previous or the new file, never a partial one.
* Every change of the index (``datastore_v2.json``) is a read-modify-write under the datastore's inter-process file
  lock (``<datastore>/.lock``, the one MONAI Label uses): the index is re-read from disk, only this call's change is
  applied, and the result is written atomically. A scoring subprocess therefore no longer writes back its stale copy
  over labels saved meanwhile.
* Each label has a sidecar ``labels/<tag>/.meta/<id>.json`` holding its ``label_info`` and the size and mtime of the
  file it describes. At start an empty, garbled or missing index is rebuilt from the files on disk (the damaged file
  is kept as ``datastore_v2.json.damaged-<time>``) and each label's info is restored from its sidecar; a label saved
  just before a crash that did not reach the index gets its info from the sidecar too.
* At start (under the lock, so never while another process writes): leftover temp files are removed, and a label
  file that is empty or not readable as an image is moved to ``labels/<tag>/.quarantine/`` (logged, never deleted).
* Uploads are checked before they are stored: an image must be a readable single-channel 3-D volume, a label a
  readable single-channel integer map with its image's shape (``BadImageError``, HTTP 422). Ids and tags are checked
  with ``lib.validation.check_name`` (``UnsafeNameError``, HTTP 400); ids already in the datastore (file names found
  on disk) are accepted as they are.

Test hook, inert unless the environment variable ``SEGVOL_FAULT_DIR`` is set: at each named point of a write
(``fault_point``) the process checks for ``$SEGVOL_FAULT_DIR/<point>.arm``; when it exists it is renamed to
``<point>.hit`` and the process sleeps (``SEGVOL_FAULT_SLEEP`` seconds, default one hour) so a test can SIGKILL it
there. Points: ``image-partial``, ``image-before-rename``, ``image-before-index``, ``label-partial``,
``label-before-rename``, ``label-before-index``, ``sidecar-partial``, ``sidecar-before-rename``, ``index-partial``,
``index-before-rename`` (``*-partial``: half the bytes written and fsynced).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import secrets
import shutil
import time
import zlib
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from lib.validation import check_name
from segvol.errors import BadImageError
from segvol.io import fsync_dir as _fsync_dir
from segvol.io import replace_durably

logger = logging.getLogger(__name__)

TMP_MARK = ".segvol-tmp-"
_TMP_NAME = re.compile(r"^\..+\.segvol-tmp-\d+-[0-9a-f]+$")
META_DIR = ".meta"
QUARANTINE_DIR = ".quarantine"
SIDECAR_FORMAT = "segvol-label-sidecar/1"


# --------------------------------------------------------------------------------------------------------- test hook
def fault_point(name: str) -> None:
    """Block here when a test armed ``name`` (see the module docstring); a no-op unless ``SEGVOL_FAULT_DIR`` is set."""
    folder = os.environ.get("SEGVOL_FAULT_DIR")
    if not folder:
        return
    try:
        os.rename(os.path.join(folder, f"{name}.arm"), os.path.join(folder, f"{name}.hit"))
    except OSError:
        return
    logger.warning("fault point %s reached: pausing for a test (SEGVOL_FAULT_DIR)", name)
    time.sleep(float(os.environ.get("SEGVOL_FAULT_SLEEP", "3600")))


# ---------------------------------------------------------------------------------------------------- atomic writes
def fsync_dir(folder: str) -> None:
    """``segvol.io.fsync_dir``, strict: a datastore write whose folder cannot be synced fails."""
    _fsync_dir(folder, strict=True)


def temp_path(dest: str) -> str:
    """A temp name beside ``dest`` that no datastore pattern (``*.nii.gz``...) matches and start-up cleans."""
    folder, name = os.path.split(dest)
    return os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    return bool(_TMP_NAME.match(name))


def _partial(out, kind: str) -> None:
    if os.environ.get("SEGVOL_FAULT_DIR"):
        out.flush()
        os.fsync(out.fileno())
        fault_point(f"{kind}-partial")


def atomic_write(dest: str, content, kind: str, before_rename=None) -> os.stat_result:
    """Write ``content`` (bytes, or the path of a file to copy) to ``dest`` atomically; returns the stat of the
    written file (size and mtime survive the rename). ``before_rename(stat)`` runs once the data is durable."""
    tmp = temp_path(dest)
    try:
        with open(tmp, "xb") as out:
            if isinstance(content, (bytes, bytearray)):
                half = len(content) // 2
                out.write(content[:half])
                _partial(out, kind)
                out.write(content[half:])
            else:
                with open(content, "rb") as src:
                    remaining = os.fstat(src.fileno()).st_size // 2
                    while remaining > 0:
                        chunk = src.read(min(remaining, 1 << 20))
                        if not chunk:
                            break
                        out.write(chunk)
                        remaining -= len(chunk)
                    _partial(out, kind)
                    shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        stat = os.stat(tmp)
        if before_rename is not None:
            before_rename(stat)
        fault_point(f"{kind}-before-rename")
        replace_durably(tmp, dest, strict=True)  # segvol.io: rename, then fsync the folder
        return stat
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------- content checks
_INTEGER_TYPES = ("8-bit unsigned integer", "8-bit signed integer", "16-bit unsigned integer",
                  "16-bit signed integer", "32-bit unsigned integer", "32-bit signed integer",
                  "64-bit unsigned integer", "64-bit signed integer")


def _header(path: str, what: str) -> Tuple[Tuple[int, ...], str, int]:
    """(shape without trailing 1s beyond 3-D, ITK pixel type name, components) from the header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise BadImageError(f"{what} is not a readable image file (NIfTI, NRRD, ...)") from None
    shape = list(reader.GetSize())
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(int(s) for s in shape), sitk.GetPixelIDValueAsString(reader.GetPixelID()), \
        int(reader.GetNumberOfComponents())


def volume_shape(path: str, what: str = "image") -> Tuple[int, ...]:
    """The volume's shape from its header alone (``BadImageError`` when it does not read)."""
    return _header(path, what)[0]


def _gzip_intact(path: str) -> bool:
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False


def _fully_readable(path: str) -> bool:
    """The whole file decodes: the gzip stream is complete (``.gz``), or ITK reads every voxel (other formats)."""
    if path.endswith(".gz"):
        return _gzip_intact(path)
    import SimpleITK as sitk

    try:
        sitk.ReadImage(path)
        return True
    except RuntimeError:
        return False


def check_image_file(path: str) -> Tuple[int, ...]:
    """The shape of a readable single-channel 3-D volume, else ``BadImageError``."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadImageError("image upload is empty")
    shape, _, components = _header(path, "image upload")
    if len(shape) != 3 or min(shape) < 1:
        raise BadImageError(f"image must be a 3-D volume, got {len(shape)}-D size {list(shape)}")
    if components != 1:
        raise BadImageError(f"image must have one value per voxel, got {components} components")
    if path.endswith(".gz") and not _gzip_intact(path):
        raise BadImageError("image upload is truncated or corrupt (incomplete gzip stream)")
    return shape


def check_label_file(path: str, image_shape: Tuple[int, ...]) -> None:
    """A readable single-channel integer label map of ``image_shape``, else ``BadImageError``."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadImageError("label upload is empty")
    shape, pixel, components = _header(path, "label upload")
    if components != 1:
        raise BadImageError(f"label must be one label map (one value per voxel), got {components} components")
    if pixel not in _INTEGER_TYPES:
        raise BadImageError(f"label must have an integer voxel type (uint8, int16, ...), got {pixel}")
    if tuple(shape) != tuple(image_shape):
        raise BadImageError(f"label size {list(shape)} differs from the image's {list(image_shape)}")
    if not _fully_readable(path):
        raise BadImageError("label upload is truncated or corrupt")


def label_problem(path: str, trusted: bool) -> Optional[str]:
    """Why a label file on disk must not be listed (``None`` if it is fine). ``trusted``: its sidecar says this
    datastore wrote exactly this file, so the header is enough."""
    try:
        if os.path.getsize(path) == 0:
            return "empty (0 bytes)"
        _header(path, "label")
    except (OSError, BadImageError):
        return "not readable as an image"
    if not trusted and not _fully_readable(path):
        return "truncated or corrupt"
    return None


# ------------------------------------------------------------------------------------------------------ datastore
class SegVolDatastore(LocalDatastore):
    """``LocalDatastore`` with atomic writes, inter-process read-modify-write of the index, label sidecars,
    start-up repair and upload checks (see the module docstring)."""

    def __init__(self, datastore_path: str, images_dir: str = ".", labels_dir: str = "labels",
                 datastore_config: str = "datastore_v2.json", extensions=("*.nii.gz", "*.nii"),
                 auto_reload: bool = False, read_only: bool = False):
        os.makedirs(datastore_path, exist_ok=True)
        self._index_sig: Optional[Tuple[int, int, int]] = None
        self._segvol_read_only = read_only
        self._extensions = [extensions] if isinstance(extensions, str) else list(extensions)
        # One lock object per instance: re-entrant in its thread, exclusive between threads and processes.
        self._segvol_lock = FileLock(os.path.join(datastore_path, ".lock"))
        with self._segvol_lock:
            known = self._prepare(datastore_path, images_dir, labels_dir, datastore_config, read_only)
            super().__init__(datastore_path, images_dir=images_dir, labels_dir=labels_dir,
                             datastore_config=datastore_config, extensions=extensions, auto_reload=auto_reload,
                             read_only=read_only)
            if not read_only:
                self._sync_sidecars(known)

    # ------------------------------------------------------------------------------------------ start-up repair
    def _prepare(self, root: str, images_dir: str, labels_dir: str, config: str, read_only: bool) -> Set[tuple]:
        """Before MONAI Label reads anything: clean temp files, set a damaged index aside, quarantine bad labels.
        Returns the (id, tag) pairs of the index as it was on disk (empty when it had to be rebuilt)."""
        index = os.path.join(root, config)
        model = None
        if os.path.exists(index):
            try:
                with open(index, "rb") as fp:
                    model = LocalDatastoreModel.model_validate_json(fp.read())
            except (OSError, ValueError) as error:
                reason = str(error).splitlines()[0][:200]
                if read_only:
                    logger.error("datastore index %s is damaged (%s): rebuilding it in memory (read-only)", index,
                                 reason)
                else:
                    aside = f"{index}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
                    os.replace(index, aside)
                    fsync_dir(root)
                    logger.error("datastore index %s is damaged (%s): kept as %s; rebuilding it from the files, "
                                 "label info from the sidecars", index, reason, aside)
        if model is not None:
            images_dir, labels_dir = model.images_dir or images_dir, model.labels_dir or labels_dir
        if read_only:
            return self._index_pairs(model)

        labels_root = os.path.join(root, labels_dir)
        folders = [root, os.path.join(root, images_dir), labels_root]
        tags = sorted(t for t in (os.listdir(labels_root) if os.path.isdir(labels_root) else [])
                      if not t.startswith(".") and os.path.isdir(os.path.join(labels_root, t)))
        for tag in tags:
            folders += [os.path.join(labels_root, tag), os.path.join(labels_root, tag, META_DIR)]
        for folder in dict.fromkeys(os.path.normpath(f) for f in folders):
            self._remove_temp_files(folder)
        for tag in tags:
            self._quarantine_bad_labels(os.path.join(labels_root, tag))
        return self._index_pairs(model)

    @staticmethod
    def _index_pairs(model) -> Set[tuple]:
        if model is None:
            return set()
        return {(image_id, tag) for image_id, obj in model.objects.items() for tag in obj.labels}

    @staticmethod
    def _remove_temp_files(folder: str) -> None:
        # Temp files only exist while their writer holds the lock, which we hold now: any found is orphaned.
        if not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            if is_temp_name(name):
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    logger.warning("removing an interrupted write's temp file %s", path)
                    os.unlink(path)

    def _matching_files(self, folder: str) -> List[str]:
        import fnmatch

        names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not is_temp_name(n)]
        return sorted({n for pattern in self._extensions for n in fnmatch.filter(names, pattern)})

    def _quarantine_bad_labels(self, folder: str) -> None:
        for name in self._matching_files(folder):
            path = os.path.join(folder, name)
            label_id, ext = self._to_id(name)
            sidecar_path = os.path.join(folder, META_DIR, f"{label_id}.json")
            sidecar = self._read_sidecar(sidecar_path)
            problem = label_problem(path, trusted=self._sidecar_matches(sidecar, path, ext))
            if problem is None:
                continue
            quarantine = os.path.join(folder, QUARANTINE_DIR)
            os.makedirs(quarantine, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = os.path.join(quarantine, f"{stamp}-{name}")
            os.replace(path, target)
            if os.path.exists(sidecar_path):
                os.replace(sidecar_path, os.path.join(quarantine, f"{stamp}-{label_id}.json"))
            fsync_dir(folder)
            logger.error("label %s is %s: moved to %s (not listed; inspect or delete it by hand)", path, problem,
                         target)

    def _sync_sidecars(self, known: Set[tuple]) -> None:
        """Make index and sidecars agree after start: a sidecar describing exactly the file on disk wins (the index
        missed its last write or was rebuilt); otherwise the index's info is written to the sidecar."""
        with self._segvol_lock:
            ds = self._fresh_locked()
            changed = False
            for image_id, obj in ds.objects.items():
                for tag, label in obj.labels.items():
                    path = os.path.join(ds.label_path(tag), self._filename(image_id, label.ext))
                    sidecar = self._read_sidecar(self._sidecar_path(tag, image_id))
                    info = sidecar.get("info") if sidecar else None
                    if self._sidecar_matches(sidecar, path, label.ext) and isinstance(info, dict):
                        if info != label.info:
                            logger.warning("label %s/%s: info restored from its sidecar", tag, image_id)
                            label.info, changed = info, True
                        continue
                    if (image_id, tag) not in known and isinstance(info, dict):
                        logger.warning("label %s/%s: info restored from its sidecar (the file changed since)", tag,
                                       image_id)
                        label.info, changed = info, True
                    if os.path.exists(path):
                        self._write_sidecar(tag, image_id, label.ext, label.info, os.stat(path))
            for tag in ds.tags() | {"final", "original"}:
                self._remove_orphan_sidecars(ds.label_path(tag))
            if changed:
                self._update_datastore_file()

    def _remove_orphan_sidecars(self, folder: str) -> None:
        meta = os.path.join(folder, META_DIR)
        if not os.path.isdir(meta):
            return
        for name in os.listdir(meta):
            path = os.path.join(meta, name)
            if not name.endswith(".json") or is_temp_name(name):
                continue
            sidecar = self._read_sidecar(path)
            file = sidecar.get("file") if sidecar else None
            if isinstance(file, str) and "/" not in file and not os.path.exists(os.path.join(folder, file)):
                logger.info("removing sidecar %s: its label %s does not exist", path, file)
                os.unlink(path)

    # ---------------------------------------------------------------------------------------------- sidecars
    def _sidecar_path(self, tag: str, label_id: str) -> str:
        return os.path.join(self._datastore.label_path(tag), META_DIR, f"{label_id}.json")

    @staticmethod
    def _read_sidecar(path: str) -> Optional[Dict[str, Any]]:
        try:
            with open(path, "rb") as fp:
                record = json.loads(fp.read())
            return record if isinstance(record, dict) and record.get("format") == SIDECAR_FORMAT else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _sidecar_matches(sidecar: Optional[Dict[str, Any]], path: str, ext: str) -> bool:
        try:
            stat = os.stat(path)
        except OSError:
            return False
        return bool(sidecar) and sidecar.get("ext") == ext and sidecar.get("size") == stat.st_size \
            and sidecar.get("mtime_ns") == stat.st_mtime_ns

    def _write_sidecar(self, tag: str, label_id: str, ext: str, info: Dict[str, Any], stat: os.stat_result) -> None:
        path = self._sidecar_path(tag, label_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"format": SIDECAR_FORMAT, "id": label_id, "tag": tag, "ext": ext,
                  "file": self._filename(label_id, ext), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "info": info}
        atomic_write(path, json.dumps(record, indent=1, default=str).encode(), "sidecar")

    # ------------------------------------------------------------------------------------------------- index
    def _read_index(self, force: bool = False):
        """(model, signature, mtime) of the index on disk; ``None`` when it is unchanged since we last read or wrote
        it (unless ``force``), missing, or unreadable (logged)."""
        try:
            with open(self._datastore_config_path, "rb") as fp:
                stat = os.fstat(fp.fileno())
                sig = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                if sig == self._index_sig and not force:
                    return None
                text = fp.read()
        except FileNotFoundError:
            return None
        try:
            model = LocalDatastoreModel.model_validate_json(text)
        except ValueError as error:
            logger.error("datastore index %s is unreadable (%s): using the last good copy in memory",
                         self._datastore_config_path, str(error).splitlines()[0][:200])
            return None
        model.base_path = self._datastore_path
        return model, sig, stat.st_mtime

    def _init_from_datastore_file(self, throw_exception=False, force=False):
        """Load the index when it changed on disk (or ``force``). Never raises: a damaged index keeps the in-memory
        one, which the next change writes back whole."""
        loaded = self._read_index(force)
        if loaded is not None:
            self._datastore, self._index_sig, self._config_ts = loaded

    def _write_index(self, model: LocalDatastoreModel) -> None:
        with self._segvol_lock:
            data = json.dumps(model.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
            atomic_write(self._datastore_config_path, data, "index")
            stat = os.stat(self._datastore_config_path)
            self._datastore = model
            self._index_sig = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            self._config_ts = stat.st_mtime

    def _update_datastore_file(self, lock=True):
        self._write_index(self._datastore)

    @contextmanager
    def _update(self) -> Iterator[LocalDatastoreModel]:
        """Read-modify-write of the index under the inter-process lock: the body changes a private, freshly read
        copy, which is written and then published to this process's readers (worker threads never see it half
        changed)."""
        with self._segvol_lock:
            loaded = self._read_index(force=True)
            model = loaded[0] if loaded is not None else self._datastore.model_copy(deep=True)
            yield model
            self._write_index(model)

    def _reconcile_datastore(self):
        with self._segvol_lock:
            self._init_from_datastore_file(force=True)
            super()._reconcile_datastore()

    def _fresh_locked(self) -> LocalDatastoreModel:
        self._init_from_datastore_file(force=True)
        return self._datastore

    def _fresh(self) -> LocalDatastoreModel:
        self._init_from_datastore_file()
        return self._datastore

    # ------------------------------------------------------------------------------------------------- names
    def _image_id(self, image_id: Any, field: str = "image") -> str:
        """A known id (as found on disk) or a safe new one."""
        if isinstance(image_id, str) and image_id in self._datastore.objects and "/" not in image_id \
                and os.sep not in image_id and "\x00" not in image_id and image_id not in (".", ".."):
            return image_id
        return check_name(image_id, field)

    def _tag(self, tag: Any) -> str:
        if isinstance(tag, str) and tag in self._datastore.tags() and "/" not in tag and os.sep not in tag \
                and "\x00" not in tag and ".." not in tag and tag not in (".", ""):
            return tag
        return check_name(tag, "tag")

    # ------------------------------------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        file_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or file_id, "image")
        check_image_file(image_filename)
        name = self._filename(image_id, ext)
        info = dict(image_info or {})
        info["ts"] = int(time.time())
        info["name"] = name
        logger.info("Adding Image: %s => %s", image_id, name)
        with self._segvol_lock:
            dest = os.path.join(self._fresh().image_path(), name)
            atomic_write(dest, image_filename, "image")
            fault_point("image-before-index")
            with self._update() as ds:
                old = ds.objects.get(image_id)
                ds.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext),
                                                       labels=old.labels if old else {})
            if old and old.image.ext != ext:
                self._remove(os.path.join(ds.image_path(), self._filename(image_id, old.image.ext)), "superseded")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self._fresh()
        image_id = self._image_id(image_id)
        label_tag = self._tag(label_tag)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        image_path = os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))
        try:
            image_shape = _header(image_path, "image")[0]
        except BadImageError:
            raise BadImageError(f"image {image_id} is not readable: cannot store a label for it") from None
        check_label_file(label_filename, image_shape)

        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, ext)
        info = dict(label_info or {})
        info["ts"] = int(time.time())
        info["name"] = name
        logger.info("Saving Label for Image: %s; Tag: %s; Info: %s", image_id, label_tag, info)
        with self._segvol_lock:
            folder = self._fresh().label_path(label_tag)
            if not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                fsync_dir(os.path.dirname(folder))
            dest = os.path.join(folder, name)
            atomic_write(dest, label_filename, "label",
                         before_rename=lambda stat: self._write_sidecar(label_tag, image_id, ext, info, stat))
            fault_point("label-before-index")
            with self._update() as ds:
                obj = ds.objects.get(image_id)
                if obj is None:  # removed by another process meanwhile
                    self._remove(dest, "orphaned")
                    self._remove(self._sidecar_path(label_tag, image_id), "orphaned")
                    raise ImageNotFoundException(f"Image {image_id} not found")
                old = obj.labels.get(label_tag)
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
            if old and old.ext != ext:
                self._remove(os.path.join(folder, self._filename(image_id, old.ext)), "superseded")
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._fresh()
        label_id = self._image_id(label_id, "label")
        label_tag = self._tag(label_tag)
        logger.info("Removing label: %s => %s", label_id, label_tag)
        with self._update() as ds:
            label = ds.label(label_id, label_tag)
            if label is None:
                return
            self._remove(os.path.join(ds.label_path(label_tag), self._filename(label_id, label.ext)), "removed")
            self._remove(self._sidecar_path(label_tag, label_id), "removed")
            del ds.objects[label_id].labels[label_tag]

    def remove_image(self, image_id: str) -> None:
        self._fresh()
        image_id = self._image_id(image_id)
        logger.info("Removing Image: %s", image_id)
        with self._update() as ds:
            obj = ds.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            for tag, label in obj.labels.items():
                self._remove(os.path.join(ds.label_path(tag), self._filename(image_id, label.ext)), "removed")
                self._remove(self._sidecar_path(tag, image_id), "removed")
            self._remove(os.path.join(ds.image_path(), self._filename(image_id, obj.image.ext)), "removed")
            del ds.objects[image_id]

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._fresh()
        image_id = self._image_id(image_id)
        with self._update() as ds:
            obj = ds.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self._fresh()
        label_id = self._image_id(label_id, "label")
        label_tag = self._tag(label_tag)
        with self._update() as ds:
            label = ds.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
            path = os.path.join(ds.label_path(label_tag), self._filename(label_id, label.ext))
            if os.path.exists(path):
                self._write_sidecar(label_tag, label_id, label.ext, label.info, os.stat(path))

    @staticmethod
    def _remove(path: str, why: str) -> None:
        if os.path.isfile(path):
            logger.info("deleting %s (%s)", path, why)
            os.unlink(path)
            fsync_dir(os.path.dirname(path))

    # ------------------------------------------------------------------------------------------------- reads
    def get_image_uri(self, image_id: str) -> str:
        self._fresh()
        return super().get_image_uri(self._image_id(image_id))

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._fresh()
        return super().get_image_info(self._image_id(image_id))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        self._fresh()
        return super().get_label_uri(self._image_id(label_id, "label"), self._tag(label_tag))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self._fresh()
        return super().get_label_info(self._image_id(label_id, "label"), self._tag(label_tag))

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        self._fresh()
        return super().get_labels_by_image_id(self._image_id(image_id))

    def datalist(self, full_path=True):
        self._fresh()
        return super().datalist(full_path)

    def get_labeled_images(self, label_tag=None, labels=None):
        self._fresh()
        return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag=None, labels=None):
        self._fresh()
        return super().get_unlabeled_images(label_tag, labels)

    def list_images(self):
        self._fresh()
        return super().list_images()

    def get_dataset_archive(self, limit_cases):
        self._fresh()
        return super().get_dataset_archive(limit_cases)

    def status(self):
        self._fresh()
        return super().status()

    def json(self):
        self._fresh()
        return super().json()
