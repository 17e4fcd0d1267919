"""scripts/download_weights.py: downloads into the models folder, skips what is there, fails fast offline."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "download_weights.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_offline_fails_fast_with_instructions(tmp_path):
    result = run("--models-dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9", "--timeout", "2")
    assert result.returncode == 2
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    assert str(tmp_path / "pytorch_model.bin") in result.stderr and "--conf weights" in result.stderr


def test_downloads_from_a_hub_layout_and_skips_existing(tmp_path):
    hub = tmp_path / "hub" / "BAAI" / "SegVol" / "resolve" / "main"
    hub.mkdir(parents=True)
    files = {"pytorch_model.bin": b"w" * 3_000_000, "vocab.json": b"{}", "tokenizer_config.json": b"{}",
             "special_tokens_map.json": b"{}", "tokenizer.json": b"{}"}  # merges.txt absent: optional
    for name, content in files.items():
        (hub / name).write_bytes(content)

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "hub"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    models = tmp_path / "models"
    try:
        first = run("--models-dir", str(models), "--endpoint", endpoint)
        assert first.returncode == 0, first.stderr
        for name, content in files.items():
            assert (models / name).read_bytes() == content
        assert not list(models.glob("*.part")) and not list(models.glob("*.tmp"))
        second = run("--models-dir", str(models), "--endpoint", endpoint)
        assert second.returncode == 0 and "pytorch_model.bin: already present, skipped" in second.stderr
    finally:
        server.shutdown()
