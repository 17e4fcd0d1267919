"""DICOMweb datastore for SEGs stored into the PACS by any viewer (``--studies http(s)://...``).

MONAI Label's ``DICOMWebDatastore`` lists an image as labelled when a SEG series references it, but converts the SEG
with pydicom-seg's multi-class reader and keeps no segment names (the label's info holds only DICOM study fields, so
the trainer falls back to the app's label indices and a SEG numbered 3 "liver", 7 "spleen" trains "liver" as value
3 of the vocabulary); it converts whichever SEG it meets first and never replaces it; and a SEG that did not come
through ``PUT /datastore/label`` never counts toward retraining. ``SegVolDICOMwebDatastore`` changes that:

* **names**: a SEG becomes a label map on the image's grid (each frame placed by its plane position, or by the source
  image it derives from; BINARY or FRACTIONAL, in-plane cropped or not, any segment numbers). Each voxel value is the
  segment number and the label's info carries ``label_info = [{"name", "idx", "description"}]`` with the name from
  SegmentLabel (else SegmentDescription, else the property type's meaning), what ``segvol.training`` reads.
* **newest wins**: when several SEG series reference one image, the newest one is the label (SeriesDate/SeriesTime,
  else ContentDate/ContentTime, else InstanceCreationDate/Time; then the instance creation time, then the uid). A newer
  SEG replaces the converted older one at the next listing; a SEG removed from the PACS removes its label.
* **counted once**: a SEG series uid that appears in the PACS without going through our PUT counts toward
  ``--conf retrain_threshold`` once, when the server notices it while listing (``/info``, next sample, training
  datalist; at most every ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds). The uids already counted are kept in a small
  record (``<app>/model/pacs_segs.json``, written atomically under a file lock, one section per DICOMweb root); SEGs
  saved through PUT are written there as they are stored, so they are not counted a second time. Only the SEG that is
  the image's label when noticed counts (an older SEG that arrives late changes nothing). The SEGs already in the PACS
  the first time the server lists a DICOMweb root are the starting point: recorded, not counted.

Only the server process counts (MONAI Label's train and scoring subprocesses rebuild the app and list too).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from segvol.io import atomic_write_json

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
ORIGIN = "pacs"  # label info "origin" of a label converted from a SEG found in the PACS
MAX_SOURCES = 20  # DICOMweb roots kept in the record


# --------------------------------------------------------------------------------------------------------------------
# SEG -> label map
# --------------------------------------------------------------------------------------------------------------------
def dicom_stamp(date: Any, time_: Any = "") -> Optional[float]:
    """DICOM DA + TM (``YYYYMMDD``, ``HH[MM[SS[.ffffff]]]``) -> seconds since the epoch (naive, UTC), or None."""
    date = str(date or "").strip()
    if len(date) < 8 or not date[:8].isdigit():
        return None
    text = str(time_ or "").strip().replace(":", "")
    whole, _, fraction = text.partition(".")
    whole = (whole if whole.isdigit() else "")[:6].ljust(6, "0")
    try:
        moment = _dt.datetime.strptime(date[:8] + whole, "%Y%m%d%H%M%S").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return None
    seconds = moment.timestamp()
    if fraction.isdigit():
        seconds += float("0." + fraction)
    return seconds


def segment_names(ds) -> Dict[int, Dict[str, str]]:
    """``{segment number: {"name", "description"}}`` of a SEG dataset: SegmentLabel, else SegmentDescription, else the
    segmented property type's CodeMeaning, else ``segment <n>``."""
    out: Dict[int, Dict[str, str]] = {}
    for item in ds.get("SegmentSequence", []) or []:
        number = int(item.SegmentNumber)
        label = str(item.get("SegmentLabel", "") or "").strip()
        description = str(item.get("SegmentDescription", "") or "").strip()
        meaning = ""
        codes = item.get("SegmentedPropertyTypeCodeSequence")
        if codes:
            meaning = str(codes[0].get("CodeMeaning", "") or "").strip()
        out[number] = {"name": label or description or meaning or f"segment {number}",
                       "description": description or meaning}
    return out


def _item(ds, index: int, sequence: str):
    """The first item of functional group ``sequence`` for frame ``index`` (per-frame, else shared), or None."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        frames = ds.get(groups)
        if not frames:
            continue
        group = frames[index] if groups.startswith("PerFrame") else frames[0]
        if sequence in group and group[sequence].value:
            return group[sequence][0]
    return None


def seg_to_label(seg_files: Sequence[str], reference, source_geometry: Optional[Callable[[str], Any]] = None
                 ) -> Tuple[Any, List[Dict[str, Any]], Dict[str, Any]]:
    """DICOM SEG instance(s) of one series -> ``(label map on the reference grid, label_info, notes)``.

    ``reference`` is the image (a SimpleITK image or a file) whose grid the label takes. Each frame is placed by its
    plane position (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence; the frame may be cropped
    in-plane), or, when it has none, by its source image (``source_geometry(sop_uid)`` -> a pydicom dataset with
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing; such a frame is taken to cover its whole source
    image, as DICOM requires of frames without a position). Voxel values are the segment numbers (where
    segments overlap, the higher number is kept; ``notes["overlap_voxels"]`` counts them)."""
    import pydicom
    import SimpleITK as sitk

    ref = reference if isinstance(reference, sitk.Image) else sitk.ReadImage(str(reference))
    size = ref.GetSize()  # (x, y, z)
    origin = np.asarray(ref.GetOrigin(), float)
    to_index = np.linalg.inv(np.asarray(ref.GetDirection(), float).reshape(3, 3) @ np.diag(ref.GetSpacing()))
    values: Dict[int, np.ndarray] = {}
    names: Dict[int, Dict[str, str]] = {}
    notes: Dict[str, Any] = {"frames": 0, "outside_voxels": 0, "overlap_voxels": 0}
    datasets = []
    for path in seg_files:
        ds = pydicom.dcmread(str(path))
        if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
            continue
        datasets.append(ds)
    if not datasets:
        raise ValueError("no DICOM SEG instance in the series")

    for ds in datasets:
        names.update(segment_names(ds))
        pixels = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if pixels.ndim == 2:
            pixels = pixels[None]
        threshold = 0
        if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
            threshold = float(ds.get("MaximumFractionalValue", 255)) / 2.0
        for index in range(frames):
            frame = pixels[index] > threshold
            if not frame.any():
                continue
            ident = _item(ds, index, "SegmentIdentificationSequence")
            if ident is None:
                raise ValueError(f"frame {index + 1} names no segment (SegmentIdentificationSequence)")
            number = int(ident.ReferencedSegmentNumber)
            position, orientation, spacing = _frame_geometry(ds, index, source_geometry)
            rows, cols = np.nonzero(frame)
            row_dir, col_dir = orientation[:3], orientation[3:]
            # pixel (r, c) -> position + c * column spacing * row direction + r * row spacing * column direction
            base = to_index @ (position - origin)
            step_c = to_index @ (row_dir * spacing[1])
            step_r = to_index @ (col_dir * spacing[0])
            ijk = np.rint(base[None] + cols[:, None] * step_c[None] + rows[:, None] * step_r[None]).astype(np.int64)
            inside = np.all((ijk >= 0) & (ijk < np.asarray(size)[None]), axis=1)
            notes["outside_voxels"] += int((~inside).sum())
            ijk = ijk[inside]
            flat = np.ravel_multi_index((ijk[:, 2], ijk[:, 1], ijk[:, 0]), (size[2], size[1], size[0]))
            values.setdefault(number, []).append(flat)  # type: ignore[arg-type]
            notes["frames"] += 1

    top = max([*values, *names, 0])
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16
    label = np.zeros(size[2] * size[1] * size[0], dtype)
    taken = np.zeros(label.shape, bool)
    for number in sorted(values):
        flat = np.unique(np.concatenate(values[number]))
        notes["overlap_voxels"] += int(taken[flat].sum())
        label[flat] = number
        taken[flat] = True
    image = sitk.GetImageFromArray(label.reshape(size[2], size[1], size[0]))
    image.CopyInformation(ref)
    info = [{"name": names.get(n, {}).get("name", f"segment {n}"), "idx": int(n),
             "description": names.get(n, {}).get("description", "")} for n in sorted(set(names) | set(values))]
    notes["voxels"] = {str(n): int((label == n).sum()) for n in sorted(values)}
    return image, info, notes


def _frame_geometry(ds, index: int, source_geometry) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float]]:
    position = _item(ds, index, "PlanePositionSequence")
    orientation = _item(ds, index, "PlaneOrientationSequence")
    measures = _item(ds, index, "PixelMeasuresSequence")
    if position is not None and orientation is not None and measures is not None:
        return (np.asarray(position.ImagePositionPatient, float),  # type: ignore[return-value]
                np.asarray(orientation.ImageOrientationPatient, float), tuple(float(v) for v in measures.PixelSpacing))
    derivation = _item(ds, index, "DerivationImageSequence")
    source = None
    if derivation is not None and derivation.get("SourceImageSequence") and source_geometry is not None:
        source = source_geometry(str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID))
    if source is None:
        raise ValueError(f"frame {index + 1} has no plane position and no source image that can be found")
    return (np.asarray(source.ImagePositionPatient, float), np.asarray(source.ImageOrientationPatient, float),
            tuple(float(v) for v in source.PixelSpacing))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# the record of counted SEG series
# --------------------------------------------------------------------------------------------------------------------
class SegRecord:
    """``{source: {"baseline": bool, "updated": ts, "segs": {seg uid: {"image", "how", "ts"}}}}`` in one JSON file,
    changed under an exclusive file lock (server process and subprocesses) and replaced atomically.

    ``how``: ``baseline`` (in the PACS when the server first listed it), ``counted`` (noticed, counted), ``saved``
    (stored by our PUT, counted by the save), ``superseded`` (a newer SEG of the same image was the label)."""

    def __init__(self, path: str, source: str):
        self.path = path
        self.source = source

    def _load(self) -> Dict[str, Any]:
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            if isinstance(data, dict) and isinstance(data.get("sources"), dict):
                return data
        except (OSError, ValueError):
            pass
        return {"version": 1, "sources": {}}

    def _save(self, data: Dict[str, Any]) -> None:
        sources = data["sources"]
        if len(sources) > MAX_SOURCES:  # keep the most recently used DICOMweb roots
            keep = sorted(sources, key=lambda s: sources[s].get("updated", 0), reverse=True)[:MAX_SOURCES]
            data["sources"] = {s: sources[s] for s in keep}
        atomic_write_json(self.path, data)  # segvol.io: temp file, fsync, rename, fsync the folder

    def _locked(self, change: Callable[[Dict[str, Any]], Any]) -> Any:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._load()
                result = change(data)
                self._save(data)
                return result
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def section(self) -> Dict[str, Any]:
        return self._load()["sources"].get(self.source, {})

    def mark_saved(self, seg_uid: str, image_id: str) -> None:
        """A SEG our PUT stored (the save itself counted)."""
        def change(data):
            section = data["sources"].setdefault(self.source, {"baseline": False, "segs": {}})
            section["segs"][seg_uid] = {"image": image_id, "how": "saved", "ts": int(time.time())}
            section["updated"] = time.time()
        self._locked(change)

    def notice(self, segs: Dict[str, str], winners: Iterable[str]) -> List[Tuple[str, str]]:
        """``segs`` ``{seg uid: image id}`` now in the PACS, ``winners`` the uids that are their image's label. ->
        ``[(image id, seg uid)]`` to count: winners not recorded yet (none on the first listing of this source)."""
        winners = set(winners)

        def change(data):
            section = data["sources"].setdefault(self.source, {"baseline": False, "segs": {}})
            known = section.setdefault("segs", {})
            new = [uid for uid in segs if uid not in known]
            first = not section.get("baseline")
            now = int(time.time())
            counted = []
            for uid in new:
                how = "baseline" if first else "counted" if uid in winners else "superseded"
                known[uid] = {"image": segs[uid], "how": how, "ts": now}
                if how == "counted":
                    counted.append((segs[uid], uid))
            section["baseline"] = True
            section["updated"] = time.time()
            return counted

        section = self.section()
        if not section.get("baseline") or any(uid not in section.get("segs", {}) for uid in segs):
            return self._locked(change)
        return []


# --------------------------------------------------------------------------------------------------------------------
# the datastore
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegSeries:
    uid: str
    study: str
    image: str  # the referenced image series
    order: Tuple[float, float, str]  # newest = largest

    @property
    def stamp(self) -> Optional[float]:
        return None if self.order[0] == float("-inf") else self.order[0]


@dataclass
class SegIndex:
    segs: Dict[str, SegSeries]  # every usable SEG series referencing a listed image
    winners: Dict[str, SegSeries]  # image id -> its newest SEG
    fetched: float  # time.time() of the QIDO search


class SegVolDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with SEG names, newest-SEG-wins and counting of SEGs from other viewers (see
    the module docstring); a save the DICOMweb server refuses is a 502 with the reason, and ``status`` survives an
    unreachable server with the last known status."""

    def __init__(self, client, search_filter: Dict[str, Any], cache_path: Optional[str] = None,
                 fetch_by_frame: bool = False, convert_to_nifti: bool = True, record_path: Optional[str] = None,
                 on_new_labels: Optional[Callable[[List[Tuple[str, str]]], Any]] = None,
                 active: Callable[[], bool] = lambda: True):
        """MONAI Label's arguments, then ours: ``on_new_labels([(image id, seg uid)])`` is called for SEGs to count,
        when ``active()`` (the server process) and a ``record_path`` is given."""
        # ours first: MONAI Label's constructor already lists the datastore through the methods overridden here
        self.record = SegRecord(record_path, client.base_url) if record_path else None
        self.on_new_labels = on_new_labels
        self._active = active
        self._index: Optional[SegIndex] = None
        self._index_lock = threading.Lock()
        self._sync_lock = threading.RLock()
        self._count_lock = threading.RLock()  # a PUT's upload + record, against a listing's count
        self._seg_meta: Dict[str, Optional[SegSeries]] = {}
        self._last_status: Dict[str, Any] = {}
        super().__init__(client, search_filter, cache_path=cache_path, fetch_by_frame=fetch_by_frame,
                         convert_to_nifti=convert_to_nifti)

    @classmethod
    def like(cls, template: DICOMWebDatastore, **ours: Any) -> "SegVolDICOMwebDatastore":
        """This datastore with the client, search filter and cache settings of ``template`` (the one MONAI Label
        builds from its settings: credentials, Google Cloud sessions, URL prefixes), which stops watching its
        folder."""
        observer = getattr(template, "_observer", None)
        if observer is not None:
            observer.stop()
        return cls(template._client, template._search_filter, cache_path=os.path.dirname(template._datastore_path),
                   fetch_by_frame=template._fetch_by_frame, convert_to_nifti=template._convert_to_nifti, **ours)

    def status(self) -> Dict[str, Any]:
        """MONAI Label's status, or the last one known with an ``error`` when the DICOMweb server does not answer
        (``/info``, which ``/infer`` calls too, must not fail for it)."""
        try:
            self._last_status.update(super().status())
            return dict(self._last_status)
        except Exception as error:
            return {**self._last_status, "error": f"DICOMweb server {self._client.base_url} unreachable: {error}"}

    # ---------------------------------------------------------------------------------------------------- listing
    def _ttl(self) -> float:
        from monailabel.config import settings

        return float(settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY)

    def seg_index(self, fresh: bool = False) -> SegIndex:
        """The SEG series of the PACS that reference a listed image, and each image's newest (cached for the
        DICOMweb cache expiry; each SEG's metadata is read once). New SEGs are counted here."""
        with self._index_lock:
            index = self._index
            refreshed = fresh or index is None or time.time() - index.fetched > self._ttl()
            if refreshed:
                fetched = time.time()
                found = self._client.search_for_series(search_filters={"Modality": "SEG"})
                images = set(self.list_images())
                segs: Dict[str, SegSeries] = {}
                for item in found:
                    uid = _json_value(item, "0020000E")
                    study = _json_value(item, "0020000D")
                    if not uid or not study:
                        continue
                    if uid not in self._seg_meta:
                        self._seg_meta[uid] = self._read_seg_series(study, uid)
                    seg = self._seg_meta[uid]
                    if seg is None:
                        continue
                    if seg.image not in images:
                        logger.warning("SEG %s ignored: the series it references (%s) is not among the images",
                                       uid, seg.image)
                        continue
                    segs[uid] = seg
                winners: Dict[str, SegSeries] = {}
                for seg in segs.values():
                    if seg.image not in winners or seg.order > winners[seg.image].order:
                        winners[seg.image] = seg
                index = self._index = SegIndex(segs, winners, fetched)
        if refreshed:
            self._notice(index)
        return index

    def _read_seg_series(self, study: str, uid: str) -> Optional[SegSeries]:
        from pydicom.dataset import Dataset

        try:
            metas = self._client.retrieve_series_metadata(study, uid)
        except Exception as error:
            logger.warning("SEG %s: metadata not read (%s: %s)", uid, type(error).__name__, error)
            return None
        best: Optional[SegSeries] = None
        for meta in metas:
            ds = Dataset.from_json(meta)
            refs = ds.get("ReferencedSeriesSequence")
            if not refs:
                logger.warning("SEG %s ignored: it has no ReferencedSeriesSequence", uid)
                continue
            image = str(refs[0].SeriesInstanceUID)
            primary = (dicom_stamp(ds.get("SeriesDate"), ds.get("SeriesTime"))
                       or dicom_stamp(ds.get("ContentDate"), ds.get("ContentTime"))
                       or dicom_stamp(ds.get("InstanceCreationDate"), ds.get("InstanceCreationTime")))
            created = dicom_stamp(ds.get("InstanceCreationDate"), ds.get("InstanceCreationTime"))
            ninf = float("-inf")
            seg = SegSeries(uid, study, image, (primary if primary is not None else ninf,
                                                created if created is not None else ninf, uid))
            if best is None or seg.order > best.order:
                best = seg
        return best

    def _notice(self, index: SegIndex) -> None:
        if self.record is None or not self._active():
            return
        with self._count_lock:  # waits for a PUT that is storing its SEG (recorded as saved, not counted here)
            try:
                new = self.record.notice({u: s.image for u, s in index.segs.items()},
                                         [s.uid for s in index.winners.values()])
            except OSError as error:
                logger.warning("record of counted SEGs not updated (%s): counting later", error)
                return
        if new:
            logger.info("new SEG(s) in the PACS count toward retraining: %s", new)
            if self.on_new_labels is not None:
                try:
                    self.on_new_labels(new)
                except Exception:
                    logger.exception("counting new SEGs failed")

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        """Images with a SEG in the PACS (each once, however many SEGs reference it)."""
        return sorted(self.seg_index().winners)

    # ------------------------------------------------------------------------------------------------- conversion
    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        self.sync_labels()
        return LocalDatastore.datalist(self, full_path)

    def sync_labels(self, image_id: Optional[str] = None) -> None:
        """Make the cached final labels match the PACS: each labelled image's newest SEG converted (names kept); a
        label whose SEG left the PACS removed. ``image_id``: only that image."""
        index = self.seg_index()
        with self._sync_lock:
            for image, seg in sorted(index.winners.items()):
                if image_id and image != image_id:
                    continue
                info = LocalDatastore.get_label_info(self, image, FINAL) or {}
                uri = LocalDatastore.get_label_uri(self, image, FINAL)
                if info.get("SeriesInstanceUID") == seg.uid and uri and os.path.isfile(uri):
                    continue
                try:
                    self._convert(seg)
                except Exception as error:  # one bad SEG must not keep the other labels from training
                    logger.exception("SEG %s of %s not converted: %s", seg.uid, image, error)
            if image_id:
                return
            removed = False
            for image in LocalDatastore.get_labeled_images(self):
                if image in index.winners:
                    continue
                info = LocalDatastore.get_label_info(self, image, FINAL) or {}
                if float(info.get("ts", 0)) >= index.fetched - 1:
                    continue  # saved after the listing (its SEG is not in that list yet)
                uri = LocalDatastore.get_label_uri(self, image, FINAL)
                logger.info("label of %s: its SEG is no longer in the PACS; removed from the cache", image)
                if uri and os.path.exists(uri):
                    os.unlink(uri)
                    removed = True
            if removed:
                self.refresh()

    def _convert(self, seg: SegSeries) -> str:
        import pydicom
        import SimpleITK as sitk
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        image_uri = self.get_image_uri(seg.image)
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), seg.image))

        def source_geometry(sop: str):
            path = os.path.join(image_dir, f"{sop}.dcm")
            return pydicom.dcmread(path, stop_before_pixels=True) if os.path.isfile(path) else None

        work = tempfile.mkdtemp(prefix="segvol-seg-")
        try:
            dicom_web_download_series(seg.study, seg.uid, work, self._client, False)
            files = sorted(os.path.join(work, f) for f in os.listdir(work))
            label, label_info, notes = seg_to_label(files, image_uri, source_geometry)
            out = os.path.join(work, f"{seg.image}.nii.gz")
            sitk.WriteImage(label, out, True)
            info = {"SeriesInstanceUID": seg.uid, "StudyInstanceUID": seg.study, "origin": ORIGIN,
                    "label_info": label_info, "seg_stamp": seg.stamp, "conversion": notes}
            LocalDatastore.save_label(self, seg.image, out, FINAL, info)
            logger.info("SEG %s -> final label of %s: %s", seg.uid, seg.image,
                        ", ".join(f"{i['idx']}={i['name']}" for i in label_info))
            return out
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """Final labels: ``label_id`` (or ``image_id``) an image id, or the uid of one of its SEG series; the
        image's newest SEG, converted when needed. '' when there is none."""
        if label_tag != FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        image = image_id or label_id
        if image not in self.list_images():
            index = self.seg_index()
            seg = index.segs.get(label_id)
            if seg is None:
                return ""
            image = seg.image
        self.sync_labels(image)
        return LocalDatastore.get_label_uri(self, image, FINAL)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        if label_tag == FINAL and label_id in self.list_images():
            self.sync_labels(label_id)
        return LocalDatastore.get_label_info(self, label_id, label_tag)

    # ------------------------------------------------------------------------------------------------------ saving
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        """MONAI Label's save (a final label is stored as a SEG in the PACS), then its SEG uid recorded as saved (our
        PUT counts it), before a listing can see it as new. The SEG's segments carry names, colours and SegVol's
        provenance (``lib.seg_metadata``). A save the DICOMweb server does not take is an HTTP 502 with the reason:
        nothing was stored and the client keeps its label."""
        from fastapi import HTTPException

        try:
            return self._save_label(image_id, label_filename, label_tag, label_info, label_id)
        except HTTPException:
            raise
        except Exception as error:
            logger.exception("label of %s not saved", image_id)
            raise HTTPException(status_code=502, detail=f"label of {image_id} not saved: the DICOMweb server "
                                f"{self._client.base_url} did not take it ({type(error).__name__}: {error}); nothing "
                                "was stored, keep the label and save again") from None

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                    label_id: str) -> str:
        if label_tag == FINAL and isinstance(label_info, dict):
            from .seg_metadata import with_segment_attributes

            with_segment_attributes(label_info)
        with self._count_lock:
            saved = super().save_label(image_id, label_filename, label_tag, label_info, label_id)
            uid = (label_info or {}).get("SeriesInstanceUID") if label_tag == FINAL else None
            if uid and self.record is not None:
                try:
                    self.record.mark_saved(str(uid), image_id)
                except OSError as error:
                    logger.warning("SEG %s not recorded as saved (%s): it may count twice", uid, error)
            if label_tag == FINAL:
                with self._index_lock:
                    self._index = None  # list again: the new SEG is the image's newest
        return saved


def _json_value(item: Dict[str, Any], tag: str) -> str:
    value = (item.get(tag) or {}).get("Value") or [""]
    return str(value[0])
