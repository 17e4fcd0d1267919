"""The real SegVol Label server driven as OHIF v3, 3D Slicer and the Python client drive it.

One server per module (``monailabel start_server`` on a free loopback port) with a small-configuration checkpoint and
the CLIP tokenizer; the datastore holds a real CT (``example_ct_sm``) stored three ways: RAS as shipped, LPS (first two
axes flipped) and with its axes permuted and anisotropic spacing, plus a corrupt file.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from _server import Server, random_weights
from conftest import DATA, require

from segvol.config import SMALL


def _ras_to_itk_affine(image: sitk.Image) -> np.ndarray:
    """The RAS affine of an ITK image (ITK stores LPS geometry)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1, -1, 1, 1]) @ affine


def _read_label(content: bytes, suffix: str, tmp_path) -> tuple:
    path = tmp_path / f"result{suffix}"
    path.write_bytes(content)
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # back to (i, j, k)
    return array, _ras_to_itk_affine(image), image


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    source = require(DATA / "totalseg-example" / "example_ct_sm.nii.gz", "sample CT")
    folder = tmp_path_factory.mktemp("studies")
    image = nib.load(str(source))
    data = np.asarray(image.dataobj).astype(np.int16)
    affine = image.affine
    nib.save(nib.Nifti1Image(data, affine), folder / "ct_ras.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), affine @ flip), folder / "ct_lps.nii.gz")
    permute = np.eye(4)[[2, 0, 1, 3]].T  # new (a, b, c) = old (k, i, j)
    nib.save(nib.Nifti1Image(data.transpose(2, 0, 1).copy(), affine @ permute), folder / "ct_permuted.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return folder


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("weights")
    return random_weights(folder, tokenizer_dir, SMALL)


@pytest.fixture(scope="module")
def server(studies, small_weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    instance = Server(studies, {"weights": str(small_weights), "device": "cpu"}, log).wait()
    yield instance
    instance.stop()


def test_info_lists_the_three_faces_and_the_vocabulary(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    models = info["models"]
    assert models["segvol"]["type"] == "vista3d"
    assert models["segvol_interactive"]["type"] == "deepgrow"
    assert models["segvol_auto"]["type"] == "segmentation"
    assert len(models["segvol"]["labels"]) > 200 and models["segvol"]["labels"]["liver"] == 1
    assert set(models["segvol_auto"]["labels"]) >= {"liver", "spleen", "kidney left", "aorta"}


def test_python_client_text_prompt(server, studies):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url)
    label_file, params = client.infer("segvol", "ct_ras", {"texts": ["liver"], "result_extension": ".nii.gz"})
    label = nib.load(label_file)
    image = nib.load(str(studies / "ct_ras.nii.gz"))
    assert label.shape == image.shape
    assert np.allclose(label.affine, image.affine, atol=1e-4)
    assert np.asarray(label.dataobj).dtype == np.uint8
    assert params["label_names"] == {"liver": 1}
    assert params["prompts"]["texts"] == ["liver"]
    assert params["model"].startswith("segvol_label.pt@")
    assert params["latencies"]["total"] > 0


def _ohif(server, image, params, tmp_path):
    base = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
    response = server.infer("segvol", image, {**base, **params}, output="image")
    assert response.status_code == 200, response.text
    return _read_label(response.content, ".nrrd", tmp_path)


def test_ohif_class_prompts_several_labels(server, studies, tmp_path):
    info = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["segvol"]["labels"]
    indices = [info["liver"], info["spleen"], info["kidney left"]]
    array, affine, _ = _ohif(server, "ct_ras", {"label_prompt": indices}, tmp_path)
    image = nib.load(str(studies / "ct_ras.nii.gz"))
    assert array.shape == image.shape and array.dtype == np.uint8
    assert np.allclose(affine, image.affine, atol=1e-4)
    assert set(np.unique(array)) <= {0, *indices}


def test_ohif_point_prompts(server, tmp_path):
    response = server.infer("segvol", "ct_ras", {"points": [[60, 50, 15], [20, 20, 5]], "point_labels": [1, 0],
                                                 "label_prompt": [1], "result_extension": ".nrrd"}, output="all")
    assert response.status_code == 200, response.text
    assert b"negative_points" in response.content  # multipart: the params part echoes the prompts used
    array, _, _ = _ohif(server, "ct_ras", {"points": [[60, 50, 15]], "point_labels": [1]}, tmp_path)
    assert array.shape == (122, 101, 30)


def test_slicer_deepgrow_with_roi_in_either_order(server, tmp_path):
    params = {"label": "liver", "foreground": [[60, 50, 15]], "background": [], "roi": [90, 30, 20, 80, 25, 5],
              "result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}
    response = server.infer("segvol_interactive", "ct_ras", params, output="all")
    assert response.status_code == 200, response.text
    part = response.content.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    result = json.loads(part)
    assert result["prompts"]["box"] == [30, 20, 5, 90, 80, 25]
    assert result["label_names"] == {"liver": 1}
    response = server.infer("segvol_interactive", "ct_ras", {**params, "label": "Segment_1"}, output="image")
    assert response.status_code == 200, response.text
    array, _, _ = _read_label(response.content, ".nrrd", tmp_path)
    assert set(np.unique(array)) <= {0, 1}


def test_auto_segmentation(server, tmp_path):
    response = server.infer("segvol_auto", "ct_ras", {"result_extension": ".nii.gz"}, output="all")
    assert response.status_code == 200, response.text
    assert b"kidney left" in response.content and b"label_names" in response.content


def _same_anatomy(label_a, affine_a, label_b, affine_b):
    """Resample b onto a's voxel grid by the affines (exact axis flips/permutations) and compare."""
    ijk = np.indices(label_a.shape).reshape(3, -1)
    world = affine_a[:3, :3] @ ijk + affine_a[:3, 3:4]
    other = np.linalg.inv(affine_b)
    ijk_b = np.rint(other[:3, :3] @ world + other[:3, 3:4]).astype(int)
    return np.array_equal(label_a.reshape(-1), label_b[tuple(ijk_b)])


@pytest.mark.parametrize("other", ["ct_lps", "ct_permuted"])
def test_point_lands_on_the_same_anatomy_in_any_orientation(server, studies, tmp_path, other):
    ras = nib.load(str(studies / "ct_ras.nii.gz"))
    image = nib.load(str(studies / f"{other}.nii.gz"))
    point_ras = np.array([60, 50, 15, 1])
    point_other = np.rint(np.linalg.inv(image.affine) @ ras.affine @ point_ras).astype(int)[:3].tolist()
    results = []
    for name, point in (("ct_ras", point_ras[:3].tolist()), (other, point_other)):
        # a client of its own: a fresh session (one with history may keep an earlier zoom-in grid that covers the ROI,
        # which changes the blend slightly; this test is about orientation, not session history)
        response = server.infer("segvol_interactive", name, {"label": "liver", "foreground": [point],
                                                             "result_extension": ".nii.gz",
                                                             "client_id": f"anatomy-{other}-{name}"}, output="image")
        assert response.status_code == 200, response.text
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(response.content)
        label = nib.load(str(path))
        results.append((np.asarray(label.dataobj), label.affine))
    (label_ras, affine_ras), (label_other, affine_other) = results
    assert label_other.shape == image.shape and np.allclose(affine_other, image.affine, atol=1e-4)
    assert label_ras.any()
    assert _same_anatomy(label_ras, affine_ras, label_other, affine_other)


@pytest.mark.parametrize("model, image, params, status, message", [
    ("nope", "ct_ras", {"texts": ["liver"]}, 404, "unknown model"),
    ("segvol", "no_such_image", {"texts": ["liver"]}, 404, "not found"),
    ("segvol", "ct_ras", {"texts": ["kidny left"]}, 422, "closest known names"),
    ("segvol", "ct_ras", {"label_prompt": [9999]}, 422, "not in the vocabulary"),
    ("segvol", "ct_ras", {"points": [[500, 50, 15]], "point_labels": [1]}, 422, "outside"),
    ("segvol", "ct_ras", {"points": "abc", "point_labels": [1]}, 422, "points"),
    ("segvol", "ct_ras", {"points": [[1, 2, 3]], "point_labels": [7]}, 422, "point_labels"),
    ("segvol_interactive", "ct_ras", {"foreground": [[60, 50, 15]], "roi": [1, 2, 3]}, 422, "roi must be"),
    ("segvol_interactive", "ct_ras", {"foreground": [[60, 50, 15]], "roi": ["a", 1, 2, 3, 4, 5]}, 422, "roi must"),
    ("segvol", "ct_ras", {}, 422, "no prompt"),
    ("segvol", "corrupt", {"texts": ["liver"]}, 422, "corrupt"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, model, image, params, status, message):
    response = server.infer(model, image, params, output="json")
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert server.alive()
    ok = server.infer("segvol", "ct_ras", {"texts": ["spleen"]}, output="json")
    assert ok.status_code == 200, ok.text


def test_without_weights_the_server_starts_and_says_how_to_get_them(studies, tmp_path):
    server = Server(studies, {"weights": str(tmp_path / "missing"), "device": "cpu"}, tmp_path / "server.log").wait()
    try:
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        assert {"segvol", "segvol_interactive", "segvol_auto"} <= set(info["models"])
        response = server.infer("segvol", "ct_ras", {"texts": ["liver"]}, output="json")
        assert response.status_code == 503
        assert "scripts/download_weights.py" in response.json()["detail"]
    finally:
        server.stop()


def test_ohif_auto_segmentation_tab_on_the_vista3d_face(server):
    """OHIF's Auto Segmentation tab sends nearly every /info label; the auto-segmentation set among them is used."""
    info = requests.get(f"{server.url}/info/", timeout=30).json()["models"]
    everything = sorted(info["segvol"]["labels"].values())
    response = server.infer("segvol", "ct_ras", {"label_prompt": everything}, output="json")
    assert response.status_code == 200, response.text
    assert set(response.json()["label_names"]) == set(info["segvol_auto"]["labels"])


def test_int8_is_served_on_request_calibrated_on_the_datastore(studies, small_weights, tmp_path):
    """``--conf precision int8``: the image encoder is quantized at the first load on the datastore's readable CTs
    (the corrupt one skipped), ``model_status`` says what runs, and the answer is a label like fp32's."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    server = Server(studies, {"weights": str(small_weights), "device": "cpu", "precision": "int8"},
                    tmp_path / "server.log", env={"SEGVOL_CACHE_DIR": str(tmp_path / "cache")}).wait()
    try:
        response = server.infer("segvol", "ct_ras", {"texts": ["liver"], "result_extension": ".nii.gz"})
        assert response.status_code == 200, response.text
        serving = requests.get(f"{server.url}/info/", timeout=30).json()["model_status"]["serving"]
        assert serving["precision"]["precision"] == "int8" and serving["precision"]["runtime"] == "openvino"
        assert "int8" in serving["precision"]["cache_path"]
        assert str(tmp_path / "cache") in serving["precision"]["cache_path"]
    finally:
        server.stop()
    assert "int8 calibration skips" in (tmp_path / "server.log").read_text()
