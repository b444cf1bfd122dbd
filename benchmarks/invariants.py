"""Numbers that a refactoring must not move: digests of every merge (with and without SVC), of the
demo-micro zoo's files, and the accuracies of `bash run.sh demo-micro`.

    python benchmarks/invariants.py --write benchmarks/invariants.json   # on the reference commit
    python benchmarks/invariants.py --check benchmarks/invariants.json   # after a change: exit 1 on a difference

Merges run on two inputs: K = 8 synthetic task vectors with ViT-like key names and shapes (a shared
low-rank part, a task low-rank part, dense noise), and the demo-micro zoo's task vectors. Every
registered method runs with its defaults and the plain-SVD decomposition (`decomposition="svd"`,
ignored by code that has no such option), then SVC with its default alpha. Each merged tensor is
hashed bit for bit. `--skip-run-sh` leaves out the sweep (about 2 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import merge_func  # noqa: E402
from src.svc import svc  # noqa: E402
from src.task_vectors import TaskVector  # noqa: E402


def synthetic_task_vectors(k: int = 8, width: int = 48, seed: int = 0) -> list[TaskVector]:
    """K task vectors over a two-block ViT-shaped encoder."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.visual.class_embedding": (width,), "model.visual.positional_embedding": (50, width),
              "model.visual.conv1.weight": (width, 3, 8, 8), "model.visual.ln_pre.weight": (width,),
              "model.visual.proj": (width, 32)}
    for b in range(2):
        p = f"model.visual.transformer.resblocks.{b}."
        shapes.update({p + "ln_1.weight": (width,), p + "attn.in_proj_weight": (3 * width, width),
                       p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                       p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_proj.weight": (width, 4 * width)})

    def low_rank(shape, rank, scale):
        if len(shape) < 2:
            return scale * torch.randn(shape, generator=g)
        m, n = shape[0], int(torch.tensor(shape[1:]).prod())
        a, b = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
        return (scale * a @ b / rank).reshape(shape)

    shared = {key: low_rank(s, 4, 0.02) for key, s in shapes.items()}
    return [TaskVector(vector={key: shared[key] + low_rank(s, 8, 0.03) + 0.002 * torch.randn(s, generator=g)
                               for key, s in shapes.items()}) for _ in range(k)]


def demo_task_vectors(base: Path) -> tuple[list[TaskVector], dict[str, str]]:
    """demo-micro's task vectors (the zoo is built under ``base`` if needed) and its files' digests."""
    import clip
    from src.demo.zoo import ensure_zoo

    folder = Path(ensure_zoo("demo-micro", str(base / "checkpoints")))
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".pt", ".safetensors")}
    ckpts = clip.find_checkpoints("demo-micro", str(base), ["Digits", "Shapes", "Colors"])
    zeroshot = ckpts.load_zeroshot("demo-micro")
    return [TaskVector(zeroshot, ckpts.load_finetuned(t, zeroshot)) for t in ckpts.finetuned], files


def digest(tv: TaskVector) -> str:
    h = hashlib.sha256()
    for key in sorted(tv.vector):
        t = tv.vector[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def merge_digests(tvs: list[TaskVector]) -> dict[str, str]:
    out = {}
    config = SimpleNamespace(decomposition="svd")
    for name, fn in merge_func.MERGE_METHODS.items():
        merged = fn(None, tvs, config)
        out[name] = digest(merged)
        alpha = 1.0 if name == "TSV-M" else 1.0 / len(tvs)  # the official sweep's default
        out[f"{name}+SVC"] = digest(svc(merged, tvs, alpha))
    return out


def run_sh_accuracies(base: Path) -> dict[str, dict[str, float]]:
    """`bash run.sh demo-micro` in a project folder of its own; accuracies per (method, svc) run."""
    logs = base / "logs"
    cmd = ["bash", str(ROOT / "run.sh"), "demo-micro", "--base_dir", str(base), "--logs", str(logs),
           "--threads", "1", "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHON": sys.executable})
    runs = {}
    for line in (logs / "demo-micro" / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        runs[f"{r['merge']}{'+SVC' if r.get('svc') else ''}"] = r["accuracy"]
    return dict(sorted(runs.items()))


def measure(skip_run_sh: bool) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        demo_tvs, zoo_files = demo_task_vectors(Path(tmp))
        out = {"synthetic_k8": merge_digests(synthetic_task_vectors()), "demo_micro": merge_digests(demo_tvs),
               "demo_micro_zoo_files": zoo_files}
        if not skip_run_sh:
            out["run_sh_demo_micro"] = run_sh_accuracies(Path(tmp))
    return out


def compare(expected: dict, got: dict) -> list[str]:
    diffs = []
    for section, values in expected.items():
        if section not in got:
            continue
        for name, value in values.items():
            if got[section].get(name) != value:
                diffs.append(f"{section}/{name}: expected {value}, got {got[section].get(name)}")
        diffs += [f"{section}/{name}: new, not in the reference" for name in got[section] if name not in values]
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="FILE", help="measure and write the reference")
    what.add_argument("--check", metavar="FILE", help="measure and compare with the reference")
    p.add_argument("--skip-run-sh", action="store_true", help="leave out the run.sh demo-micro sweep")
    args = p.parse_args()
    got = measure(args.skip_run_sh)
    if args.write:
        Path(args.write).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"written: {args.write}")
        return
    diffs = compare(json.loads(Path(args.check).read_text()), got)
    checked = sum(len(v) for k, v in got.items())
    for line in diffs:
        print(line)
    print(f"{checked} values checked, {len(diffs)} differ")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
