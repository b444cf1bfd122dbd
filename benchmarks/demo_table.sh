#!/usr/bin/env bash
# The README's results table and figures for the embedded benchmark (demo zoo, seed 0).
#   bash benchmarks/demo_table.sh            # ~5 minutes on 2 CPU cores once the zoo exists
set -eu
cd "$(dirname "$0")/.."
P=(--model demo --no-progress --threads 1 --skip-existing)
python main.py "${P[@]}" --merge zeroshot
python main.py "${P[@]}" --merge finetuned
for m in TA TIES TSV-M Iso-C; do
  python main.py "${P[@]}" --merge "$m"
  python main.py "${P[@]}" --merge "$m" --c
done
python main.py "${P[@]}" --merge TA --scaling_coef auto
python main.py "${P[@]}" --merge TA --scaling_coef auto --c
python -m src.results logs/demo --decimals 1 --out benchmarks/figures/demo_table.md
python -m src.plots spectrum --model demo --tasks demo --merge TA --out benchmarks/figures/demo_spectrum
python -m src.plots scaling logs/demo --merge TA --out benchmarks/figures/demo_scaling
cat benchmarks/figures/demo_table.md
