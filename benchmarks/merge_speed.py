"""Speed, memory and agreement of the spectral merges' two decompositions on real ViT shapes.

    python benchmarks/merge_speed.py                          # ViT-B-32, K = 8 and 20, 1 thread (~5 min idle)
    python benchmarks/merge_speed.py --threads 1,2 --reference  # the table of docs/performance.md
    python benchmarks/merge_speed.py --model ViT-L-14 --tasks 8
    python benchmarks/merge_speed.py --full --tasks 8         # every key, whole-model peak memory
    python benchmarks/merge_speed.py --full --tasks 8 --keys resblocks.5.attn.in_proj --reference  # one key

For TSV-M, Iso-C, Iso-CTS and STAR it times ``decomposition="svd"`` (the original's full
float32 SVDs) and ``decomposition="gram"`` (the default: float64 Gram matrices, only the part
of the spectrum a method uses) in the same process, interleaved (svd, gram, svd, gram, ...),
and keeps the best of ``--repeats`` runs of each.

Inputs: the open_clip architecture (``pretrained=None``) only for its shapes, and K synthetic
task vectors from ``benchmarks/svc_speed.py`` (shared rank-8 part + task rank-16 part + dense
noise: a decaying spectrum whose tail is a near-continuum, as in real task vectors). By
default each distinct matrix of the visual tower is merged once and its time counted as
often as the model holds it (ViT-B/32: 12 x four block matrices, visual.proj, positional
embedding, conv1), which estimates a whole-model merge in a fraction of its time; ``--full``
merges every key for real. Memory is the peak resident set above the inputs during one
merge, sampled every 5 ms (default mode: the largest single key). "max rel diff" is the
largest over keys of max|gram - svd| / max|svd|; ``--reference`` adds each route's
distance to a float64 reference (tests/spectral_reference.py; untimed, once per K).
LAPACK timings on a shared machine swing several-fold with other load: read the ratios of
one run, not the absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.svc_speed import measure, synthetic_task_vectors  # noqa: E402
from merge_func import get_merge_method  # noqa: E402
from src.linalg import KEY_FILTERS  # noqa: E402
from src.task_vectors import TaskVector  # noqa: E402

METHODS = ("TSV-M", "Iso-C", "Iso-CTS", "STAR")
# which keys each method decomposes (the others take a plain mean: nothing to compare)
DECOMPOSES = {"TSV-M": lambda key, shape: KEY_FILTERS["official"](key, shape),
              "Iso-C": lambda key, shape: KEY_FILTERS["iso"](key, shape),
              "Iso-CTS": lambda key, shape: KEY_FILTERS["iso"](key, shape),
              "STAR": lambda key, shape: len(shape) >= 2}


def visual_shapes(model: str) -> dict[str, torch.Size]:
    """Shapes of the open_clip visual tower's parameters under the ImageEncoder's ``model.`` prefix."""
    import open_clip

    net = open_clip.create_model(model, pretrained=None)
    shapes = {"model." + k: v.shape for k, v in net.state_dict().items() if k.startswith("visual.")}
    del net
    return shapes


def representatives(shapes: dict[str, torch.Size], full: bool) -> "OrderedDict[str, int]":
    """key -> how many keys of the model it stands for: every >= 2-D key once (``full``), or one
    key per distinct (shape, method filters) with the number of keys that share them."""
    groups: "OrderedDict[tuple, list[str]]" = OrderedDict()
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue
        signature = (key,) if full else (tuple(shape), *(f(key, shape) for f in DECOMPOSES.values()))
        groups.setdefault(signature, []).append(key)
    return OrderedDict((keys[0], len(keys)) for keys in groups.values())


def restrict(tvs: list[TaskVector], keys) -> list[TaskVector]:
    return [TaskVector(vector={k: tv.vector[k] for k in keys}) for tv in tvs]


def max_rel_diff(got: TaskVector, ref: TaskVector) -> float:
    worst = 0.0
    for key, r in ref.vector.items():
        scale = float(r.abs().max())
        diff = float((got.vector[key] - r).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def bench(method: str, tvs: list[TaskVector], weights: "OrderedDict[str, int]", repeats: int, full: bool,
          per_key: bool = False, references: dict | None = None) -> dict:
    """Best-of-``repeats`` interleaved times (weighted per key), peaks and the largest difference."""
    fn = get_merge_method(method)
    keys = [k for k in weights if DECOMPOSES[method](k, tvs[0].vector[k].shape)]
    # one call over every key (--full: whole-model memory), or one call per representative key
    units = [keys] if full else [[k] for k in keys]
    row = {"method": method, "keys": sum(weights[k] for k in keys), "svd_s": 0.0, "gram_s": 0.0,
           "svd_peak_mib": 0.0, "gram_peak_mib": 0.0, "max_rel_diff": 0.0}
    for unit in units:
        part = restrict(tvs, unit)
        weight = 1 if full else weights[unit[0]]
        best = {"svd": float("inf"), "gram": float("inf")}
        out = {}
        for _ in range(repeats):
            for route in ("svd", "gram"):
                out[route], seconds, peak = measure(lambda: fn(None, part, SimpleNamespace(decomposition=route)))
                best[route] = min(best[route], seconds)
                row[f"{route}_peak_mib"] = max(row[f"{route}_peak_mib"], peak / 2**20)
        row["svd_s"] += weight * best["svd"]
        row["gram_s"] += weight * best["gram"]
        row["max_rel_diff"] = max(row["max_rel_diff"], max_rel_diff(out["gram"], out["svd"]))
        if references is not None:  # float64 reference per key, computed once per K and method
            from tests import spectral_reference

            for key in unit:
                if (method, key) not in references:
                    d = torch.stack([tv.vector[key].double() for tv in tvs])
                    references[method, key] = spectral_reference.merge(method, d).float()
                expected = TaskVector(vector={key: references[method, key]})
                for route in ("gram", "svd"):
                    diff = max_rel_diff(TaskVector(vector={key: out[route].vector[key]}), expected)
                    row[f"{route}_ref_diff"] = max(row.get(f"{route}_ref_diff", 0.0), diff)
        if per_key:
            shape = "every key" if full else "x".join(map(str, tvs[0].vector[unit[0]].shape))
            print(f"      {method:8s} {shape:>14s} x{weight:<2d} svd {best['svd']:.3f} s  gram {best['gram']:.3f} s  "
                  f"{best['svd'] / best['gram']:.2f}x", flush=True)
    row["ratio"] = row["svd_s"] / row["gram_s"] if row["gram_s"] else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (ViT-B-32, ViT-L-14, ...)")
    parser.add_argument("--tasks", default="8,20", help="comma-separated K values")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts, e.g. 1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per route; the best counts")
    parser.add_argument("--full", action="store_true", help="merge every key of the model (slow; K x model memory)")
    parser.add_argument("--per-key", action="store_true", help="print each key's times as well")
    parser.add_argument("--reference", action="store_true",
                        help="also compare both routes with a float64 SVD reference (slow: float64 SVDs)")
    parser.add_argument("--keys", default="",
                        help="comma-separated substrings: time only the keys that contain one (the task vectors "
                             "are those of the whole model, so a key's numbers match a run without --keys)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    shapes = visual_shapes(args.model)
    weights = representatives(shapes, args.full)
    wanted = [w for w in args.keys.split(",") if w]
    selected = OrderedDict((k, n) for k, n in weights.items() if not wanted or any(w in k for w in wanted))
    if not selected:
        parser.error(f"--keys {args.keys}: no key of {args.model} contains any of them")
    mode = "every key" if args.full else f"{len(weights)} distinct matrices, weighted to the model's {sum(weights.values())}"
    if wanted:
        mode += f"; only the {len(selected)} with {args.keys!r} in their name"
    print(f"{args.model}: {mode}; torch {torch.__version__}; best of {args.repeats}, svd and gram interleaved",
          flush=True)
    rows = []
    start = time.perf_counter()
    for k_tasks in (int(x) for x in args.tasks.split(",") if x):
        tvs = restrict(synthetic_task_vectors({k: shapes[k] for k in weights}, k_tasks), selected)
        references = {} if args.reference else None
        for threads in (int(x) for x in args.threads.split(",") if x):
            torch.set_num_threads(threads)
            for method in methods:
                row = {"model": args.model, "K": k_tasks, "threads": threads,
                       **bench(method, tvs, selected, args.repeats, args.full, args.per_key, references)}
                rows.append(row)
                print(f"  K={k_tasks:2d} {threads}t {method:8s} svd {row['svd_s']:7.2f} s  gram {row['gram_s']:7.2f} s  "
                      f"{row['ratio']:5.2f}x  peak {row['svd_peak_mib']:6.0f} / {row['gram_peak_mib']:6.0f} MiB  "
                      f"diff {row['max_rel_diff']:.1e}"
                      + (f"  vs float64: svd {row['svd_ref_diff']:.1e} gram {row['gram_ref_diff']:.1e}"
                         if args.reference else ""), flush=True)
        del tvs
    print(f"\n{args.model}, {mode}; time = best of {args.repeats} (model-weighted sum over keys); peak = RSS above "
          f"the inputs ({'whole merge' if args.full else 'largest key'}); diff = max over keys of "
          f"max|gram - svd| / max|svd|. Total benchmark time {time.perf_counter() - start:.0f} s.\n")
    extra = " svd vs float64 | gram vs float64 |" if args.reference else ""
    print("| K | threads | method | svd | gram | svd / gram | peak svd | peak gram | max rel diff |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.reference else ""))
    for r in rows:
        print(f"| {r['K']} | {r['threads']} | {r['method']} | {r['svd_s']:.1f} s | {r['gram_s']:.1f} s | "
              f"{r['ratio']:.2f}x | {r['svd_peak_mib']:.0f} MiB | {r['gram_peak_mib']:.0f} MiB | {r['max_rel_diff']:.1e} |"
              + (f" {r['svd_ref_diff']:.1e} | {r['gram_ref_diff']:.1e} |" if args.reference else ""))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "full": args.full, "repeats": args.repeats, "rows": rows}, f, indent=1)
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
