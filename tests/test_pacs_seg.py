"""DICOM SEGs stored straight into the PACS by another DICOM SEG writer become labels (apps/segvol/lib/dicomweb.py).

Real parts only: Orthanc with its DICOMweb plugin (scripts/orthanc.py), the abdominal CT of ../shared/data/dicom, the
SegVol Label server (apps/segvol/segvol_server.py with ``--studies http://.../dicom-web``; no network weights are
needed), SEGs written with pydicom-seg (numbered differently from our vocabulary) and stored through Orthanc's REST
API as another workstation would. The app runs from a folder of links to apps/segvol with its own ``model/`` folder,
so the retrain counter and the record of counted SEGs start empty and nothing is shared with other runs.

Checked through the server: the image counts as labelled, the training datalist / ``cases_from_datastore`` give a
label whose values carry the SEG's names and voxels, the retrain counter went up by exactly one; a newer SEG replaces
it (an older one arriving later does not), counted once more; listing again (and after a restart) counts nothing;
a label saved through ``PUT /datastore/label`` is counted once, not twice.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from _server import Server, free_port, orthanc_missing

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "segvol"
CT_DIR = ROOT.parent / "shared" / "data" / "dicom" / "CRLM-CT-1004"
CT_SERIES = "1.3.6.1.4.1.14519.5.2.1.9203.8273.254242588659825836950462054011"
TTL = 1  # MONAI_LABEL_DICOMWEB_CACHE_EXPIRY of the server under test (seconds)


def _missing():
    if not CT_DIR.is_dir():
        return f"sample CT not available: {CT_DIR} is missing (tests read it from ../shared)"
    try:
        import pydicom_seg  # noqa: F401  (a MONAI Label dependency)
    except ImportError:
        return "pydicom-seg (the DICOM SEG writer used here) is not installed"
    return None


_REASON = _missing()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(ROOT / "scripts"))
    import orthanc as cli

    sys.path.remove(str(ROOT / "scripts"))
    port, storage = free_port(), tmp_path_factory.mktemp("orthanc")
    cli.start(port, storage)
    try:
        summary = cli.upload([CT_DIR], port, quiet=True)
        assert summary["uploaded"] == 41 and not summary["failed"], summary
        yield f"http://127.0.0.1:{port}"
    finally:
        cli.stop(storage)


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """apps/segvol as links, with a ``model/`` folder of its own (deploy/ linked beside it)."""
    top = tmp_path_factory.mktemp("project")
    app = top / "apps" / "segvol"
    app.mkdir(parents=True)
    for item in APP.iterdir():
        if item.name not in ("model", "logs", "__pycache__"):
            (app / item.name).symlink_to(item)
    (app / "model").mkdir()
    (top / "deploy").symlink_to(ROOT / "deploy")
    return app


class PacsServer(Server):
    """The app over Orthanc's DICOMweb, listing the PACS again after ``TTL`` seconds."""

    def __init__(self, app_dir: Path, dicomweb: str, cache: Path, log: Path):
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache), "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": str(TTL)}
        conf = {"retrain_threshold": "1000", "weights": str(app_dir / "no-weights-needed")}
        super().__init__(dicomweb, conf, log, env, app=app_dir)
        self.wait(180)

    def info(self):
        time.sleep(TTL + 0.2)  # past the server's DICOMweb cache expiry: it lists the PACS again
        return super().info()

    def datalist(self):
        response = requests.get(f"{self.url}/datastore/", params={"output": "train"}, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    def label_info(self, image):
        response = requests.get(f"{self.url}/datastore/label/info", params={"label": image, "tag": "final"},
                                timeout=120)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def server(orthanc, app_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    running = {"server": PacsServer(app_dir, f"{orthanc}/dicom-web", tmp_path_factory.mktemp("cache"),
                                    logs / "server.log")}
    running["restart"] = lambda: _restart(running, app_dir, orthanc, tmp_path_factory, logs)
    yield running
    running["server"].stop()


def _restart(running, app_dir, orthanc, tmp_path_factory, logs):
    running["server"].stop()
    running["server"] = PacsServer(app_dir, f"{orthanc}/dicom-web", tmp_path_factory.mktemp("cache"),
                                   logs / "server.log")
    return running["server"]


@pytest.fixture(scope="module")
def ct():
    """The CT as SimpleITK reads it (the grid the server's cached NIfTI has) and its DICOM headers."""
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_DIR)))
    image = reader.Execute()
    headers = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(CT_DIR.iterdir()) if p.is_file()]
    return image, headers


# ----------------------------------------------------------------------------------------------------------- helpers
def _mask(ct_image, boxes):
    """Label map on the CT grid: ``{value: (k0, k1, j0, j1, i0, i1)}`` boxes (numpy order z, y, x)."""
    size = ct_image.GetSize()
    mask = np.zeros((size[2], size[1], size[0]), np.uint16)
    for value, (k0, k1, j0, j1, i0, i1) in boxes.items():
        mask[k0:k1, j0:j1, i0:i1] = value
    return mask


def _write_seg(ct, mask, segments, when, description, crop=False):
    """A DICOM SEG written by pydicom-seg (not our writer): ``segments`` ``{number: name}`` keep their numbers;
    ``crop`` writes only the bounding box of each frame and skips empty slices (frames placed by position)."""
    import pydicom_seg
    import SimpleITK as sitk

    image, headers = ct
    attributes = [{"labelID": number, "SegmentLabel": name, "SegmentDescription": f"{name} (other workstation)",
                   "SegmentAlgorithmType": "MANUAL",
                   "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                             "CodeMeaning": "Anatomical Structure"},
                   "SegmentedPropertyTypeCodeSequence": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT",
                                                         "CodeMeaning": name},
                   "recommendedDisplayRGBValue": [200, 100, 50]} for number, name in segments.items()]
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "Other^Reader", "ClinicalTrialSeriesID": "S1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": description, "SeriesNumber": "301", "InstanceNumber": "1",
        "segmentAttributes": [attributes], "ContentLabel": "SEGMENTATION", "ContentDescription": description,
        "ClinicalTrialCoordinatingCenterName": "Elsewhere", "BodyPartExamined": ""})
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=crop, skip_empty_slices=crop,
                                          skip_missing_segment=False)
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    ds = writer.write(label, headers)
    for prefix in ("Series", "Content", "InstanceCreation"):
        setattr(ds, f"{prefix}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", when.strftime("%H%M%S.%f"))
    return ds


def _store(orthanc, ds):
    """Store the SEG as another workstation would: straight into Orthanc (REST), not through SegVol Label."""
    buffer = io.BytesIO()
    ds.save_as(buffer)
    response = requests.post(f"{orthanc}/instances", data=buffer.getvalue(),
                             headers={"Content-Type": "application/dicom"}, timeout=60)
    assert response.status_code == 200, response.text
    return str(ds.SeriesInstanceUID)


def _ct_label(server):
    """(label map, path) of the CT's entry in the training datalist."""
    import SimpleITK as sitk

    items = [item for item in server.datalist() if os.path.basename(item["image"]).startswith(CT_SERIES)]
    assert len(items) == 1, items
    return sitk.GetArrayFromImage(sitk.ReadImage(items[0]["label"])), items[0]["label"]


def _names(info):
    return {int(item["idx"]): item["name"] for item in info["label_info"]}


def _cases(orthanc, cache):
    """``segvol.training.cases_from_datastore`` on a datastore of ours over the same PACS (the train task's path)."""
    sys.path.insert(0, str(APP))
    try:
        from monailabel.datastore.dicom import DICOMwebClientX

        from lib.dicomweb import SegVolDICOMwebDatastore
        from segvol.training import cases_from_datastore
    finally:
        sys.path.remove(str(APP))
    client = DICOMwebClientX(url=f"{orthanc}/dicom-web", qido_url_prefix=None, wado_url_prefix=None,
                             stow_url_prefix=None)
    datastore = SegVolDICOMwebDatastore(client, {"Modality": "CT"}, cache_path=str(cache))
    try:
        return {case.id: case for case in cases_from_datastore(datastore, {1: "vocabulary name"})}
    finally:
        observer = getattr(datastore, "_observer", None)
        if observer is not None:
            observer.stop()


def _dicomweb():
    sys.path.insert(0, str(APP))
    try:
        import lib.dicomweb as module
    finally:
        sys.path.remove(str(APP))
    return module


# ------------------------------------------------------------------------------------------------------------- tests
NOW = dt.datetime.now()
FIRST = {3: "liver", 7: "spleen"}
SECOND = {2: "aorta", 9: "gallbladder"}


def test_conversion_places_frames_by_source_image_and_reads_fractional_segs(ct, tmp_path):
    """Frames without a plane position are placed by the CT slice they derive from; FRACTIONAL SEGs are thresholded
    at half their maximum; names fall back to SegmentDescription, then the property type's meaning."""
    import SimpleITK as sitk

    dicomweb = _dicomweb()
    image, headers = ct
    mask = _mask(image, {3: (10, 14, 200, 240, 150, 200), 7: (20, 22, 300, 320, 300, 330)})
    ds = _write_seg(ct, mask, FIRST, NOW, "Derived frames", crop=False)  # full frames: the source slice places them
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    del ds.SegmentSequence[0].SegmentLabel  # segment 3: named by its description
    ds.SegmentSequence[1].SegmentLabel = ""  # segment 7: named by its description too
    path = tmp_path / "derived.dcm"
    ds.save_as(str(path))
    by_sop = {str(h.SOPInstanceUID): h for h in headers}
    label, info, notes = dicomweb.seg_to_label([str(path)], image, by_sop.get)
    assert np.array_equal(sitk.GetArrayFromImage(label), mask) and notes["outside_voxels"] == 0
    assert {i["idx"]: i["name"] for i in info} == {3: "liver (other workstation)", 7: "spleen (other workstation)"}
    with pytest.raises(ValueError, match="no plane position"):
        dicomweb.seg_to_label([str(path)], image, None)

    # the same voxels as a FRACTIONAL SEG (values 0..255, kept above half)
    fractional = _write_seg(ct, mask, FIRST, NOW, "Fractional", crop=False)
    frames = fractional.pixel_array.astype(np.uint8) * 200
    frames[:, 0, 0] = 100  # under half of MaximumFractionalValue: not part of the segment
    fractional.SegmentationType, fractional.MaximumFractionalValue = "FRACTIONAL", 255
    fractional.SegmentationFractionalType = "PROBABILITY"
    fractional.BitsAllocated = fractional.BitsStored = 8
    fractional.HighBit = 7
    fractional.PixelData = frames.tobytes()
    path = tmp_path / "fractional.dcm"
    fractional.save_as(str(path))
    label, info, _ = dicomweb.seg_to_label([str(path)], image)
    assert np.array_equal(sitk.GetArrayFromImage(label), mask)
    assert {i["idx"]: i["name"] for i in info} == FIRST


def test_record_starts_from_what_is_there_and_counts_each_new_seg_once(tmp_path):
    dicomweb = _dicomweb()
    record = dicomweb.SegRecord(str(tmp_path / "model" / "pacs_segs.json"), "http://pacs/dicom-web")
    record.mark_saved("put-1", "ct-a")  # a PUT before the first listing: the baseline still happens
    assert record.notice({"old-1": "ct-a", "put-1": "ct-a"}, ["put-1"]) == []  # first listing: the starting point
    assert record.notice({"old-1": "ct-a", "put-1": "ct-a", "new-1": "ct-a", "late-old": "ct-b", "new-2": "ct-b"},
                         ["new-1", "new-2"]) == [("ct-a", "new-1"), ("ct-b", "new-2")]
    assert record.notice({"new-1": "ct-a", "new-2": "ct-b"}, ["new-1", "new-2"]) == []  # listed again: nothing
    record.mark_saved("put-2", "ct-a")
    assert record.notice({"put-2": "ct-a"}, ["put-2"]) == []  # our own save: counted by the save, not here
    how = {uid: item["how"] for uid, item in record.section()["segs"].items()}
    assert how == {"put-1": "saved", "old-1": "baseline", "new-1": "counted", "late-old": "superseded",
                   "new-2": "counted", "put-2": "saved"}
    other = dicomweb.SegRecord(record.path, "http://other/dicom-web")  # another DICOMweb root: its own section
    assert other.notice({"new-1": "ct-a"}, ["new-1"]) == []
    assert not list(tmp_path.glob("model/*.tmp"))


def test_dicom_stamps_order_dates_and_times():
    dicomweb = _dicomweb()
    assert dicomweb.dicom_stamp("20240102", "030405.25") - dicomweb.dicom_stamp("20240102", "0304") == 5.25
    assert dicomweb.dicom_stamp("20240102", "") < dicomweb.dicom_stamp("20240102", "000001")
    assert dicomweb.dicom_stamp("", "120000") is None and dicomweb.dicom_stamp("2024", "") is None


def test_a_seg_from_another_writer_becomes_a_named_label_and_counts_once(server, orthanc, ct, tmp_path):
    app = server["server"]
    before = app.info()
    assert before["datastore"]["completed"] == 0
    retrain = before["retrain"]
    assert retrain["threshold"] == 1000 and retrain["total"] == 0 and retrain["count"] == 0

    mask = _mask(ct[0], {3: (10, 20, 200, 300, 150, 260), 7: (15, 25, 220, 280, 320, 380)})
    _store(orthanc, _write_seg(ct, mask, FIRST, NOW - dt.timedelta(hours=2), "Other viewer A"))

    info = app.info()
    assert info["datastore"]["completed"] == 1
    assert info["retrain"]["total"] == 1 and info["retrain"]["count"] == 1 and info["retrain"]["external"] == 1
    # the training datalist: the SEG's voxels on the CT grid, under the SEG's own segment numbers
    label, _ = _ct_label(app)
    assert label.shape == mask.shape and np.array_equal(label, mask)
    names = app.label_info(CT_SERIES)
    assert _names(names) == FIRST and names["origin"] == "pacs"
    # the trainer's cases: values named by the SEG (not the app's label indices)
    case = _cases(orthanc, tmp_path / "cache")[CT_SERIES]
    assert case.label_names == FIRST
    assert app.info()["retrain"]["total"] == 1  # listing again counts nothing


def test_a_newer_seg_replaces_it_and_an_older_one_arriving_late_does_not(server, orthanc, ct, tmp_path):
    app = server["server"]
    mask = _mask(ct[0], {2: (5, 30, 250, 300, 240, 290), 9: (18, 22, 180, 230, 180, 240)})
    newer = _store(orthanc, _write_seg(ct, mask, SECOND, NOW - dt.timedelta(hours=1), "Other viewer B", crop=True))
    info = app.info()
    assert info["datastore"]["completed"] == 1  # one image, whatever the number of SEGs referencing it
    assert info["retrain"]["total"] == 2 and info["retrain"]["external"] == 2
    label, _ = _ct_label(app)
    assert np.array_equal(label, mask)  # cropped frames of the second writer placed by their positions
    names = app.label_info(CT_SERIES)
    assert _names(names) == SECOND and names["SeriesInstanceUID"] == newer

    # a SEG dated before both arrives now: it is not the newest, so neither the label nor the counter changes
    older = _mask(ct[0], {4: (1, 3, 10, 20, 10, 20)})
    _store(orthanc, _write_seg(ct, older, {4: "stomach"}, NOW - dt.timedelta(hours=5), "Old import"))
    info = app.info()
    assert info["retrain"]["total"] == 2
    label, _ = _ct_label(app)
    assert np.array_equal(label, mask) and _names(app.label_info(CT_SERIES)) == SECOND
    assert _cases(orthanc, tmp_path / "cache")[CT_SERIES].label_names == SECOND


def test_listing_again_and_a_restart_count_nothing(server, app_dir):
    app = server["server"]
    for _ in range(2):
        assert app.info()["retrain"]["total"] == 2
        app.datalist()
    record = json.loads((app_dir / "model" / "pacs_segs.json").read_text())
    (section,) = record["sources"].values()
    assert sorted(s["how"] for s in section["segs"].values()) == ["counted", "counted", "superseded"]
    app = server["restart"]()  # an empty DICOMweb cache; the record in model/ remembers what was counted
    info = app.info()
    assert info["retrain"]["total"] == 2 and info["datastore"]["completed"] == 1
    assert _names(app.label_info(CT_SERIES)) == SECOND
    assert app.info()["retrain"]["total"] == 2


def test_a_label_saved_through_put_counts_once_not_twice(server, ct, tmp_path):
    import SimpleITK as sitk

    app = server["server"]
    mask = _mask(ct[0], {1: (12, 16, 260, 300, 200, 240)}).astype(np.uint8)
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(ct[0])
    path = tmp_path / "label.nii.gz"
    sitk.WriteImage(label, str(path))
    params = {"label_info": [{"name": "kidney left", "idx": 1, "model_name": "SegVol PUT"}]}
    with open(path, "rb") as handle:
        response = requests.put(f"{app.url}/datastore/label", params={"image": CT_SERIES},
                                data={"params": json.dumps(params)},
                                files={"label": ("label.nii.gz", handle, "application/octet-stream")}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["retrain"]["counted"] is True
    for _ in range(2):  # the PUT's SEG is in the PACS now: listing sees it, and does not count it again
        info = app.info()
        assert info["retrain"]["total"] == 3 and info["retrain"]["external"] == 2
    saved, _ = _ct_label(app)
    assert np.array_equal(saved, mask)  # the newest SEG is ours: the saved label stays, with its names
    assert _names(app.label_info(CT_SERIES)) == {1: "kidney left"}
    assert app.info()["retrain"]["total"] == 3


def test_dicomweb_datastore_without_its_server_keeps_the_last_status_and_answers_a_save_with_502(tmp_path):
    """No DICOMweb server at all: ``status`` (what ``/info`` reads) keeps answering with an ``error``, and a save is
    an HTTP 502 saying nothing was stored (the client keeps its label)."""
    from fastapi import HTTPException
    from monailabel.datastore.dicom import DICOMwebClientX

    module = _dicomweb()
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    client = DICOMwebClientX(url=url, qido_url_prefix=None, wado_url_prefix=None, stow_url_prefix=None)
    datastore = module.SegVolDICOMwebDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "cache"))
    status = datastore.status()
    assert "unreachable" in status["error"] and url in status["error"]
    label = tmp_path / "label.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(label))
    with pytest.raises(HTTPException) as raised:
        datastore.save_label("1.2.3.4", str(label), "final", {"label_info": [{"name": "liver", "idx": 1}]})
    assert raised.value.status_code == 502 and "nothing was stored" in raised.value.detail
