"""The OHIF extension's JavaScript: its pure functions' unit tests (``node --test tests/ohif``) and ESLint
(``eslint.config.mjs``) over ``apps/segvol/ohif`` and ``tests/ohif``. Node and ESLint come from
``bash scripts/install_system_deps.sh`` (ESLint is a dev dependency of tests/e2e/package.json); without them these
tests skip, saying so."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from _server import ROOT

NODE = shutil.which("node")
ESLINT = ROOT / "tests" / "e2e" / "node_modules" / ".bin" / "eslint"


def _node_major() -> int:
    done = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30)
    return int(done.stdout.strip().lstrip("v").split(".")[0])


needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (bash scripts/install_system_deps.sh)")
needs_eslint = pytest.mark.skipif(NODE is None or not ESLINT.exists(),
                                  reason="ESLint is not installed (bash scripts/install_system_deps.sh runs npm ci in "
                                         "tests/e2e)")


@needs_node
def test_the_extension_pure_functions_pass_their_node_tests():
    if _node_major() < 18:
        pytest.skip("node --test needs Node 18 or newer")
    done = subprocess.run([NODE, "--test", "tests/ohif/"], cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass " in done.stdout


@needs_eslint
def test_eslint_finds_nothing_in_the_extension_and_catches_an_undefined_name():
    done = subprocess.run([str(ESLINT), "apps/segvol/ohif", "tests/ohif"], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # the configuration applies to the extension's files: a module using an undefined name fails
    bad = subprocess.run([str(ESLINT), "--stdin", "--stdin-filename", "apps/segvol/ohif/probe.js"], cwd=str(ROOT),
                         input="export const value = undefinedName + 1;\n", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no-undef" in bad.stdout, bad.stdout + bad.stderr
