"""Training state is always true, and a bad checkpoint never takes the model down.

Through the real server (a throw-away copy of the app, a tiny SegVol checkpoint, synthetic CTs):

- with MONAI Label's automatic scoring refresh on (the train subprocess asks the server for a scoring run after the
  run, and MONAI Label answers None for the one it cannot start), a run that finished and published is DONE in
  ``/train`` and FINISHED in ``/info`` ``train_stats``;
- a published checkpoint truncated on disk: inference keeps answering 200 with the model already loaded, ``/info``
  ``model_status`` shows the fallback and the load error;
- a training subprocess killed with SIGKILL while the server lives is FAILED (with the reason) in ``/info``;
- the whole server killed with SIGKILL mid-run: after a restart the run is FAILED, the temp files of interrupted
  writes are gone, and (the published checkpoint still truncated) inference serves the last good fine-tuned copy.

In-process (``lib/service.py``): the fallback order (loaded engine, last good copy, base weights) and the 503 only when
nothing loads.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from _server import Server, copy_app, random_weights
from _train_data import TINY, write_unlabelled

import segvol
from segvol.io import process_alive

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "segvol_finetune"
LABEL_INFO = [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]


def _load(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state_studies")
    labels = tmp_path_factory.mktemp("state_labels")
    write_unlabelled(folder, labels, 2, seed=11)
    return folder, labels


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("state_weights")
    return random_weights(folder, tokenizer_dir, TINY)


CONF = {"device": "cpu", "train_epochs": "1", "train_val_split": "0", "train_lr": "0.002",
        "train_freeze": "image_encoder,text_encoder", "auto_scoring": "fg_fraction,fh_novelty"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return copy_app(tmp_path_factory.mktemp("state_app") / "segvol")


@pytest.fixture(scope="module")
def server(app, studies, weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("state_logs") / "server.log"
    # MONAI Label's automatic scoring refresh on (at start, after next-sample and training)
    instance = Server(studies[0], {"weights": str(weights), **CONF}, log, {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"},
                      app=app, threads=1).wait()
    yield instance
    instance.stop()


def _info(server) -> dict:
    response = requests.get(f"{server.url}/info/", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _infer(server):
    return server.infer("segvol", "img_0", {"texts": ["liver"], "result_extension": ".nii.gz"}, output="json")


def _wait(predicate, timeout: float, what: str, server=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if server is not None and not server.alive():
            raise RuntimeError(server.log.read_text()[-4000:])
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout}s" + (f"\n{server.log.read_text()[-3000:]}" if server else ""))


def _running_stats(server, min_epoch: int = 0):
    stats = _info(server)["train_stats"].get(TRAIN) or {}
    return stats if stats.get("status") == "RUNNING" and int(stats.get("epoch") or 0) >= min_epoch else None


def _temp_files(app: Path):
    return sorted(str(p.relative_to(app)) for p in (app / "model").rglob("*.tmp"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_finished_run_is_done_in_train_and_info_with_auto_scoring(server, studies):
    server.save_label("img_0", studies[1] / "img_0.nii.gz", params={"label_info": LABEL_INFO})
    started = requests.post(f"{server.url}/train/{TRAIN}", json={"max_epochs": 1}, timeout=30)
    assert started.status_code == 200, started.text
    tasks = server.wait_trained(1, timeout=300)
    assert tasks[-1]["status"] == "DONE", list(tasks[-1].get("details") or [])
    stats = _info(server)["train_stats"][TRAIN]
    assert stats["status"] == "FINISHED" and stats["epoch"] == stats["total_epochs"] == 1
    assert stats["task"]["status"] == "DONE" and stats["task"]["id"] == tasks[-1]["id"]
    assert stats["published"] and stats["pid"] > 0
    # the train subprocess did ask for the scoring refresh, and one request was not started (MONAI Label's None)
    log = server.log.read_text()
    assert "Failed To Trigger Scoring" in log or "not started" in log, log[-3000:]


def test_a_run_with_a_name_of_its_own_is_the_one_info_shows(server, app):
    runs = len(server.train_tasks())
    started = requests.post(f"{server.url}/train/{TRAIN}", json={"max_epochs": 1, "name": "my_run"}, timeout=30)
    assert started.status_code == 200, started.text
    tasks = server.wait_trained(runs + 1, timeout=300)
    assert tasks[-1]["status"] == "DONE", list(tasks[-1].get("details") or [])
    stats = _info(server)["train_stats"][TRAIN]
    assert stats["name"] == "my_run" and stats["status"] == "FINISHED" and stats["epoch"] == 1
    assert (app / "model" / "my_run" / "train_stats.json").is_file()


def test_truncated_published_checkpoint_keeps_the_loaded_model_serving(server, app):
    published = app / "model" / "segvol_finetuned.pt"
    first = _infer(server)
    assert first.status_code == 200 and first.json()["model"].startswith("segvol_finetuned.pt@"), first.text
    status = _info(server)["model_status"]
    assert status["serving"]["kind"] == "fine-tuned" and status["fallback"] is False and status["error"] is None
    assert status["last_good"] and Path(status["last_good"]).read_bytes() == published.read_bytes()

    content = published.read_bytes()
    with open(published, "r+b") as handle:  # damaged in place (e.g. a manual copy over it that did not finish)
        handle.truncate(len(content) // 2)
    os.utime(published, ns=(time.time_ns(), time.time_ns()))
    again = _infer(server)
    assert again.status_code == 200, again.text
    assert again.json()["model"] == first.json()["model"]  # the model already loaded keeps serving
    status = _info(server)["model_status"]
    assert status["fallback"] is True and status["serving"]["kind"] == "fine-tuned"
    assert status["error"]["checkpoint"].endswith("segvol_finetuned.pt") and status["error"]["error"]
    assert "does not load" in server.log.read_text()


def test_killed_training_subprocess_is_failed_while_the_server_lives(server):
    runs = len(server.train_tasks())
    started = requests.post(f"{server.url}/train/{TRAIN}", json={"max_epochs": 500, "init": "official"}, timeout=30)
    assert started.status_code == 200, started.text
    stats = _wait(lambda: _running_stats(server), 180, "a RUNNING run", server)
    os.kill(int(stats["pid"]), signal.SIGKILL)
    tasks = server.wait_trained(runs + 1, timeout=60)
    assert tasks[-1]["status"] == "ERROR"
    stats = _info(server)["train_stats"][TRAIN]
    assert stats["status"] == "FAILED" and "died" in stats["reason"] and str(stats["pid"]) in stats["reason"]
    assert stats["task"]["status"] == "ERROR"


def test_run_stopped_by_the_client_is_stopped(server, app):
    runs = len(server.train_tasks())
    started = requests.post(f"{server.url}/train/{TRAIN}", json={"max_epochs": 500, "init": "official"}, timeout=30)
    assert started.status_code == 200, started.text
    _wait(lambda: _running_stats(server), 180, "a RUNNING run", server)
    assert requests.delete(f"{server.url}/train/", timeout=30).status_code == 200
    tasks = server.wait_trained(runs + 1, timeout=60)
    assert tasks[-1]["status"] == "STOPPED"
    stats = _info(server)["train_stats"][TRAIN]
    assert stats["status"] == "STOPPED" and "client" in stats["reason"]
    on_disk = json.loads((app / "model" / TRAIN / "train_stats.json").read_text())
    assert on_disk["status"] == "STOPPED"  # recorded: a restart does not call it FAILED


def test_server_killed_mid_run_restarts_with_the_run_failed_temp_files_gone_and_the_last_good_model(
        server, app, studies, weights, tmp_path_factory):
    started = requests.post(f"{server.url}/train/{TRAIN}", json={"max_epochs": 500, "init": "official"}, timeout=30)
    assert started.status_code == 200, started.text
    stats = _wait(lambda: _running_stats(server, min_epoch=1), 240, "a run past its first epoch", server)
    assert (app / "model" / TRAIN / "last.pt").is_file()
    os.killpg(server.process.pid, signal.SIGKILL)  # the server and its train/scoring subprocesses
    server.process.wait(timeout=30)
    _wait(lambda: not process_alive(stats["pid"]), 30, "the training process gone")
    # what writes interrupted at that instant leave behind (torch.save's temp, a publish's and a stats' temp copy)
    run = app / "model" / TRAIN
    (run / "last.pt.tmp").write_bytes((run / "last.pt").read_bytes()[:1000])
    (run / "best.pt.tmp").write_bytes(b"\0" * 100)
    (app / "model" / f"segvol_finetuned.pt.{_dead_pid()}.tmp").write_bytes(b"partial")
    (run / f"train_stats.json.{_dead_pid()}.tmp").write_text("{\"status\": ")
    assert len(_temp_files(app)) >= 4

    log = tmp_path_factory.mktemp("state_logs_restart") / "server.log"
    restarted = Server(studies[0], {"weights": str(weights), **CONF}, log, app=app, threads=1).wait()
    try:
        stats = _info(restarted)["train_stats"][TRAIN]
        assert stats["status"] == "FAILED" and "died" in stats["reason"], stats
        assert "task" not in stats  # this server ran no task: the record on disk says it all
        assert _temp_files(app) == []
        assert (run / "last.pt").is_file()  # the resumable checkpoint stays

        status = _info(restarted)["model_status"]
        assert status["serving"] is None and status["wanted_kind"] == "fine-tuned"
        response = _infer(restarted)  # the published file is still truncated: the last good copy serves
        assert response.status_code == 200, response.text
        assert response.json()["model"].startswith("segvol_finetuned.last_good.pt@")
        status = _info(restarted)["model_status"]
        assert status["fallback"] is True and status["serving"]["kind"] == "fine-tuned (last good)"
        assert status["error"]["checkpoint"].endswith("segvol_finetuned.pt")
        assert "instead of" in log.read_text()
    finally:
        restarted.stop()


# ---------------------------------------------------------------------------------------------------------------------
# in-process: the service's fallback order, and the state helpers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service_module():
    return _load("segvol_app_service", "apps/segvol/lib/service.py")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_service_falls_back_to_the_last_good_then_the_base_and_503s_only_when_nothing_loads(
        service_module, weights, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    published = model_dir / "segvol_finetuned.pt"
    base = weights / "segvol_label.pt"

    def service():
        return service_module.SegVolService(weights=str(weights), device="cpu", published=str(published))

    torch.manual_seed(1)
    segvol.save_checkpoint(str(published), segvol.SegVol(TINY), vocabulary=["zorblax gland"])
    first = service()
    assert first.status()["serving"] is None and first.status()["wanted"] == str(published)
    first.engine()
    good_id = first.checkpoint_id
    assert good_id.startswith("segvol_finetuned.pt@")
    last_good = Path(first.status()["last_good"])
    assert last_good.name == "segvol_finetuned.last_good.pt" and last_good.read_bytes() == published.read_bytes()

    _truncate(published)  # a publish that went wrong: the loaded engine keeps serving, nothing reloads
    assert first.engine() is first.engine() and first.checkpoint_id == good_id
    status = first.status()
    assert status["fallback"] and status["error"]["checkpoint"] == str(published)

    restarted = service()  # nothing loaded yet: the last good copy serves
    restarted.engine()
    assert restarted.checkpoint_id.startswith("segvol_finetuned.last_good.pt@")
    assert "zorblax gland" in restarted.vocabulary.labels()  # its learned names come with it
    status = restarted.status()
    assert status["fallback"] and status["serving"]["kind"] == "fine-tuned (last good)"
    assert status["serving"]["checkpoint"] == str(last_good) and "not a readable" in status["error"]["error"]

    last_good.unlink()  # no last good copy: the base weights serve
    third = service()
    third.engine()
    assert third.checkpoint_id.startswith("segvol_label.pt@") and third.status()["serving"]["kind"] == "base"

    torch.manual_seed(2)  # a good publish after a bad one: switches to it, the error clears
    segvol.save_checkpoint(str(published), segvol.SegVol(TINY), vocabulary=[])
    third.engine()
    status = third.status()
    assert third.checkpoint_id.startswith("segvol_finetuned.pt@") and not status["fallback"] and not status["error"]

    broken = tmp_path / "broken"  # nothing that loads: 503 with the reason
    broken.mkdir()
    shutil.copy(base, broken / "segvol_label.pt")
    _truncate(broken / "segvol_label.pt")
    nothing = service_module.SegVolService(weights=str(broken), device="cpu", published=str(tmp_path / "none.pt"))
    with pytest.raises(service_module.WeightsUnavailableError, match="could not be loaded"):
        nothing.engine()
    assert nothing.status()["serving"] is None and nothing.status()["error"]["error"]


def test_a_run_with_init_auto_starts_from_the_last_good_checkpoint_when_the_published_one_is_damaged(
        service_module, weights, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "segvol_app_trainers", ROOT / "apps/segvol/lib/trainers/__init__.py",
        submodule_search_locations=[str(ROOT / "apps/segvol/lib/trainers")])
    trainers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainers
    spec.loader.exec_module(trainers)
    published = tmp_path / "segvol_finetuned.pt"
    service = service_module.SegVolService(weights=str(weights), device="cpu", published=str(published))
    task = trainers.SegVolFinetune(service, str(tmp_path), {"train_multi_gpu": "false"}, {"liver": 1})
    segvol.save_checkpoint(str(published), segvol.SegVol(TINY), vocabulary=[])
    service.engine()  # loads it: the last good copy
    options, _ = task.options({})
    assert options.init == str(published) and options.publish_if_better_than_init
    _truncate(published)
    options, _ = task.options({})
    assert options.init == service.last_good and options.publish_if_better_than_init
    os.unlink(service.last_good)
    options, _ = task.options({})
    assert options.init == "official" and options.weights == str(weights / "segvol_label.pt")


def test_recover_marks_dead_runs_failed_and_spares_live_ones(tmp_path):
    state = _load("segvol_app_train_state", "apps/segvol/lib/trainers/state.py")
    dead, live = tmp_path / "dead", tmp_path / "live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "last.pt.tmp").write_bytes(b"x")
    state.write_stats(str(dead / state.STATS), {"status": "RUNNING", "epoch": 3, "pid": _dead_pid()})
    state.write_stats(str(live / state.STATS), {"status": "RUNNING", "epoch": 1, **state.process_identity()})
    orphan = tmp_path / f"segvol_finetuned.pt.{_dead_pid()}.tmp"
    orphan.write_bytes(b"x")
    (tmp_path / f"segvol_finetuned.pt.{os.getppid()}.tmp").write_bytes(b"x")  # its writer is alive
    # the pid of a live process that started after the file was written (a pid reused after a restart)
    reused = tmp_path / f"last.pt.0a1b2c3d.{os.getppid()}.tmp"
    reused.write_bytes(b"x")
    os.utime(reused, (946684800, 946684800))  # written in 2000

    summary = state.recover(str(tmp_path))
    dead_stats = state.read_stats(str(dead / state.STATS))
    assert dead_stats["status"] == "FAILED" and dead_stats["epoch"] == 3 and "died" in dead_stats["reason"]
    assert state.read_stats(str(live / state.STATS))["status"] == "RUNNING"
    assert not (dead / "last.pt.tmp").exists() and (live / "last.pt.tmp").exists()
    assert sorted(summary["removed"]) == sorted([str(dead / "last.pt.tmp"), str(orphan), str(reused)])
    assert summary["failed"] == [str(dead)]
    assert (tmp_path / f"segvol_finetuned.pt.{os.getppid()}.tmp").exists()
    # a RUNNING record of a process that was reused by another pid is dead too
    assert state.run_is_dead({"status": "RUNNING", "pid": os.getpid(), "pid_start": 1.0})
    assert not state.run_is_dead({"status": "FINISHED", "pid": _dead_pid()})
