#!/usr/bin/env bash
# The GPU benchmark, on one GPU with no network (benchmarks/gpu_bench.py says what it measures); under 8 minutes on
# an H100 / H200. Appends its table to benchmarks/RESULTS.md.
#   bash benchmarks/gpu.sh             # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run   # on a CPU: the same code on a tiny model, two steps per variant (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_bench.py "$@"
