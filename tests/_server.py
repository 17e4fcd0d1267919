"""The one harness every server test uses: a real SegVol Label server in its own process group (``Server``:
``apps/segvol/segvol_server.py`` of an app folder, or a serve script such as ``scripts/serve_dicomweb.sh``), a
throw-away app copy (``copy_app``), the Orthanc check (``orthanc_missing``) and random test weights."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import requests

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "segvol"


def random_weights(folder: Path, tokenizer_dir: Path, config) -> Path:
    """``folder`` holding a project checkpoint of ``config`` with seeded random weights and the CLIP tokenizer files:
    what a test server gets as ``--conf weights``."""
    import torch

    import segvol

    torch.manual_seed(0)
    segvol.save_checkpoint(str(folder / "segvol_label.pt"), segvol.SegVol(config), vocabulary=[])
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy(item, folder / item.name)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_app(destination: Path) -> Path:
    """A copy of apps/segvol with empty ``model``, ``logs`` and ``bin`` folders: what a test's server counts,
    records and publishes never reaches the repository's app folder."""
    shutil.copytree(APP, destination, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    for name in ("model", "logs", "bin"):
        (destination / name).mkdir(exist_ok=True)
    return destination


def orthanc_missing() -> Optional[str]:
    """Why Orthanc with its DICOMweb plugin cannot run here (``scripts/orthanc.py`` finds both), or None."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import orthanc

        orthanc.find_orthanc()
        orthanc.find_plugin()
    except Exception as error:  # orthanc.OrthancError
        return f"{error} (bash scripts/install_system_deps.sh installs it)"
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return None


class Server:
    """A SegVol Label server for ``studies`` (a datastore folder or a DICOMweb URL) with ``--conf`` options ``conf``,
    logging to ``log``.

    ``app``: the app folder (default apps/segvol; ``copy_app`` for one a test may change); ``script``: None runs the
    app's ``segvol_server.py`` directly, a serve script (``scripts/serve.sh``, ``scripts/serve_dicomweb.sh``) gets
    the port and studies through ``SEGVOL_PORT`` and ``SEGVOL_DATASTORE``/``SEGVOL_DICOMWEB`` and ``--app`` after its
    own; ``env``: added to the test environment (MONAI Label's tracking, automatic scoring and datastore reload off);
    ``threads``: ``OMP_NUM_THREADS`` of the server and its train subprocesses.
    """

    def __init__(self, studies: Union[Path, str], conf: Optional[Dict[str, str]], log: Path,
                 env: Optional[Dict[str, str]] = None, *, app: Path = APP, script: Optional[Path] = None,
                 threads: Optional[int] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.app = Path(app)
        options: List[str] = [item for key, value in (conf or {}).items() for item in ("--conf", key, value)]
        environ = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", MONAI_LABEL_AUTO_UPDATE_SCORING="false",
                       MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1")
        if threads is not None:
            environ["OMP_NUM_THREADS"] = str(threads)
        if script is None:
            args = [sys.executable, str(self.app / "segvol_server.py"), "--app", str(self.app), "--studies",
                    str(studies), "--host", "127.0.0.1", "--port", str(self.port), *options]
        else:
            remote = str(studies).startswith(("http://", "https://"))
            environ.update({"SEGVOL_PORT": str(self.port), "SEGVOL_HOST": "127.0.0.1",
                            "SEGVOL_DICOMWEB" if remote else "SEGVOL_DATASTORE": str(studies)})
            args = ["bash", str(script), *options, "--app", str(self.app)]  # the last --app counts
        environ.update(env or {})
        self._log_handle = open(log, "a")
        self.process = subprocess.Popen(args, cwd=str(ROOT), env=environ, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 240) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_handle.close()

    def info(self) -> dict:
        response = requests.get(f"{self.url}/info/", timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

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

    def infer(self, model: str, image: str, params: Optional[dict] = None, output: str = "image",
              files: Optional[dict] = None) -> requests.Response:
        """A request shaped like the OHIF and Slicer plugins': multipart form with a JSON ``params`` field."""
        data = {"params": json.dumps(params or {})}
        return requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": output}, data=data,
                             files=files, timeout=600)
