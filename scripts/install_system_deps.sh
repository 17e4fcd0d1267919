#!/usr/bin/env bash
# System dependencies of the OHIF/Orthanc end-to-end test and of scripts/orthanc.py (Debian, run as root; idempotent).
#   orthanc + orthanc-dicomweb  the DICOMweb server (started by scripts/orthanc.py, never as a system service)
#   chromium                    the headless browser the e2e test drives
#   tests/e2e/node_modules      playwright-core (no browser download: it drives /usr/bin/chromium) and ESLint
# Nothing is done when everything is already there. Set SEGVOL_SKIP_SYSTEM_DEPS=1 to skip entirely.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "${SEGVOL_SKIP_SYSTEM_DEPS:-0}" = "1" ] && exit 0

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[deps] missing ${missing[*]}: install them (Debian: apt-get install ${missing[*]}) or the e2e test will skip" >&2
    exit 0
  fi
  echo "[deps] apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The orthanc package ships a system service; we never want it started (our script starts Orthanc itself), so
  # forbid service starts for the duration of the install (policy-rc.d exit 101 = "action not allowed").
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
  fi
  trap 'if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # In case a service was started anyway (no policy-rc.d honoured), stop it: it would hold port 8042.
  if command -v service >/dev/null 2>&1 && [ -x /etc/init.d/orthanc ]; then
    service orthanc stop >/dev/null 2>&1 || true
  fi
fi

if [ ! -d "$ROOT/tests/e2e/node_modules/playwright-core" ] || [ ! -x "$ROOT/tests/e2e/node_modules/.bin/eslint" ]; then
  echo "[deps] npm ci (tests/e2e: playwright-core without a browser download, and ESLint)" >&2
  (cd "$ROOT/tests/e2e" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
