"""Start the real SegVol Label server (``apps/segvol/segvol_server.py``, as ``scripts/serve.sh`` does) in a subprocess
for tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "segvol"


def random_weights(folder: Path, tokenizer_dir: Path, config) -> Path:
    """``folder`` holding a project checkpoint of ``config`` with seeded random weights and the CLIP tokenizer files:
    what a test server gets as ``--conf weights``."""
    import shutil

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


class Server:
    # extra environment for the server process (a subclass may set it); the ``env`` argument adds to it
    extra_env: Dict[str, str] = {}

    def __init__(self, studies: Path, conf: Dict[str, str], log: Path, env: Optional[Dict[str, str]] = None):
        overrides = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [sys.executable, str(APP / "segvol_server.py"), "--app", str(APP), "--studies", str(studies),
                "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            args += ["--conf", key, value]
        env = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", MONAI_LABEL_AUTO_UPDATE_SCORING="false",
                   MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        env.update(overrides or {})
        self._log_handle = open(log, "w")
        self.process = subprocess.Popen(args, cwd=str(ROOT), env=env, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 180) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == 200:
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
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log_handle.close()

    def infer(self, model: str, image: str, params: Optional[dict] = None, output: str = "image",
              files: Optional[dict] = None) -> requests.Response:
        """A request shaped like the OHIF and Slicer plugins': multipart form with a JSON ``params`` field."""
        import json

        data = {"params": json.dumps(params or {})}
        return requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": output}, data=data,
                             files=files, timeout=600)
