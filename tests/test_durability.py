"""The durable datastore (``apps/segvol/lib/datastore.py``): atomic writes, an index rebuilt with label info from the
sidecars, temp clean-up and quarantine at start, concurrent writers, and upload checks; then fault injection through
the real server: SIGKILL at chosen points of label saves, image uploads and index writes (the ``SEGVOL_FAULT_DIR``
hook), at random times of a burst of saves, and while a scoring-like process writes the index; after each restart
every acknowledged label is byte-intact and listed with its label info, and nothing partial is listed.

No weights and no ../shared data are needed: the datastore endpoints work without a model.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from _server import APP, ROOT, Server

sys.path.insert(0, str(APP))  # the app's own `lib` package, as MONAI Label imports it
from lib.datastore import SegVolDatastore, atomic_write, is_temp_name  # noqa: E402
from lib.validation import UnsafeNameError  # noqa: E402
from segvol.errors import BadImageError  # noqa: E402

SHAPE = (24, 20, 12)
EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd"]


# ------------------------------------------------------------------------------------------------------- helpers
def write_volume(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


def image_array(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


def label_bytes(version: int, folder: Path, shape=SHAPE) -> bytes:
    """A distinct label file (uint8, values 0..3 plus the version in one voxel) as NIfTI bytes."""
    array = np.random.default_rng(version).integers(0, 4, shape).astype(np.uint8)
    array[0, 0, 0] = version % 250
    path = folder / f"label_v{version}.nii.gz"
    write_volume(path, array)
    return path.read_bytes()


def temp_files(folder: Path):
    return [str(p) for p in folder.rglob("*") if is_temp_name(p.name)]


def open_store(folder: Path) -> SegVolDatastore:
    return SegVolDatastore(str(folder), extensions=EXTENSIONS)


@pytest.fixture()
def store_dir(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for index in range(3):
        write_volume(folder / f"img{index}.nii.gz", image_array(index))
    return folder


def save(store, folder: Path, image: str, version: int, tag: str = "final"):
    source = folder.parent / f"upload_{image}_{version}.nii.gz"
    source.write_bytes(label_bytes(version, folder.parent))
    store.save_label(image, str(source), tag, {"label_info": [{"name": "liver", "idx": 1}], "version": version})
    return source.read_bytes()


# ---------------------------------------------------------------------------------------------------- unit level
def test_saves_are_complete_files_with_sidecars_and_no_temp_left(store_dir):
    store = open_store(store_dir)
    content = save(store, store_dir, "img0", 1)
    path = Path(store.get_label_uri("img0", "final"))
    assert path.read_bytes() == content
    sidecar = json.loads((store_dir / "labels" / "final" / ".meta" / "img0.json").read_text())
    assert sidecar["info"]["version"] == 1 and sidecar["size"] == len(content)
    assert sidecar["mtime_ns"] == path.stat().st_mtime_ns
    index = json.loads((store_dir / "datastore_v2.json").read_text())
    assert index["objects"]["img0"]["labels"]["final"]["info"]["version"] == 1
    assert temp_files(store_dir) == []


def test_a_write_that_fails_before_the_rename_keeps_the_previous_file(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"previous")

    def fail(_stat):
        raise RuntimeError("crash before rename")

    with pytest.raises(RuntimeError):
        atomic_write(str(dest), b"new content", "test", before_rename=fail)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write(str(dest), b"new content", "test")
    assert dest.read_bytes() == b"new content" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.mark.parametrize("damage", ["empty", "garbled", "truncated", "missing", "wrong-shape"])
def test_a_damaged_index_is_rebuilt_with_label_info_from_the_sidecars(store_dir, damage):
    store = open_store(store_dir)
    final = save(store, store_dir, "img0", 3)
    save(store, store_dir, "img1", 4, tag="original")
    index = store_dir / "datastore_v2.json"
    text = index.read_text()
    {"empty": lambda: index.write_bytes(b""), "garbled": lambda: index.write_bytes(b"\x00\xff{not json"),
     "truncated": lambda: index.write_text(text[: len(text) // 2]), "missing": index.unlink,
     "wrong-shape": lambda: index.write_text('{"objects": []}')}[damage]()

    reopened = open_store(store_dir)
    assert sorted(reopened.list_images()) == ["img0", "img1", "img2"]
    assert reopened.get_label_info("img0", "final")["version"] == 3
    assert reopened.get_label_info("img0", "final")["label_info"] == [{"name": "liver", "idx": 1}]
    assert reopened.get_label_info("img1", "original")["version"] == 4
    assert Path(reopened.get_label_uri("img0", "final")).read_bytes() == final
    assert json.loads(index.read_text())["objects"]["img0"]["labels"]["final"]["info"]["version"] == 3
    kept = [p.name for p in store_dir.glob("datastore_v2.json.damaged-*")]
    assert len(kept) == (0 if damage == "missing" else 1)  # the damaged file is kept for inspection


def test_a_save_whose_index_write_was_lost_is_recovered_from_its_sidecar(store_dir):
    store = open_store(store_dir)
    save(store, store_dir, "img0", 1)
    index = store_dir / "datastore_v2.json"
    before = index.read_bytes()
    second = save(store, store_dir, "img0", 2)
    index.write_bytes(before)  # as if the process died after the rename, before the index write
    reopened = open_store(store_dir)
    assert reopened.get_label_info("img0", "final")["version"] == 2
    assert Path(reopened.get_label_uri("img0", "final")).read_bytes() == second


def test_a_sidecar_for_a_file_that_never_landed_gives_way_to_the_index(store_dir):
    store = open_store(store_dir)
    first = save(store, store_dir, "img0", 1)
    meta = store_dir / "labels" / "final" / ".meta" / "img0.json"
    record = json.loads(meta.read_text())
    record.update(size=record["size"] + 1, info={**record["info"], "version": 2})
    meta.write_text(json.dumps(record))  # sidecar written, then killed before the label's rename
    reopened = open_store(store_dir)
    assert reopened.get_label_info("img0", "final")["version"] == 1
    assert Path(reopened.get_label_uri("img0", "final")).read_bytes() == first
    assert json.loads(meta.read_text())["info"]["version"] == 1  # the sidecar describes the file again


def test_temp_files_are_removed_and_bad_labels_quarantined_at_start(store_dir):
    store = open_store(store_dir)
    good = save(store, store_dir, "img0", 1)
    final = store_dir / "labels" / "final"
    leftovers = [store_dir / ".img9.nii.gz.segvol-tmp-4242-0a1b2c3d", final / ".img0.nii.gz.segvol-tmp-1-ff",
                 final / ".meta" / ".img0.json.segvol-tmp-77-abcdef01",
                 store_dir / ".datastore_v2.json.segvol-tmp-5-00"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (store_dir / ".keep-me").write_bytes(b"not ours")
    (final / "img1.nii.gz").write_bytes(b"")  # a 0-byte label (left by a non-atomic writer)
    (store_dir / "labels" / "original").mkdir(exist_ok=True)
    (store_dir / "labels" / "original" / "img2.nii.gz").write_bytes(b"random bytes, not an image" * 20)
    truncated = label_bytes(7, store_dir.parent)
    (final / "img2.nii.gz").write_bytes(truncated[: len(truncated) // 2])  # valid header, cut gzip stream

    reopened = open_store(store_dir)
    assert not any(path.exists() for path in leftovers)
    assert (store_dir / ".keep-me").exists()
    assert reopened.get_labeled_images() == ["img0"]
    assert reopened.get_labels_by_image_id("img1") == {} and reopened.get_labels_by_image_id("img2") == {}
    assert Path(reopened.get_label_uri("img0", "final")).read_bytes() == good
    quarantined = sorted(p.name.split("-", 2)[-1] for p in (final / ".quarantine").iterdir())
    assert quarantined == ["img1.nii.gz", "img2.nii.gz"]
    assert [p.read_bytes() for p in (final / ".quarantine").iterdir() if p.name.endswith("img2.nii.gz")] == \
        [truncated[: len(truncated) // 2]]  # moved aside, not deleted
    assert len(list((store_dir / "labels" / "original" / ".quarantine").iterdir())) == 1


def test_two_datastores_on_one_folder_never_drop_each_others_updates(store_dir):
    server = open_store(store_dir)
    scoring = open_store(store_dir)  # MONAI Label's scoring subprocess: its own copy of the index, loaded now
    save(server, store_dir, "img0", 1)
    scoring.update_image_info("img1", {"fg_fraction": 0.5})  # used to write back its copy without img0's label
    server.update_label_info("img0", "final", {"reviewed": True})
    scoring.update_image_info("img2", {"fg_fraction": 0.7})
    save(scoring, store_dir, "img1", 2)
    server.update_image_info("img0", {"fh_novelty": 1.0})
    assert scoring.get_label_info("img0", "final")["reviewed"] is True  # reads see the other's writes

    fresh = open_store(store_dir)
    assert fresh.get_label_info("img0", "final")["version"] == 1
    assert fresh.get_label_info("img0", "final")["reviewed"] is True
    assert fresh.get_label_info("img1", "final")["version"] == 2
    assert fresh.get_image_info("img1")["fg_fraction"] == 0.5 and fresh.get_image_info("img2")["fg_fraction"] == 0.7
    assert fresh.get_image_info("img0")["fh_novelty"] == 1.0

    def hammer(store, key):
        for step in range(25):
            store.update_image_info(f"img{step % 3}", {f"{key}{step}": step})

    # the server's worker threads share one instance: two writers and a reader on it, plus the other process
    threads = [threading.Thread(target=hammer, args=(s, k)) for s, k in ((server, "a"), (scoring, "b"), (server, "c"))]
    errors, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                assert server.status()["total"] == 3 and len(server.json()["objects"]) == 3
                server.get_image_info("img1")
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert errors == []
    final = open_store(store_dir)
    for key in "abc":
        for step in range(25):
            assert final.get_image_info(f"img{step % 3}")[f"{key}{step}"] == step
    assert final.get_label_info("img0", "final")["reviewed"] is True


def test_unsafe_ids_and_tags_are_refused(store_dir, tmp_path):
    store = open_store(store_dir)
    label = tmp_path / "label.nii.gz"
    label.write_bytes(label_bytes(1, tmp_path))
    image = write_volume(tmp_path / "image.nii.gz", image_array(5))
    calls = [lambda: store.add_image("../escaped", str(image), {}),
             lambda: store.add_image("/tmp/abs", str(image), {}),
             lambda: store.save_label("img0", str(label), "../../escaped", {}),
             lambda: store.save_label("../img0", str(label), "final", {}),
             lambda: store.save_label("img0", str(label), None, {}),
             lambda: store.remove_image("../img0"),
             lambda: store.remove_label("img0", "../final"),
             lambda: store.get_image_uri("a\x00b"),
             lambda: store.get_label_uri("img0", "final/.."),
             lambda: store.update_image_info("../../x", {}),
             lambda: store.update_label_info("img0", "..", {})]
    for call in calls:
        with pytest.raises(UnsafeNameError) as error:
            call()
        assert error.value.http_status == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii.gz", "label.nii.gz", "label_v1.nii.gz",
                                                          "studies"]
    assert sorted(store.list_images()) == ["img0", "img1", "img2"] and store.get_labeled_images() == []


def test_ids_found_on_disk_stay_usable_even_when_new_ones_could_not_use_their_names(store_dir):
    write_volume(store_dir / "case (1).nii.gz", image_array(9))
    store = open_store(store_dir)
    assert "case (1)" in store.list_images()
    assert store.get_image_uri("case (1)").endswith("case (1).nii.gz")
    save(store, store_dir, "case (1)", 5)
    assert store.get_label_info("case (1)", "final")["version"] == 5


def test_a_resave_in_another_format_replaces_the_old_file(store_dir, tmp_path):
    store = open_store(store_dir)
    save(store, store_dir, "img0", 1)
    nrrd = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(SHAPE, np.uint8).transpose(2, 1, 0)), str(nrrd))
    store.save_label("img0", str(nrrd), "final", {"version": 2})
    final = store_dir / "labels" / "final"
    assert sorted(p.name for p in final.iterdir() if p.is_file()) == ["img0.nrrd"]
    reopened = open_store(store_dir)
    assert reopened.get_label_uri("img0", "final").endswith("img0.nrrd")
    assert reopened.get_label_info("img0", "final")["version"] == 2
    assert json.loads((final / ".meta" / "img0.json").read_text())["ext"] == ".nrrd"


def test_bad_uploads_are_refused_and_nothing_is_stored(store_dir, tmp_path):
    store = open_store(store_dir)
    images = {
        "2d.nii.gz": lambda p: write_volume(p, np.zeros((20, 20), np.int16)),
        "rgb.nii.gz": lambda p: write_volume(p, np.zeros((8, 8, 4, 3), np.int16)),
        "garbage.nii.gz": lambda p: p.write_bytes(b"\x00garbage" * 100),
        "empty.nii.gz": lambda p: p.write_bytes(b""),
        "cut.nii.gz": lambda p: p.write_bytes(gzip.compress(write_volume(tmp_path / "x.nii", image_array(1))
                                                            .read_bytes())[:3000]),
    }
    for name, make in images.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(BadImageError) as error:
            store.add_image(name.split(".")[0], str(path), {})
        assert error.value.http_status == 422, name
    labels = {
        "shape": write_volume(tmp_path / "shape.nii.gz", np.zeros((24, 20, 11), np.uint8)),
        "float": write_volume(tmp_path / "float.nii.gz", np.zeros(SHAPE, np.float32)),
        "2d": write_volume(tmp_path / "l2d.nii.gz", np.zeros((24, 20), np.uint8)),
        "bytes": tmp_path / "bytes.nii.gz",
        "cut": tmp_path / "lcut.nii.gz",
        "empty": tmp_path / "lempty.nii.gz",
    }
    labels["bytes"].write_bytes(os.urandom(4000))
    whole = label_bytes(3, tmp_path)
    labels["cut"].write_bytes(whole[: len(whole) - 40])
    labels["empty"].write_bytes(b"")
    for name, path in labels.items():
        with pytest.raises(BadImageError) as error:
            store.save_label("img0", str(path), "final", {})
        assert error.value.http_status == 422, name
        assert path.exists(), "the caller's file is left alone"
    assert sorted(store.list_images()) == ["img0", "img1", "img2"] and store.get_labeled_images() == []
    assert list((store_dir / "labels" / "final").glob("*.nii.gz")) == []
    assert temp_files(store_dir) == []
    # a good int16 label of the right shape, and an image in another format, are fine
    store.save_label("img0", str(write_volume(tmp_path / "ok.nii.gz", np.ones(SHAPE, np.int16))), "final", {})
    nrrd = tmp_path / "other.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(image_array(3).transpose(2, 1, 0)), str(nrrd))
    assert store.add_image("other", str(nrrd), {}) == "other" and store.get_image_uri("other").endswith(".nrrd")


def kill_child_at(folder: Path, faults: Path, point: str, operation) -> None:
    """Run ``operation(store)`` in a forked child with ``point`` armed and SIGKILL the child when it gets there."""
    hit = faults / f"{point}.hit"
    (faults / f"{point}.arm").touch()
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, no return
        code = 1
        try:
            os.environ["SEGVOL_FAULT_DIR"] = str(faults)
            operation(open_store(folder))
            code = 0
        finally:
            os._exit(code)
    deadline = time.time() + 60
    while not hit.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"the child exited ({status}) without reaching {point}"
        assert time.time() < deadline, f"fault point {point} was never reached"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    hit.unlink()


LABEL_POINTS = ["label-partial", "sidecar-partial", "sidecar-before-rename", "label-before-rename",
                "label-before-index", "index-partial", "index-before-rename"]
IMAGE_POINTS = ["image-partial", "image-before-rename", "image-before-index", "index-partial"]


@pytest.mark.parametrize("point", LABEL_POINTS)
def test_sigkill_at_each_point_of_a_label_resave_leaves_old_or_new(store_dir, tmp_path, point):
    store = open_store(store_dir)
    old = save(store, store_dir, "img0", 1)
    faults = tmp_path / "faults"
    faults.mkdir()
    new_source = tmp_path / "new.nii.gz"
    new_source.write_bytes(label_bytes(2, tmp_path))
    kill_child_at(store_dir, faults, point, lambda s: s.save_label("img0", str(new_source), "final", {"version": 2}))
    assert temp_files(store_dir) != [] or point.endswith("before-index")  # the kill left its temp file behind

    reopened = open_store(store_dir)
    assert temp_files(store_dir) == []
    content = Path(reopened.get_label_uri("img0", "final")).read_bytes()
    version = reopened.get_label_info("img0", "final")["version"]
    assert (content, version) in ((old, 1), (new_source.read_bytes(), 2)), point
    if point in ("label-partial", "sidecar-partial", "sidecar-before-rename", "label-before-rename"):
        assert version == 1  # nothing was renamed yet
    else:
        assert version == 2  # the file was in place: its sidecar completes the save


@pytest.mark.parametrize("point", IMAGE_POINTS)
def test_sigkill_at_each_point_of_an_image_upload_leaves_nothing_partial(store_dir, tmp_path, point):
    open_store(store_dir)  # the index exists: the child's first index write is the upload's
    faults = tmp_path / "faults"
    faults.mkdir()
    source = write_volume(tmp_path / "upload.nii.gz", image_array(77))
    kill_child_at(store_dir, faults, point, lambda s: s.add_image("new", str(source), {}))
    reopened = open_store(store_dir)
    assert temp_files(store_dir) == []
    if "new" in reopened.list_images():
        assert Path(reopened.get_image_uri("new")).read_bytes() == source.read_bytes()
    assert ("new" in reopened.list_images()) == (point in ("image-before-index", "index-partial"))
    assert sorted(set(reopened.list_images()) - {"new"}) == ["img0", "img1", "img2"]


# ------------------------------------------------------------------------------------- fault injection (server)
class Harness:
    """A real server on one datastore that the test kills with SIGKILL and restarts; it remembers every label save
    the server acknowledged (HTTP 200) and the one in flight."""

    def __init__(self, studies: Path, faults: Path, logs: Path, work: Path):
        self.studies, self.faults, self.logs, self.work = studies, faults, logs, work
        self.acked = {}     # (image, tag) -> (version, bytes) of the last acknowledged save
        self.inflight = {}  # (image, tag) -> (version, bytes) sent, not yet acknowledged
        self.version = 100
        self.starts = 0
        self.server = None

    def start(self):
        self.starts += 1
        old = os.environ.get("SEGVOL_FAULT_DIR")
        os.environ["SEGVOL_FAULT_DIR"] = str(self.faults)
        try:
            self.server = Server(self.studies, {"weights": str(self.work / "no-weights")},
                                 self.logs / f"server{self.starts}.log").wait(timeout=120)
        finally:
            if old is None:
                os.environ.pop("SEGVOL_FAULT_DIR", None)
            else:
                os.environ["SEGVOL_FAULT_DIR"] = old
        return self.server

    def kill(self):
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait(timeout=30)
        self.server._log_handle.close()

    def save_label(self, image: str, tag: str = "final", timeout: float = 60):
        self.version += 1
        version, content = self.version, label_bytes(self.version, self.work)
        self.inflight[(image, tag)] = (version, content)
        response = requests.put(f"{self.server.url}/datastore/label", params={"image": image, "tag": tag},
                                files={"label": ("label.nii.gz", content)},
                                data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}],
                                                            "version": version})}, timeout=timeout)
        if response.status_code == 200:
            self.acked[(image, tag)] = (version, content)
        self.inflight.pop((image, tag), None)
        return response

    def kill_at(self, point: str, action):
        """Arm ``point``, run ``action`` (which blocks in the server), SIGKILL the server there, restart it."""
        hit = self.faults / f"{point}.hit"
        hit.unlink(missing_ok=True)
        (self.faults / f"{point}.arm").touch()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(action)
            deadline = time.time() + 60
            while not hit.exists():
                assert time.time() < deadline, f"fault point {point} was never reached"
                assert not future.done() or future.exception() is None, future.exception()
                time.sleep(0.02)
            self.kill()
            try:
                future.result(timeout=60)
            except requests.RequestException:
                pass  # the connection died with the server: not acknowledged
        self.start()
        self.verify()

    def verify(self):
        """Every acknowledged label intact with its info; everything listed complete; no temp file left."""
        url = self.server.url
        assert temp_files(self.studies) == []
        index = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
        for (image, tag), (version, content) in self.acked.items():
            options = {version: content}
            if (image, tag) in self.inflight:
                options.update([self.inflight[(image, tag)]])
            assert tag in index["objects"][image]["labels"], f"acknowledged label {image}/{tag} is not listed"
            got = requests.get(f"{url}/datastore/label", params={"label": image, "tag": tag}, timeout=30)
            assert got.status_code == 200
            matches = [v for v, c in options.items() if c == got.content]
            assert matches, f"label {image}/{tag} is neither the acknowledged nor the in-flight version"
            info = requests.get(f"{url}/datastore/label/info", params={"label": image, "tag": tag}, timeout=30).json()
            assert info.get("version") == matches[0], f"label {image}/{tag}: info does not describe its file"
            assert info.get("label_info") == [{"name": "liver", "idx": 1}]
            self.acked[(image, tag)] = (matches[0], options[matches[0]])  # what the next checks hold it to
        self.inflight.clear()
        for image, obj in index["objects"].items():
            for tag in obj["labels"]:
                got = requests.get(f"{url}/datastore/label", params={"label": image, "tag": tag}, timeout=30)
                assert got.status_code == 200 and len(got.content) > 0
                path = self.work / "check.nii.gz"
                path.write_bytes(got.content)
                assert sitk.ReadImage(str(path)).GetSize() == SHAPE  # complete, decodable
            assert (self.studies / obj["image"]["info"]["name"]).stat().st_size > 0


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One datastore for the server tests below (each continues on what the previous left)."""
    tmp_path = tmp_path_factory.mktemp("durability")
    studies, faults, logs, work = (tmp_path / name for name in ("studies", "faults", "logs", "work"))
    for folder in (studies, faults, logs, work):
        folder.mkdir()
    for index in range(6):
        write_volume(studies / f"img{index}.nii.gz", image_array(index))
    instance = Harness(studies, faults, logs, work)
    instance.start()
    yield instance
    if instance.server.alive():
        instance.server.stop()


def upload_image(harness: Harness, image: str, content: bytes):
    return requests.put(f"{harness.server.url}/datastore/image", params={"image": image},
                        files={"file": (f"{image}.nii.gz", content)}, timeout=60)


def test_sigkill_at_every_write_point_keeps_acknowledged_labels_and_starts(harness):
    for image in ("img0", "img1", "img2"):
        assert harness.save_label(image).status_code == 200
    assert harness.save_label("img1", tag="original").status_code == 200
    harness.verify()

    # a new label: half written / complete but not renamed -> not listed after the restart
    harness.kill_at("label-partial", lambda: harness.save_label("img3"))
    assert requests.head(f"{harness.server.url}/datastore/label", params={"image": "img3", "tag": "final"},
                         timeout=10).status_code == 404
    # re-saves of an acknowledged label (every point is covered without the server above): the previous version,
    # or the new one with its own info
    for point in ("label-before-rename", "label-before-index"):
        harness.kill_at(point, lambda: harness.save_label("img0"))
    # the index write of an info update, cut half-way
    harness.kill_at("index-partial", lambda: requests.put(f"{harness.server.url}/datastore/image/info",
                                                          params={"image": "img2"}, data={"info": '{"x": 1}'},
                                                          timeout=60))
    # an image upload half written -> not listed
    upload = write_volume(harness.work / "new.nii.gz", image_array(42)).read_bytes()
    harness.kill_at("image-partial", lambda: upload_image(harness, "new_a", upload))
    assert "new_a" not in requests.get(f"{harness.server.url}/datastore/", params={"output": "all"},
                                       timeout=10).json()["objects"]
    # the server keeps working after all that
    assert upload_image(harness, "new_c", upload).status_code == 200
    assert harness.save_label("new_c").status_code == 200
    assert harness.save_label("img3").status_code == 200
    harness.verify()


def save_until(harness: Harness, stop: threading.Event) -> None:
    """Save labels round the images (some as ``original``) until ``stop`` or the server dies."""
    step = 0
    while not stop.is_set():
        try:
            harness.save_label(f"img{step % 6}", tag=("final", "original")[step % 7 == 3], timeout=20)
        except requests.RequestException:
            return
        step += 1


def test_sigkill_at_random_times_during_a_burst_of_saves(harness):
    rng = random.Random(12)
    for _ in range(2):
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(save_until, harness, stop)
            time.sleep(rng.uniform(0.3, 1.5))
            harness.kill()
            stop.set()
            future.result(timeout=60)
        harness.start()
        harness.verify()
    assert len(harness.acked) >= 6


SCORER = """
import json, os, sys, time
sys.path.insert(0, {app!r})
from lib.datastore import SegVolDatastore
store = SegVolDatastore({studies!r}, extensions={extensions!r})
acked = {{}}
step = 0
while True:
    image = "img%d" % (step % 6)
    store.update_image_info(image, {{"scorer": step}})
    acked[image] = step
    with open({out!r} + ".tmp", "w") as fp:
        json.dump(acked, fp)
    os.replace({out!r} + ".tmp", {out!r})
    step += 1
"""


def test_sigkill_while_a_scoring_process_writes_the_index(harness):
    """MONAI Label's scoring subprocess holds its own index copy and updates image info in a loop; labels the
    server saves meanwhile keep their info, live and after SIGKILL of both, and the scorer's acknowledged updates
    stay too."""
    out = harness.work / "scorer.json"
    script = harness.work / "scorer.py"
    script.write_text(SCORER.format(app=str(APP), studies=str(harness.studies), extensions=EXTENSIONS, out=str(out)))
    scorer = subprocess.Popen([sys.executable, str(script)], cwd=str(ROOT))
    try:
        deadline = time.time() + 90
        while not out.exists():
            assert scorer.poll() is None and time.time() < deadline, "the scoring-like process did not start"
            time.sleep(0.05)
        for step in range(8):  # saves interleaved with the scorer's index writes
            assert harness.save_label(f"img{step % 6}").status_code == 200
        assert requests.post(f"{harness.server.url}/scoring/fg_fraction", timeout=30).status_code == 200  # a real one
        time.sleep(0.5)  # the scorer writes its copy of the index many times meanwhile
        for (image, tag), (version, _) in harness.acked.items():
            info = requests.get(f"{harness.server.url}/datastore/label/info", params={"label": image, "tag": tag},
                                timeout=10).json()
            assert info.get("version") == version, f"label {image}/{tag} lost its info to the scorer's writes"
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(save_until, harness, stop)
            time.sleep(random.Random(7).uniform(0.3, 1.2))
            scorer.kill()
            harness.kill()
            stop.set()
            future.result(timeout=60)
    finally:
        if scorer.poll() is None:
            scorer.kill()
        scorer.wait()
    harness.start()
    harness.verify()
    for image, step in json.loads(out.read_text()).items():
        info = requests.get(f"{harness.server.url}/datastore/image/info", params={"image": image}, timeout=10).json()
        assert info.get("scorer", -1) >= step, f"the scorer's acknowledged update of {image} was lost"
