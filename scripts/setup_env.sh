#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements plus this project (editable) when missing or out of date.
# Sourced by serve.sh and test.sh so each quick-start command does all of its own set-up on a fresh clone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEGVOL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.segvol-requirements.sha1"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements (first run takes about 7 minutes)" >&2
  # Keep Python 3.11's bundled pip: newer pips crash in `pip check` on itk's wheel tags.
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
