#!/usr/bin/env bash
# The README's "Results so far" figures: `finetune run medical` (what `make recipe=medical` runs) on the shipped
# sample, in its own folder, then its eval, merge and GGUF reports copied to benchmarks/results/sample/medical/ and
# the README section regenerated from them.
#   bash benchmarks/sample_run.sh            (a few minutes on 2 cores; the GGUF check needs `make setup-llamacpp`)
set -euo pipefail
cd "$(dirname "$0")/.."
finetune=${FINETUNE:-.venv/bin/finetune}
python=${PYTHON:-.venv/bin/python}
run=runs/readme-sample-medical
"$finetune" run medical train.output_dir=$run --overwrite
results=benchmarks/results/sample/medical
mkdir -p "$results"
cp "$run/eval.json" "$run/eval.md" "$run/run.json" "$run/merged/merge.json" "$run/gguf/export.json" "$results/"
"$python" benchmarks/readme_results.py
