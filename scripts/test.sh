#!/usr/bin/env bash
# Runs ruff (the lint rules in pyproject.toml; any finding fails the run), then the full test suite (sets up .venv
# first when needed). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
ruff check .
exec python -m pytest tests "$@"
