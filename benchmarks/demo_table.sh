#!/usr/bin/env bash
# The results table and figures of docs/embedded-benchmark.md (demo zoo, seed 0).
#   bash benchmarks/demo_table.sh     # ~10 minutes on 2 CPU cores once the zoo exists
# Runs already in logs/demo/results.jsonl on the same checkpoints are reused, not rerun.
set -eu
cd "$(dirname "$0")/.."
P=(--no-progress --threads 1)
bash run.sh demo "${P[@]}"  # every method, with and without SVC
for c in "" --c; do  # TA with lambda chosen on the <Task>Val splits, without and with SVC
  python main.py --model demo "${P[@]}" --skip-existing --merge TA --scaling_coef auto $c
done
python -m src.results logs/demo --decimals 1 --out benchmarks/figures/demo_table.md
python -m src.plots spectrum --model demo --tasks demo --merge TA --out benchmarks/figures/demo_spectrum
python -m src.plots scaling logs/demo --merge TA --out benchmarks/figures/demo_scaling
cat benchmarks/figures/demo_table.md
