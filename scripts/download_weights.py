#!/usr/bin/env python
"""Download the official SegVol weights and CLIP tokenizer (Hugging Face ``BAAI/SegVol``) into a models folder.

    python scripts/download_weights.py [--models-dir models] [--endpoint https://huggingface.co]

Shows a progress bar per file and skips files already present. Without network access it fails within seconds and
says where to put the files by hand. The app's default ``weights`` setting is this folder.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

REPO = "BAAI/SegVol"
WEIGHTS = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
OPTIONAL = {"merges.txt", "tokenizer.json"}


def manual_instructions(models_dir: str) -> str:
    return (
        f"Place the files by hand instead:\n"
        f"  {os.path.join(models_dir, WEIGHTS)}   (from https://huggingface.co/{REPO}; SegVol_v1.pth from the SegVol "
        f"README also works)\n"
        f"  {models_dir}/{{{', '.join(TOKENIZER_FILES)}}}   (the CLIP tokenizer files of the same repository)\n"
        f"or start the app with --conf weights /path/to/checkpoint --conf tokenizer /path/to/tokenizer-folder."
    )


def check_reachable(endpoint: str, timeout: float) -> None:
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout):
        pass


def download(url: str, target: str, timeout: float) -> None:
    from tqdm import tqdm

    from segvol.io import atomic_output

    # never leave a truncated file under the final name (segvol.io: temp file, fsync, rename; removed on failure)
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_output(target) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target)) as bar:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR)
    parser.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    parser.add_argument("--revision", default="main")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a connection attempt gives up")
    args = parser.parse_args(argv)

    os.makedirs(args.models_dir, exist_ok=True)
    try:
        check_reachable(args.endpoint, args.timeout)
    except OSError as error:
        print(f"error: cannot reach {args.endpoint} ({error}).\n{manual_instructions(args.models_dir)}",
              file=sys.stderr)
        return 2
    for name in (WEIGHTS, *TOKENIZER_FILES):
        target = os.path.join(args.models_dir, name)
        if os.path.isfile(target):
            print(f"{name}: already present, skipped", file=sys.stderr)
            continue
        url = f"{args.endpoint.rstrip('/')}/{REPO}/resolve/{args.revision}/{name}"
        try:
            download(url, target, args.timeout)
        except urllib.error.HTTPError as error:
            if error.code == 404 and name in OPTIONAL:
                continue
            print(f"error: {url}: HTTP {error.code}.\n{manual_instructions(args.models_dir)}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"error: downloading {url} failed ({error}).\n{manual_instructions(args.models_dir)}",
                  file=sys.stderr)
            return 2
    print(f"SegVol weights and tokenizer are in {args.models_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
