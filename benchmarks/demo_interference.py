"""Where task arithmetic loses accuracy on a demo zoo: own gain against interference.

For each task i, on a generated split (val by default), through the pipeline's own loaders,
TaskVector, apply_in_place and evaluate:
  self(lam)     theta_0 + lam * tau_i                      the task's own gain at lam
  others(lam)   theta_0 + lam * sum_{j != i} tau_j          what the other task vectors do to it
  shared(lam)   theta_0 + lam * (K-1) * mean_j tau_j        ... their part shared by all tasks
  specific(lam) others(lam) minus that shared part          ... their task-specific part
  TA(lam)       theta_0 + lam * sum_j tau_j
and the forgetting matrix: accuracy change of task i (column) under theta_0 + tau_j (row).

    python benchmarks/demo_interference.py --zoo checkpoints/demo [--split val] [--lambdas 0.1 0.3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.demo.mechanism import forgetting  # noqa: E402
from src.demo.zoo import accuracy, load_built, stored_config  # noqa: E402
from src.modeling import build_image_encoder  # noqa: E402
from src.task_vectors import TaskVector  # noqa: E402
from src.tuning import apply_in_place  # noqa: E402


def interference(zoo_dir: str | Path, model: str, split: str = "val",
                 lambdas: tuple[float, ...] = (0.1, 0.3)) -> dict:
    """Accuracies (%) per task for every probe above; see the module docstring."""
    zoo_dir = Path(zoo_dir)
    cfg = stored_config(zoo_dir)
    tasks, design = list(cfg.tasks), cfg.design
    zs, heads, tau = load_built(zoo_dir, tasks)
    encoder = build_image_encoder(model, zs).eval()
    params = encoder.state_dict()
    total = sum(tau.values())
    shared = ((len(tasks) - 1) / len(tasks)) * total  # (K-1) x the mean task vector

    def acc(update: TaskVector, lam: float, task: str) -> float:
        apply_in_place(params, zs, update, lam)
        return accuracy(encoder, heads[task], task, split, design)

    probes: dict[str, dict[str, float]] = {"zero-shot": {}, "fine-tuned": {}}
    for t in tasks:
        probes["zero-shot"][t] = acc(total, 0.0, t)
        probes["fine-tuned"][t] = acc(tau[t], 1.0, t)
        others = total - tau[t]
        updates = {"self": tau[t], "others": others, "shared": shared, "specific": others - shared, "TA": total}
        for lam in lambdas:
            for name, update in updates.items():
                probes.setdefault(f"{name} {lam}", {})[t] = acc(update, lam, t)
    forget = forgetting(params, zs, tau, lambda t: accuracy(encoder, heads[t], t, split, design))
    return {"split": split, "tasks": tasks, "probes": probes, "forgetting": forget["matrix"],
            "mean_forgetting": forget["mean"]}


def format_table(res: dict) -> str:
    tasks = res["tasks"]
    w = max(len(t) for t in tasks) + 1
    head = f"{'':16}" + "".join(f"{t[:w - 1]:>{w}}" for t in tasks) + f"{'avg':>7}"
    lines = [f"accuracy on {res['split']} (%)", head]
    for name, d in res["probes"].items():
        lines.append(f"{name:16}" + "".join(f"{d[t]:{w}.1f}" for t in tasks)
                     + f"{np.mean([d[t] for t in tasks]):7.1f}")
    lines += ["", "forgetting: accuracy change of the column task under theta_0 + tau_row", head[:-7]]
    for j in tasks:
        lines.append(f"{j:16}" + "".join(f"{res['forgetting'][j][i]:{w}.1f}" for i in tasks))
    lines.append(f"mean off-diagonal change: {res['mean_forgetting']:.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", default="checkpoints/demo", help="a built zoo folder (<checkpoint-dir>/<model>)")
    p.add_argument("--model", default=None, help="model name (default: the zoo folder's name)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--out", default=None, help="also write the result as JSON")
    a = p.parse_args(argv)
    if not (Path(a.zoo) / "zoo.json").exists():
        p.error(f"{a.zoo}/zoo.json not found: build the zoo first (python -m src.demo.zoo --model demo)")
    torch.set_num_threads(1)
    res = interference(a.zoo, a.model or Path(a.zoo).name, a.split, tuple(a.lambdas))
    print(format_table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
