#!/usr/bin/env bash
# The README's "On real data" results. For each domain, `finetune sweep real/NAME` trains every variant of
# recipes/real/NAME.yaml's grid, scores each on the validation suite, picks the winner there, and scores the
# test suite once, on the winner alone. The sweep's tables and the winner's test report are then copied to
# benchmarks/results/real/NAME/; `python benchmarks/readme_results.py` writes the README's tables from them.
#   bash benchmarks/real_data.sh [medical] [legal] [finance]     (default: all three; on 2 cores medical took 2.5 hours,
#   legal 1.5 hours, finance 1.8 hours)
# A rerun continues where it stopped: finished variants are skipped, an unfinished one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d ../shared/data ] || {
  echo "real_data.sh: ../shared/data not found; these runs need the shared data sets beside the project" >&2
  exit 2
}
finetune=${FINETUNE:-.venv/bin/finetune}
python=${PYTHON:-.venv/bin/python}

domains=("$@")
[ ${#domains[@]} -gt 0 ] || domains=(medical legal finance)
for name in "${domains[@]}"; do
    "$finetune" sweep "real/$name"
    sweep=runs/real-$name-sweep
    final=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['final_run'])" "$sweep/sweep.json")
    results=benchmarks/results/real/$name
    mkdir -p "$results"
    cp "$sweep/sweep.json" "$sweep/sweep.md" "$sweep/sweep.png" "$results/"
    cp "$final/eval.json" "$final/eval.md" "$final/run.json" "$results/"
done
"$python" benchmarks/readme_results.py
