"""Speed and memory of SVC and the merge methods on the real ViT-B/32 visual tower.

    python benchmarks/svc_speed.py                       # K = 8, 14, 20; methods at K = 8
    python benchmarks/svc_speed.py --tasks 8 --threads 2 --methods ""

Builds the open_clip ViT-B-32 architecture (``pretrained=None``) only for its shapes,
makes K synthetic task vectors with realistic structure (shared low-rank part +
task-specific low-rank part + small dense noise) on the ``visual.*`` keys, and times,
in one run and one thread setting:
  svd     the thin SVDs (torch.linalg.svd) of the 49 merged matrices alone;
  svc     ``src.svc.svc`` (Gram eigendecomposition + one batched GEMM per matrix);
  svc_svd ``src.svc.svc`` with decomposition='svd';
  naive   a straightforward implementation: SVD, then a loop over tasks.
LAPACK timings on a shared 2-core machine swing several-fold with other load, so
read the ratios (same run), not the absolute seconds. Peak memory is the resident
set size above the pre-call baseline, sampled every 5 ms.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from merge_func import MERGE_METHODS, get_merge_method  # noqa: E402
from src.svc import EPS, svc, svc_keys  # noqa: E402
from src.task_vectors import TaskVector  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Return freed heap pages to the OS so the RSS baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak may be underestimated
        pass


def measure(fn):
    """(result, seconds, peak RSS above baseline in bytes)."""
    release_free_memory()
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return result, seconds, max(peak[0], rss_bytes()) - base


def vit_b32_visual_shapes() -> dict[str, torch.Size]:
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return {"model." + k: v.shape for k, v in model.state_dict().items() if k.startswith("visual.")}


def synthetic_task_vectors(shapes, k_tasks: int, seed: int = 0) -> list[TaskVector]:
    """Shared rank-8 + task rank-16 + dense noise for matrices; small noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for key, shape in shapes.items():
        if len(shape) == 2:
            m, n = shape
            shared[key] = (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / 8
    tvs = []
    for _ in range(k_tasks):
        vec = {}
        for key, shape in shapes.items():
            if len(shape) == 2:
                m, n = shape
                own = (torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g)) / 16
                vec[key] = 1e-3 * (shared[key] + own + 0.3 * torch.randn(m, n, generator=g))
            else:
                vec[key] = 1e-3 * torch.randn(shape, generator=g)
        tvs.append(TaskVector(vector=vec))
    return tvs


def naive_svc_matrix(merged: torch.Tensor, deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Straightforward reference: LAPACK SVD, then one projection per task."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    a_m = s[:, None] * vh
    floored = torch.zeros_like(s)
    for d in deltas:
        a_i = u.T @ d
        coef = (a_m * a_i).sum(1) / (a_i * a_i).sum(1).clamp_min(EPS)
        floored += coef.clamp_min(alpha)
    return (u * (s / (floored / len(deltas)))) @ vh


def bench_svc(shapes, k_tasks: int, check_parity: bool) -> dict:
    tvs = synthetic_task_vectors(shapes, k_tasks)
    merged = get_merge_method("TA")(None, tvs, SimpleNamespace())
    keys = svc_keys(merged)
    alpha = 1.0 / k_tasks
    row = {"K": k_tasks, "matrices": len(keys)}
    _, row["svd_s"], row["svd_peak_mib"] = measure(
        lambda: [torch.linalg.svd(merged.vector[k], full_matrices=False) for k in keys])
    fast, row["svc_s"], row["svc_peak_mib"] = measure(lambda: svc(merged, tvs, alpha))
    _, row["svc_svd_s"], _ = measure(lambda: svc(merged, tvs, alpha, decomposition="svd"))
    naive, row["naive_s"], row["naive_peak_mib"] = measure(
        lambda: {k: naive_svc_matrix(merged.vector[k], [tv.vector[k] for tv in tvs], alpha) for k in keys})
    for name in ("svd", "svc", "naive"):
        row[f"{name}_peak_mib"] = round(row[f"{name}_peak_mib"] / 2**20, 1)
    row["svc_over_svd"] = row["svc_s"] / row["svd_s"]
    row["naive_over_svd"] = row["naive_s"] / row["svd_s"]
    row["max_rel_diff_vs_naive"] = max(
        float((fast.vector[k] - naive[k]).norm() / naive[k].norm()) for k in keys)
    if check_parity:  # against a float64 SVD reference: the accuracy of both paths
        ref = svc(merged, tvs, alpha, dtype=torch.float64, decomposition="svd")
        row["max_rel_err_svc_f64ref"] = max(
            float((fast.vector[k] - ref.vector[k]).norm() / ref.vector[k].norm()) for k in keys)
        row["max_rel_err_naive_f64ref"] = max(
            float((naive[k] - ref.vector[k]).norm() / ref.vector[k].norm()) for k in keys)
    return row


def bench_methods(shapes, k_tasks: int, methods: list[str]) -> list[dict]:
    tvs = synthetic_task_vectors(shapes, k_tasks)
    rows = []
    for name in methods:
        fn = get_merge_method(name)
        _, seconds, peak = measure(lambda: fn(None, tvs, SimpleNamespace()))
        rows.append({"method": fn.merge_name, "K": k_tasks, "seconds": seconds, "peak_mib": round(peak / 2**20, 1)})
        print(f"  {fn.merge_name:8s} K={k_tasks}: {seconds:7.2f} s, peak +{peak / 2**20:7.1f} MiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="8,14,20", help="comma-separated K values for the SVC comparison")
    parser.add_argument("--methods", default=",".join(MERGE_METHODS), help="merge methods to time ('' for none)")
    parser.add_argument("--methods-k", type=int, default=8, help="K used to time the merge methods")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded in the output)")
    parser.add_argument("--out", default="benchmarks/results/svc_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = vit_b32_visual_shapes()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(shapes)} visual keys", flush=True)
    svc_rows = []
    for i, k in enumerate(int(x) for x in args.tasks.split(",") if x):
        row = bench_svc(shapes, k, check_parity=(i == 0))
        print(json.dumps({key: float(f"{v:.4g}") if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        svc_rows.append(row)
    method_rows = bench_methods(shapes, args.methods_k, [m for m in args.methods.split(",") if m])

    print(f"\nSVC on the 49 ViT-B/32 matrices, {torch.get_num_threads()} thread(s), one run:\n")
    print("| K | thin SVDs alone | SVC (ours) | ours / SVDs | SVC, SVD path | straightforward | straightforward / SVDs | peak RAM ours / straightforward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in svc_rows:
        print(f"| {r['K']} | {r['svd_s']:.1f} s | {r['svc_s']:.1f} s | {r['svc_over_svd']:.2f}x | {r['svc_svd_s']:.1f} s "
              f"| {r['naive_s']:.1f} s | {r['naive_over_svd']:.2f}x | {r['svc_peak_mib']:.0f} / {r['naive_peak_mib']:.0f} MiB |")
    for r in svc_rows:
        if "max_rel_err_svc_f64ref" in r:
            print(f"\nK = {r['K']}: largest relative error against a float64 SVD reference, over the 49 matrices: "
                  f"ours {r['max_rel_err_svc_f64ref']:.1e}, straightforward float32 {r['max_rel_err_naive_f64ref']:.1e}")
    if method_rows:
        print(f"\nMerge methods, K = {args.methods_k}:\n\n| method | time | peak RAM above inputs |\n|---|---|---|")
        for r in method_rows:
            print(f"| {r['method']} | {r['seconds']:.1f} s | {r['peak_mib']:.0f} MiB |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "svc": svc_rows,
                   "methods": method_rows}, f, indent=1)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
