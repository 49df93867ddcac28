#!/usr/bin/env bash
# Every adaptation strategy of adapt.py on one unseen task, with the experts in experts/ (RESULTS.md).
#   bash bench/adapt_all.sh TASK [LIMIT] [THREADS] [MODES...]
# Each mode scores the same prompts (the few-shot examples are left out of all of them); prints each
# mode's row (bench/results_table.py) from runs/adapt-<mode>-<task>.json; runs/adapt-<task>.log holds
# the whole output.
set -u
cd "$(dirname "$0")/.."
task=$1; limit=${2:-200}; threads=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
modes=${*:-"none expert prompt cls fewshot"}
expert_of() { .venv/bin/python -c "import tasks, sys; print(tasks.get(sys.argv[1]).category)" "$1"; }  # the task's category
for mode in $modes; do
  extra=""
  [ "$mode" = expert ] && extra="--expert-name $(expert_of "$task")"
  .venv/bin/python adapt.py --mode "$mode" --task "$task" --limit "$limit" --threads "$threads" $extra \
    >> "runs/adapt-$task.log" 2>&1
  .venv/bin/python bench/results_table.py adapt "runs/adapt-$mode-$task.json" | tail -n 1
done
