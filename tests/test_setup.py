"""The installed environment is the pinned, consistent set the README promises."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_versions_are_installed():
    assert version("torch").startswith("2.14.1")
    assert version("monailabel") == "0.8.5"
    assert version("monai").startswith("1.5.")
    assert version("pydicom") == "2.4.4"
    assert version("dicomweb-client").startswith("0.59.")
    assert version("pynetdicom").startswith("2.")
    assert int(version("numpy").split(".")[0]) < 2


def test_pip_check_finds_no_broken_requirement():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_quick_start_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick_start.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/serve.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
