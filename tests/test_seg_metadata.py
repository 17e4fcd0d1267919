"""The DICOM SEG of a saved label, written by the real dcmqi (``itkimage2segimage`` of the pinned ``dcmqi`` package)
through MONAI Label's own conversion (``nifti_to_dicom_seg``), with the segment attributes of ``lib.seg_metadata``:
names, SegVol's algorithm identification (checkpoint id) and the prompts of a segment SegVol produced, MANUAL for a
hand-drawn one; read back with pydicom and with dcmqi's ``segimage2itkimage``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT.parent / "shared" / "data" / "dicom" / "CRLM-CT-1004"
sys.path.insert(0, str(ROOT / "apps" / "segvol"))

from lib.seg_metadata import DESCRIPTION_LIMIT, provenance_text, with_segment_attributes  # noqa: E402

CHECKPOINT = "SegVol_v1.pth@0123456789ab"
PROVENANCE = {"model": CHECKPOINT, "mode": "zoom_out_zoom_in",
              "prompts": {"texts": ["liver"], "box": [10, 20, 3, 40, 60, 9], "positive_points": [[30, 40, 5]],
                          "negative_points": [], "requested": {"ignored": True}}}


def _dcmqi_bin() -> str:
    folder = os.path.dirname(sys.executable)
    found = shutil.which("itkimage2segimage", path=folder) or shutil.which("itkimage2segimage")
    if not found:
        pytest.fail("dcmqi's itkimage2segimage is not installed (pip install -r requirements.txt)")
    return os.path.dirname(found)


def test_attributes_name_the_algorithm_and_the_prompts_of_produced_segments_only():
    info = {"label_info": [{"name": "liver", "idx": 1, "provenance": PROVENANCE, "color": [200, 10, 10]},
                           {"name": "my lesion", "idx": 3}, {"name": "no index"}]}
    assert with_segment_attributes(info) is info  # in place: MONAI Label adds the SEG's uids to the same dict
    liver, lesion, plain = (entry.get("segmentAttribute") for entry in info["label_info"])
    assert liver["labelID"] == 1 and liver["SegmentLabel"] == "liver"
    assert liver["recommendedDisplayRGBValue"] == [200, 10, 10]
    assert liver["SegmentAlgorithmType"] == "SEMIAUTOMATIC" and liver["SegmentAlgorithmName"] == f"SegVol {CHECKPOINT}"
    described = json.loads(liver["SegmentDescription"])
    assert described["checkpoint"] == CHECKPOINT and described["mode"] == "zoom_out_zoom_in"
    assert described["prompts"]["texts"] == ["liver"] and "requested" not in described["prompts"]
    assert lesion["SegmentAlgorithmType"] == "MANUAL" and "SegmentAlgorithmName" not in lesion
    assert plain is None  # no index: MONAI Label's own defaults


def test_long_point_lists_keep_the_description_within_dicom_limits():
    many = {**PROVENANCE, "prompts": {"texts": ["liver"], "positive_points": [[i, i, i] for i in range(500)]}}
    text = provenance_text(many)
    assert len(text) <= DESCRIPTION_LIMIT and json.loads(text)["prompts"]["positive_points"] == "500 items"


@pytest.mark.skipif(not SERIES.is_dir(), reason=f"sample DICOM series not available: {SERIES}")
def test_real_dcmqi_writes_names_algorithm_and_prompts_read_back_two_ways(tmp_path, monkeypatch):
    import pydicom
    import SimpleITK as sitk
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    monkeypatch.setenv("PATH", os.pathsep.join([_dcmqi_bin(), os.environ.get("PATH", "")]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES)))
    image = reader.Execute()
    array = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    array[5:9, 100:160, 100:170] = 1
    array[12:14, 50:80, 50:90] = 3
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    info = with_segment_attributes({"label_info": [
        {"name": "liver", "idx": 1, "model_name": "SegVol Label", "provenance": PROVENANCE},
        {"name": "my lesion", "idx": 3, "model_name": "SegVol Label"}]})

    written = nifti_to_dicom_seg(str(SERIES), str(tmp_path / "label.nii.gz"), info["label_info"])
    try:
        ds = pydicom.dcmread(written)
        shutil.copy(written, tmp_path / "seg.dcm")
    finally:
        os.unlink(written)
    assert ds.Manufacturer == "QIICR" and "dcmqi" in str(ds.ManufacturerModelName)  # dcmqi wrote it
    assert ds.SeriesDescription == "SegVol Label"
    segments = {str(s.SegmentLabel): s for s in ds.SegmentSequence}
    assert sorted(segments) == ["liver", "my lesion"]
    assert segments["liver"].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segments["liver"].SegmentAlgorithmName == f"SegVol {CHECKPOINT}"
    assert json.loads(segments["liver"].SegmentDescription)["prompts"]["box"] == [10, 20, 3, 40, 60, 9]
    assert segments["my lesion"].SegmentAlgorithmType == "MANUAL"

    out = tmp_path / "back"
    out.mkdir()
    subprocess.run([os.path.join(_dcmqi_bin(), "segimage2itkimage"), "--inputDICOM", str(tmp_path / "seg.dcm"),
                    "--outputDirectory", str(out)], check=True, capture_output=True, timeout=300)
    meta = json.loads((out / "meta.json").read_text())
    back = {s["SegmentLabel"]: s for group in meta["segmentAttributes"] for s in group}
    assert back["liver"]["SegmentAlgorithmName"] == f"SegVol {CHECKPOINT}"
    assert json.loads(back["liver"]["SegmentDescription"])["checkpoint"] == CHECKPOINT
    assert back["my lesion"]["SegmentAlgorithmType"] == "MANUAL"
