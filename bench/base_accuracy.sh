#!/usr/bin/env bash
# The default model's accuracy on every task (README table), one task after another.
#   bash bench/base_accuracy.sh [THREADS]
set -u
cd "$(dirname "$0")/.."
threads=${1:-2}
for spec in "arc_easy test 300" "arc_challenge test 300" "gsm8k test 200" "humaneval test 164" "mbpp test 199" "math test500 100"; do
  set -- $spec
  .venv/bin/python evaluate.py --task $1 --split $2 --limit $3 --threads $threads --out runs/base-$1-$2.jsonl 2>&1 | grep -a "accuracy"
done
