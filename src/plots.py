"""Figures that explain SVC, as PNG and PDF.

    python -m src.plots spectrum     --model M --base_dir DIR --merge TA [--layer KEY ...] [--tasks 8]
    python -m src.plots coefficients --model M --base_dir DIR --merge TA TIES TSV-M [--layer KEY]
    python -m src.plots alpha   logs/M --merge TA        # accuracy vs SVC alpha (results.jsonl)
    python -m src.plots scaling logs/M --merge TA        # accuracy vs merge coefficient, TA and TA+SVC
    python -m src.plots bars    logs/M                   # per-dataset bars of the results table

`spectrum` and `coefficients` read checkpoints only (no data): singular values of the
merged update before and after SVC with the task spectra, and the projection
coefficients s_ri with the calibration factor gamma_r. The others read results.jsonl.
Files go next to the logs (logs/<model>/<plot>_<merge>.png/.pdf) unless --out is given.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

import merge_func  # noqa: E402
from src.results import (  # noqa: E402
    AVG, NORM, REFERENCE_LABELS, config_of, label_configs, load_results, results_files, row_scores, same_method,
    summarize,
)

METRICS = {"avg": AVG, "normalized": NORM}


def save_figure(fig, out: str | Path) -> list[Path]:
    """Write `out` as .png (150 dpi) and .pdf (a .png/.pdf suffix of `out` is replaced)."""
    out = Path(out)
    if out.suffix.lower() in (".png", ".pdf"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.parent / f"{out.name}.png", out.parent / f"{out.name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def short_key(key: str) -> str:
    """'model.visual.transformer.resblocks.4.attn.out_proj.weight' -> 'block 4 attn.out_proj'."""
    k = key.removeprefix("model.").removeprefix("visual.").removesuffix(".weight")
    if k.startswith("transformer.resblocks."):
        block, rest = k[len("transformer.resblocks."):].split(".", 1)
        return f"block {block} {rest}"
    return k


# ----------------------------------------------------------------------------- spectral data
def _svdvals(t: Tensor) -> np.ndarray:
    return torch.linalg.svdvals(t.double()).numpy()


def spectrum_data(merged: Tensor, task_deltas: Sequence[Tensor], alpha: float) -> dict[str, object]:
    """Singular values of one layer: merged update before/after SVC, and of each task delta."""
    from src.svc import calibration_stats

    stats = calibration_stats(merged, list(task_deltas), alpha)
    return {
        "before": stats["sigma"].numpy(),
        "after": stats["sigma_calibrated"].numpy(),  # U and V are unchanged, so these are M's new singular values
        "tasks": [_svdvals(d) for d in task_deltas],
    }


def coefficient_data(merged: Tensor, task_deltas: Sequence[Tensor], alpha: float) -> dict[str, np.ndarray]:
    """s_ri (k x K), gamma_r (k,) and sigma_r (k,) of one layer, as numpy arrays."""
    from src.svc import calibration_stats

    return {k: v.numpy() for k, v in calibration_stats(merged, list(task_deltas), alpha).items()}


def pick_layers(keys_with_shapes: dict[str, torch.Size], wanted: Sequence[str] | None) -> list[str]:
    """Layers to plot: exact keys or unique substrings; default = attn.out_proj of the first,
    middle and last block (any SVC-calibrated matrices if there are none)."""
    from src.svc import svc_keys

    candidates = svc_keys(keys_with_shapes)
    if not wanted:
        outs = [k for k in candidates if k.endswith("attn.out_proj.weight")] or candidates
        if not outs:
            raise ValueError("no 2-D matrix that SVC calibrates was found in these checkpoints")
        return list(dict.fromkeys([outs[0], outs[len(outs) // 2], outs[-1]]))
    chosen = []
    for w in wanted:
        if w in keys_with_shapes:
            matches = [w]
        else:
            matches = [k for k in candidates if w in k]
        if len(matches) != 1:
            found = "no match" if not matches else f"{len(matches)} matches ({matches[:4]} ...)"
            raise ValueError(f"--layer {w!r}: {found} among the calibrated matrices, e.g. {candidates[:3]}; "
                             "pass a full key or a substring naming exactly one")
        if len(keys_with_shapes[matches[0]]) != 2:
            raise ValueError(f"--layer {matches[0]!r} is not a 2-D matrix")
        chosen.append(matches[0])
    return chosen


def merge_layers(method: str, task_vectors: Sequence, keys: Sequence[str], options: dict | None = None) -> dict[str, Tensor]:
    """The merged update of `keys` for `method` (a merge_func registry name), with its options."""
    from src.task_vectors import TaskVector

    info = merge_func.method_info(method)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if info.merges_key_by_key(options):  # the registry says whether a key's merge depends on that key alone
        task_vectors = [TaskVector(vector={k: tv.vector[k] for k in keys}) for tv in task_vectors]
    merged = info.fn(None, list(task_vectors), types.SimpleNamespace(**options))
    return {k: merged.vector[k] for k in keys}


def load_task_vectors(model: str, base_dir: str, tasks: Sequence[str]) -> list:
    """Lazy TaskVectors (one per task) from the checkpoints found under base_dir."""
    import clip
    from src.task_vectors import TaskVector

    found = clip.find_checkpoints(model, base_dir, list(tasks))
    return [TaskVector(found.zeroshot, found.finetuned[t]) for t in tasks]


# ----------------------------------------------------------------------------- spectral plots
def plot_spectrum(layers: dict[str, dict], out: str | Path, task_names: Sequence[str] | None = None,
                  title: str | None = None) -> list[Path]:
    """One panel per layer (log scale): task spectra (thin), merged before and after SVC (thick)."""
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (key, d) in zip(axes[0], layers.items()):
        for i, s in enumerate(d["tasks"]):
            name = task_names[i] if task_names else f"task {i + 1}"
            ax.plot(np.arange(1, len(s) + 1), s, lw=0.8, alpha=0.6, color=colors[i % 20], label=name)
        ranks = np.arange(1, len(d["before"]) + 1)
        ax.plot(ranks, d["before"], lw=2.2, color="black", label="merged")
        ax.plot(ranks, d["after"], lw=2.2, color="tab:red", ls="--", label="merged + SVC")
        ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_title(short_key(key), fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        top = d["before"][0] / max(max(s[0] for s in d["tasks"]), 1e-30)
        ax.text(0.97, 0.97, f"top $\\sigma$: {top:.2f}x largest task", transform=ax.transAxes,
                ha="right", va="top", fontsize=8)
        # the tail of the spectrum is numerically zero: keep the axis on the informative range
        positive = np.concatenate([d["before"], d["after"], *d["tasks"]])
        positive = positive[positive > positive.max() * 1e-8]
        ax.set_ylim(positive.min() * 0.7, positive.max() * 1.5)
    axes[0][0].set_ylabel("singular value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_coefficients(per_method: dict[str, dict], out: str | Path, task_names: Sequence[str] | None = None,
                      title: str | None = None, alpha: dict[str, float] | None = None) -> list[Path]:
    """Heatmap of s_ri (rank x task) per method, and gamma_r of every method on one axis."""
    n = len(per_method)
    fig = plt.figure(figsize=(2.6 * n + 5.5, 4.2), layout="constrained")
    grid = fig.add_gridspec(1, n + 3, width_ratios=[1] * n + [0.08, 0.12, 1.8])
    all_s = np.concatenate([d["s"].ravel() for d in per_method.values()])
    lo, hi = np.percentile(all_s, [1, 99])
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.0), vmax=max(hi, 2.0))  # s = 1: counted once; red: over-counted
    image = None
    for i, (method, d) in enumerate(per_method.items()):
        ax = fig.add_subplot(grid[0, i])
        k, num_tasks = d["s"].shape
        image = ax.imshow(d["s"], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                          extent=(-0.5, num_tasks - 0.5, k + 0.5, 0.5))
        ax.set_title(f"{method}: $s_{{ri}}$", fontsize=10)
        ax.set_xticks(range(num_tasks))
        ax.set_xticklabels(task_names or [str(t + 1) for t in range(num_tasks)], rotation=90, fontsize=7)
        if i == 0:
            ax.set_ylabel("rank r")
        else:
            ax.tick_params(labelleft=False)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, n]), label="$s_{ri}$ (colours clipped to 1st-99th pct.)")
    ax = fig.add_subplot(grid[0, n + 2])
    for method, d in per_method.items():
        a = f", $\\alpha$={alpha[method]:.3g}" if alpha and method in alpha else ""
        ax.plot(np.arange(1, len(d["gamma"]) + 1), d["gamma"], lw=1.5, label=f"{method}{a}")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("rank r")
    ax.set_ylabel("$\\gamma_r$ (SVC factor on $\\sigma_r$)")
    ax.set_title("calibration factor", fontsize=10)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- results plots
def _point_value(point: dict, metric: str) -> float:
    """Score of one curve point written by src.tuning.Selection (avg / normalized)."""
    value = point.get(metric)
    return math.nan if value is None else float(value)


def _curve_stats(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean and sample std (0 for single runs) of (x, y) pairs grouped by x."""
    by_x = defaultdict(list)
    for x, y in points:
        if not math.isnan(y):
            by_x[float(x)].append(y)
    xs = np.array(sorted(by_x))
    means = np.array([np.mean(by_x[x]) for x in xs])
    stds = np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs])
    return xs, means, stds


def _sweep(rows: list[dict], merge: str, coef: str, metric: str, svc: bool) -> dict[str, dict]:
    """Runs of `merge` (with/without SVC) grouped by configuration minus the swept `coef`.

    Per group label: "test" (coef, test score) of runs with a numeric coef, "val" the
    validation curve points stored by an automatic selection, "selected" the chosen
    values, "all" every run's test score.
    """
    column = METRICS[metric]
    picked = [(r, sc[column]) for r, sc in zip(rows, row_scores(rows))
              if same_method(r["merge"], merge) and bool(r.get("svc")) == svc]
    configs = []
    for r, _ in picked:
        cfg = config_of(r)
        cfg.pop(coef, None)
        configs.append(cfg)
    keys = [json.dumps(c, sort_keys=True, default=str) for c in configs]
    unique = list(dict.fromkeys(keys))
    labels = dict(zip(unique, label_configs([configs[keys.index(k)] for k in unique])))
    groups = {labels[k]: {"test": [], "val": [], "selected": [], "all": [], "config": json.loads(k)} for k in unique}
    for (row, score), key in zip(picked, keys):
        g = groups[labels[key]]
        g["all"].append(score)
        curve = row.get(f"{coef}_curve")
        if isinstance(curve, list):
            g["val"] += [(p["coef"], _point_value(p, metric)) for p in curve if isinstance(p, dict) and "coef" in p]
            g["selected"].append(row.get(f"{coef}_selected", row.get(coef)))
        value = row.get(coef)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            g["test"].append((value, score))
    return groups


def _curves_only(groups: dict[str, dict]) -> dict[str, dict]:
    """Drop groups that are a single point (no curve) when some group is a real curve."""
    curves = {k: g for k, g in groups.items() if g["val"] or len({x for x, _ in g["test"]}) > 1}
    return curves or groups


def _plot_sweeps(ax, groups: dict[str, dict], colors) -> None:
    for (label, g), color in zip(groups.items(), colors):
        if g["val"]:
            xs, ys, _ = _curve_stats(g["val"])
            ax.plot(xs, ys, ls="--", lw=1.2, color=color, alpha=0.8, label=f"{label}, validation")
            for sel in {s for s in g["selected"] if isinstance(s, (int, float))}:
                ax.axvline(sel, color=color, lw=0.8, ls=":")
        if g["test"]:
            xs, ys, sd = _curve_stats(g["test"])
            ax.errorbar(xs, ys, yerr=sd if sd.any() else None, marker="o", ms=4, lw=1.8, color=color,
                        capsize=2, label=f"{label}, test")


def _reference_lines(ax, rows: list[dict], metric: str) -> None:
    scores = row_scores(rows)
    for ref, style in (("zeroshot", ":"), ("finetuned", (0, (8, 3)))):
        values = [sc[METRICS[metric]] for r, sc in zip(rows, scores) if r["merge"] == ref]
        values = [v for v in values if not math.isnan(v)]
        if values:
            ax.axhline(np.mean(values), color="black", ls=style, lw=0.9, label=REFERENCE_LABELS[ref])


def _finish(ax, xlabel: str, metric: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{METRICS[metric]} accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def plot_alpha(rows: list[dict], merge: str, out: str | Path, metric: str = "avg") -> list[Path]:
    """Accuracy against SVC's alpha for `merge` + SVC, with the base method (no SVC) as lines."""
    groups = _curves_only(_sweep(rows, merge, "alpha", metric, svc=True))
    if not any(g["test"] or g["val"] for g in groups.values()):
        raise ValueError(f"no {merge} +SVC rows with a numeric alpha or a stored alpha_curve in these results")
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.get_cmap("tab10").colors
    _plot_sweeps(ax, groups, colors)
    # the same configuration without SVC, as a horizontal line in the curve's colour
    base = _sweep(rows, merge, "alpha", metric, svc=False)
    for g, color in zip(groups.values(), colors):
        same = {k: v for k, v in g["config"].items() if k != "svc"}
        for label, b in base.items():
            ys = [y for y in b["all"] if not math.isnan(y)]
            if ys and {k: v for k, v in b["config"].items() if k != "svc"} == same:
                ax.axhline(np.mean(ys), color=color, lw=1.2, ls="-.", label=f"{label} (no SVC), test")
    _reference_lines(ax, rows, metric)
    _finish(ax, "SVC floor $\\alpha$", metric, f"{merge} + SVC: accuracy vs $\\alpha$")
    return save_figure(fig, out)


def plot_scaling(rows: list[dict], merge: str, out: str | Path, metric: str = "avg") -> list[Path]:
    """Accuracy against the merge coefficient for `merge` with and without SVC on one axis:
    test points of fixed-coefficient runs, validation curves of automatic selections."""
    groups = {**_curves_only(_sweep(rows, merge, "scaling_coef", metric, svc=False)),
              **_curves_only(_sweep(rows, merge, "scaling_coef", metric, svc=True))}
    if not any(len({x for x, _ in g["test"]}) > 1 or g["val"] for g in groups.values()):
        raise ValueError(f"no {merge} runs at several merge coefficients (nor a stored scaling_coef_curve) "
                         "in these results: run a coefficient sweep or --scaling_coef auto first")
    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_sweeps(ax, groups, plt.get_cmap("tab10").colors)
    _reference_lines(ax, rows, metric)
    _finish(ax, "merge coefficient $\\lambda$", metric, f"{merge} and {merge} + SVC across merge coefficients")
    return save_figure(fig, out)


def plot_bars(table, out: str | Path, rows: Sequence[str] | None = None) -> list[Path]:
    """Grouped bars: one group per dataset (and the averages), one bar per table row."""
    mean, std, n = table.mean, table.std, table.n
    labels = list(rows) if rows else list(mean.index)
    unknown = [r for r in labels if r not in mean.index]
    if unknown:
        raise ValueError(f"rows {unknown} are not in the table; rows are: {list(mean.index)}")
    columns = [c for c in mean.columns if mean.loc[labels, c].notna().any()]
    width = 0.8 / len(labels)
    x = np.arange(len(columns))
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 1.5 + 0.12 * len(columns) * len(labels))), 4.2))
    colors = plt.get_cmap("tab20").colors
    for i, label in enumerate(labels):
        err = std.loc[label, columns].fillna(0).to_numpy() if n[label] > 1 else None
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, mean.loc[label, columns].to_numpy(), width,
               yerr=err, capsize=2, color=colors[i % 20], label=label + (f" (n={n[label]})" if n[label] > 1 else ""),
               hatch="//" if label in table.reference else None, edgecolor="white", lw=0.3)
    ax.set_xticks(x)
    ax.set_xticklabels(columns, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- CLI
def _resolve_tasks(spec: list[str]) -> list[str]:
    if len(spec) == 1:
        try:
            from src.datasets.registry import resolve_tasks
        except ImportError:
            return spec[0].split(",")
        return resolve_tasks(spec[0])
    return spec


def _default_tasks(model: str) -> str:
    from src.args import default_tasks  # the task set main.py merges for this model, so plots show that run

    return default_tasks(model)


def _results_dir(path: str) -> Path:
    files = results_files(path)
    if len(files) > 1:
        raise ValueError(f"{path} holds several models' results ({[str(f.parent) for f in files]}); pass one of them")
    return files[0].parent


def _merge_options(args) -> dict:
    return {"scaling_coef": args.scaling_coef} if args.scaling_coef is not None else {}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m src.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("spectrum", "coefficients"):
        p = sub.add_parser(name, help=f"{name} plot from checkpoints (no data needed)")
        p.add_argument("--model", required=True, help="e.g. ViT-B-32 or demo")
        p.add_argument("--base_dir", default=".", help="folder holding checkpoints/ (as main.py)")
        p.add_argument("--tasks", nargs="+", default=None,
                       help="task set (8, 14, 20, demo) or task names (default: as main.py, the model's own set "
                            "for demo models, else 8)")
        p.add_argument("--merge", nargs="+", default=["TA"] if name == "spectrum" else ["TA", "TIES", "TSV-M"])
        p.add_argument("--layer", nargs="+" if name == "spectrum" else 1, default=None,
                       help="parameter key(s) or unique substring(s); default: attn.out_proj of "
                            "the first/middle/last block" + ("" if name == "spectrum" else " (middle one here)"))
        p.add_argument("--alpha", type=float, default=None, help="SVC floor; default 1/K (1.0 for TSV-M)")
        p.add_argument("--scaling_coef", type=float, default=None, help="merge coefficient; default: the method's")
        p.add_argument("--logs_dir", default="logs")
        p.add_argument("--out", help="output path (.png and .pdf are written)")
    for name in ("alpha", "scaling", "bars"):
        p = sub.add_parser(name, help=f"{name} plot from results.jsonl")
        p.add_argument("path", nargs="?", default="logs", help="logs/<model> or a results.jsonl")
        if name != "bars":
            p.add_argument("--merge", default="TA")
            p.add_argument("--metric", choices=list(METRICS), default="avg")
        else:
            p.add_argument("--rows", nargs="+", help="table rows to show (labels as printed by src.results)")
            p.add_argument("--merge", nargs="+", help="only these methods (references kept)")
        p.add_argument("--out", help="output path (.png and .pdf are written)")
    args = parser.parse_args(argv)

    try:
        paths = _run(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        parser.error(str(err))
    for p in paths:
        print(p)
    return paths


def _run(args) -> list[Path]:
    if args.command in ("spectrum", "coefficients"):
        tasks = _resolve_tasks(args.tasks or [_default_tasks(args.model)])
        tvs = load_task_vectors(args.model, args.base_dir, tasks)
        layers = pick_layers(tvs[0].shapes(), args.layer)
        if args.command == "coefficients" and not args.layer:
            layers = [layers[len(layers) // 2]]
        outdir = Path(args.logs_dir) / args.model
        per_method, alphas = {}, {}
        for method in args.merge:
            alpha = args.alpha if args.alpha is not None else merge_func.method_info(method).default_alpha(len(tasks))
            merged = merge_layers(method, tvs, layers, _merge_options(args))
            deltas = {k: [tv.vector[k] for tv in tvs] for k in layers}
            if args.command == "spectrum":
                data = {k: spectrum_data(merged[k], deltas[k], alpha) for k in layers}
                title = f"{args.model}, {method} (K={len(tasks)}, SVC $\\alpha$={alpha:.3g})"
                out = args.out or outdir / f"spectrum_{method}"
                if len(args.merge) > 1 and args.out:
                    out = Path(args.out).with_name(f"{Path(args.out).stem}_{method}")
                per_method[method] = plot_spectrum(data, out, tasks, title)
            else:
                per_method[method] = coefficient_data(merged[layers[0]], deltas[layers[0]], alpha)
                alphas[method] = alpha
        if args.command == "spectrum":
            return [p for paths in per_method.values() for p in paths]
        out = args.out or outdir / f"coefficients_{short_key(layers[0]).replace(' ', '_')}"
        title = f"{args.model}, {short_key(layers[0])} (K={len(tasks)})"
        return plot_coefficients(per_method, out, tasks, title, alphas)

    folder = _results_dir(args.path)
    rows = load_results(args.path)
    if args.command == "bars":
        if args.merge:
            rows = [r for r in rows if r["merge"] in REFERENCE_LABELS or any(same_method(r["merge"], m) for m in args.merge)]
        return plot_bars(summarize(rows), args.out or folder / "bars", args.rows)
    plot = plot_alpha if args.command == "alpha" else plot_scaling
    return plot(rows, args.merge, args.out or folder / f"{args.command}_{args.merge}", args.metric)


if __name__ == "__main__":
    main(sys.argv[1:])
