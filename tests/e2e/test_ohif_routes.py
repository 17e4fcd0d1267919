"""The server's own OHIF files (apps/segvol/segvol_ohif.py): our app-config.js and SegVol modules are served ahead of
MONAI Label's /ohif catch-all, only files of apps/segvol/ohif are served, everything else still comes from the wheel.
No browser needed (the OHIF e2e test in test_ohif_e2e.py drives them in Chromium)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OHIF = ROOT / "apps" / "segvol" / "ohif"


@pytest.fixture()
def client():
    from fastapi import APIRouter, FastAPI
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "apps" / "segvol"))
    try:
        from segvol_ohif import install_ohif_routes
    finally:
        sys.path.remove(str(ROOT / "apps" / "segvol"))
    app = FastAPI()
    shipped = APIRouter(prefix="/ohif")  # the shape of monailabel.endpoints.ohif: one catch-all for the build

    @shipped.get("/{path:path}")
    async def wheel(path: str):
        return {"from": "wheel", "path": path}

    app.include_router(shipped)
    install_ohif_routes(app)
    return TestClient(app)


def test_app_config_and_modules_come_from_the_project(client):
    config = client.get("/ohif/app-config.js")
    assert config.status_code == 200 and config.headers["content-type"].startswith("text/javascript")
    assert config.content == (OHIF / "app-config.js").read_bytes()
    assert "/ohif/segvol/segvol-extension.js" in config.text and "/ohif/segvol/segvol-mode.js" in config.text
    for name in ("segvol-extension.js", "segvol-mode.js"):
        response = client.get(f"/ohif/segvol/{name}")
        assert response.status_code == 200 and response.content == (OHIF / name).read_bytes()
        assert response.headers["cache-control"] == "no-cache"
    # the rest of the viewer is still the wheel's build
    assert client.get("/ohif/index.html").json() == {"from": "wheel", "path": "index.html"}


@pytest.mark.parametrize("name", ["nothing.js", ".hidden", "app-config.js", "..%2Fsegvol_ohif.py", "..%5Cmain.py"])
def test_only_files_of_the_extension_folder_are_served(client, name):
    response = client.get(f"/ohif/segvol/{name}")
    body = response.content
    assert response.status_code == 404 or response.json().get("from") == "wheel"
    assert b"install_ohif_routes" not in body and b"SegVolApp" not in body


def test_the_modules_parse_as_javascript():
    import shutil

    if not shutil.which("node"):
        pytest.skip("node is not installed")
    for name in ("segvol-extension.js", "segvol-mode.js"):
        done = subprocess.run(["node", "--input-type=module", "--check"], input=(OHIF / name).read_text(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    done = subprocess.run(["node", "--check", str(OHIF / "app-config.js")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
