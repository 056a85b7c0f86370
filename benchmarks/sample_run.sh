#!/usr/bin/env bash
# The README's figures on the shipped samples: `finetune run medical` (what `make recipe=medical` runs) and
# `finetune run medical-cpt`, each in its own folder; their reports are copied to benchmarks/results/sample/NAME/
# and the README sections regenerated from them.
#   bash benchmarks/sample_run.sh            (about 10 minutes on 2 cores; the GGUF check needs `make setup-llamacpp`)
set -euo pipefail
cd "$(dirname "$0")/.."
finetune=${FINETUNE:-.venv/bin/finetune}
python=${PYTHON:-.venv/bin/python}
run=runs/readme-sample-medical
"$finetune" run medical train.output_dir=$run --overwrite
results=benchmarks/results/sample/medical
mkdir -p "$results"
cp "$run/eval.json" "$run/eval.md" "$run/run.json" "$run/merged/merge.json" "$run/gguf/export.json" "$results/"
cpt=runs/readme-sample-medical-cpt
"$finetune" run medical-cpt train.output_dir=$cpt --overwrite
mkdir -p benchmarks/results/sample/medical-cpt
cp "$cpt/eval.json" "$cpt/eval.md" "$cpt/run.json" benchmarks/results/sample/medical-cpt/
"$python" benchmarks/readme_results.py
