"""Next-sample strategies, their scoring methods, and the scribbles task (FH supervoxels and SegVol prompts)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from _server import APP, Server
from conftest import DATA, require

import segvol
from segvol.config import SMALL

sys.path.insert(0, str(APP))  # the app's own `lib` package, as MONAI Label imports it
from lib.activelearning import (  # noqa: E402
    ClassEntropyStrategy,
    DisagreementStrategy,
    FHNoveltyStrategy,
    RandomForegroundStrategy,
)
from lib.infers.segvol_scribbles import scribble_ids, spread_points  # noqa: E402
from lib.scoring import ClassEntropyScoring, DisagreementScoring, FHNoveltyScoring, ForegroundScoring  # noqa: E402
from lib.scoring.class_entropy import exploration_noise, mean_entropy, stratified_scores  # noqa: E402
from lib.scoring.structures import structure_names  # noqa: E402
from lib.service import SegVolService  # noqa: E402


def phantom(shape=(48, 40, 24), body=0.5, seed=0, organ_hu=60.0):
    """A CT-like volume: air around an ellipsoidal body of soft tissue holding a brighter organ."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[radius < body * 1.6] = 0.0
    volume[np.sqrt(((grid - 0.15) ** 2).sum(0)) < body * 0.5] = organ_hu
    return (volume + rng.normal(0, 5, shape)).astype(np.int16)


def save(path: Path, array: np.ndarray, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), str(path))


@pytest.fixture()
def datastore(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    for index, body in enumerate([0.2, 0.35, 0.5, 0.6]):
        save(tmp_path / f"img{index}.nii.gz", phantom(body=body, seed=index))
    store = LocalDatastore(str(tmp_path), extensions=("*.nii.gz",))
    label = tmp_path / "lab.nii.gz"
    save(label, (phantom(body=0.6, seed=3) > 30).astype(np.uint8))
    store.save_label("img3", str(label), "final", {})
    return store


def test_strategies_never_return_a_labelled_image(datastore):
    ForegroundScoring()({}, datastore)
    FHNoveltyScoring()({}, datastore)
    for image_id in datastore.get_unlabeled_images():
        datastore.update_image_info(image_id, {"segvol_disagreement": 0.1})
    datastore.update_image_info("img3", {"segvol_disagreement": 0.99, "fh_novelty": 9.0, "fg_fraction": 1.0})
    strategies = [RandomForegroundStrategy(), DisagreementStrategy(), FHNoveltyStrategy()]
    for strategy in strategies:
        for seed in range(20):
            chosen = strategy({"strategy": "x", "seed": seed}, datastore)
            assert chosen["id"] in {"img0", "img1", "img2"}, (strategy, chosen)


def test_strategies_follow_their_scores(datastore):
    datastore.update_image_info("img0", {"segvol_disagreement": 0.2, "fh_novelty": 0.1})
    datastore.update_image_info("img1", {"segvol_disagreement": 0.7, "fh_novelty": 0.3})
    datastore.update_image_info("img2", {"segvol_disagreement": 0.4, "fh_novelty": 0.9})
    assert DisagreementStrategy()({"strategy": "d"}, datastore)["id"] == "img1"
    assert FHNoveltyStrategy()({"strategy": "f"}, datastore)["id"] == "img2"
    datastore.update_image_info("img0", {"segvol_disagreement": 0.95, "fh_novelty": 2.0})
    assert DisagreementStrategy()({"strategy": "d"}, datastore)["id"] == "img0"
    assert FHNoveltyStrategy()({"strategy": "f"}, datastore)["id"] == "img0"


def test_random_fg_prefers_body_and_changes_with_scores(datastore):
    for image_id, fraction in (("img0", 0.01), ("img1", 0.01), ("img2", 0.9)):
        datastore.update_image_info(image_id, {"fg_fraction": fraction})
    picks = [RandomForegroundStrategy()({"strategy": "r", "seed": s}, datastore)["id"] for s in range(200)]
    assert picks.count("img2") > 150
    datastore.update_image_info("img2", {"fg_fraction": 0.0001})
    datastore.update_image_info("img0", {"fg_fraction": 0.9})
    picks = [RandomForegroundStrategy()({"strategy": "r", "seed": s}, datastore)["id"] for s in range(200)]
    assert picks.count("img0") > 150


def test_foreground_scoring_measures_the_body(datastore):
    result = ForegroundScoring()({}, datastore)
    assert result["scored"] == 4
    fractions = [datastore.get_image_info(f"img{i}")["fg_fraction"] for i in range(4)]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    assert ForegroundScoring()({}, datastore)["up_to_date"] == 4  # scores are kept until forced


def test_fh_novelty_is_zero_for_a_labelled_twin_and_high_for_an_outlier(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    save(tmp_path / "a.nii.gz", phantom(body=0.5, seed=1))
    save(tmp_path / "twin.nii.gz", phantom(body=0.5, seed=1))
    save(tmp_path / "odd.nii.gz", np.where(phantom(body=0.3, seed=2) > -500, 900, -1000).astype(np.int16))
    store = LocalDatastore(str(tmp_path), extensions=("*.nii.gz",))
    label = tmp_path / "lab.nii.gz"
    save(label, np.zeros((48, 40, 24), np.uint8))
    store.save_label("a", str(label), "final", {})
    FHNoveltyScoring()({}, store)
    assert store.get_image_info("twin")["fh_novelty"] == pytest.approx(0.0, abs=1e-6)
    assert store.get_image_info("odd")["fh_novelty"] > 0.1
    assert FHNoveltyStrategy()({"strategy": "f"}, store)["id"] == "odd"


def test_scoring_survives_images_removed_and_added_while_it_runs(datastore, tmp_path):
    class Disruptive(ForegroundScoring):
        def score(self, image_id, path):
            if image_id == "img0":
                datastore.remove_image("img1")  # another user deletes an image mid-run
                (tmp_path / "incoming").mkdir(exist_ok=True)
                save(tmp_path / "incoming" / "late.nii.gz", phantom(seed=9))
                datastore.add_image("late", str(tmp_path / "incoming" / "late.nii.gz"), {})
            return super().score(image_id, path)

    result = Disruptive()({}, datastore)
    assert "img1" not in datastore.list_images()
    assert result["scored"] >= 3
    assert "fg_fraction" not in (datastore.get_image_info("late") or {})  # scored on the next run
    ForegroundScoring()({}, datastore)
    assert "fg_fraction" in datastore.get_image_info("late")


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    segvol.save_checkpoint(str(folder / "segvol_label.pt"), segvol.SegVol(SMALL))
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


def test_disagreement_scoring_with_a_model(datastore, small_weights):
    service = SegVolService(str(small_weights), device="cpu")
    scoring = DisagreementScoring(service, fallback=["liver", "spleen"])
    result = scoring({}, datastore)
    assert result["scored"] == 3  # the labelled image is not scored
    assert 0 < result["seconds_per_image"] <= result["seconds"]  # what a pass costs per image
    assert result["structures"] == ["liver", "spleen"]  # the final label names none: the configured ones
    scores = [datastore.get_image_info(f"img{i}")["segvol_disagreement"] for i in range(3)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scoring({}, datastore)["up_to_date"] == 3  # same checkpoint: nothing recomputed
    missing = DisagreementScoring(SegVolService(str(small_weights / "nope"), device="cpu"))({}, datastore)
    assert "not available" in missing["error"]


def test_scoring_prompts_the_structures_the_datastore_labels_name(datastore, tmp_path, small_weights):
    from segvol.vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    assert structure_names(datastore, vocabulary, ["liver"]) == ["liver"]  # no label names yet: the fallback
    label = tmp_path / "hn.nii.gz"
    save(label, (phantom(body=0.6, seed=2) > 30).astype(np.uint8))
    datastore.save_label("img2", str(label), "final", {"label_info": [{"name": "Parotid Left", "idx": 1},
                                                                       {"name": "my gland", "idx": 2}]})
    datastore.update_label_info("img3", "final", {"label_info": [{"name": "parotid left", "idx": 1}]})
    names = structure_names(datastore, vocabulary, ["liver"])
    parotid = vocabulary.find("parotid left").name
    assert names == [parotid, "my gland"]  # the most named first, vocabulary spellings resolved, free text kept
    service = SegVolService(str(small_weights), device="cpu")
    scoring = ClassEntropyScoring(service, fallback=["liver"])
    result = scoring({}, datastore)
    assert result["structures"] == names and result["scored"] == 2  # two images are labelled now
    info = datastore.get_image_info("img0")
    assert set(info["class_entropy"]) == set(names) and all(0 <= v <= 1 for v in info["class_entropy"].values())
    assert scoring({}, datastore)["up_to_date"] == 2
    chosen = ClassEntropyStrategy()({}, datastore)
    assert chosen["id"] in {"img0", "img1"} and chosen["scored"] and chosen["labelled"] == 2


def test_class_stratified_scores_on_synthetic_probability_maps():
    certain = np.where(np.arange(1000) < 500, 0.99, 0.01).reshape(10, 10, 10)
    unsure = np.full((10, 10, 10), 0.5)
    assert mean_entropy(certain) < 0.1 and abs(mean_entropy(unsure) - 1.0) < 1e-9
    assert mean_entropy(np.zeros((4, 4, 4))) == 0.0  # nothing reached: no uncertainty counted
    # image a: unsure about the large liver, sure about the small gland; b: a little surer about the liver but unsure
    # about the gland. Entropy summed over voxels picks a (the liver is large); per structure, each weighs the same.
    per_image = {"a": {"liver": 0.50, "gland": 0.10}, "b": {"liver": 0.48, "gland": 0.60},
                 "c": {"liver": 0.10, "gland": 0.05}}
    voxels = {"liver": 20000, "gland": 50}
    summed = {image: sum(voxels[k] * v for k, v in scores.items()) for image, scores in per_image.items()}
    assert max(summed, key=summed.get) == "a"
    scores = stratified_scores(per_image)
    assert max(scores, key=scores.get) == "b" and min(scores, key=scores.get) == "c"
    assert stratified_scores({"x": {"liver": 0.3}}) == {"x": 0.0}  # one candidate: nothing to rank against
    # the exploration noise fades as labels arrive
    import random

    early = [exploration_noise(0, rng=random.Random(seed)) for seed in range(200)]
    late = [exploration_noise(15, rng=random.Random(seed)) for seed in range(200)]
    assert np.std(early) > 10 * np.std(late) and np.std(late) < 0.02


def test_scribble_helpers():
    assert scribble_ids([{"name": "liver", "id": 1}, {"name": "foreground_scribbles", "id": 5},
                         {"name": "background_scribbles", "id": 4}]) == {"background_scribbles": 4,
                                                                         "foreground_scribbles": 5}
    assert scribble_ids(None) == {"background_scribbles": 2, "foreground_scribbles": 3}
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 5, 5] = True
    points = spread_points(mask, 3)
    assert points == [(2, 5, 5), (4, 5, 5), (7, 5, 5)]  # first, middle and last voxel of the stroke


# --- through the real server, as 3D Slicer sends scribbles ------------------------------------------------------


@pytest.fixture(scope="module")
def scribble_server(tmp_path_factory, small_weights):
    studies = tmp_path_factory.mktemp("scribble_studies")
    save(studies / "phantom.nii.gz", phantom(shape=(64, 64, 32), body=0.5))
    ct = DATA / "totalseg-example" / "example_ct.nii.gz"
    if ct.exists():
        shutil.copy(ct, studies / "example_ct.nii.gz")
    log = tmp_path_factory.mktemp("scribble_logs") / "server.log"
    server = Server(studies, {"weights": str(small_weights), "device": "cpu", "auto_scoring": ""}, log).wait()
    yield server, studies
    server.stop()


def _slicer_scribbles(server, image, scribbles: np.ndarray, affine, tmp_path, params, output="image"):
    path = tmp_path / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(scribbles.astype(np.uint8), affine), str(path))
    label_info = [{"name": "organ", "id": 1}, {"name": "background_scribbles", "id": 2},
                  {"name": "foreground_scribbles", "id": 3}]
    body = {"label_info": label_info, "selected_label_name": "organ", "result_extension": ".nii.gz",
            "result_dtype": "uint8", **params}
    with open(path, "rb") as handle:
        response = server.infer("segvol_scribbles", image, body, output=output,
                                files={"label": ("scribbles.nii.gz", handle)})
    return response


def test_scribbles_select_fh_supervoxels(scribble_server, tmp_path):
    server, studies = scribble_server
    image = nib.load(str(studies / "phantom.nii.gz"))
    volume = np.asarray(image.dataobj)
    organ = volume > 30
    scribbles = np.zeros(volume.shape, np.uint8)
    centre = np.round(np.argwhere(organ).mean(0)).astype(int)
    scribbles[centre[0] - 3:centre[0] + 3, centre[1], centre[2]] = 3  # foreground stroke inside the organ
    scribbles[5:20, 5, 5] = 2  # background stroke in the air
    started = time.perf_counter()
    response = _slicer_scribbles(server, "phantom", scribbles, image.affine, tmp_path, {})
    assert response.status_code == 200, response.text
    (tmp_path / "out.nii.gz").write_bytes(response.content)
    result = nib.load(str(tmp_path / "out.nii.gz"))
    label = np.asarray(result.dataobj)
    assert label.shape == volume.shape and np.allclose(result.affine, image.affine)
    assert label[scribbles == 3].all() and not label[scribbles == 2].any()
    dice = 2 * (label.astype(bool) & organ).sum() / (label.astype(bool).sum() + organ.sum())
    assert dice > 0.8, dice
    assert time.perf_counter() - started < 60


def test_scribbles_as_segvol_prompts(scribble_server, tmp_path):
    server, studies = scribble_server
    image = nib.load(str(studies / "phantom.nii.gz"))
    scribbles = np.zeros(image.shape, np.uint8)
    scribbles[30:36, 38, 20] = 3
    scribbles[2:6, 2, 2] = 2
    response = _slicer_scribbles(server, "phantom", scribbles, image.affine, tmp_path, {"method": "segvol"})
    assert response.status_code == 200, response.text
    (tmp_path / "out.nii.gz").write_bytes(response.content)
    label = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert label[scribbles == 3].all() and not label[scribbles == 2].any()
    # A known segment name becomes the text prompt; the strokes become points and the box.
    response = _slicer_scribbles(server, "phantom", scribbles, image.affine, tmp_path,
                                 {"method": "segvol", "selected_label_name": "Liver"}, output="json")
    assert response.status_code == 200, response.text
    prompts = response.json()["prompts"]
    assert prompts["text"] == "liver" and prompts["box"] == [30, 38, 20, 35, 38, 20]
    assert [1, 0] == sorted({p[3] for p in prompts["points"]}, reverse=True)


def test_scribbles_bad_requests(scribble_server, tmp_path):
    server, studies = scribble_server
    image = nib.load(str(studies / "phantom.nii.gz"))
    empty = np.zeros(image.shape, np.uint8)
    response = _slicer_scribbles(server, "phantom", empty, image.affine, tmp_path, {})
    assert response.status_code == 422 and "no foreground scribble" in response.json()["detail"]
    wrong = np.zeros((5, 5, 5), np.uint8)
    response = _slicer_scribbles(server, "phantom", wrong, image.affine, tmp_path, {})
    assert response.status_code == 422 and "does not match" in response.json()["detail"]
    response = server.infer("segvol_scribbles", "phantom", {}, output="json")
    assert response.status_code == 422 and "scribbles missing" in response.json()["detail"]


def test_scribbles_on_real_ct_answer_in_seconds(scribble_server, tmp_path):
    server, studies = scribble_server
    path = require(studies / "example_ct.nii.gz", "sample CT")
    image = nib.load(str(path))
    scribbles = np.zeros(image.shape, np.uint8)
    scribbles[55:65, 45, 50] = 3
    scribbles[10:20, 10, 50] = 2
    started = time.perf_counter()
    response = _slicer_scribbles(server, "example_ct", scribbles, image.affine, tmp_path, {})
    assert response.status_code == 200, response.text
    assert time.perf_counter() - started < 30


def test_strategies_and_scoring_through_the_server(scribble_server):
    server, _ = scribble_server
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert list(info["strategies"])[:3] == ["random_fg", "disagreement", "fh_novelty"]
    assert {"fg_fraction", "segvol_disagreement", "fh_novelty"} <= set(info["scoring"])
    assert info["models"]["segvol_scribbles"]["type"] == "scribbles"
    response = requests.post(f"{server.url}/scoring/fh_novelty", params={"run_sync": "true"}, json={}, timeout=300)
    assert response.status_code == 200, response.text
    chosen = requests.post(f"{server.url}/activelearning/fh_novelty", json={}, timeout=60).json()
    assert chosen["id"] in {"phantom", "example_ct"} and "fh_novelty" in chosen
    chosen = requests.post(f"{server.url}/activelearning/random_fg", json={}, timeout=60).json()
    assert chosen["id"] in {"phantom", "example_ct"}


def test_the_docs_document_every_strategy():
    curation = (Path(__file__).resolve().parents[1] / "docs" / "curation.md").read_text()
    for name in ("random_fg", "disagreement", "fh_novelty", "class_entropy", "random", "first", "segvol_scribbles"):
        assert f"`{name}`" in curation
