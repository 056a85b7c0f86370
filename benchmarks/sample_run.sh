#!/usr/bin/env bash
# The README's figures on the shipped samples: `finetune run medical` (what `make recipe=medical` runs) and
# `finetune run medical-cpt`, each in its own folder, and the medical run exported as every other GGUF type; their
# reports, and what the medical run and its q4_k_m export printed (console.txt), are copied to
# benchmarks/results/sample/NAME/ and the README sections regenerated from them.
#   bash benchmarks/sample_run.sh   (about 5 minutes on 2 cores: 290 s from an empty model cache;
#                                    the GGUF checks need `make setup-llamacpp`)
set -euo pipefail
cd "$(dirname "$0")/.."
finetune=${FINETUNE:-.venv/bin/finetune}
python=${PYTHON:-.venv/bin/python}
run=runs/readme-sample-medical
results=benchmarks/results/sample/medical
mkdir -p "$results"
shown() {  # the command and what it prints, as a user sees them
  echo "\$ finetune $*"
  "$finetune" "$@"
}
{
  shown run medical train.output_dir=$run --overwrite
  shown export $run --gguf q4_k_m
} | tee "$results/console.txt"
for outtype in f32 q8_0 q5_k_m q6_k; do
  "$finetune" export $run --gguf $outtype
done
cp "$run/eval.json" "$run/eval.md" "$run/run.json" "$run/merged/merge.json" "$run/gguf/export.json" "$results/"
cpt=runs/readme-sample-medical-cpt
"$finetune" run medical-cpt train.output_dir=$cpt --overwrite
mkdir -p benchmarks/results/sample/medical-cpt
cp "$cpt/eval.json" "$cpt/eval.md" "$cpt/run.json" benchmarks/results/sample/medical-cpt/
"$python" benchmarks/readme_results.py
