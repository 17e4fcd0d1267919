#!/usr/bin/env python3
"""Start, stop and fill a local Orthanc (DICOMweb) for SegVol Label, with deploy/orthanc/orthanc.json.

    python scripts/orthanc.py start [--port 8042] [--storage DIR] [--no-samples] [FOLDER ...]
    python scripts/orthanc.py upload [--port 8042] FOLDER_OR_FILE ...
    python scripts/orthanc.py status [--port 8042]
    python scripts/orthanc.py stop [--storage DIR]

``start`` runs ``Orthanc`` (Debian packages ``orthanc`` and ``orthanc-dicomweb``) as a background process of ours on
127.0.0.1 (no system service), waits until it answers, then uploads the sample CT studies in ../shared/data/dicom
(unless ``--no-samples``) and every FOLDER given, through Orthanc's REST API (``POST /instances``). Re-uploading is
harmless.
The DICOMweb root is then ``http://127.0.0.1:<port>/dicom-web`` (what ``--studies`` takes). Storage defaults to
``build/orthanc`` in the repository; the process id is kept in ``<storage>/orthanc.pid`` and its log in
``<storage>/orthanc.log``. ``--foreground`` runs Orthanc in this process instead (Ctrl-C stops it).

Only the Python standard library is used, so the script runs with any python3.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "orthanc" / "orthanc.json"
SAMPLES = ROOT.parent / "shared" / "data" / "dicom"
DEFAULT_STORAGE = ROOT / "build" / "orthanc"
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",  # Debian/Ubuntu orthanc-dicomweb
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


class OrthancError(RuntimeError):
    pass


def _request(url: str, data: Optional[bytes] = None, method: str = "GET", timeout: float = 60,
             content_type: str = "application/dicom") -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def find_plugin() -> str:
    explicit = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if explicit:
        return explicit
    for candidate in PLUGIN_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise OrthancError("the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) is not installed: "
                       "apt-get install orthanc-dicomweb (or bash scripts/install_system_deps.sh), "
                       "or point ORTHANC_DICOMWEB_PLUGIN at it")


def find_orthanc() -> str:
    binary = os.environ.get("ORTHANC_BINARY") or shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if not binary:
        raise OrthancError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb "
                           "(or bash scripts/install_system_deps.sh)")
    return binary


def alive(port: int, timeout: float = 2) -> bool:
    try:
        return "Version" in json.loads(_request(f"{base_url(port)}/system", timeout=timeout))
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _environment(port: int, storage: Path) -> Dict[str, str]:
    return dict(os.environ, ORTHANC_STORAGE=str(storage), ORTHANC_HTTP_PORT=str(port), ORTHANC_PLUGINS=find_plugin())


def start(port: int = 8042, storage: Path = DEFAULT_STORAGE, timeout: float = 60) -> subprocess.Popen:
    """Start Orthanc in the background (its own session, so a Ctrl-C in the caller's terminal does not reach it)."""
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if alive(port):
        raise OrthancError(f"something already answers on {base_url(port)} (stop it, or use --port)")
    log = open(storage / "orthanc.log", "ab")
    process = subprocess.Popen([find_orthanc(), str(CONFIG)], env=_environment(port, storage), cwd=str(storage),
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    (storage / "orthanc.pid").write_text(str(process.pid))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            tail = (storage / "orthanc.log").read_text(errors="replace")[-3000:]
            raise OrthancError(f"Orthanc exited with code {process.returncode}; its log ends with:\n{tail}")
        if alive(port):
            if "dicom-web" not in json.loads(_request(f"{base_url(port)}/plugins")):
                stop(storage)
                raise OrthancError("Orthanc started without its DICOMweb plugin; see " + str(storage / "orthanc.log"))
            return process
        time.sleep(0.2)
    stop(storage)
    raise OrthancError(f"Orthanc did not answer on {base_url(port)} within {timeout} s; see {storage / 'orthanc.log'}")


def stop(storage: Path = DEFAULT_STORAGE, timeout: float = 20) -> bool:
    """Stop the Orthanc that ``start`` launched with this storage folder (by its recorded process id)."""
    pid_file = Path(storage).resolve() / "orthanc.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    pid_file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it when it is our child (tests start and stop it in one process)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return True


def _dicom_files(paths: Iterable[Path]) -> List[Path]:
    files: List[Path] = []
    for path in paths:
        path = Path(path)
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for candidate in candidates:
            if candidate.name.upper() == "DICOMDIR":
                continue
            try:
                with open(candidate, "rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        files.append(candidate)
            except OSError:
                continue
    return files


def upload(paths: Iterable[Path], port: int = 8042, quiet: bool = False) -> Dict[str, object]:
    """Upload every DICOM file (Part 10, 'DICM' preamble) under ``paths`` with ``POST /instances``."""
    files = _dicom_files(paths)
    studies, series, failed = set(), set(), []
    for path in files:
        try:
            answer = json.loads(_request(f"{base_url(port)}/instances", data=path.read_bytes(), method="POST"))
        except urllib.error.HTTPError as error:
            failed.append(f"{path}: HTTP {error.code} {error.read()[:200]!r}")
            continue
        studies.add(answer.get("ParentStudy"))
        series.add(answer.get("ParentSeries"))
    summary = {"files": len(files), "uploaded": len(files) - len(failed), "studies": len(studies),
               "series": len(series), "failed": failed}
    if not quiet:
        print(f"[orthanc] uploaded {summary['uploaded']}/{len(files)} DICOM files "
              f"({len(studies)} studies, {len(series)} series)", file=sys.stderr)
        for line in failed:
            print(f"[orthanc] failed: {line}", file=sys.stderr)
    return summary


def _main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "upload", "status"))
    parser.add_argument("paths", nargs="*", type=Path, help="DICOM folders/files to upload")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ORTHANC_PORT", 8042)))
    parser.add_argument("--storage", type=Path, default=Path(os.environ.get("ORTHANC_STORAGE_DIR", DEFAULT_STORAGE)))
    parser.add_argument("--no-samples", action="store_true", help="do not upload ../shared/data/dicom")
    parser.add_argument("--foreground", action="store_true", help="run Orthanc in this process (Ctrl-C stops it)")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.command == "stop":
            print("[orthanc] stopped" if stop(args.storage) else "[orthanc] not running (no pid file)",
                  file=sys.stderr)
            return 0
        if args.command == "status":
            up = alive(args.port)
            print(f"[orthanc] {base_url(args.port)}: {'up' if up else 'down'}", file=sys.stderr)
            if up:
                print(json.dumps({"statistics": json.loads(_request(f"{base_url(args.port)}/statistics")),
                                  "dicomweb": f"{base_url(args.port)}/dicom-web"}, indent=1))
            return 0 if up else 1
        if args.command == "start":
            if args.foreground:
                storage = args.storage.resolve()
                storage.mkdir(parents=True, exist_ok=True)
                os.execve(find_orthanc(), [find_orthanc(), str(CONFIG)], _environment(args.port, storage))
            process = start(args.port, args.storage)
            print(f"[orthanc] started (pid {process.pid}): DICOMweb at {base_url(args.port)}/dicom-web, "
                  f"storage {args.storage.resolve()}", file=sys.stderr)
        if not alive(args.port):
            raise OrthancError(f"no Orthanc on {base_url(args.port)}: run `python scripts/orthanc.py start` first")
        paths = list(args.paths)
        if args.command == "start" and not args.no_samples:
            if SAMPLES.is_dir():
                paths.insert(0, SAMPLES)
            else:
                print(f"[orthanc] no sample studies at {SAMPLES}: upload your own with "
                      "`python scripts/orthanc.py upload FOLDER`", file=sys.stderr)
        if paths:
            summary = upload(paths, args.port)
            if summary["failed"] and args.command == "upload":
                return 1
        return 0
    except OrthancError as error:
        print(f"[orthanc] error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
