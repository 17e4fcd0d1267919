#!/usr/bin/env bash
# Starts the SegVol Label server against a DICOMweb server (default: the local Orthanc of scripts/orthanc.py), with
# OHIF v3 (shipped inside the monailabel package) at http://127.0.0.1:$SEGVOL_PORT/ohif/ (sets up .venv when needed).
#   SEGVOL_DICOMWEB   DICOMweb root (default http://127.0.0.1:${ORTHANC_PORT:-8042}/dicom-web)
#   SEGVOL_PORT       port of the app (default 8000; OHIF's MONAI Label panel assumes 8000 unless told otherwise)
#   SEGVOL_HOST       bind address (default 127.0.0.1)
#   SEGVOL_START_ORTHANC=1   also start Orthanc (scripts/orthanc.py start, sample studies uploaded) if none answers
# Extra arguments go to `monailabel start_server`, e.g. --conf weights /path/to/SegVol_v1.pth --conf device cuda
#
# DICOM SEG: MONAI Label writes the SEG of a saved label with dcmqi's itkimage2segimage (the dcmqi package of
# requirements.txt, installed in .venv/bin by setup_env.sh and first on PATH), so it never downloads dcmqi.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
ORTHANC_PORT="${ORTHANC_PORT:-8042}"
DICOMWEB="${SEGVOL_DICOMWEB:-http://127.0.0.1:${ORTHANC_PORT}/dicom-web}"

if [ "${SEGVOL_START_ORTHANC:-0}" = "1" ] && ! python "$ROOT/scripts/orthanc.py" status --port "$ORTHANC_PORT" >/dev/null 2>&1; then
  python "$ROOT/scripts/orthanc.py" start --port "$ORTHANC_PORT"
fi
if ! python - "$DICOMWEB" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/studies?limit=1", timeout=5).read()
except Exception as error:
    sys.exit(f"[serve] no DICOMweb server answers at {sys.argv[1]} ({error}); start one with: python scripts/orthanc.py start")
EOF
then
  exit 1
fi

# MONAI Label caches the DICOMweb series lists (images, and images that have a SEG) for 2 hours by default, so a label
# saved from OHIF would not show as "labeled" before then; 30 s keeps the counts fresh (QIDO on Orthanc is cheap).
export MONAI_LABEL_DICOMWEB_CACHE_EXPIRY="${MONAI_LABEL_DICOMWEB_CACHE_EXPIRY:-30}"
export MONAI_LABEL_TRACKING_ENABLED="${MONAI_LABEL_TRACKING_ENABLED:-false}"
cd "$ROOT"
echo "[serve] DICOMweb: $DICOMWEB   OHIF: http://${SEGVOL_HOST:-127.0.0.1}:${SEGVOL_PORT:-8000}/ohif/" >&2
# SegVol Label's hardened server (apps/segvol/segvol_server.py: MONAI Label's app, same arguments), not the
# `monailabel` wrapper script, which also passes its arguments on unquoted ($*).
exec python "$ROOT/apps/segvol/segvol_server.py" --app "$ROOT/apps/segvol" --studies "$DICOMWEB" \
  --host "${SEGVOL_HOST:-127.0.0.1}" --port "${SEGVOL_PORT:-8000}" "$@"
