"""Training through the real server: the ``segvol_finetune`` train task (MONAI Label's async /train, a subprocess
rebuilding the app) publishes a checkpoint that the infer tasks switch to without a restart; a label name new to
SegVol becomes a text prompt; final labels past ``retrain_threshold`` queue exactly one run.

The app is a temporary copy of apps/segvol (its model/ folder receives the published checkpoint), served with a
tiny-configuration checkpoint and the CLIP tokenizer; the datastore holds synthetic CTs.
"""
from __future__ import annotations

import json
import time

import pytest
import requests
from _server import Server, copy_app, random_weights
from _train_data import TINY, write_unlabelled

import segvol

NEW_NAME = "zorblax gland"
LABEL_INFO = [{"name": NEW_NAME, "idx": 1}, {"name": "Brainstem", "idx": 2}]
THRESHOLD = 2


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_studies")
    labels = tmp_path_factory.mktemp("train_labels")
    write_unlabelled(folder, labels, 3, seed=5)
    return folder, labels


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("train_weights")
    return random_weights(folder, tokenizer_dir, TINY)


@pytest.fixture(scope="module")
def server(studies, weights, tmp_path_factory):
    app = copy_app(tmp_path_factory.mktemp("app") / "segvol")
    conf = {"weights": str(weights), "device": "cpu", "retrain_threshold": str(THRESHOLD), "train_epochs": "2",
            "train_val_split": "0", "train_lr": "0.002", "train_freeze": "image_encoder,text_encoder"}
    instance = Server(studies[0], conf, tmp_path_factory.mktemp("train_logs") / "server.log", app=app,
                      threads=1).wait()
    yield instance
    instance.stop()


def _infer(server, texts, free_text=False):
    response = server.infer("segvol", "img_0", {"texts": texts, "free_text": free_text,
                                                 "result_extension": ".nii.gz"}, output="json")
    return response


def test_train_task_publishes_a_checkpoint_the_infer_tasks_switch_to(server, studies):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert "segvol_finetune" in info["trainers"]
    assert info["trainers"]["segvol_finetune"]["config"]["max_epochs"] == 2
    before = _infer(server, ["liver"])
    assert before.status_code == 200 and before.json()["model"].startswith("segvol_label.pt@")
    assert _infer(server, [NEW_NAME]).status_code in (400, 422)  # not a known name yet

    saved = server.save_label("img_0", studies[1] / "img_0.nii.gz", params={"label_info": LABEL_INFO})
    assert saved["retrain"] == {"counted": True, "count": 1, "threshold": THRESHOLD, "queued": False}
    started = requests.post(f"{server.url}/train/segvol_finetune", json={"max_epochs": 1}, timeout=30)
    assert started.status_code == 200, started.text
    tasks = server.wait_trained(1)
    assert tasks[-1]["status"] == "DONE", tasks[-1].get("details")

    published = server.app / "model" / "segvol_finetuned.pt"
    assert published.is_file()
    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"]["segvol_finetune"]
    assert stats["status"] == "FINISHED" and stats["epoch"] == stats["total_epochs"] == 1
    assert NEW_NAME in stats["vocabulary"]
    after = _infer(server, ["liver"])  # no restart: the next request runs the published checkpoint
    assert after.status_code == 200 and after.json()["model"].startswith("segvol_finetuned.pt@")
    learned = _infer(server, [NEW_NAME])  # the name it was trained on is now a text prompt
    assert learned.status_code == 200, learned.text
    names = learned.json()["label_names"]
    assert list(names) == [NEW_NAME] and names[NEW_NAME] > 200  # indexed after the built-in vocabulary


def test_saving_final_labels_past_the_threshold_queues_exactly_one_run(server, studies):
    runs = len(server.train_tasks())
    count = json.loads((server.app / "model" / "retrain_state.json").read_text())["count"]
    assert count == 1  # persisted: the first test's save
    other = server.save_label("img_2", studies[1] / "img_2.nii.gz", tag="original")
    assert other["retrain"]["counted"] is False  # only final labels count
    first = server.save_label("img_1", studies[1] / "img_1.nii.gz", params={"label_info": LABEL_INFO})
    assert first["retrain"]["queued"] is True and first["retrain"]["count"] == 0
    second = server.save_label("img_2", studies[1] / "img_2.nii.gz", params={"label_info": LABEL_INFO})
    assert second["retrain"] == {"counted": True, "count": 1, "threshold": THRESHOLD, "queued": False}
    tasks = server.train_tasks()
    assert len(tasks) == runs + 1 and tasks[-1]["request"]["model"] == "segvol_finetune"
    stamp = (server.app / "model" / "segvol_finetuned.pt").stat().st_mtime_ns
    tasks = server.wait_trained(runs + 1)
    assert len(tasks) == runs + 1 and tasks[-1]["status"] == "DONE", tasks[-1].get("details")
    assert (server.app / "model" / "segvol_finetuned.pt").stat().st_mtime_ns != stamp  # a new checkpoint
    assert _infer(server, [NEW_NAME]).status_code == 200


def test_retrain_counter_never_queues_behind_a_waiting_run(tmp_path):
    import importlib.util

    path = segvol.__file__.rsplit("/lib/", 1)[0] + "/apps/segvol/lib/trainers/retrain.py"
    spec = importlib.util.spec_from_file_location("segvol_app_retrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Store:  # the final label's timestamp, as the datastore records it on every save
        stamps = {}

        def get_label_info(self, label_id, tag):
            return {"ts": self.stamps[label_id]} if tag == "final" else {}

    queued = []
    waiting = {"value": False}
    counter = module.RetrainCounter(str(tmp_path / "state.json"), threshold=2)

    def save(name, new=True):
        if new:
            Store.stamps[name] = int(time.time()) + len(queued) + len(Store.stamps)
        result = counter.on_save_label(Store(), name, name, queue=lambda: queued.append(name) or {"id": name},
                                       pending=lambda: waiting["value"])
        return result["retrain"]

    assert save("a")["count"] == 1
    assert save("a", new=False)["counted"] is False  # the final label did not change (another tag was saved)
    assert save("b")["queued"] is True and queued == ["b"]
    waiting["value"] = True  # that run has not started yet
    save("c")
    assert save("d")["queued"] is False and queued == ["b"]  # the waiting run will see c and d
    again = module.RetrainCounter(str(tmp_path / "state.json"), threshold=2)  # a restart keeps the count
    assert again.read()["count"] == 0 and again.read()["total"] == 4
