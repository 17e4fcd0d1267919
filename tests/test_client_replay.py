"""The stock clients' workflows replayed against the real server, and their results imported the way each client does.

**3D Slicer.** The requests go through the Slicer plugin's own client library, ``MONAILabelLib`` (``client.py``),
imported the way the plugin imports it (``from MONAILabelLib import MONAILabelClient`` with the plugin folder on
``sys.path``). It is not copied into this repository: the loader takes it from the monailabel wheel, which installs
the plugin as data under ``<sys.prefix>/monailabel/plugins/slicer/MONAILabel``, or from a folder named by
``SEGVOL_SLICER_PLUGIN`` (e.g. a checkout of Project-MONAI/MONAILabel's ``plugins/slicer/MONAILabel``). When neither
is there it falls back to ``monailabel.client.MONAILabelClient``: compared for monailabel 0.8.5, the two files differ
only in a log line and in ``save_result`` returning None when a response has no file; the request and response code
is the same. What the Slicer module (``MONAILabel.py``) does around the client is replayed by the small functions
below, written from reading it: the request params (the model's ``/info`` config with the first element of each list,
``result_extension`` ``.nrrd``, ``result_dtype`` ``uint8``), and the import (``updateSegmentationMask``: segment IDs
are names; ``ImportLabelmapToSegmentationNode`` puts label value k into the k-th name of the list, the list being
``label_names`` sorted by value for auto-segmentation, ``[segment name]`` for deepgrow and scribbles; segments exist
for the app-level ``/info`` labels, created when a sample is opened).

**OHIF v3.** The requests are the MONAI Label panel's (``MonaiLabelClient.infer``: form field ``params`` with
``result_extension`` ``.nrrd``, ``result_dtype`` ``uint8``, ``result_compress`` false, ``restore_label_idx`` false,
query ``output=image``; ``label_prompt`` indices taken from the model's ``/info`` labels; ``points`` +
``point_labels``), and the parsing is the panel's ``onInfo``/``updateView``: one uint8 segment per distinct name of
all ``/info`` labels, sorted; a returned value is mapped through the model's ``/info`` labels (a list -> 1..N, a dict
-> its values) for the names the tab passes. The Class Prompts preset lists are read at test time from the OHIF bundle
the wheel ships (``monailabel/endpoints/static/ohif``).

What the server meant is read from a second request on the ``segvol`` face with the same text prompts (its
``label_names`` name each value): every client's import must give each named segment exactly those voxels.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from _server import Server, copy_app, random_weights
from conftest import DATA, require

from segvol.config import SMALL
from segvol.vocabulary import Vocabulary

PLUGIN_ENV = "SEGVOL_SLICER_PLUGIN"


# ---- the Slicer plugin's client library, loaded the way the plugin loads it -----------------------------------------

def slicer_plugin_folder() -> Optional[Path]:
    candidates = [os.environ.get(PLUGIN_ENV), os.path.join(sys.prefix, "monailabel", "plugins", "slicer", "MONAILabel")]
    for folder in candidates:
        if folder and (Path(folder) / "MONAILabelLib" / "client.py").is_file():
            return Path(folder)
    return None


def slicer_client_class():
    """``MONAILabelLib.MONAILabelClient`` from the plugin folder; else MONAI Label's copy of the same client."""
    folder = slicer_plugin_folder()
    if folder is None:
        from monailabel.client import MONAILabelClient

        return MONAILabelClient, "monailabel.client (the Slicer plugin folder is absent)"
    sys.path.insert(0, str(folder))
    try:
        from MONAILabelLib import MONAILabelClient  # the plugin's own import line
    finally:
        sys.path.remove(str(folder))
    return MONAILabelClient, str(folder)


def ohif_bundle_text() -> str:
    import monailabel

    for path in glob.glob(os.path.join(os.path.dirname(monailabel.__file__), "endpoints", "static", "ohif", "*.js")):
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if "selected_organs_indx" in text:
            return text
    pytest.skip("the OHIF build with the MONAI Label panel is not in the installed monailabel package")


def ohif_presets() -> Dict[str, List[str]]:
    """The Class Prompts preset buttons of the shipped panel: {button: [names it ticks]}."""
    found = re.findall(r"on(\w+)ClickBtn = async \(\) => \{\s*const selected_organs_indx = \[(.*?)\];",
                       ohif_bundle_text(), re.S)
    assert found, "preset lists not found in the OHIF bundle"
    return {name: re.findall(r"'([^']*)'", body) for name, body in found}


# ---- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    source = require(DATA / "totalseg-example" / "example_ct_sm.nii.gz", "sample CT")
    folder = tmp_path_factory.mktemp("replay_studies")
    image = nib.load(str(source))
    data = np.asarray(image.dataobj).astype(np.int16)
    for name in ("ct_a", "ct_b"):
        nib.save(nib.Nifti1Image(data, image.affine), folder / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("replay_weights")
    return random_weights(folder, tokenizer_dir, SMALL)


@pytest.fixture(scope="module")
def server(studies, weights, tmp_path_factory):
    app = copy_app(tmp_path_factory.mktemp("replay_app") / "segvol")
    conf = {"weights": str(weights), "device": "cpu", "zoom": "zoom_out", "train_epochs": "1",
            "train_val_split": "0"}
    instance = Server(studies, conf, tmp_path_factory.mktemp("replay_logs") / "server.log", app=app, threads=2).wait()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def slicer(server, tmp_path_factory):
    cls, _ = slicer_client_class()
    return cls(server.url, str(tmp_path_factory.mktemp("slicer_tmp")), "replay-user")


@pytest.fixture(scope="module")
def info(slicer):
    return slicer.info()


# ---- what the Slicer module does around the client -----------------------------------------------------------------

def slicer_config(info: dict, section: str, name: str) -> dict:
    """``getParamsFromConfig``: the /info config of that model/strategy/trainer, first element of each list."""
    config = info.get(section, {}).get(name, {}).get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def slicer_infer(slicer, model: str, image: str, params: dict, label_in: Optional[str] = None):
    """``MONAILabelLogic.infer``: .nrrd and uint8 asked for, then the client library's infer."""
    params = dict(params)
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    return slicer.infer(model, image, params, label_in, None, None)


def slicer_models(info: dict, *types: str) -> List[str]:
    return [name for name, model in info["models"].items() if model["type"] in types]


def read_itk(path: str):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (i, j, k)


def same_geometry(label: sitk.Image, image: sitk.Image) -> bool:
    return (label.GetSize() == image.GetSize() and np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
            and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-5))


def slicer_import(result_file: str, labels: List[str], segments: List[str]) -> Dict[str, int]:
    """``updateSegmentationMask`` (whole-volume path): value k -> the k-th of ``labels`` ("background" dropped),
    imported only into segments that exist (their IDs are names). -> voxels per imported segment."""
    _, array = read_itk(result_file)
    labels = [label for label in labels if label != "background"]
    return {name: int((array == k).sum()) for k, name in enumerate(labels, 1) if name in segments}


def label_names_in_slicer_order(params: dict, model_labels) -> List[str]:
    labels = params.get("label_names") if params and params.get("label_names") else model_labels
    if labels and isinstance(labels, dict):
        labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
    return list(labels or [])


# ---- what the OHIF panel does -------------------------------------------------------------------------------------

class OhifInfo:
    """``MonaiLabelPanel.onInfo``: per-model name <-> index maps and one segment per distinct name, sorted."""

    ORDER = ("deepgrow", "deepedit", "vista3d", "segmentation")

    def __init__(self, info: dict):
        self.info = info
        all_labels = list(info.get("labels", []))
        self.label_to_idx: Dict[str, Dict[str, int]] = {}
        self.names: Dict[str, List[str]] = {}
        self.indices: Dict[str, List[int]] = {}
        models = [m for kind in self.ORDER for m, v in info["models"].items() if v["type"] == kind]
        for model in models:
            labels = info["models"][model]["labels"]
            pairs = list(enumerate(labels, 1)) if isinstance(labels, list) else [(v, k) for k, v in labels.items()]
            self.label_to_idx[model] = {name: idx for idx, name in pairs}
            all_labels += [name for _, name in pairs]
            self.names[model] = sorted(self.label_to_idx[model])
            # JavaScript sorts the index keys as strings before mapping them to numbers
            self.indices[model] = [int(k) for k in sorted({str(idx) for idx, _ in pairs})]
        self.segments = sorted(set(all_labels))  # labelsOrdered: segment index = position + 1

    def segment_index(self, name: str) -> int:
        return self.segments.index(name) + 1


def ohif_infer(server, model: str, image: str, params: dict) -> bytes:
    """``MonaiLabelClient.infer`` with the panel's defaults."""
    params = {**params, "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    response = requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": "image"},
                             data={"params": json.dumps(params)}, timeout=600)
    assert response.status_code == 200, response.text
    return response.content


def ohif_parse(content: bytes, ohif: OhifInfo, model: str, labels: List[str], tmp_path: Path,
               class_unknown: bool = False) -> Dict[str, int]:
    """``updateView`` on an empty labelmap: the NRRD's voxels remapped to segment indices -> voxels per segment."""
    path = tmp_path / "ohif_result.nrrd"
    path.write_bytes(content)
    header = content.split(b"\n\n", 1)[0].decode("latin-1")
    assert re.search(r"^type: (unsigned char|uchar|uint8)", header, re.M), header
    assert "encoding: raw" in header  # result_compress false: the panel's nrrd-js reads the raw buffer
    _, data = read_itk(str(path))
    mapping = {0: 0}
    for position, label in enumerate(labels, 1):
        model_idx = ohif.label_to_idx[model].get(label) or position
        mapping[model_idx] = 0xFF & ohif.segment_index(label)
    converted = np.zeros_like(data)
    for value in np.unique(data):
        if value and mapping.get(int(value)):
            converted[data == value] = mapping[int(value)]
        elif value and class_unknown and len(labels) == 1:
            converted[data == value] = ohif.segment_index(labels[0])
    return {name: int((converted == ohif.segment_index(name)).sum()) for name in labels}


# ---- what the server meant ----------------------------------------------------------------------------------------

def meant(slicer, image: str, texts: List[str], **prompts) -> Dict[str, int]:
    """Voxels per served name, from the ``segvol`` face with the same text prompts (its own label_names)."""
    result_file, params = slicer.infer("segvol", image, {"texts": texts, "result_extension": ".nii.gz", **prompts})
    array = np.asarray(nib.load(result_file).dataobj)
    return {name: int((array == value).sum()) for name, value in params["label_names"].items()}


def meant_object(slicer, image: str, **prompts) -> int:
    result_file, _ = slicer.infer("segvol", image, {"result_extension": ".nii.gz", **prompts})
    return int((np.asarray(nib.load(result_file).dataobj) > 0).sum())


# ---- tests: Slicer ------------------------------------------------------------------------------------------------

def test_the_slicer_client_library_is_the_plugins(slicer):
    folder = slicer_plugin_folder()
    if folder is None:
        pytest.skip(f"the Slicer plugin folder is absent (set {PLUGIN_ENV}); the other tests use monailabel.client")
    assert Path(sys.modules[type(slicer).__module__].__file__).resolve().is_relative_to(folder.resolve())


def test_slicer_panels_list_the_faces(info):
    assert slicer_models(info, "segmentation", "detection") == ["segvol_auto"]
    assert slicer_models(info, "deepgrow", "deepedit") == ["segvol_interactive"]
    assert slicer_models(info, "scribbles") == ["segvol_scribbles"]
    assert list(info["strategies"])[0] == "random_fg"  # Slicer selects the first listed strategy


def test_slicer_auto_segmentation_imports_every_organ(slicer, info, studies):
    model = slicer_models(info, "segmentation", "detection")[0]
    result_file, params = slicer_infer(slicer, model, "ct_a", slicer_config(info, "models", model))
    labels = label_names_in_slicer_order(params, info["models"][model]["labels"])
    assert labels == list(info["models"][model]["labels"])  # names preserved, in the order of the /info labels
    imported = slicer_import(result_file, labels, segments=info["labels"])
    assert set(imported) == set(labels)  # each name has its segment (created from the app-level /info labels)
    label_image, _ = read_itk(result_file)
    assert same_geometry(label_image, sitk.ReadImage(str(studies / "ct_a.nii.gz")))
    texts = params["prompts"]["texts"]
    expected = meant(slicer, "ct_a", texts)
    assert imported == expected
    assert sum(1 for count in expected.values() if count) >= 2, expected  # not a vacuous comparison


@pytest.mark.parametrize("segment, treated_as", [("liver", "vocabulary"), ("Segment_1", "generic"),
                                                 ("my lesion", "unknown")])
def test_slicer_deepgrow_clicks_and_roi(slicer, info, studies, segment, treated_as):
    model = slicer_models(info, "deepgrow", "deepedit")[0]
    clicks = {"foreground": [[60, 50, 15]], "background": [[20, 20, 5]]}
    roi = [90, 30, 20, 80, 25, 5]  # Slicer's [i0, i1, j0, j1, k0, k1], pairs as they come out of RAS->IJK
    params = {"label": segment, **clicks, **slicer_config(info, "models", model), "roi": roi}
    result_file, result = slicer_infer(slicer, model, "ct_a", params)
    imported = slicer_import(result_file, [segment], segments=[segment])
    assert result["name_treated_as"] == treated_as
    text = ["liver"] if treated_as == "vocabulary" else []
    assert result["name_used"] == (text[0] if text else None)
    assert result["name_ignored"] == (None if text else segment)
    assert bool(result["warnings"]) == (treated_as == "unknown")
    assert result["prompts"]["box"] == [30, 20, 5, 90, 80, 25]
    expected = meant_object(slicer, "ct_a", texts=text, points=clicks["foreground"] + clicks["background"],
                            point_labels=[1, 0], box=[30, 20, 5, 90, 80, 25])
    assert imported == {segment: expected}
    assert expected > 0
    label_image, _ = read_itk(result_file)
    assert same_geometry(label_image, sitk.ReadImage(str(studies / "ct_a.nii.gz")))


def test_slicer_deepgrow_own_name_as_free_text_when_asked(slicer, info):
    model = slicer_models(info, "deepgrow", "deepedit")[0]
    config = slicer_config(info, "models", model)
    assert config["free_text"] is False  # the Options checkbox; --conf segment_name_free_text sets its default
    params = {**config, "free_text": True, "label": "my lesion", "foreground": [[60, 50, 15]], "background": []}
    _, result = slicer_infer(slicer, model, "ct_a", params)
    assert result["name_used"] == "my lesion" and result["name_treated_as"] == "free text"
    assert result["label_names"] == {"my lesion": 1} and result["warnings"] == []
    vocabulary_size = len(slicer.info()["models"]["segvol"]["labels"])
    assert vocabulary_size == len(info["models"]["segvol"]["labels"])  # free text did not grow the vocabulary


def test_slicer_deepgrow_own_name_without_clicks_is_a_clear_4xx(slicer, info):
    model = slicer_models(info, "deepgrow", "deepedit")[0]
    params = {**slicer_config(info, "models", model), "label": "my lesion", "foreground": [], "background": []}
    with pytest.raises(Exception) as error:
        slicer_infer(slicer, model, "ct_a", params)
    message = getattr(error.value, "msg", str(error.value))  # what Slicer's error dialog shows
    assert "Status: 422" in message and "my lesion" in message and "no click or ROI" in message


def _scribbles_file(studies: Path, folder: Path, segments: List[str]) -> tuple:
    """Slicer's export of all segments to a labelmap on the image grid: value = position + 1."""
    image = nib.load(str(studies / "ct_a.nii.gz"))
    label = np.zeros(image.shape, dtype=np.uint8)
    ids = {name: n for n, name in enumerate(segments, 1)}
    label[55:65, 45:55, 14:16] = ids["foreground_scribbles"]
    label[15:25, 15:25, 4:6] = ids["background_scribbles"]
    label[80:85, 60:65, 20:22] = ids["liver"]  # an ordinary segment: not a scribble
    path = folder / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(label, image.affine), path)
    return path, label, ids


@pytest.mark.parametrize("method", ["fh", "segvol"])
def test_slicer_scribbles_with_label_info(slicer, info, studies, tmp_path, method):
    model = slicer_models(info, "scribbles")[0]
    segments = ["liver", "my lesion", "background_scribbles", "foreground_scribbles"]  # scribble layers come last
    path, label, ids = _scribbles_file(studies, tmp_path, segments)
    params = {**slicer_config(info, "models", model), "method": method, "roi": [],
              "label_info": [{"name": name, "id": n} for name, n in ids.items()],
              "selected_label_name": "my lesion"}
    result_file, result = slicer_infer(slicer, model, "ct_a", params, label_in=str(path))
    imported = slicer_import(result_file, ["my lesion"], segments=segments)
    _, array = read_itk(result_file)
    assert result["label_names"] == {"my lesion": 1}
    assert imported == {"my lesion": int((array == 1).sum())} and set(np.unique(array)) <= {0, 1}
    assert array[label == ids["foreground_scribbles"]].all()  # the strokes are in
    assert not array[label == ids["background_scribbles"]].any()
    assert result["foreground_voxels"] == int((label == ids["foreground_scribbles"]).sum())
    if method == "segvol":
        assert result["name_ignored"] == "my lesion" and result["warnings"]


def test_slicer_next_sample_submit_label_and_training(slicer, info, studies, tmp_path):
    strategy = list(info["strategies"])[0]
    sample = slicer.next_sample(strategy, slicer_config(info, "strategies", strategy))
    assert sample["id"] in ("ct_a", "ct_b") and os.path.exists(sample["path"])

    # Submit Label: the labelmap of the non-scribble segments, label_info names in segment order
    image = nib.load(str(studies / f"{sample['id']}.nii.gz"))
    label = np.zeros(image.shape, dtype=np.uint8)
    label[40:70, 30:60, 10:20] = 1
    label[75:90, 55:70, 12:18] = 2
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, image.affine), path)
    saved = slicer.save_label(sample["id"], str(path),
                              params={"label_info": [{"name": "liver", "idx": 1}, {"name": "left rib 1", "idx": 2}],
                                      "model": "segvol_auto"})
    assert saved["image"] == sample["id"]
    datastore = slicer.datastore()
    assert "final" in datastore["objects"][sample["id"]]["labels"]
    other = ({"ct_a", "ct_b"} - {sample["id"]}).pop()
    for name in ("first", "random", strategy):
        assert slicer.next_sample(name, {})["id"] == other  # a labelled image is never the next sample

    with pytest.raises(Exception) as error:
        slicer.next_sample("no_such_strategy", {})
    message = getattr(error.value, "msg", str(error.value))
    assert "Status: 404" in message and "random_fg" in message

    trainer = list(info["trainers"])[0]
    started = slicer.train_start(trainer, {**slicer_config(info, "trainers", trainer), "max_epochs": 1})
    assert started["status"] in ("SUBMITTED", "RUNNING") and started["id"]
    status = slicer.train_status(False)
    assert status["id"] == started["id"]
    slicer.train_stop()
    deadline = time.time() + 60
    while slicer.train_status(True) and time.time() < deadline:
        time.sleep(1)
    assert not slicer.train_status(True)  # Slicer's monitor sees no run going any more


# ---- tests: OHIF ---------------------------------------------------------------------------------------------------

def test_ohif_segments_fit_a_uint8_labelmap(info):
    assert len(OhifInfo(info).segments) <= 255


def test_ohif_class_prompt_presets_tick_every_structure_we_have(info):
    ohif = OhifInfo(info)
    vocabulary = Vocabulary.load()
    for group, names in ohif_presets().items():
        ticked = [n for n in names if ohif.label_to_idx["segvol"].get(n)]
        ours = [n for n in names if n in vocabulary]
        assert ticked == ours == names, (group, sorted(set(names) - set(ticked)))
        for name in ticked:  # each ticked name sends an index the server maps back to that structure
            assert vocabulary.by_index(ohif.label_to_idx["segvol"][name]).name == vocabulary.resolve(name)
        # segvol_auto ticks the names its structures are served by (no misspelling aliases: values are positions)
        auto = [n for n in names if ohif.label_to_idx["segvol_auto"].get(n)]
        auto_texts = {vocabulary.resolve(a) for a in info["models"]["segvol_auto"]["labels"]}
        assert auto == [n for n in names if vocabulary.resolve(n) in auto_texts and vocabulary.served_name(n) == n]


@pytest.mark.parametrize("model", ["segvol_auto", "segvol"])
def test_ohif_auto_segmentation(server, slicer, info, tmp_path, model):
    ohif = OhifInfo(info)
    params = {}
    if info["models"][model]["type"] == "vista3d":  # AutoSegmentation.tsx: every index but a few body parts
        excluded = [ohif.label_to_idx[model].get(n) for n in ("kidney", "lung", "bone", "lung tumor", "uterus",
                                                                "postcava")]
        params["label_prompt"] = [v for v in ohif.indices[model] if v not in excluded]
    content = ohif_infer(server, model, "ct_a", params)
    imported = ohif_parse(content, ohif, model, ohif.names[model], tmp_path)
    auto_names = list(info["models"]["segvol_auto"]["labels"])
    expected = meant(slicer, "ct_a", [Vocabulary.load().resolve(n) for n in auto_names])
    assert {n: imported[n] for n in expected} == expected
    assert sum(imported.values()) == sum(expected.values())  # nothing lands in another segment
    assert sum(1 for count in expected.values() if count) >= 2, expected


@pytest.mark.parametrize("model", ["segvol", "segvol_auto"])
def test_ohif_class_prompts(server, slicer, info, tmp_path, model):
    ohif = OhifInfo(info)
    presets = ohif_presets()
    wanted = ["liver", "spleen", "left kidney", "dudenum", "esphagus"] + presets["Lungs"][:2]
    ticked = [n for n in wanted if ohif.label_to_idx[model].get(n)]
    assert len(ticked) >= 3
    content = ohif_infer(server, model, "ct_a", {"label_prompt": [ohif.label_to_idx[model][n] for n in ticked]})
    imported = ohif_parse(content, ohif, model, ticked, tmp_path)
    vocabulary = Vocabulary.load()
    expected = meant(slicer, "ct_a", [vocabulary.resolve(n) for n in ticked])
    assert imported == {n: expected[vocabulary.served_name(vocabulary.resolve(n))] for n in ticked}
    assert sum(1 for count in expected.values() if count) >= 2, expected


@pytest.mark.parametrize("model", ["segvol", "segvol_interactive"])
def test_ohif_point_prompts(server, slicer, info, tmp_path, model):
    ohif = OhifInfo(info)
    foreground, background = [[60, 50, 15], [62, 52, 15]], [[20, 20, 5]]
    current = "liver"
    if info["models"][model]["type"] == "vista3d":
        params = {"points": foreground + background, "point_labels": [1, 1, 0],
                  "label_prompt": [ohif.label_to_idx[model][current]]}
        texts = ["liver"]
    else:  # deepgrow: class-agnostic, imported into the current label
        params = {"foreground": foreground, "background": background}
        texts = []
    content = ohif_infer(server, model, "ct_a", params)
    imported = ohif_parse(content, ohif, model, [current], tmp_path, class_unknown=model == "segvol_interactive")
    expected = meant_object(slicer, "ct_a", texts=texts, points=foreground + background, point_labels=[1, 1, 0])
    assert imported == {current: expected} and expected > 0


def test_ohif_next_sample_posts_random(server):
    response = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json().get("id") in ("ct_a", "ct_b")
    response = requests.post(f"{server.url}/activelearning/nope", json={}, timeout=60)
    assert response.status_code == 404 and "random" in response.json()["detail"]


# ---- free text: a label of one request, never of the served vocabulary ---------------------------------------------

def test_free_text_names_are_per_request_labels(server, info):
    before = requests.get(f"{server.url}/info/", timeout=30).json()
    first = 1 + max(info["models"]["segvol"]["labels"][n] for n in info["labels"])
    for batch in range(3):  # 36 free-text names in all: more than a uint8 label has room for beside the vocabulary
        names = [f"lesion {batch}-{n}" for n in range(12)]
        response = server.infer("segvol", "ct_a", {"texts": ["liver", *names], "free_text": True}, output="json")
        assert response.status_code == 200, (batch, response.text)
        assert response.json()["label_names"] == {"liver": 1, **{name: first + n for n, name in enumerate(names)}}
    after = requests.get(f"{server.url}/info/", timeout=30).json()
    assert after["labels"] == before["labels"]
    assert after["models"]["segvol"]["labels"] == before["models"]["segvol"]["labels"]
