"""The server an operator can trust (issue: reliability): malformed requests are 4xx with a short message naming the
field and the server keeps serving; nothing outside the datastore is read, written or deleted; foreign web origins
are refused; a token is required when configured; ``/info``, the datastore and OHIF's files answer while inference
runs.

One real server (``apps/segvol/segvol_server.py``, as ``scripts/serve.sh`` starts it) with a small-configuration
checkpoint and the CLIP tokenizer, over a datastore holding a real CT; a second one with a token.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from _server import APP, Server, random_weights
from conftest import DATA, require

from segvol.config import SMALL

TRAVERSAL_TARGETS = ("../x", "../../x", "..", "a/b", "/tmp/x", "x\x00y", " x", "a\\..\\b")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder holding the datastore and, beside it, a file that must never be touched."""
    root = tmp_path_factory.mktemp("sandbox")
    studies = root / "studies"
    studies.mkdir()
    source = require(DATA / "totalseg-example" / "example_ct_sm.nii.gz", "sample CT")
    shutil.copy(source, studies / "ct.nii.gz")
    shutil.copy(source, studies / "ct_two.nii.gz")
    big = DATA / "totalseg-example" / "example_ct.nii.gz"
    if big.exists():
        shutil.copy(big, studies / "ct_big.nii.gz")
    (root / "outside.nii.gz").write_bytes(source.read_bytes())
    (root / "x").write_text("keep me")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("weights")
    return random_weights(folder, tokenizer_dir, SMALL)


@pytest.fixture(scope="module")
def server(sandbox, weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    instance = Server(sandbox / "studies", {"weights": str(weights), "device": "cpu", "max_points": "200"}, log).wait()
    yield instance
    instance.stop()


def _snapshot(root: Path):
    """Every file outside the datastore folder, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "studies" not in p.relative_to(root).parts}


def _label_bytes(sandbox: Path) -> bytes:
    return (sandbox / "studies" / "ct.nii.gz").read_bytes()


def _int_label(sandbox: Path, tmp_path: Path, shape=None, dtype=np.uint8, name: str = "label") -> Path:
    image = nib.load(str(sandbox / "studies" / "ct.nii.gz"))
    data = np.zeros(shape or image.shape, dtype=dtype)
    data[10:20, 10:20, 5:10] = 1
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return path


def _assert_4xx(response: requests.Response, *, field: str = ""):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    detail = response.json().get("detail")
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert 0 < len(text) < 2500, text[:300]
    if field:
        assert field in text, text


def _alive(server):
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


# ----------------------------------------------------------------------------------------------------------------------
# bad input: each one a 4xx naming what is wrong, and the server still serving
# ----------------------------------------------------------------------------------------------------------------------
INFER_CASES = [
    ("params not an object", "segvol", "ct", "[1, 2]", "image", "params"),
    ("params not JSON", "segvol", "ct", "{texts: liver", "image", "params"),
    ("infinite box", "segvol", "ct", '{"texts": ["liver"], "box": [1, 2, 3, Infinity, 5, 6]}', "image", "box"),
    ("NaN roi", "segvol_interactive", "ct", '{"label": "liver", "roi": [1, NaN, 2, 3, 4, 5]}', "image", "roi"),
    ("result_extension .exe", "segvol", "ct", '{"texts": ["liver"], "result_extension": ".exe"}', "image",
     "result_extension"),
    ("result_extension ..", "segvol", "ct", '{"texts": ["liver"], "result_extension": ".."}', "image",
     "result_extension"),
    ("result_extension .", "segvol", "ct", '{"texts": ["liver"], "result_extension": "."}', "image",
     "result_extension"),
    ("result_extension NUL", "segvol", "ct", '{"texts": ["liver"], "result_extension": ".nii\\u0000.gz"}', "image",
     "result_extension"),
    ("result_extension .png", "segvol", "ct", '{"texts": ["liver"], "result_extension": ".png"}', "image",
     "result_extension"),
    ("dicom_seg on a local datastore", "segvol", "ct", '{"texts": ["liver"], "label_info": [{"name": "liver"}]}',
     "dicom_seg", "dicom_seg"),
    ("label_prompt 1.5", "segvol", "ct", '{"label_prompt": [1.5]}', "image", "label_prompt"),
    ("label_prompt true", "segvol", "ct", '{"label_prompt": [true]}', "image", "label_prompt"),
    ("label_prompt a word", "segvol", "ct", '{"label_prompt": ["liver"]}', "image", "label_prompt"),
    ("too many points", "segvol", "ct",
     json.dumps({"points": [[1, 1, 1]] * 5_000, "point_labels": [1] * 5_000}), "image", "max_points"),
    ("100 000 points (over 1 MB)", "segvol", "ct",
     json.dumps({"points": [[1, 1, 1]] * 100_000, "point_labels": [1] * 100_000}), "image", "too large"),
    ("points not a list", "segvol_interactive", "ct", '{"foreground": 5}', "image", "foreground"),
    ("save_label not a flag", "segvol", "ct", '{"texts": ["liver"], "save_label": "maybe"}', "image", "save_label"),
    ("text over 77 tokens", "segvol", "ct", json.dumps({"texts": ["liver " * 90], "free_text": True}), "image",
     "77"),
    ("unknown model", "nope", "ct", "{}", "image", "nope"),
    ("unknown image", "segvol", "not_there", '{"texts": ["liver"]}', "image", "not_there"),
    ("no image at all", "segvol", "", '{"texts": ["liver"]}', "image", "image"),
    ("params.image names another image", "segvol", "ct", '{"texts": ["liver"], "image": "ct_two"}', "image",
     "params.image"),
]


@pytest.mark.parametrize("name,model,image,params,output,field", INFER_CASES, ids=[c[0] for c in INFER_CASES])
def test_bad_infer_request_is_a_clear_4xx(server, name, model, image, params, output, field):
    response = requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": output},
                             data={"params": params}, timeout=120)
    _assert_4xx(response, field=field)
    _alive(server)


def test_numbers_reach_the_model_as_sent(server):
    """A fractional click is not rounded on the way, and ``label_prompt`` 1.0 is index 1 (one rule for the HTTP check
    and the task: the check used to refuse what the task accepts)."""
    response = requests.post(f"{server.url}/infer/segvol_interactive", params={"image": "ct", "output": "json"},
                             data={"params": json.dumps({"foreground": [[60.4, 50.25, 20.5]]})}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["prompts"]["positive_points"] == [[60.4, 50.25, 20.5]]
    response = requests.post(f"{server.url}/infer/segvol", params={"image": "ct", "output": "json"},
                             data={"params": json.dumps({"label_prompt": [1.0]})}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert list(response.json()["label_names"].values()) == [1]


def test_huge_prompt_is_refused_without_echoing_it(server):
    prompt = "a" * 2_000_000
    response = requests.post(f"{server.url}/infer/segvol", params={"image": "ct"},
                             data={"params": json.dumps({"texts": [prompt]})}, timeout=60)
    assert response.status_code == 413
    assert len(response.content) < 2000


def test_bad_requests_to_other_endpoints(server, sandbox, tmp_path):
    url = server.url
    cases = [
        (requests.post, f"{url}/train/segvol_finetune", {"json": {"max_epochs": -3}}, "max_epochs"),
        (requests.post, f"{url}/train/segvol_finetune", {"json": {"max_epochs": 1, "bundle_path": "/tmp"}},
         "bundle_path"),
        (requests.post, f"{url}/train/segvol_finetune", {"json": {"init": "/etc/passwd"}}, "init"),
        (requests.post, f"{url}/train/segvol_finetune", {"json": {"learning_rate": "fast"}}, "learning_rate"),
        (requests.post, f"{url}/train/no_such_trainer", {"json": {}}, "no_such_trainer"),
        (requests.post, f"{url}/scoring/no_such_method", {"json": {}}, "no_such_method"),
        (requests.post, f"{url}/scoring/fg_fraction", {"json": {"bundle_path": "/tmp"}}, "bundle_path"),
        (requests.post, f"{url}/activelearning/no_such_strategy", {"json": {}}, "no_such_strategy"),
        (requests.post, f"{url}/batch/infer/segvol", {"json": {"label_tag": "../../x"}}, "label_tag"),
        (requests.get, f"{url}/datastore/dataset", {}, "labels"),
        (requests.get, f"{url}/logs/", {"params": {"lines": "9" * 30}}, "lines"),
        (requests.get, f"{url}/datastore/label", {"params": {"label": "ct", "tag": "final"}}, ""),
        (requests.get, f"{url}/datastore/label/info", {"params": {"label": "ct", "tag": "nope"}}, "no label"),
        (requests.get, f"{url}/datastore/image/info", {"params": {"image": "nope"}}, "nope"),
        (requests.put, f"{url}/model/segvol", {"files": {"file": ("m.pt", b"pickle")}}, "disabled"),
        (requests.put, f"{url}/datastore/image/info", {"params": {"image": "ct"}, "data": {"info": "[1]"}}, "info"),
        (requests.put, f"{url}/datastore/image", {"params": {"image": "evil"},
                                                  "files": {"file": ("evil.exe", b"MZ")}}, "file"),
        (requests.get, f"{url}/proxy/dicom/studies", {}, "DICOMweb"),
    ]
    for method, target, kwargs, field in cases:
        response = method(target, timeout=60, **kwargs)
        _assert_4xx(response, field=field)
    _alive(server)


def test_bad_scribbles_are_a_clear_4xx(server, sandbox, tmp_path):
    image = nib.load(str(sandbox / "studies" / "ct.nii.gz"))
    info = [{"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
    cases = [
        (_int_label(sandbox, tmp_path, shape=(30, 30, 30), name="small"), {"label_info": info}, "does not match"),
        (_int_label(sandbox, tmp_path, name="k_word"), {"label_info": info, "k": "abc"}, "k (the FH scale)"),
        (_int_label(sandbox, tmp_path, name="k_negative"), {"label_info": info, "k": -1}, "k (the FH scale)"),
    ]
    for path, params, message in cases:
        data = np.asarray(nib.load(str(path)).dataobj) * 3  # the drawn cube is a foreground scribble
        nib.save(nib.Nifti1Image(data.astype(np.uint8), image.affine), path)
        with open(path, "rb") as handle:
            response = requests.post(f"{server.url}/infer/segvol_scribbles", params={"image": "ct", "output": "json"},
                                     data={"params": json.dumps(params)},
                                     files={"label": ("scribbles.nii.gz", handle)}, timeout=120)
        _assert_4xx(response, field=message)
    # label_info entries that are not {name, id} objects
    path = _int_label(sandbox, tmp_path, name="numbers")
    with open(path, "rb") as handle:
        response = requests.post(f"{server.url}/infer/segvol_scribbles", params={"image": "ct", "output": "json"},
                                 data={"params": json.dumps({"label_info": [2, 3]})},
                                 files={"label": ("scribbles.nii.gz", handle)}, timeout=120)
    _assert_4xx(response, field="label_info[0]")
    # OHIF's binary scribbles (one byte per voxel): a file of another size is refused before MONAI Label reshapes it
    voxels = int(np.prod(image.shape))
    for junk in (os.urandom(3000), b"\3" * (voxels + 1)):
        response = requests.post(f"{server.url}/infer/segvol_scribbles", params={"image": "ct", "output": "json"},
                                 data={"params": json.dumps({"label_info": info})},
                                 files={"label": ("scribbles.bin", junk)}, timeout=120)
        _assert_4xx(response, field=str(voxels))
    scribbles = np.zeros(image.shape, np.uint8)
    scribbles[40:50, 40:50, 10:15] = 3
    response = requests.post(f"{server.url}/infer/segvol_scribbles", params={"image": "ct", "output": "json"},
                             data={"params": json.dumps({"label_info": info})},
                             files={"label": ("scribbles.bin", scribbles.tobytes(order="F"))}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["foreground_voxels"] == 500
    _alive(server)


def test_corrupt_image_uploaded_by_the_python_client_is_a_4xx(server, sandbox, tmp_path):
    from monailabel.client.client import MONAILabelClient

    client = MONAILabelClient(server.url)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(_label_bytes(sandbox)[:5000])
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(os.urandom(5000))
    for path in (truncated, junk):
        with pytest.raises(Exception) as raised:
            client.upload_image(str(path), "broken")
        assert "Status: 422" in str(raised.value), str(raised.value)[:300]
    listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30)
    assert listing.status_code == 200 and '"broken"' not in listing.text
    _alive(server)


def test_label_for_an_unknown_image_is_404_and_not_stored(server, sandbox, tmp_path):
    label = _int_label(sandbox, tmp_path)
    with open(label, "rb") as handle:
        response = requests.put(f"{server.url}/datastore/label", params={"image": "no_such_image"},
                                files={"label": ("label.nii.gz", handle)}, timeout=60)
    _assert_4xx(response, field="no_such_image")
    assert not list((sandbox / "studies").rglob("no_such_image*"))


def test_failed_uploads_leave_no_temp_file(server, sandbox, tmp_path):
    import tempfile

    temp = Path(tempfile.gettempdir()) / f"segvol-server-{server.process.pid}"  # segvol_server's own temp folder
    assert temp.is_dir()
    before = {p.name for p in temp.glob("tmp*.nii.gz")}
    for _ in range(3):
        response = requests.put(f"{server.url}/datastore/label", params={"image": "no_such_image"},
                                files={"label": ("label.nii.gz", b"not an image at all")}, timeout=60)
        assert 400 <= response.status_code < 500
    time.sleep(0.5)
    after = {p.name for p in temp.glob("tmp*.nii.gz")}
    assert not after - before


# ----------------------------------------------------------------------------------------------------------------------
# nothing outside the datastore
# ----------------------------------------------------------------------------------------------------------------------
def test_no_request_reaches_outside_the_datastore(server, sandbox, tmp_path):
    before = _snapshot(sandbox)
    label = _int_label(sandbox, tmp_path)
    url = server.url
    for target in TRAVERSAL_TARGETS:
        with open(sandbox / "outside.nii.gz", "rb") as handle:
            response = requests.put(f"{url}/datastore/image", params={"image": target},
                                    files={"file": ("ct.nii.gz", handle)}, timeout=60)
        _assert_4xx(response)
        with open(label, "rb") as handle:
            response = requests.put(f"{url}/datastore/label", params={"image": "ct", "tag": target},
                                    files={"label": ("label.nii.gz", handle)}, timeout=60)
        _assert_4xx(response)
        with open(label, "rb") as handle:
            response = requests.put(f"{url}/datastore/label", params={"image": target},
                                    files={"label": ("label.nii.gz", handle)}, timeout=60)
        _assert_4xx(response)
        response = requests.post(f"{url}/infer/segvol", params={"image": "ct", "output": "json"},
                                 data={"params": json.dumps({"texts": ["liver"], "save_label": True,
                                                             "label_tag": target})}, timeout=120)
        _assert_4xx(response)
        _assert_4xx(requests.delete(f"{url}/datastore/image", params={"id": target}, timeout=30))
        _assert_4xx(requests.delete(f"{url}/datastore/label", params={"id": "ct", "tag": target}, timeout=30))
        _assert_4xx(requests.delete(f"{url}/datastore/label", params={"id": target, "tag": "final"}, timeout=30))
        _assert_4xx(requests.get(f"{url}/datastore/image", params={"image": target}, timeout=30))
        _assert_4xx(requests.get(f"{url}/datastore/label", params={"label": target, "tag": "final"}, timeout=30))
    # a file outside, named by absolute path, is not segmented (no --conf allow_local_paths)
    response = requests.post(f"{url}/infer/segvol", params={"image": str(sandbox / "outside.nii.gz")},
                             data={"params": json.dumps({"texts": ["liver"]})}, timeout=60)
    _assert_4xx(response, field="allow_local_paths")
    assert _snapshot(sandbox) == before
    assert (sandbox / "studies" / "ct.nii.gz").exists()
    _alive(server)


# ----------------------------------------------------------------------------------------------------------------------
# network exposure
# ----------------------------------------------------------------------------------------------------------------------
def test_foreign_origin_is_refused_and_gets_no_cors_headers(server):
    foreign = {"Origin": "http://evil.example"}
    response = requests.get(f"{server.url}/info/", headers=foreign, timeout=30)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in {k.lower() for k in response.headers}
    preflight = requests.options(f"{server.url}/infer/segvol", timeout=30, headers={
        **foreign, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in {k.lower() for k in preflight.headers}
    # a simple (no preflight) cross-site form post must not run either
    response = requests.post(f"{server.url}/scoring/fg_fraction", headers=foreign, timeout=30)
    assert response.status_code == 403
    same = requests.get(f"{server.url}/info/", headers={"Origin": server.url}, timeout=30)
    assert same.status_code == 200


def test_refuses_to_listen_beyond_loopback_without_a_token(sandbox):
    env = {k: v for k, v in os.environ.items() if k != "SEGVOL_AUTH_TOKEN"}
    result = subprocess.run([sys.executable, str(APP / "segvol_server.py"), "--app", str(APP), "--studies",
                             str(sandbox / "studies"), "--host", "0.0.0.0", "--port", "1"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "SEGVOL_AUTH_TOKEN" in result.stderr


def test_token_is_required_when_configured(sandbox, weights, tmp_path):
    token = "s3cret-token-for-tests"
    allowed = "https://viewer.example.org"
    server = Server(sandbox / "studies", {"weights": str(weights), "device": "cpu", "cors_origins": allowed},
                    tmp_path / "server.log", env={"SEGVOL_AUTH_TOKEN": token})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"{server.url}/auth/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert requests.get(f"{server.url}/auth/", timeout=30).json()["enabled"] is True
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 401
        assert requests.get(f"{server.url}/info/", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code \
            == 401
        good = {"Authorization": f"Bearer {token}"}
        assert requests.get(f"{server.url}/info/", headers=good, timeout=30).status_code == 200
        # Slicer's login: any user name, the token as password, through MONAI Label's client call
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(server.url)
        assert client.auth_enabled()
        client.update_auth(client.auth_token("annotator", token))
        assert client.info()["name"] == "SegVol Label"
        with pytest.raises(Exception):  # noqa: B017 (the client raises its own types by version)
            MONAILabelClient(server.url).auth_token("annotator", "wrong")
        # an origin the operator allowed: its preflight needs no token, its requests do, and both get CORS headers
        preflight = requests.options(f"{server.url}/infer/segvol", timeout=30, headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers.get("access-control-allow-origin") == allowed
        response = requests.get(f"{server.url}/info/", headers={"Origin": allowed, **good}, timeout=30)
        assert response.status_code == 200 and response.headers.get("access-control-allow-origin") == allowed
        assert requests.get(f"{server.url}/info/", headers={"Origin": allowed}, timeout=30).status_code == 401
        assert requests.get(f"{server.url}/info/", headers={"Origin": "https://other.example.org", **good},
                            timeout=30).status_code == 403
        # a browser: opening a page once with ?token= sets the cookie the rest of its requests carry
        session = requests.Session()
        assert session.get(f"{server.url}/ohif/", params={"token": token}, timeout=30).status_code == 200
        assert session.get(f"{server.url}/info/", timeout=30).status_code == 200
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------------------------
# responsive while inference runs
# ----------------------------------------------------------------------------------------------------------------------
def test_info_datastore_and_ohif_answer_within_a_second_during_inference(server, sandbox):
    image = "ct_big" if (sandbox / "studies" / "ct_big.nii.gz").exists() else "ct"
    results = []

    def infer(name):
        response = requests.post(f"{server.url}/infer/segvol", params={"image": image, "output": "json"},
                                 data={"params": json.dumps({"texts": [name], "zoom": "zoom_out_zoom_in"})},
                                 timeout=900)
        results.append(response.status_code)

    # four organs (nothing cached for the later ones), queued behind each other on the inference worker
    names = ["liver", "spleen", "kidney left", "aorta"]
    workers = [threading.Thread(target=infer, args=(name,)) for name in names]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # the first request is being inferred, the others queued behind it
    timings = {}
    probes = 0
    while any(w.is_alive() for w in workers) and probes < 30:
        for name, path in (("info", "/info/"), ("datastore", "/datastore/?output=stats"), ("ohif", "/ohif/"),
                           ("label head", "/datastore/image?image=ct")):
            started = time.perf_counter()
            response = requests.get(f"{server.url}{path}", timeout=30)
            timings.setdefault(name, []).append(time.perf_counter() - started)
            assert response.status_code == 200, (name, response.text[:300])
        probes += 1
        time.sleep(0.2)
    still_running = any(w.is_alive() for w in workers)
    for worker in workers:
        worker.join()
    assert results == [200] * len(names)
    assert probes >= 3 or still_running, "inference finished before the probes could overlap it"
    slowest = {name: max(values) for name, values in timings.items()}
    print("slowest answers during inference (s):", {k: round(v, 3) for k, v in slowest.items()}, "probes", probes)
    assert all(value < 1.0 for value in slowest.values()), slowest
