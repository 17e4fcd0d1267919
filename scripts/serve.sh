#!/usr/bin/env bash
# Starts the SegVol Label MONAI Label server on 127.0.0.1 with a local datastore (sets up .venv first when needed).
#   SEGVOL_DATASTORE  datastore folder (default: ./datastore; created if missing)
#   SEGVOL_PORT       port (default 8000)
# Extra arguments go to `monailabel start_server`, e.g. --conf weights /path/to/SegVol_v1.pth --conf device cuda
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
DATASTORE="${SEGVOL_DATASTORE:-$ROOT/datastore}"
SAMPLES="${SEGVOL_SAMPLES:-$ROOT/../shared/data/totalseg-example}"
mkdir -p "$DATASTORE"
if [ -z "$(ls -A "$DATASTORE" 2>/dev/null)" ]; then
  if [ -d "$SAMPLES" ]; then
    echo "[serve] copying sample CTs from $SAMPLES into $DATASTORE" >&2
    cp "$SAMPLES"/example_ct*.nii.gz "$DATASTORE"/
  else
    echo "[serve] $DATASTORE is empty: copy NIfTI CTs (*.nii.gz) into it, or upload them with PUT /datastore/image" >&2
  fi
fi
cd "$ROOT"
exec python "$ROOT/apps/segvol/segvol_server.py" --app "$ROOT/apps/segvol" --studies "$DATASTORE" \
  --host "${SEGVOL_HOST:-127.0.0.1}" --port "${SEGVOL_PORT:-8000}" "$@"
