"""Shared fixtures: paths to ../shared, and the official-format checkpoint built once per test session."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PARITY = SHARED / "parity"
TOKENIZER = SHARED / "clip-tokenizer"
DATA = SHARED / "data"

torch.set_num_threads(max(1, os.cpu_count() or 1))


def require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not available: {path} is missing (tests read it from ../shared beside the repository)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return require(TOKENIZER, "CLIP tokenizer")


@pytest.fixture(scope="session")
def goldens():
    return torch.load(require(PARITY / "goldens.pt", "parity goldens"), map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def filled_state_dict():
    """The official tensors (no prefix) filled deterministically by ../shared/parity/fill.py."""
    require(PARITY / "fill.py", "parity fill script")
    sys.path.insert(0, str(PARITY))
    try:
        from fill import fill_state_dict
    finally:
        sys.path.remove(str(PARITY))
    manifest = json.loads((PARITY / "segvol_keys.json").read_text())["tensors"]
    return fill_state_dict(manifest)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, filled_state_dict) -> Path:
    """An official-format SegVol_v1.pth (about 724 MB) in a session temp dir, built once, deleted afterwards."""
    folder = tmp_path_factory.mktemp("official")
    path = folder / "SegVol_v1.pth"
    torch.save({"model": {"module." + k: v for k, v in filled_state_dict.items()}, "epoch": 0}, path)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def official_model(official_checkpoint, tokenizer_dir):
    import segvol

    return segvol.load_model(str(official_checkpoint), device="cpu", tokenizer=str(tokenizer_dir))


@pytest.fixture(scope="session")
def golden_image_embedding(official_model, goldens):
    with torch.no_grad():
        return official_model.encode_image(goldens["preprocess"]["example_ct"]["zoom_out"][None])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks train fastest on one thread (and a busy 2-core machine makes two threads much slower); a test
    module that trains them uses it: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
