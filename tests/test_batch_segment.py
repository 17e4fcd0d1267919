"""Batch segmentation (segvol.batch, scripts/segment.py --input-dir/--scheduler/--datastore) on a local Dask cluster.

A worker is SIGKILLed while it segments an image: every output must still be written, exactly once (the journal
lists each output once), with no temp file left, and a re-run skips everything.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import segvol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_fixtures import run_cli, synthetic_ct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not TOKENIZER.exists():
        pytest.skip(f"{TOKENIZER} is missing (tests read it from ../shared beside the repository)")
    folder = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    model = segvol.SegVol(segvol.SMALL).eval()
    checkpoint = segvol.save_checkpoint(str(folder / "small.pt"), model)
    images = folder / "images"
    images.mkdir()
    array, affine, _ = synthetic_ct()
    for index in range(6):
        nib.save(nib.Nifti1Image(np.roll(array, index * 3, axis=0), affine), str(images / f"case{index}.nii.gz"))
    return {"checkpoint": checkpoint, "images": images, "folder": folder}


def _common(inputs):
    return ["--checkpoint", inputs["checkpoint"], "--tokenizer", str(TOKENIZER), "--device", "cpu", "--text",
            "liver", "--no-progress"]


def test_in_process_batch_skips_done_and_writes_a_datastore_tag(inputs, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("case0.nii.gz", "case1.nii.gz"):
        (store / name).write_bytes((inputs["images"] / name).read_bytes())
    argv = _common(inputs) + ["--datastore", str(store), "--label-tag", "segvol", "--mode", "zoom_out"]
    status, lines = run_cli(argv)
    assert status == 0 and [l["status"] for l in lines] == ["written", "written"]
    outputs = sorted(p.name for p in (store / "labels" / "segvol").glob("*.nii.gz"))
    assert outputs == ["case0.nii.gz", "case1.nii.gz"]  # labels/<tag>/<image id>.nii.gz, as pseudo_labels.py writes
    label = nib.load(str(store / "labels" / "segvol" / "case0.nii.gz"))
    assert label.shape == nib.load(str(store / "case0.nii.gz")).shape
    status, lines = run_cli(argv)
    assert status == 0 and [l["status"] for l in lines] == ["exists", "exists"]
    assert not list((store / "labels" / "segvol" / ".partial").iterdir())


def test_local_cluster_survives_a_killed_worker(inputs, tmp_path):
    from dask.distributed import Client, LocalCluster

    out = tmp_path / "labels"
    journal = tmp_path / "journal.jsonl"
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=0)
    client = Client(cluster)
    killed = {}

    def killer():
        # kill a worker as soon as one of them is busy segmenting (its model loaded, an image in progress)
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            processing = client.processing()
            busy = [address for address, keys in processing.items() if keys]
            # mid-run: a first label written (models loaded on the workers), or 40 s of work without one
            if busy and (any(out.glob("*.nii.gz")) or time.time() > deadline - 200):
                pids = client.run(os.getpid, workers=[busy[0]])
                pid = pids[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    try:
        thread.start()
        argv = _common(inputs) + ["--input-dir", str(inputs["images"]), "--out", str(out), "--mode", "zoom_out",
                                  "--scheduler", cluster.scheduler_address, "--journal", str(journal)]
        status, lines = run_cli(argv)
        thread.join(timeout=5)
    finally:
        with contextlib.suppress(Exception):  # a slow shutdown on a loaded machine is not what this test checks
            client.close(timeout=60)
            cluster.close(timeout=60)
    assert killed, "no worker was killed: the test did not exercise a worker death"
    assert status == 0, lines
    assert sorted(Path(l["image"]).name for l in lines) == [f"case{i}.nii.gz" for i in range(6)]
    # A worker killed after its rename but before its answer reached the scheduler: Dask reruns that image, which then
    # finds its output in place and skips it. Either way the journal holds each output exactly once.
    assert all(l["status"] in ("written", "exists") for l in lines), lines
    written = [json.loads(line)["out"] for line in journal.read_text().splitlines()]
    assert sorted(written) == sorted(l["out"] for l in lines) and len(written) == len(set(written)) == 6
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"case{i}_segvol.nii.gz" for i in range(6)]
    assert not list((out / ".partial").iterdir())
    for line in lines:
        assert nib.load(line["out"]).shape == nib.load(line["image"]).shape
    # a second run over the same cluster type skips every output (idempotent tasks)
    status, again = run_cli(_common(inputs) + ["--input-dir", str(inputs["images"]), "--out", str(out),
                                               "--mode", "zoom_out", "--journal", str(journal)])
    assert status == 0 and {l["status"] for l in again} == {"exists"}
    assert len(journal.read_text().splitlines()) == 6


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from segvol.batch import remove_dead_partials
    from segvol.io import PARTIAL_DIR

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    partial = tmp_path / "labels" / PARTIAL_DIR
    partial.mkdir(parents=True)
    dead = partial / f"{process.pid}-0a1b2c3d-case0_segvol.nii.gz"  # a worker killed while writing
    live = partial / f"{os.getpid()}-0a1b2c3d-case1_segvol.nii.gz"  # this process is still writing it
    other = partial / f"{process.pid}-0a1b2c3d-not_a_job.nii.gz"  # not an output of these jobs
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    jobs = [{"image": str(tmp_path / f"case{i}.nii.gz"), "out": str(tmp_path / "labels" / f"case{i}_segvol.nii.gz")}
            for i in range(2)]
    assert remove_dead_partials(jobs) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()


def test_temp_names_give_back_their_writer_and_target():
    from segvol.io import parse_temp_name, temp_name

    assert parse_temp_name(temp_name("/d/case0_segvol.nii.gz", "/d/.partial")) == (os.getpid(), "case0_segvol.nii.gz")
    assert parse_temp_name(temp_name("/run/last.pt")) == (os.getpid(), "last.pt")
    assert parse_temp_name("train_stats.json.4321.tmp") == (4321, "train_stats.json")
    for other in ("last.pt.tmp", "case0_segvol.nii.gz", "12-zz-name", "x.abc.tmp"):
        assert parse_temp_name(other) is None, other
