"""OHIF end to end: Orthanc (DICOMweb) + the SegVol Label server + OHIF v3 in headless Chromium.

Real parts only: Orthanc with its DICOMweb plugin started by scripts/orthanc.py (deploy/orthanc/orthanc.json) and
filled with the CT studies of ../shared/data/dicom through its REST API; the app started by scripts/serve_dicomweb.sh
with ``--studies http://127.0.0.1:<port>/dicom-web``; OHIF v3 as shipped inside the monailabel package (``/ohif/``,
with our app-config.js, mode and SegVol panel), driven by tests/e2e/ohif_driver.js (Playwright on /usr/bin/chromium).
The network is a small-configuration SegVol with random weights: the test proves the plumbing (grids, orientation,
storage, counts), not segmentation quality.

Screenshots and the driver's step records go to tests/e2e/artifacts/ (or $SEGVOL_E2E_ARTIFACTS).
System dependencies: ``bash scripts/install_system_deps.sh`` (Debian: orthanc, orthanc-dicomweb, chromium, npm).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from _server import Server, copy_app, free_port, orthanc_missing

E2E = Path(__file__).resolve().parent
ROOT = E2E.parents[1]
SHARED = ROOT.parent / "shared"
DICOM = SHARED / "data" / "dicom"
TOKENIZER = SHARED / "clip-tokenizer"
ARTIFACTS = Path(os.environ.get("SEGVOL_E2E_ARTIFACTS", E2E / "artifacts"))
CHROMIUM = os.environ.get("SEGVOL_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

CT_STUDY = "1.3.6.1.4.1.14519.5.2.1.9203.8273.319461848560755521018609264462"  # CRLM-CT-1004, abdominal CT
CT_SERIES = "1.3.6.1.4.1.14519.5.2.1.9203.8273.254242588659825836950462054011"
STS_SERIES = "1.3.6.1.4.1.14519.5.2.1.5168.1900.449841255123215696894565592289"  # sarcoma CT (with an RTSTRUCT)
AUTO_LABELS = ["liver", "spleen", "kidney left"]
CLASS_LABEL = "aorta"
PAINT_LABEL = "liver"
REST_SEG = "SegVol Label"  # SeriesDescription of the SEG MONAI Label writes for PUT /datastore/label (model_name)
TEXT_PREFIX, TEXT_LABEL = "liv", "liver"  # typed, then picked from the suggestions
FREE_TEXT = "hepatic cyst xyz"  # not in the vocabulary: sent as free text
SECOND_LABEL = "spleen"  # the structure segmented over the locked TEXT_LABEL segment
# a training run short enough for the e2e (OHIF's "Update Model" trains with the server's defaults): one epoch from
# the served small-configuration weights, at most one minute
TRAIN_CONF = {"train_epochs": "1", "train_init": "official", "train_minutes": "1"}
FINAL_TRAIN = ("FINISHED", "BUDGET")


def _missing_requirements():
    if not DICOM.is_dir():
        return f"sample DICOM studies not available: {DICOM} is missing (tests read them from ../shared)"
    if not TOKENIZER.is_dir():
        return f"CLIP tokenizer not available: {TOKENIZER} is missing"
    reason = orthanc_missing()
    if reason:
        return reason
    if not os.path.exists(CHROMIUM):
        return "chromium is not installed (bash scripts/install_system_deps.sh installs it)"
    if not shutil.which("node") or not (E2E / "node_modules" / "playwright-core").is_dir():
        return "node or tests/e2e/node_modules/playwright-core missing (bash scripts/install_system_deps.sh)"
    return None


_REASON = _missing_requirements()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _orthanc_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "orthanc.py"), *args], capture_output=True,
                          text=True, timeout=timeout)


class Orthanc:
    def __init__(self, storage: Path):
        self.port = free_port()
        self.storage = storage
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def start(self, samples=True):
        args = ["start", "--port", str(self.port), "--storage", str(self.storage)] + ([] if samples else
                                                                                       ["--no-samples"])
        done = _orthanc_cli(*args)
        assert done.returncode == 0, done.stderr
        return done

    def stop(self):
        _orthanc_cli("stop", "--storage", str(self.storage))

    def qido(self, path, **params):
        response = requests.get(f"{self.dicomweb}/{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else []

    def seg_series(self):
        """{SeriesDescription: SeriesInstanceUID} of the SEG series in the CT study."""
        found = {}
        for item in self.qido(f"studies/{CT_STUDY}/series", Modality="SEG", includefield="0008103E"):
            found[item.get("0008103E", {}).get("Value", [""])[0]] = item["0020000E"]["Value"][0]
        return found

    def series_file(self, series_uid):
        """The (single) instance of a series, as a pydicom dataset (Orthanc REST)."""
        import io

        import pydicom

        ids = requests.post(f"{self.url}/tools/lookup", data=series_uid, timeout=30).json()
        series_id = [item["ID"] for item in ids if item["Type"] == "Series"][0]
        instances = requests.get(f"{self.url}/series/{series_id}/instances", timeout=30).json()
        assert len(instances) == 1, instances
        raw = requests.get(f"{self.url}/instances/{instances[0]['ID']}/file", timeout=60).content
        return pydicom.dcmread(io.BytesIO(raw))


def start_app(orthanc: Orthanc, weights: Path, cache: Path, log: Path, app_dir: Path) -> Server:
    """scripts/serve_dicomweb.sh for the app copy ``app_dir``, started and answering."""
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache), "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "2"}
    conf = {"weights": str(weights), "device": "cpu", "zoom": "zoom_out", "auto_labels": ",".join(AUTO_LABELS),
            "max_labels": "3", "retrain_threshold": "1000", **TRAIN_CONF}
    return Server(orthanc.dicomweb, conf, log, env, app=app_dir, script=ROOT / "scripts" / "serve_dicomweb.sh").wait()


@pytest.fixture(scope="module")
def artifacts():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    import segvol

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    segvol.save_checkpoint(str(folder / "segvol_label.pt"), segvol.SegVol(segvol.SMALL), vocabulary=[])
    for item in TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """A copy of apps/segvol with an empty model folder, so the test's counters, SEG records and the checkpoint its
    training run publishes never reach the repository's apps/segvol/model."""
    return copy_app(tmp_path_factory.mktemp("app") / "segvol")


@pytest.fixture(scope="module")
def app(orthanc, weights, tmp_path_factory, artifacts, app_dir):
    server = start_app(orthanc, weights, tmp_path_factory.mktemp("dicomweb-cache"), artifacts / "server.log", app_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def annotate(app, artifacts):
    """One OHIF session (driver phase "annotate"); its step records, keyed by step name."""
    return _drive(app, "annotate", artifacts)


def _drive(app, phase, artifacts, timeout=420):
    config = {"phase": phase, "server": app.url, "study": CT_STUDY, "series": CT_SERIES, "artifacts": str(artifacts),
              "chromium": CHROMIUM, "timeout_s": 240, "auto_model": "segvol_auto", "class_model": "segvol",
              "class_label": CLASS_LABEL, "paint_label": PAINT_LABEL, "seg_description": REST_SEG,
              "text_prefix": TEXT_PREFIX, "text_label": TEXT_LABEL, "free_text": FREE_TEXT, "train_timeout_s": 150,
              "second_label": SECOND_LABEL}
    path = artifacts / f"{phase}-config.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(["node", str(E2E / "ohif_driver.js"), str(path)], cwd=str(E2E), capture_output=True,
                          text=True, timeout=timeout)
    (artifacts / f"{phase}-driver.log").write_text(done.stdout + done.stderr)
    result = json.loads((artifacts / f"{phase}.json").read_text())
    failed = [s for s in result["steps"] if not s["ok"]]
    assert done.returncode == 0 and result["ok"], (
        f"OHIF driver phase {phase} failed at {failed[0]['name'] if failed else '?'}:\n"
        f"{(failed[0].get('error') if failed else result.get('error'))}\n"
        "console:\n" + "\n".join(result.get("console_tail", [])[-30:]))
    return {s["name"]: s for s in result["steps"]}


# ---------------------------------------------------------------------------------------------------------- helpers

def _colored(path: Path) -> np.ndarray:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return rgb


def _overlay_pixels(before: Path, after: Path) -> int:
    """Pixels that changed and are coloured in ``after`` (the CT renders grey; segmentations are coloured)."""
    a, b = _colored(before), _colored(after)
    assert a.shape == b.shape
    saturation = b.max(axis=2) - b.min(axis=2)
    changed = np.abs(b - a).sum(axis=2) > 30
    return int(np.count_nonzero(changed & (saturation > 40)))


def _area(path) -> int:
    shape = _colored(Path(path)).shape
    return shape[0] * shape[1]


def _changed_pixels(before: Path, after: Path) -> int:
    a, b = _colored(before), _colored(after)
    return int(np.count_nonzero(np.abs(b - a).sum(axis=2) > 30))


def _on_slice(stats, label, k=20) -> int:
    """Voxels of ``label`` on slice ``k`` (the axial viewport shows the middle slice, 21 of 41)."""
    for segment in stats["segments"]:
        if segment["label"] == label:
            return sum(s["count"] for s in segment["slices"].values() if s["k"] == k)
    return 0


def _visible(voxels: int, screenshot: Path) -> float:
    """About how many screen pixels ``voxels`` voxels of a 512 x 512 slice cover when the slice fills the viewport
    width."""
    width = _colored(screenshot).shape[1]
    return voxels * (width / 512) ** 2


def _labelmap(stats) -> dict:
    """{(label, SOPInstanceUID): (count, sum_i, sum_j)} from the driver's OHIF labelmap statistics."""
    table = {}
    for segment in stats["segments"]:
        for sop, s in segment["slices"].items():
            table[(segment["label"], sop)] = (s["count"], s["sum_i"], s["sum_j"])
    return table


def _seg_table(ds, positions=None) -> dict:
    """The same table from a DICOM SEG (frames of BINARY or FRACTIONAL segments, any frame order)."""
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    table = {}
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if "DerivationImageSequence" in item:
            sop = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        else:
            z = tuple(round(float(v), 2) for v in item.PlanePositionSequence[0].ImagePositionPatient)
            sop = positions[z]
        frame = pixels[index] > 0
        js, is_ = np.nonzero(frame)
        if len(js) == 0:
            continue
        key = (names[number], sop)
        count, si, sj = table.get(key, (0, 0, 0))
        table[key] = (count + len(js), si + int(is_.sum()), sj + int(js.sum()))
    return table


def _ct_positions(orthanc) -> dict:
    meta = requests.get(f"{orthanc.dicomweb}/studies/{CT_STUDY}/series/{CT_SERIES}/metadata", timeout=60).json()
    return {tuple(round(float(v), 2) for v in m["00200032"]["Value"]): m["00080018"]["Value"][0] for m in meta}


# ------------------------------------------------------------------------------------------------------------ tests

def test_orthanc_holds_the_sample_studies_and_takes_any_dicom_folder(orthanc, tmp_path):
    studies = orthanc.qido("studies")
    assert len(studies) == 2
    modalities = sorted(s["00080060"]["Value"][0] for s in orthanc.qido("series"))
    assert modalities == ["CT", "CT", "RTSTRUCT"]
    # a folder a user points at (here: one series copied with a non-DICOM file beside it); re-uploading is harmless
    folder = tmp_path / "user"
    shutil.copytree(DICOM / "STS_001", folder / "STS_001")
    (folder / "notes.txt").write_text("not DICOM")
    done = _orthanc_cli("upload", "--port", str(orthanc.port), str(folder))
    assert done.returncode == 0, done.stderr
    assert "uploaded 60/60 DICOM files" in done.stderr  # 59 CT slices + the RTSTRUCT
    assert len(orthanc.qido("series")) == 3
    # loopback-only configuration: remote access refused, DICOM (DIMSE) port disabled
    system = requests.get(f"{orthanc.url}/system", timeout=10).json()
    assert "dicom-web" in requests.get(f"{orthanc.url}/plugins", timeout=10).json()
    config = (ROOT / "deploy" / "orthanc" / "orthanc.json").read_text()
    assert '"RemoteAccessAllowed" : false' in config and '"DicomServerEnabled" : false' in config
    assert system["Name"] == "SegVolLabel"


def test_app_serves_dicomweb_studies_ohif_and_the_proxy(app, orthanc, tmp_path):
    info = app.info()
    assert info["datastore"]["total"] == 2  # the two CT series (the RTSTRUCT is not an image)
    assert isinstance(info["labels"], list) and "liver" in info["labels"]  # OHIF's panel needs a list here
    page = requests.get(f"{app.url}/ohif/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    studies = requests.get(f"{app.url}/proxy/dicom/qido/studies", timeout=30).json()
    assert {s["0020000D"]["Value"][0] for s in studies} >= {CT_STUDY}
    # the second study works too (REST, the request the OHIF Class Prompts tab sends)
    liver = info["models"]["segvol"]["labels"]["liver"]
    params = {"label_prompt": [liver], "result_extension": ".nrrd", "result_dtype": "uint8",
              "result_compress": False, "restore_label_idx": False}
    response = requests.post(f"{app.url}/infer/segvol", params={"image": STS_SERIES, "output": "image"},
                             data={"params": json.dumps(params)}, timeout=600)
    assert response.status_code == 200, response.text
    import SimpleITK as sitk

    (tmp_path / "sts.nrrd").write_bytes(response.content)
    label = sitk.ReadImage(str(tmp_path / "sts.nrrd"))
    assert label.GetSize() == (198, 202, 59) and label.GetPixelID() == sitk.sitkUInt8


def test_ohif_auto_and_class_segmentation_appear(annotate, app):
    auto, klass = annotate["auto-segmentation"], annotate["class prompt"]
    labels = {s["label"]: s["total"] for s in auto["stats"]["segments"]}
    assert set(labels) <= set(AUTO_LABELS) and sum(labels.values()) > 0
    assert auto["stats"]["dtype"] == "Uint8Array" and auto["stats"]["dimensions"] == [512, 512, 41]
    added = {s["label"]: s["total"] for s in klass["stats"]["segments"]}
    assert added.get(CLASS_LABEL, 0) > 0
    # pixels: the overlay is on screen (coloured pixels that were not there before)
    opened = Path(annotate["open study in OHIF (SegVol Label mode)"]["screenshot"])
    area = _colored(opened).shape[0] * _colored(opened).shape[1]
    assert _overlay_pixels(opened, Path(auto["screenshot"])) > 0.01 * area
    # the class prompt only fills voxels no other segment holds (OHIF's merge rule), so few are new on this slice
    new = _on_slice(klass["stats"], CLASS_LABEL) - _on_slice(auto["stats"], CLASS_LABEL)
    assert new > 0
    assert _changed_pixels(Path(auto["screenshot"]), Path(klass["screenshot"])) > 0.5 * _visible(new, opened)


def test_segvol_panel_sends_text_box_and_points_in_one_request(annotate):
    prompts = annotate["SegVol prompts: text with autocomplete, free text, a box on two slices, a negative click"]
    # autocomplete from the served vocabulary: typing "liv" offers "liver" first
    assert prompts["suggestions"] and prompts["suggestions"][0] == TEXT_LABEL
    chips = {c["name"]: c for c in prompts["chips"]}
    assert not chips[TEXT_LABEL]["free"] and chips[FREE_TEXT]["free"] and "(free text)" in chips[FREE_TEXT]["shown"]
    assert prompts["slices"][0] != prompts["slices"][1] and "2 rectangles" in prompts["box_text"]
    assert prompts["points_text"] == "Points: 0 positive, 1 negative"

    run = annotate["run SegVol: text + box + points in one request"]
    params = run["params"]
    assert run["status"] == 200 and run["url"].split("?")[0].endswith("/infer/segvol")
    assert params["texts"] == [TEXT_LABEL, FREE_TEXT] and params["free_text"] is True
    i0, j0, k0, i1, j1, k1 = params["box"]
    assert i0 < i1 and j0 < j1 and k1 - k0 == abs(prompts["slices"][1] - prompts["slices"][0])  # 2 slices apart
    assert len(params["points"]) == 1 and params["point_labels"] == [0]
    i, j, k = params["points"][0]
    assert i0 <= i <= i1 and j0 <= j <= j1 and k in (k0, k1)  # clicked inside the box, on the second slice
    assert run["outcome"]["kind"] == "success" and "server" in run["latency"]
    # both names are segments of the labelmap now, the free-text one under its own name; the prompts shown beside
    shown = {s["label"]: s["total"] for s in run["stats"]["segments"]}
    assert TEXT_LABEL in shown and any(row.startswith(TEXT_LABEL) and "box [" in row for row in run["segments"])
    assert _changed_pixels(Path(prompts["screenshot"]), Path(run["screenshot"])) > 0

    again = annotate["add a positive click and run SegVol again (the image is cached)"]
    assert again["params"]["point_labels"] == [1, 0] and again["params"]["box"] == params["box"]
    assert again["outcome"]["kind"] == "success" and "image encoding reused" in again["latency"]


def test_brush_and_eraser_correct_the_labelmap(annotate):
    step = annotate["correct with the brush and the eraser (segmentation panel)"]
    before, painted, erased = step["before"], step["painted"], step["stats"]
    k = 40 - step["slice"]  # the viewport counts slices from the other end of the series
    assert _on_slice(painted, PAINT_LABEL, k) > _on_slice(before, PAINT_LABEL, k)
    total = lambda stats: sum(s["total"] for s in stats["segments"])  # noqa: E731
    assert total(erased) < total(painted)  # the eraser removed voxels of every segment it crossed
    assert _changed_pixels(Path(step["brush_screenshot"]), Path(step["screenshot"])) > 0


def test_locked_segments_undo_live_lasso_scribble_and_refine_by_clicks(annotate):
    locked = annotate["lock a segment, replace mode: a second structure overlapping it leaves it unchanged"]
    assert locked["params"]["texts"] == [SECOND_LABEL] and locked["outcome"]["kind"] == "success"
    assert locked["locked_before"] > 0 and locked["locked_after"] == locked["locked_before"]  # not one voxel changed
    assert locked["second_after"] > 0 and locked["second_after"] != locked["second_before"]

    undo = annotate["undo and redo the last result of a segment"]
    assert undo["before"] == locked["second_after"]
    assert undo["undone"] == locked["second_before"] and undo["redone"] == undo["before"]
    assert undo["locked"] == locked["locked_before"]

    live = annotate["live mode: each click runs SegVol at once"]
    assert live["requests"] == len(live["rounds"]) == 5  # one request per click, no button pressed
    times = sorted(r["round_trip_s"] for r in live["rounds"])
    print("live click round trip p50 %.2f s, p95 %.2f s (small test model)" % (times[2], times[-1]))

    freehand = annotate["a positive lasso and a negative scribble each change the segment (live)"]
    assert freehand["lasso_outcome"]["kind"] == "success" and freehand["scribble_outcome"]["kind"] == "success"
    lasso, scribble = freehand["lasso_params"], freehand["scribble_params"]
    assert lasso and sum(lasso["point_labels"]) > len(live["rounds"]), lasso  # live clicks + lasso
    assert scribble and scribble["point_labels"].count(0) > lasso["point_labels"].count(0), scribble
    assert freehand["after_lasso"] != freehand["before_lasso"]
    assert freehand["after_scribble"] != freehand["after_lasso"]

    refined = annotate["refine an existing segment: its prompts are kept and a click is added"]
    first = annotate["add a positive click and run SegVol again (the image is cached)"]["params"]
    params = refined["params"]
    assert FREE_TEXT in refined["banner"] and params["texts"] == [FREE_TEXT] and params["free_text"] is True
    assert params["box"] == first["box"]  # the box that made it
    kept = [p for p in first["points"] if p in params["points"]]
    assert kept == first["points"] and len(params["points"]) == len(first["points"]) + 1  # kept, plus the new click
    assert refined["outcome"]["kind"] == "success" and FREE_TEXT in refined["outcome"]["text"]
    existing = refined["existing"]  # made by the MONAI Label panel: no prompts of ours, so its box and inner points
    assert "texts" not in existing["params"] and len(existing["params"]["box"]) == 6
    assert existing["params"]["point_labels"] and set(existing["params"]["point_labels"]) == {1}
    assert existing["outcome"]["kind"] == "success" and CLASS_LABEL in existing["outcome"]["text"]


def test_save_button_stores_a_named_dicom_seg_and_keeps_the_view(annotate, app, orthanc, tmp_path_factory):
    failed = annotate["save while the server fails: error shown, nothing lost"]
    assert failed["puts"] == 1 and failed["outcome"]["kind"] == "error"
    assert "simulated by the e2e test" in failed["outcome"]["text"]
    assert _labelmap(failed["stats"]) == _labelmap(failed["before"])  # nothing lost in the viewer

    saved = annotate["save to SegVol Label (one button)"]
    assert saved["status"] == 200 and saved["response"]["image"] == CT_SERIES
    present = sorted(s["label"] for s in saved["before"]["segments"])
    names = [item["name"] for item in saved["params"]["label_info"]]
    assert sorted(names) == present and FREE_TEXT in names and PAINT_LABEL in names
    assert saved["outcome"]["kind"] == "success" and "Saved" in saved["outcome"]["text"]
    if app.info().get("trainers"):
        assert saved["response"]["retrain"]["counted"] is True
        assert "/1000" in saved["retrain_text"]
    # the view is kept: same labelmap, same picture
    assert _labelmap(saved["stats"]) == _labelmap(saved["before"])
    changed = _changed_pixels(Path(saved["before_screenshot"]), Path(saved["screenshot"]))
    assert changed < 0.01 * _area(saved["screenshot"])

    # the DICOM SEG in Orthanc: the segment names the annotator saw, the same voxels per segment and source slice
    segs = orthanc.seg_series()
    assert REST_SEG in segs, segs
    ds = orthanc.series_file(segs[REST_SEG])
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == CT_SERIES
    assert sorted(str(s.SegmentLabel) for s in ds.SegmentSequence) == present
    assert _seg_table(ds, _ct_positions(orthanc)) == _labelmap(saved["stats"])
    _assert_written_by_dcmqi_with_provenance(ds, app, tmp_path_factory.mktemp("seg"))


def _assert_written_by_dcmqi_with_provenance(ds, app, folder: Path):
    """The SEG came from dcmqi's itkimage2segimage (the real converter: its Manufacturer and model name), and each
    segment SegVol produced names the algorithm (SegVol + the serving checkpoint's id) and its prompts, read back
    both with pydicom and with dcmqi's segimage2itkimage."""
    assert ds.Manufacturer == "QIICR" and "dcmqi" in str(ds.ManufacturerModelName), (ds.Manufacturer,)
    serving = (app.info().get("model_status") or {}).get("serving") or {}
    produced = {str(s.SegmentLabel): s for s in ds.SegmentSequence if s.SegmentAlgorithmType == "SEMIAUTOMATIC"}
    assert FREE_TEXT in produced and TEXT_LABEL in produced, sorted(produced)
    for name, segment in produced.items():
        assert str(segment.SegmentAlgorithmName) == f"SegVol {serving['id']}"[:64]
        provenance = json.loads(str(segment.SegmentDescription))
        assert provenance["checkpoint"] == serving["id"] and provenance["mode"]
        assert name in provenance["prompts"]["texts"] or provenance["prompts"].get("box"), provenance
    assert FREE_TEXT in json.loads(str(produced[FREE_TEXT].SegmentDescription))["prompts"]["texts"]
    tool = shutil.which("segimage2itkimage", path=os.path.dirname(sys.executable)) or shutil.which("segimage2itkimage")
    ds.save_as(str(folder / "seg.dcm"))
    subprocess.run([tool, "--inputDICOM", str(folder / "seg.dcm"), "--outputDirectory", str(folder)], check=True,
                   capture_output=True, timeout=300)
    meta = json.loads((folder / "meta.json").read_text())
    segments = {s["SegmentLabel"]: s for group in meta["segmentAttributes"] for s in group}
    assert segments[FREE_TEXT]["SegmentAlgorithmName"] == str(produced[FREE_TEXT].SegmentAlgorithmName)
    assert json.loads(segments[FREE_TEXT]["SegmentDescription"])["checkpoint"] == serving["id"]


def test_update_model_runs_a_training_and_the_panel_shows_its_status(annotate, app):
    """The stock MONAI Label panel's Update Model, clicked after the save, trains on the saved label (the server's
    defaults: one epoch); the SegVol panel shows the run starting or RUNNING with its epochs, then its final status,
    the same the server records for it."""
    step = annotate["update the model (MONAI Label panel) and follow the run in the SegVol panel"]
    assert step["status"] == 200 and step["notice"] == "Model update task STARTED"
    assert step["url"].split("?")[0].rstrip("/").endswith("/train")
    assert "segvol_finetune" in step["response"], step["response"]
    statuses = [entry["status"] for entry in step["timeline"]]
    assert "RUNNING" in statuses, step["timeline"]  # seen while it ran, with its epoch count
    assert Path(step["running"]["screenshot"]).is_file()
    assert Path(step["running"]["panel_screenshot"]).is_file(), step["running"].get("panelError")
    running = step["running"]["text"]
    assert running.startswith("Training: RUNNING") and ("epoch 0/1" in running or "epoch 1/1" in running), running
    # the run's last status, after RUNNING, with the epochs done
    final = step["final"]
    assert final["status"] in FINAL_TRAIN and statuses.index(final["status"]) > statuses.index("RUNNING"), statuses
    assert final["text"].startswith(f"Training: {final['status']}") and "epoch 1/1" in final["text"], final
    for key in ("panel_screenshot", "screenshot", "started_screenshot"):
        assert Path(step[key]).is_file() and Path(step[key]).parent == ARTIFACTS
    # what the panel showed is what the server records (its stats file, /info train_stats)
    stats = app.info()["train_stats"]["segvol_finetune"]
    assert stats["status"] == final["status"] and stats["epoch"] == stats["total_epochs"] == 1, stats
    assert stats["train_cases"] == 1 and (app.app / "model" / "segvol_finetune" / "train_stats.json").is_file()


def test_next_sample_opens_the_unlabelled_study(annotate, orthanc):
    step = annotate["next sample"]
    sts_study = orthanc.qido("series", SeriesInstanceUID=STS_SERIES)[0]["0020000D"]["Value"][0]
    assert step["status"] == 200 and step["study"] == sts_study
    assert STS_SERIES in {s["series"] for s in step["series"]}


def _assert_labelled(server):
    """The CT series is labelled: in the training datalist (its label file on disk) and never the next sample."""
    info = server.info()
    # MONAI Label's DICOMweb datastore counts SEG series referencing an image as "completed" (here two SEGs of the
    # same series: the REST save and the OHIF export), not distinct images
    assert info["datastore"]["total"] == 2 and info["datastore"]["completed"] >= 1
    train = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=300).json()
    labelled = [item for item in train if os.path.basename(item["image"]).startswith(CT_SERIES)]
    assert len(labelled) == 1 and os.path.exists(labelled[0]["label"]), train
    assert not [item for item in train if os.path.basename(item["image"]).startswith(STS_SERIES)]
    strategy = next(iter(info["strategies"]))  # the clients' default active-learning strategy
    for seed in range(3):
        response = requests.post(f"{server.url}/activelearning/{strategy}", json={"seed": seed}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == STS_SERIES


def test_saved_labels_count_toward_training_and_survive_a_server_restart(annotate, app, orthanc, weights, artifacts,
                                                                         tmp_path_factory, app_dir):
    time.sleep(3)  # MONAI Label's cached list of labelled series expires after 2 s here
    _assert_labelled(app)

    app.stop()  # a new server with an empty DICOMweb cache: everything must come back from Orthanc
    again = start_app(orthanc, weights, tmp_path_factory.mktemp("dicomweb-cache-2"), artifacts / "server.log", app_dir)
    try:
        _assert_labelled(again)
        steps = _drive(again, "reopen", artifacts)
        reopened = steps["reopen the study after the server restart"]
        descriptions = {s["description"] for s in reopened["series"] if s["modality"] == "SEG"}
        assert REST_SEG in descriptions
        # the SegVol panel tells which checkpoint answers and how training stands
        status = reopened["status"]
        assert status["model"].startswith("Model:") and "checkpoint" in status["model"]
        assert status["training"].startswith("Training:") and status["retrain"].startswith("Retrain counter:")
        retrain = again.info().get("retrain")
        if retrain:  # the counter comes from /info (no save in this session): the labels saved before count
            assert retrain["threshold"] == 1000 and retrain["total"] >= 1
            assert "/1000 labels toward the next training run" in status["retrain"]
        assert status["datastore"].startswith("Labelled ") and status["datastore"].endswith("/2 images")
        # the saved label, read back by OHIF from the PACS, holds what the annotator saved
        saved = annotate["save to SegVol Label (one button)"]
        loaded = steps["load the saved DICOM SEG back into OHIF"]["loaded"]
        assert loaded["totals"] == {s["label"]: s["total"] for s in saved["stats"]["segments"]}
    finally:
        again.stop()


def test_rest_save_while_the_pacs_is_down_fails_loudly_and_loses_nothing(orthanc, weights, artifacts,
                                                                         tmp_path_factory, tmp_path, app_dir):

    server = start_app(orthanc, weights, tmp_path_factory.mktemp("dicomweb-cache-3"), artifacts / "server.log", app_dir)
    try:
        before = orthanc.seg_series()
        # a label on the series grid (the .bin form OHIF's MonaiLabelClient.save_label sends: raw uint8, i fastest)
        label = np.zeros((41, 512, 512), np.uint8)
        label[20, 200:260, 150:230] = 1
        params = {"label_info": [{"name": "liver", "idx": 1, "model_name": "SegVol retry"}]}

        def put():
            return requests.put(f"{server.url}/datastore/label", params={"image": CT_SERIES},
                                data={"params": json.dumps(params)},
                                files={"label": ("label.bin", label.tobytes(), "application/octet-stream")},
                                timeout=300)

        # the image must be in the server's cache before the PACS goes away (the user has it open)
        assert requests.post(f"{server.url}/infer/segvol_auto", params={"image": CT_SERIES, "output": "json"},
                             data={"params": "{}"}, timeout=600).status_code == 200
        orthanc.stop()
        try:
            response = put()
            assert response.status_code >= 500, response.text  # reported to the client, not silently dropped
            # and the server keeps running (MONAI Label answers /info and /infer from the PACS's series list, so
            # those wait for the PACS once its cached copy expires; the viewer itself is still served)
            assert server.process.poll() is None
            assert requests.get(f"{server.url}/ohif/", timeout=30).status_code == 200
        finally:
            orthanc.start(samples=False)  # same storage folder: what was stored before is still there
        assert orthanc.seg_series() == before
        response = put()
        assert response.status_code == 200, response.text
        if server.info().get("trainers"):
            assert response.json()["retrain"]["counted"] is True
        after = orthanc.seg_series()
        assert "SegVol retry" in after and set(before.items()) <= set(after.items())
        ds = orthanc.series_file(after["SegVol retry"])
        table = _seg_table(ds, _ct_positions(orthanc))
        assert sum(v[0] for v in table.values()) == 60 * 80
    finally:
        server.stop()
