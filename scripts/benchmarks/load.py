"""Concurrent clients mixing infer, /info and label saves against the real server on loopback, for a bounded time.

    python scripts/benchmark.py load [--clients 6] [--seconds 60] [--mix infer=1,info=4,save=1] [--url URL]

Without ``--url`` it starts ``apps/segvol/segvol_server.py`` on a free 127.0.0.1 port over a temporary datastore
holding ``example_ct_sm`` (../shared/data/totalseg-example) and a small-configuration random checkpoint with the
CLIP tokenizer of ../shared/clip-tokenizer, and stops it afterwards. Each client picks endpoints in the ``--mix``
proportions until the time is up (each request bounded by ``--timeout``); the line printed holds completed requests,
errors, and p50/p95/max latency per endpoint. Only loopback addresses are accepted for ``--url``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List
from urllib.parse import urlparse

from ._measure import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
MAX_REQUESTS_PER_CLIENT = 100_000


def add_arguments(parser) -> None:
    from segvol.modes import MODES

    parser.add_argument("--url", default="", help="a running server on loopback (default: start one)")
    parser.add_argument("--image", default="example_ct_sm", help="datastore image id to use")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--mix", default="infer=1,info=4,save=1", help="endpoint weights")
    parser.add_argument("--zoom", default="zoom_out", choices=MODES)
    parser.add_argument("--seed", type=int, default=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _OwnServer:
    """A server of our own over a temporary datastore, stopped (process group) afterwards."""

    def __init__(self, image: str):
        import torch

        import segvol
        from segvol.config import SMALL

        self.folder = tempfile.mkdtemp(prefix="segvol-load-")
        studies, weights = os.path.join(self.folder, "studies"), os.path.join(self.folder, "weights")
        os.makedirs(studies)
        os.makedirs(weights)
        source = os.path.join(SHARED, "data", "totalseg-example", "example_ct_sm.nii.gz")
        tokenizer = os.path.join(SHARED, "clip-tokenizer")
        if not (os.path.isfile(source) and os.path.isdir(tokenizer)):
            raise SystemExit(f"load benchmark: needs {source} and {tokenizer} (or pass --url)")
        shutil.copy(source, os.path.join(studies, f"{image}.nii.gz"))
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), weights)
        torch.manual_seed(0)
        segvol.save_checkpoint(os.path.join(weights, "segvol_label.pt"), segvol.SegVol(SMALL), vocabulary=[])
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = dict(os.environ, MONAI_LABEL_AUTO_UPDATE_SCORING="false", MONAI_LABEL_TRACKING_ENABLED="false")
        self.log = open(os.path.join(self.folder, "server.log"), "w")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "apps", "segvol", "segvol_server.py"), "--app",
             os.path.join(ROOT, "apps", "segvol"), "--studies", studies, "--port", self.url.rsplit(":", 1)[1],
             "--conf", "weights", weights, "--conf", "device", "cpu"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, requests_module) -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"load benchmark: the server exited; see {self.log.name}")
            try:
                if requests_module.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    return
            except requests_module.RequestException:
                time.sleep(0.5)
        raise SystemExit("load benchmark: the server did not start in 300 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _label_bytes(url: str, image: str, requests_module) -> bytes:
    """A valid final label for ``image``: its shape, uint8, a small cube."""
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image.nii.gz")
        response = requests_module.get(f"{url}/datastore/image", params={"image": image}, timeout=120)
        response.raise_for_status()
        with open(path, "wb") as handle:
            handle.write(response.content)
        reference = nib.load(path)
        data = np.zeros(reference.shape, np.uint8)
        centre = [s // 2 for s in reference.shape]
        data[tuple(slice(c - 3, c + 3) for c in centre)] = 1
        out = os.path.join(folder, "label.nii.gz")
        nib.save(nib.Nifti1Image(data, reference.affine), out)
        with open(out, "rb") as handle:
            return handle.read()


def run(args) -> Dict:
    import requests

    weights = {}
    for part in args.mix.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in ("infer", "info", "save"):
            raise SystemExit(f"--mix: unknown endpoint {name!r} (infer, info, save)")
        weights[name.strip()] = float(weight or 1)
    own = None
    url = args.url.rstrip("/")
    if url:
        host = urlparse(url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            raise SystemExit("--url must be a loopback address")
    else:
        own = _OwnServer(args.image)
        url = own.url
        own.wait(requests)
    try:
        label = _label_bytes(url, args.image, requests) if weights.get("save") else b""
        shape_hint = requests.get(f"{url}/info/", timeout=60).json()
        assert shape_hint.get("name")
        names, choices = list(weights), [weights[n] for n in weights]
        records: Dict[str, List[float]] = {name: [] for name in names}
        errors: Dict[str, int] = {name: 0 for name in names}
        samples: Dict[str, str] = {}
        lock = threading.Lock()
        deadline = time.time() + args.seconds

        def client(number: int) -> None:
            rng = random.Random(args.seed + number)
            session = requests.Session()
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.time() >= deadline:
                    return
                name = rng.choices(names, choices)[0]
                started = time.perf_counter()
                try:
                    if name == "info":
                        response = session.get(f"{url}/info/", timeout=args.timeout)
                    elif name == "infer":
                        params = {"texts": ["liver"], "zoom": args.zoom,
                                  "points": [[rng.randint(30, 90), rng.randint(30, 70), rng.randint(5, 25)]],
                                  "point_labels": [1]}
                        response = session.post(f"{url}/infer/segvol", params={"image": args.image, "output": "json"},
                                                data={"params": json.dumps(params)}, timeout=args.timeout)
                    else:
                        response = session.put(f"{url}/datastore/label", params={"image": args.image, "tag": "load"},
                                               data={"params": json.dumps({"label_info": [{"name": "liver",
                                                                                            "idx": 1}]})},
                                               files={"label": ("label.nii.gz", label)}, timeout=args.timeout)
                    ok = response.status_code == 200
                    detail = "" if ok else f"{response.status_code} {response.text[:200]}"
                except requests.RequestException as error:
                    ok, detail = False, f"{type(error).__name__}: {error}"[:200]
                elapsed = time.perf_counter() - started
                with lock:
                    records[name].append(elapsed)
                    if not ok:
                        errors[name] += 1
                        samples.setdefault(name, detail)

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
        started = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.seconds + args.timeout + 60)
        wall = time.time() - started
    finally:
        if own is not None:
            own.stop()
    endpoints = {}
    for name in names:
        values = records[name]
        endpoints[name] = {"requests": len(values), "errors": errors[name],
                           "p50_s": round(percentile(values, 0.5), 4), "p95_s": round(percentile(values, 0.95), 4),
                           "max_s": round(max(values), 4) if values else None}
        if name in samples:
            endpoints[name]["first_error"] = samples[name]
    return {"benchmark": "load", "server": "own (small config, CPU)" if own else url, "clients": args.clients,
            "seconds": round(wall, 1), "zoom": args.zoom, "mix": weights,
            "completed": sum(len(v) for v in records.values()) - sum(errors.values()),
            "errors": sum(errors.values()), "endpoints": endpoints}
