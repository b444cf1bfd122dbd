"""Quality of the embedded demo benchmark over several zoo seeds (the tables of docs/embedded-benchmark.md).

For each seed: build or reuse the `demo` zoo, then evaluate on the generated test splits, through the
pipeline's own code (clip loaders, TaskVector, merge_func, src.svc, src.tuning, src.eval):
zero-shot, individual fine-tuned, TA 0.3, TA with its coefficient chosen on the val splits, TIES, TSV-M
and Iso-C (registry defaults), each without SVC and with SVC at alpha = 1/K and alpha = 1.

    python benchmarks/demo_quality.py --seeds 0 1 2 --checkpoint-dir checkpoints/demo-seeds [--set KEY=VALUE ...]
Seed 0 builds into <checkpoint-dir>/seed0/demo, etc.; results go to --out as JSON and a markdown table,
then SVC's effect per method (mean and spread over the seeds), then the mechanism figures and the
quality targets per seed, each met or MISSED: linear probe on frozen zero-shot features, forgetting
(theta_0 + tau_j on the other tasks, val splits), spectral over-accumulation over the SVC-calibrated
matrices, the accuracy bars, and each task vector's norm relative to the pretrained weights. `--set`
overrides fields of the zoo config (as `python -m src.demo.zoo --set`), e.g. another data design.
Seeds can run in parallel processes with their own --out, then `--combine a.json b.json ...` merges them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merge_func  # noqa: E402
from src.demo import mechanism  # noqa: E402
from src.demo.zoo import CONFIGS, ZooConfig, ensure_zoo, eval_loader, load_built, with_overrides  # noqa: E402
from src.eval import evaluate  # noqa: E402
from src.modeling import build_image_encoder  # noqa: E402
from src.svc import svc  # noqa: E402
from src.tuning import apply_in_place, default_grid, select_coefficient  # noqa: E402

METHODS = ("TA", "TIES", "TSV-M", "Iso-C")


def run_seed(seed: int, base: Path, model: str = "demo", cfg: ZooConfig | None = None) -> dict:
    cfg = cfg or CONFIGS[model]
    path = ensure_zoo(model, str(base / f"seed{seed}"), seed=seed, cfg=cfg)
    tasks = list(cfg.tasks)
    K = len(tasks)
    zs, heads, by_task = load_built(path, tasks)
    tvs = [by_task[t] for t in tasks]
    enc = build_image_encoder(model, zs).eval()
    params = enc.state_dict()
    test, val, train = ({t: eval_loader(t, split, cfg.design) for t in tasks}
                        for split in ("test", "val", "train"))

    def acc(loaders, only=None):
        return {t: evaluate(enc, heads[t], loaders[t], "cpu", progress=False) for t in (only or tasks)}

    def with_update(update, loaders):
        apply_in_place(params, zs, update, 1.0)
        return acc(loaders)

    res: dict = {"seed": seed, "tasks": tasks, "methods": {}}
    t0 = time.time()
    res["methods"]["zeroshot"] = acc(test)
    ind_test, ind_val = {}, {}
    for i, t in enumerate(tasks):
        apply_in_place(params, zs, tvs[i], 1.0)
        ind_test[t] = acc(test, [t])[t]
        ind_val[t] = acc(val, [t])[t]
    res["methods"]["individual"] = ind_test
    alphas = {"": None, "+SVC a=1/K": 1.0 / K, "+SVC a=1": 1.0}

    def calibrated(merged, alpha):
        return merged if alpha is None else svc(merged, tvs, alpha)

    for name in METHODS:
        fn = merge_func.get_merge_method(name)
        merged = fn(None, tvs, SimpleNamespace())
        label = "TA 0.3" if name == "TA" else name
        for suffix, alpha in alphas.items():
            res["methods"][label + suffix] = with_update(calibrated(merged, alpha), test)
    # TA with the coefficient chosen on val (separately with and without SVC), normalised criterion
    ta = merge_func.get_merge_method("TA")
    for suffix, alpha in alphas.items():
        def score(c, alpha=alpha):
            return with_update(calibrated(ta(None, tvs, SimpleNamespace(scaling_coef=c)), alpha), val)
        sel = select_coefficient(default_grid("TA"), score, individual=ind_val)
        res["methods"][f"TA val{suffix}"] = with_update(
            calibrated(ta(None, tvs, SimpleNamespace(scaling_coef=sel.best)), alpha), test)
        res.setdefault("ta_val_coef", {})[suffix or "plain"] = sel.best
    mech = res["mechanism"] = {}
    # with_update left a merged model in params: back to theta_0 for the frozen zero-shot features
    apply_in_place(params, zs, tvs[0], 0.0)
    mech["linear_probe"] = {t: mechanism.linear_probe(enc, train[t], test[t]) for t in tasks}
    forget = mechanism.forgetting(params, zs, by_task, lambda t: acc(val, [t])[t])
    mech["forgetting"], mech["forgetting_mean"] = forget["matrix"], forget["mean"]
    over = mechanism.over_accumulation(tvs)
    mech["over_accumulation"], mech["over_accumulation_median"] = over["ratios"], over["median"]
    mech["relative_norm"] = {t: mechanism.relative_norm(zs, by_task[t]) for t in tasks}
    res["eval_seconds"] = time.time() - t0
    res["zoo"] = json.loads((path / "zoo.json").read_text())["stats"]
    return res


def table(results: list[dict]) -> str:
    names = list(results[0]["methods"])
    lines = ["| method | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean | std |",
             "|---|" + "---|" * (len(results) + 2)]
    for n in names:
        avgs = [statistics.mean(r["methods"][n].values()) for r in results]
        sd = statistics.stdev(avgs) if len(avgs) > 1 else 0.0
        lines.append(f"| {n} | " + " | ".join(f"{a:.1f}" for a in avgs) + f" | {statistics.mean(avgs):.1f} | {sd:.1f} |")
    return "\n".join(lines)


def svc_effect(results: list[dict]) -> str:
    """SVC's effect on each method's average (points), per seed and as mean and spread over seeds."""
    base = {"TA 0.3": "TA 0.3", "TA val": "TA val", "TIES": "TIES", "TSV-M": "TSV-M", "Iso-C": "Iso-C"}
    lines = ["| SVC effect (points) | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean | std |",
             "|---|" + "---|" * (len(results) + 2)]
    for name in base:
        for suffix in ("+SVC a=1/K", "+SVC a=1"):
            d = [statistics.mean(r["methods"][name + suffix].values()) - statistics.mean(r["methods"][name].values())
                 for r in results]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            lines.append(f"| {name} {suffix} | " + " | ".join(f"{v:+.1f}" for v in d)
                         + f" | {statistics.mean(d):+.1f} | {sd:.1f} |")
    return "\n".join(lines)


def targets(results: list[dict]) -> str:
    """The mechanism and accuracy targets of the data design, checked per seed, and the relative norms."""
    def avg(d):
        return statistics.mean(d.values())

    def gap(r):  # fine-tuned minus linear probe, per task
        return [r["methods"]["individual"][t] - r["mechanism"]["linear_probe"][t] for t in r["tasks"]]

    checks = [
        ("linear probe avg", lambda r: avg(r["mechanism"]["linear_probe"]), None),
        ("fine-tuned - probe, avg <= 10", lambda r: statistics.mean(gap(r)), lambda v, r: v <= 10),
        ("fine-tuned - probe, max <= 25", lambda r: max(gap(r)), lambda v, r: v <= 25),
        ("forgetting (mean off-diag.) |.| <= 5", lambda r: r["mechanism"]["forgetting_mean"],
         lambda v, r: abs(v) <= 5),
        ("over-accumulation median >= 1.5 sqrt(K)", lambda r: r["mechanism"]["over_accumulation_median"],
         lambda v, r: v >= 1.5 * len(r["tasks"]) ** 0.5),
        ("zero-shot average <= 60", lambda r: avg(r["methods"]["zeroshot"]), lambda v, r: v <= 60),
        ("min fine-tuning gain >= 15", lambda r: min(r["methods"]["individual"][t] - r["methods"]["zeroshot"][t]
                                                     for t in r["tasks"]), lambda v, r: v >= 15),
        ("individual average >= 85", lambda r: avg(r["methods"]["individual"]), lambda v, r: v >= 85),
        ("val-tuned TA - zero-shot >= 15", lambda r: avg(r["methods"]["TA val"]) - avg(r["methods"]["zeroshot"]),
         lambda v, r: v >= 15),
        ("TA 0.3 - zero-shot > 0", lambda r: avg(r["methods"]["TA 0.3"]) - avg(r["methods"]["zeroshot"]),
         lambda v, r: v > 0),
        ("max head cosine (info)", lambda r: max(r["zoo"]["head_cosine"].values()), None),
        ("rel. norm of tau, mean (info)", lambda r: avg(r["mechanism"]["relative_norm"]), None),
        ("rel. norm of tau, max (info)", lambda r: max(r["mechanism"]["relative_norm"].values()), None),
    ]
    lines = ["| target | " + " | ".join(f"seed {r['seed']}" for r in results) + " |", "|---|" + "---|" * len(results)]
    for name, value, ok in checks:
        cells = []
        for r in results:
            v = value(r)
            mark = "" if ok is None else (" met" if ok(v, r) else " MISSED")
            cells.append(f"{v:.3g}{mark}" if "norm" in name else f"{v:.2f}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| per task, seed " + str(results[0]["seed"]) + " | " + " | ".join(results[0]["tasks"]) + " |")
    lines.append("|---|" + "---|" * len(results[0]["tasks"]))
    r = results[0]
    for label, d in (("zero-shot", r["methods"]["zeroshot"]), ("linear probe", r["mechanism"]["linear_probe"]),
                     ("fine-tuned", r["methods"]["individual"])):
        lines.append(f"| {label} | " + " | ".join(f"{d[t]:.1f}" for t in r["tasks"]) + " |")
    lines.append("| rel. norm of tau | " + " | ".join(f"{r['mechanism']['relative_norm'][t]:.3g}"
                                                        for t in r["tasks"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--checkpoint-dir", default="checkpoints/demo-seeds")
    p.add_argument("--out", default="benchmarks/results/demo_quality.json")
    p.add_argument("--model", default="demo", choices=list(CONFIGS), help="demo-micro: a quick smoke run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override zoo config fields (as python -m src.demo.zoo --set), e.g. name_rate=0.1")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="only merge the results files of earlier runs (e.g. seeds run in parallel) into --out")
    a = p.parse_args()
    if a.combine:
        results = sorted((r for f in a.combine for r in json.loads(Path(f).read_text())), key=lambda r: r["seed"])
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(table(results), svc_effect(results), targets(results), sep="\n\n")
        return
    cfg = with_overrides(CONFIGS[a.model], a.set)
    torch.set_num_threads(a.threads)
    results = []
    for seed in a.seeds:
        results.append(run_seed(seed, Path(a.checkpoint_dir), a.model, cfg))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(table(results), flush=True)
    print(svc_effect(results), targets(results), sep="\n\n", flush=True)


if __name__ == "__main__":
    main()
