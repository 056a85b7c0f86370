#!/usr/bin/env bash
# The README's "Results" runs: each domain recipe trained on a real data set from ../shared/data
# and evaluated, base vs adapter, on held-out real data (evals/real/*.yaml). CPU, embedded model.
#   bash benchmarks/real_data.sh [medical] [legal] [finance]     (default: all three, ~3.2 hours on 2 cores)
# Runs go to runs/real/NAME/ (eval.md is the table); the data sets are read in place, never copied.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared/data
[ -d "$shared" ] || { echo "real_data.sh: $shared not found; these runs need the shared data sets beside the project" >&2; exit 2; }
finetune=${FINETUNE:-.venv/bin/finetune}
common=(export.merge=false export.gguf=null train.save_steps=25)

run() {
  local name=$1; shift
  "$finetune" run "$name" train.output_dir="runs/real/$name" eval.suite="evals/real/$name.yaml" "${common[@]}" "$@"
}

domains=("$@")
[ ${#domains[@]} -gt 0 ] || domains=(medical legal finance)
for name in "${domains[@]}"; do
    case $name in
      # All 500 PQA-L items outside the official 500 test PMIDs, each question asked of its abstract's
      # conclusion (the reasoning-free setting), three epochs at lr 2e-4; scored in both settings.
      medical) run medical "data.sources=[{path: $shared/medical/pubmedqa/ori_pqal.json, reader: pubmedqa_reasoning_free}]" train.epochs=3 train.learning_rate=2e-4 ;;
      # All 1,037 (NDA, hypothesis) pairs of ContractNLI's dev split, the label alone (the recipe's default), one epoch.
      legal) run legal "data.sources=[{path: $shared/legal/contract-nli/dev.json, reader: contractnli}]" ;;
      # All 1,668 TAT-QA dev questions as 278 report conversations (2 longer than 2,048 tokens are dropped), two epochs.
      finance) run finance "data.sources=[{path: $shared/finance/tat-qa/tatqa_dataset_dev.json, reader: tatqa_conversation}]" ;;
      *) echo "real_data.sh: unknown domain $name (medical, legal, finance)" >&2; exit 2 ;;
    esac
done
