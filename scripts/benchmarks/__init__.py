"""Benchmark sub-commands of scripts/benchmark.py (one module each)."""
