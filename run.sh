#!/usr/bin/env bash
# Sweep every merge method with and without SVC, then print the results table.
#
#   bash run.sh                 # ViT-B-32, official settings (alpha 1/K; 1.0 for TSV-M)
#   bash run.sh demo            # the offline embedded benchmark
#   bash run.sh ViT-B-16 --tuned --tasks 14   # coefficients (and SVC's alpha) chosen on <Task>Val
#   bash run.sh demo --force    # rerun even when results.jsonl already holds a run
#
# Any other argument is passed to main.py. A run whose configuration is already in
# logs/<model>/results.jsonl is skipped (without starting main.py) unless --force; a failed run does
# not stop the sweep.
# The list of runs comes from src/sweep.py, which also sends the same sweep to Slurm.
set -u
cd "$(dirname "$0")"
MODEL=ViT-B-32
if [[ $# -gt 0 && $1 != --* ]]; then MODEL=$1; shift; fi
PYTHON=${PYTHON:-python}
SWEEP=(--model "$MODEL")
if [[ -n ${METHODS:-} ]]; then SWEEP+=(--methods $METHODS); fi  # default: every method
EXTRA=()
for arg in "$@"; do
  case $arg in
    --force | --tuned) SWEEP+=("$arg") ;;
    *) EXTRA+=("$arg") ;;
  esac
done

# one "LABEL<tab>main.py arguments (shell-quoted)" line per run
runs=$("$PYTHON" -m src.sweep "${SWEEP[@]}" --print-runs -- "${EXTRA[@]}") || exit 1
mapfile -t RUNS <<< "$runs"

failed=()
for line in "${RUNS[@]}"; do  # run each, remember failures, keep going
  [[ -n $line ]] || continue  # every run already done: the list is empty
  label=${line%%$'\t'*}
  eval "argv=(${line#*$'\t'})"
  echo "=== $MODEL $label"
  if ! "$PYTHON" main.py "${argv[@]}"; then failed+=("$label"); fi
done

# the table of the folder main.py wrote to (--logs DIR, --logs=DIR)
"$PYTHON" -m src.sweep --model "$MODEL" --table -- "${EXTRA[@]}" || failed+=("results table")
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED (${#failed[@]}): ${failed[*]}" >&2
  exit 1
fi
echo "all runs done"
