"""The robot annotator end to end: ``scripts/benchmark.py interactive`` through the real server (the Python client's
requests, the server's image session) and in process with the same checkpoint, on a tiny synthetic dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from _server import Server, random_weights
from _train_data import TINY, write_dataset, write_datastore

ROOT = Path(__file__).resolve().parents[1]
NAMES = {1: "Liver", 2: "Spleen"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("robot")
    (root / "weights").mkdir()
    weights = random_weights(root / "weights", tokenizer_dir, TINY)
    studies = root / "studies"
    studies.mkdir()
    data = write_dataset(root / "data", 2, NAMES, seed=5)
    server = Server(studies, {"weights": str(weights), "device": "cpu"}, root / "server.log").wait()
    yield {"root": root, "weights": weights, "data": data, "server": server}
    server.stop()


def robot(*args) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "interactive", *args],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_robot_through_the_server_and_in_process(setup, tokenizer_dir):
    server, root = setup["server"], setup["root"]
    through = robot("--data", str(setup["data"]), "--server", server.url, "--clicks", "2", "--out",
                    str(root / "out_server"))
    report = through["models"]["server"]
    assert report["starts"]["box"]["steps"] == ["box", "click 1", "click 2"]
    assert report["starts"]["text"]["steps"] == ["text", "text+box", "click 1", "click 2"]
    assert report["starts"]["box"]["mean"]["structures"] == 4  # 2 cases x 2 structures
    assert set(report["starts"]["text"]["per_structure"]) == set(NAMES.values())
    # the images went into the server's datastore, as a lab's client would upload them
    listed = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert {"case_0_ct", "case_1_ct"} <= set(listed)  # image ids: the file names
    traces = json.loads(Path(through["traces"]).read_text())["server"]
    clicks = [step for trace in traces for step in trace["steps"] if "click" in step]
    assert clicks, "the robot made no click"
    for step in clicks:
        assert isinstance(step["click"]["positive"], bool) and len(step["click"]["point"]) == 3
        assert step["server_s"] is not None and step["server_s"] <= step["round_trip_s"] + 1e-3
    # the server reports its whole time, the first request's model load and image preparation included
    first = traces[0]["steps"][0]
    assert first["server_s"] >= 0.8 * first["round_trip_s"] - 0.05, first
    latency = report["latency"]
    assert latency["click_server_s"]["n"] == len(clicks) and latency["first_request_s"]["n"] == 2
    assert Path(through["plot"]).stat().st_size > 1000

    # the same checkpoint in process gives the same curves (the server adds only transport)
    local = robot("--data", str(setup["data"]), "--checkpoint", f"tiny={setup['weights']}", "--tokenizer",
                  str(tokenizer_dir), "--clicks", "2", "--out", str(root / "out_local"))["models"]["tiny"]
    for start in ("box", "text"):
        assert local["starts"][start]["steps"] == report["starts"][start]["steps"]
        for ours, theirs in zip(local["starts"][start]["mean"]["dice"], report["starts"][start]["mean"]["dice"]):
            assert ours == pytest.approx(theirs, abs=0.01)


def test_robot_refuses_contradictory_options(setup):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "interactive", "--data",
                           str(setup["data"]), "--server", setup["server"].url, "--checkpoint", "x"],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert done.returncode != 0 and "--server runs the model the server serves" in done.stderr


def test_robot_on_a_datastore_in_process(setup, tokenizer_dir, tmp_path):
    """A lab's datastore: its final labels (no label_info: values are the app's /info indices, 1 = liver)."""
    datastore = write_datastore(tmp_path / "datastore", 2, seed=3, names=["liver", "kidney right"])
    out = robot("--datastore", str(datastore), "--checkpoint", f"tiny={setup['weights']}", "--tokenizer",
                str(tokenizer_dir), "--structures", "liver", "--starts", "box", "--clicks", "1", "--out",
                str(tmp_path / "out"))
    report = out["models"]["tiny"]["starts"]["box"]
    assert out["cases"] == 2 and list(report["per_structure"]) == ["liver"]
    assert report["mean"]["structures"] == 2 and report["steps"] == ["box", "click 1"]
