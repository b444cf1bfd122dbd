"""Cost of reading the logs: `python -m src.results` on generated results.jsonl files.

    python benchmarks/results_io.py                      # (a) 10^6 short lines (and 10^5, for the ratio), (b) 200,000 keys
    python benchmarks/results_io.py --lines 100000 --keys 20000 --timeout 120

(a) N short valid lines (a few configurations, zero-shot and fine-tuned rows among them), timed at N/10 and N:
    the ratio of the two times should be about 10 (linear).
(b) one line with K accuracy keys (plus a fine-tuned line of the same tasks), the case that was quadratic.
The files go to a temporary folder that is removed afterwards. Each reader runs in its own process, with a timeout.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def short_lines(path: Path, count: int) -> int:
    """``count`` short valid lines: references, then TA/TIES with and without SVC at a few seeds."""
    rng = random.Random(0)
    tasks = ["MNIST", "DTD", "EuroSAT"]
    merges = [("zeroshot", False), ("finetuned", False), ("TA", False), ("TA", True), ("TIES", False), ("TIES", True)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            merge, svc = merges[i % len(merges)]
            row = {"model": "ViT-B-32", "merge": merge, "svc": svc, "seed": i,
                   "accuracy": {t: round(rng.uniform(40, 99), 2) for t in tasks}}
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def wide_line(path: Path, keys: int) -> int:
    """One TA line with ``keys`` accuracy keys, and the fine-tuned line of the same tasks (normalisation)."""
    tasks = [f"task{i:06d}" for i in range(keys)]
    with open(path, "w", encoding="utf-8") as f:
        for merge in ("finetuned", "TA"):
            row = {"model": "ViT-B-32", "merge": merge, "svc": False, "tasks": tasks,
                   "accuracy": {t: 50.0 + (i % 50) for i, t in enumerate(tasks)}}
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def time_reader(path: Path, timeout: float) -> str:
    """Wall time of `python -m src.results <path> --format csv` (output discarded), or why it has no time."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "src.results", str(path), "--format", "csv"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s (killed at the timeout)"
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"{seconds:.1f} s, FAILED (exit {done.returncode}): {tail}"
    return f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="short lines of case (a) (default 10^6)")
    parser.add_argument("--keys", type=int, default=200_000, help="accuracy keys of case (b) (default 200,000)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per reader run (default 600)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="results_io_") as tmp:
        for count in (args.lines // 10, args.lines):
            path = Path(tmp) / f"short_{count}.jsonl"
            size = short_lines(path, count)
            print(f"(a) {count:>9,} short lines ({size / 2**20:6.1f} MiB): {time_reader(path, args.timeout)}",
                  flush=True)
            path.unlink()
        path = Path(tmp) / "wide.jsonl"
        size = wide_line(path, args.keys)
        print(f"(b) 1 line of {args.keys:,} accuracy keys ({size / 2**20:.1f} MiB, + its fine-tuned line): "
              f"{time_reader(path, args.timeout)}", flush=True)


if __name__ == "__main__":
    main()
