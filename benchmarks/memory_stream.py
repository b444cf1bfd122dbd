"""Peak memory of a TA + SVC merge of K checkpoints: eager (K+1 models in memory) vs streamed.

    python benchmarks/memory_stream.py                      # ViT-B-16, K = 20, safetensors
    python benchmarks/memory_stream.py --k 8 --format torch --model ViT-B-32

Writes K synthetic fine-tuned image-encoder checkpoints (open_clip ``model`` built with
``pretrained=None`` as the zero-shot; fine-tuned = zero-shot + a low-rank + noise delta on the
``visual.*`` keys; text-side keys unchanged, as in the real files) to a temporary folder under
/tmp, then measures each mode in a fresh subprocess (peak RSS = ``ru_maxrss``):
  eager     as the official code: each TaskVector is a dict (fine-tuned loaded fully, delta
            kept), so the K task vectors and the zero-shot model are in memory together;
  streamed  ``clip.load_state_dict`` lazy StateDicts; TaskVectors over them read one
            parameter at a time; the same ``merge_func`` TA and ``src.svc.svc``.
Both compute the same merged update (checked). The folder is deleted at the end (``--keep`` keeps it).
Heavy: about 0.45 GB per ViT-B/16 checkpoint on disk; eager needs ~K+2 models of RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_checkpoints(folder: str, model: str, k: int, fmt: str, rank: int = 16, seed: int = 0) -> list[str]:
    """Zero-shot + k fine-tuned checkpoints; returns their paths (zero-shot first)."""
    import torch
    from safetensors.torch import save_file

    from clip import create_model
    from clip.checkpoint import to_keys

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    zs = {k_: v.detach().contiguous() for k_, v in to_keys(create_model(model).state_dict()).items()}
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    save = (lambda sd, p: save_file(sd, p)) if fmt == "safetensors" else (lambda sd, p: torch.save(sd, p))
    paths = [os.path.join(folder, "zeroshot" + ext)]
    save(zs, paths[0])
    g = torch.Generator().manual_seed(seed)
    shared = {}  # a direction shared by all tasks (what SVC calibrates)
    for i in range(k):
        ft = dict(zs)
        for key, w in zs.items():
            if ".visual." not in key or not w.is_floating_point():
                continue
            scale = 1e-3 * (w.std().item() if w.numel() > 1 else 1.0)
            if w.dim() == 2:
                m, n = w.shape
                r = min(rank, m, n)
                if key not in shared:
                    shared[key] = (torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g))
                a, b = shared[key]
                delta = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)) / r + a @ b / 2
                delta = scale * (delta + 0.1 * torch.randn(m, n, generator=g))
            else:
                delta = scale * torch.randn(w.shape, generator=g)
            ft[key] = (w + delta).contiguous()
        paths.append(os.path.join(folder, f"task{i:02d}" + ext))
        save(ft, paths[-1])
    return paths


def run_mode(mode: str, paths: list[str], alpha: float) -> dict:
    """One merge in this process; returns peak RSS, time and a checksum of the result."""
    import torch
    torch.set_num_threads(1)
    import clip  # noqa: F401  (import cost outside the timing)
    from merge_func import get_merge_method
    from src.svc import svc
    from src.task_vectors import TaskVector

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "eager":
        from safetensors.torch import load_file
        load = load_file if paths[0].endswith(".safetensors") else (lambda p: torch.load(p, weights_only=True))
        zs = load(paths[0])
        tvs = []
        for p in paths[1:]:
            ft = load(p)
            tvs.append(TaskVector(vector={k: ft[k] - zs[k] for k in zs if zs[k].is_floating_point()}))
            del ft
    else:
        tvs = [TaskVector(paths[0], p) for p in paths[1:]]
    merged = get_merge_method("TA")(None, tvs, None)
    calibrated = svc(merged, tvs, alpha)
    checksum = sum(float(v.double().abs().sum()) for v in calibrated.vector.values())
    return {"mode": mode, "seconds": time.perf_counter() - t0, "checksum": checksum,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_after_imports_gib": base_rss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    ap.add_argument("--alpha", type=float, default=None, help="SVC alpha (default 1/K)")
    ap.add_argument("--modes", default="streamed,eager")
    ap.add_argument("--dir", default=None, help="reuse/keep checkpoints in this folder")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_paths", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    alpha = args.alpha if args.alpha is not None else 1.0 / args.k
    if args._run:  # child process: one measurement
        print(json.dumps(run_mode(args._run, json.loads(args._paths), alpha)))
        return
    if args._write:  # child process: write the checkpoints
        import torch
        torch.set_num_threads(1)
        write_checkpoints(args._write, args.model, args.k, args.format)
        return
    # The parent stays small (no torch): Linux carries a process's peak RSS across exec, so
    # children started from a big parent would report the parent's peak.
    folder = args.dir or tempfile.mkdtemp(prefix="memory_stream_", dir="/tmp")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ext = ".safetensors" if args.format == "safetensors" else ".pt"
        names = ["zeroshot" + ext] + [f"task{i:02d}{ext}" for i in range(args.k)]
        paths = [os.path.join(folder, n) for n in names]
        if not all(os.path.exists(p) for p in paths):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--_write", folder, "--model", args.model,
                            "--k", str(args.k), "--format", args.format], check=True, cwd=ROOT)
        size = sum(os.path.getsize(p) for p in paths) / 2**30
        print(f"{args.k + 1} {args.model} checkpoints ({args.format}, {size:.1f} GiB) in {folder} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        rows = []
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_run", mode, "--_paths",
                                  json.dumps(paths), "--k", str(args.k), "--alpha", str(alpha)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {mode}: done in {rows[-1]['seconds']:.0f} s", flush=True)
        print(f"\nTA + SVC (alpha {alpha:g}), K = {args.k}, {args.model}, {args.format}, 1 thread")
        print("| mode | peak RSS (GiB) | after imports (GiB) | time (s) |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['peak_rss_gib']:.2f} | {r['rss_after_imports_gib']:.2f} | {r['seconds']:.0f} |")
        by = {r["mode"]: r for r in rows}
        if {"eager", "streamed"} <= by.keys():
            e, s = by["eager"], by["streamed"]
            same = abs(e["checksum"] - s["checksum"]) <= 1e-6 * abs(e["checksum"])
            print(f"\nstreamed / eager peak = {s['peak_rss_gib'] / e['peak_rss_gib']:.2f} "
                  f"(target <= 0.25 and < 3 GiB); same merged result: {same}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
