#!/usr/bin/env bash
# Sweep every merge method with and without SVC, then print the results table.
#
#   bash run.sh                 # ViT-B-32, official settings (alpha 1/K; 1.0 for TSV-M)
#   bash run.sh demo            # the offline embedded benchmark
#   bash run.sh ViT-B-16 --tuned --tasks 14   # coefficients (and SVC's alpha) chosen on <Task>Val
#   bash run.sh demo --force    # rerun even when results.jsonl already holds a run
#
# Any other argument is passed to main.py. A run whose configuration is already in
# logs/<model>/results.jsonl is skipped unless --force; a failed run does not stop the sweep.
set -u
cd "$(dirname "$0")"
MODEL=ViT-B-32
if [[ $# -gt 0 && $1 != --* ]]; then MODEL=$1; shift; fi
PYTHON=${PYTHON:-python}
METHODS=${METHODS:-"TA TIES DARE TSV-M Iso-C Iso-CTS STAR WA"}
SKIP=--skip-existing
TUNED=()
EXTRA=()
for arg in "$@"; do
  case $arg in
    --force) SKIP= ;;
    --tuned) TUNED=(--scaling_coef auto) ;;
    *) EXTRA+=("$arg") ;;
  esac
done
LOGS=logs
for ((i = 0; i < ${#EXTRA[@]}; i++)); do [[ ${EXTRA[i]} == --logs ]] && LOGS=${EXTRA[i+1]}; done

failed=()
attempt() {  # attempt LABEL ARGS...: run main.py, remember failures, keep going
  local label=$1; shift
  echo "=== $MODEL $label"
  if ! "$PYTHON" main.py --model "$MODEL" $SKIP "$@" "${EXTRA[@]}"; then failed+=("$label"); fi
}

attempt zeroshot --merge zeroshot
attempt finetuned --merge finetuned
for method in $METHODS; do
  attempt "$method" --merge "$method" "${TUNED[@]}"
  if [[ ${#TUNED[@]} -gt 0 ]]; then
    attempt "$method+SVC" --merge "$method" --c --alpha auto "${TUNED[@]}"
  else  # main.py's default alpha: 1/K, and 1.0 after TSV-M as the official sweep intends
    attempt "$method+SVC" --merge "$method" --c
  fi
done

"$PYTHON" -m src.results "$LOGS/$MODEL" || failed+=("results table")
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED (${#failed[@]}): ${failed[*]}" >&2
  exit 1
fi
echo "all runs done"
