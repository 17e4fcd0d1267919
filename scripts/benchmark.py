#!/usr/bin/env python
"""Benchmarks that print one JSON line each.

    python scripts/benchmark.py encoder [--repeats N] [--device cpu]
    python scripts/benchmark.py fh ...
    python scripts/benchmark.py zoom ...

Each sub-command lives in scripts/benchmarks/<name>.py and exposes ``add_arguments(parser)`` and ``run(args) -> dict``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    import benchmarks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        modules[info.name] = module
        sub = commands.add_parser(info.name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    result = modules[args.command].run(args)
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
