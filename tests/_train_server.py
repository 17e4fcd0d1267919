"""A throw-away copy of the app (so training never publishes into the repository's apps/segvol/model) served by the
real ``monailabel start_server``, plus helpers to save labels and wait for training runs."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import _server
import requests
from _server import Server


def copy_app(destination: Path) -> Path:
    source = _server.APP
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    for name in ("model", "logs", "bin"):
        (destination / name).mkdir(exist_ok=True)
    return destination


class AppServer(Server):
    """``_server.Server`` for another app folder."""

    def __init__(self, app: Path, studies: Path, conf: Dict[str, str], log: Path, threads: int = 1):
        original, environ = _server.APP, os.environ.get("OMP_NUM_THREADS")
        _server.APP = app
        os.environ["OMP_NUM_THREADS"] = str(threads)  # tiny networks: one thread (also in the train subprocesses)
        try:
            super().__init__(studies, conf, log)
        finally:
            _server.APP = original
            if environ is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = environ
        self.app = app

    def save_label(self, image: str, path: Path, tag: str = "final", params: Optional[dict] = None) -> dict:
        with open(path, "rb") as handle:
            response = requests.put(f"{self.url}/datastore/label", params={"image": image, "tag": tag},
                                    data={"params": json.dumps(params or {})},
                                    files={"label": (path.name, handle)}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def train_tasks(self) -> list:
        response = requests.get(f"{self.url}/train/", params={"all": "true"}, timeout=30)
        return response.json() if response.status_code == 200 else []

    def wait_trained(self, count: int, timeout: float = 240) -> list:
        """Wait until ``count`` train tasks exist and none is SUBMITTED/RUNNING; -> the task records."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            tasks = self.train_tasks()
            if len(tasks) >= count and all(t["status"] not in ("SUBMITTED", "RUNNING") for t in tasks):
                return tasks
            if not self.alive():
                raise RuntimeError(self.log.read_text()[-4000:])
            time.sleep(1.0)
        raise TimeoutError(f"training did not finish in {timeout}s: {self.train_tasks()}\n"
                           f"{self.log.read_text()[-3000:]}")
