"""Merge fine-tuned CLIP image encoders, optionally calibrate with SVC, evaluate, log.

    python main.py --model ViT-B-32 --merge TA --c          # official SVC run: TA(0.3) + SVC(alpha 1/K)
    python main.py --model demo --merge TA --c              # offline embedded benchmark (built on first use)
    python main.py --model ViT-B-32 --merge TIES --scaling_coef auto --c --alpha auto --tasks 14

Flow: checkpoints -> task vectors -> merge -> calibrate -> apply -> evaluate -> log.
Every run writes logs/<model>/log_<time>_<merge>[_svc].txt and one line of
logs/<model>/results.jsonl (read by ``python -m src.results``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch

import clip
import merge_func
import utils
from clip.factory import load_into
from clip.hub import hub_checkpoints
from clip.layout import LAYOUTS
from src import tuning
from src.datasets.hf_sets import HUB_LOCATION, ensure_hub_splits
from src.datasets.registry import NAMED_SETS, resolve_tasks
from src.eval import evaluate_tasks, pick_device
from src.input_cache import MODES as INPUT_CACHE_MODES, InputCache
from src.svc import check_alpha, default_alpha, svc
from src.task_vectors import TaskVector

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- command line -------------------------------------------------------------------

def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _coef(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="ViT-B-32, ViT-B-16, ViT-L-14, demo, demo-micro")
    p.add_argument("--merge", default="TA",
                   help=f"{', '.join(merge_func.MERGE_METHODS)}, or zeroshot / finetuned for the reference rows")
    p.add_argument("--c", "--calibrate", dest="calibrate", action="store_true", help="apply SVC after merging")
    p.add_argument("--alpha", type=_coef, default=None,
                   help="SVC floor: number > 0 or 'auto' (validation). Default 1/K; 1.0 after TSV-M")
    p.add_argument("--scaling_coef", "--scaling-coef", type=_coef, default=None,
                   help="merge coefficient: number, or 'auto' to pick it on the <Task>Val splits "
                        "(default: the method's own, e.g. 0.3 for TA, 1 for the others)")
    p.add_argument("--base_dir", "--base-dir", default=".", help="project root holding checkpoints/<model>/")
    p.add_argument("--data-location", "--data_location", default=None, help="datasets root (default <base_dir>/data)")
    p.add_argument("--checkpoint-layout", choices=LAYOUTS, default=None, help="force a checkpoint layout")
    p.add_argument("--tasks", default=None, help="tasks to merge: 8 | 14 | 20 | A,B,C | a named set (default 8; "
                                                 "the model's own set for demo models)")
    p.add_argument("--eval-datasets", default=None, help="datasets to evaluate (default: the merged tasks)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--download", action="store_true",
                   help="let torchvision download datasets it can fetch (never done silently)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast for evaluation on CUDA (faster, not bit-exact)")
    p.add_argument("--seed", type=int, default=42, help="global seed (the official runs use 42)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--logs", default="logs", help="log folder; results go to <logs>/<model>/")
    p.add_argument("--save-merged", default=None, metavar="PATH", help="write the merged encoder as safetensors + JSON")
    p.add_argument("--rebuild", action="store_true", help="demo models: rebuild the checkpoint zoo")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if results.jsonl already holds a run of exactly this configuration")
    svc_group = p.add_argument_group("SVC options")
    svc_group.add_argument("--svc-target", "--target", dest="svc_target", type=int, default=None,
                           help="calibrate against one task only (official --target)")
    svc_group.add_argument("--svc-row-space", action="store_true", help="use right singular vectors (ablation)")
    svc_group.add_argument("--svc-keys", default="official",
                           help="official (2-D, no text_projection/embedding: 49 matrices on ViT-B/32) or all2d")
    svc_group.add_argument("--svc-dtype", choices=sorted(DTYPES), default="float32")
    methods = p.add_argument_group("merge-method options (default: the method's documented default)")
    seen = {"scaling_coef", "device"}
    for name, options in merge_func.METHOD_OPTIONS.items():
        for option, default in options.items():
            if option in seen:
                continue
            seen.add(option)
            kind = _str2bool if isinstance(default, bool) else type(default) if default is not None else float
            methods.add_argument(f"--{option}", type=kind, default=None,
                                 help=f"{name} (default {default if default is not None else '1/K'})")
    hub = p.add_argument_group("Hugging Face hub and evaluation speed (hub: pip install -r requirements-hf.txt)")
    hub.add_argument("--source", choices=("local", "hf"), default="local",
                     help="checkpoints: local files under --base_dir, or FusionBench's from the Hugging Face hub "
                          "(openai/clip-vit-*, tanganke/clip-vit-*_<task>): the hub cache only, fetched with "
                          "--download")
    hub.add_argument("--data-source", "--data_source", choices=("local", "hf"), default="local",
                     help="datasets: folders under --data-location, or FusionBench's Hugging Face datasets from the "
                          "hub cache (fetched with --download)")
    hub.add_argument("--input-cache", choices=INPUT_CACHE_MODES, default="auto",
                     help="keep decoded, resized inputs in memory-mapped files: auto = the <Task>Val splits "
                          "(read 20-30 times by --scaling_coef/--alpha auto), all = every split, off = never")
    hub.add_argument("--input-cache-dir", default=None, help="where (default <base_dir>/cache/inputs)")
    return p


# --- pipeline pieces ----------------------------------------------------------------

def default_tasks(model: str) -> str:
    resolve_tasks("8")  # loads registered task-set plugins
    return model if model in NAMED_SETS else "8"


def load_task_vectors(ckpts, zeroshot, tasks: list[str]) -> list[TaskVector]:
    """Lazy task vectors: tensors are read per parameter, never K whole models."""
    return [TaskVector(zeroshot, ckpts.load_finetuned(t, zeroshot)) for t in tasks]


def load_heads(args, ckpts, tasks: list[str]) -> dict:
    heads, missing = {}, []
    for task in tasks:
        base = task[:-3] if task.endswith("Val") else task
        path = ckpts.heads.get(base) or ckpts.root / f"head_{base}.pt"
        if Path(path).exists():
            heads[base] = clip.load_head(path)
        else:
            missing.append(base)
    if missing:  # build from CLIP's text tower (needs the released OpenAI weights once)
        import open_clip

        from src.heads import get_classification_head

        print(f"building zero-shot heads for {missing} from {args.model}'s text tower", flush=True)
        text_model = None
        if ckpts.layout == "hf":  # a Hugging Face CLIPModel zero-shot folder has the text tower: no download
            from clip.hub import text_model_from_hf
            text_model = text_model_from_hf(args.model, ckpts.zeroshot)
        text_model = text_model or open_clip.create_model(args.model, pretrained="openai")
        for base in missing:
            heads[base] = get_classification_head(args.model, base, ckpts.root, args.data_location, clip_model=text_model)
    return heads


def fingerprint(ckpts) -> str:
    """Short id of the checkpoint files (paths, sizes, modification times): runs made on
    different checkpoints, e.g. a rebuilt demo zoo, are never averaged together."""
    import hashlib

    files = [ckpts.zeroshot, *ckpts.finetuned.values()]
    stamp = [(str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in map(Path, files) if f.exists()]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]


def individual_path(args) -> Path:
    return Path(args.logs) / args.model / "individual_accuracies.json"


def load_individual(args) -> dict[str, float]:
    path = individual_path(args)
    return json.loads(path.read_text()) if path.exists() else {}


def evaluate_finetuned(args, ckpts, encoder, heads, datasets: list[str]) -> dict[str, float]:
    """Each fine-tuned encoder on its own task's split; cached for normalised accuracy."""
    cache = load_individual(args)
    for name in datasets:
        base = name[:-3] if name.endswith("Val") else name
        if base not in ckpts.finetuned:
            raise SystemExit(f"no fine-tuned checkpoint for {base}: --eval-datasets must be among the merged tasks")
        load_into(encoder, ckpts.load_finetuned(base), source=str(ckpts.finetuned[base]))
        cache.update(evaluate(args, encoder, heads, [name]))
    utils.atomic_write_text(individual_path(args), json.dumps(cache, indent=1, sort_keys=True))
    return {name: cache[name] for name in datasets}


def evaluate(args, encoder, heads, datasets: list[str]) -> dict[str, float]:
    return evaluate_tasks(encoder, datasets, heads, encoder.val_preprocess, args.data_location, device=args.device_obj,
                          batch_size=args.batch_size, num_workers=args.num_workers,
                          progress=False if args.no_progress else None, amp=args.amp, seed=args.seed,
                          download=args.download, input_cache=getattr(args, "inputs", None))


def individual_for(args, ckpts, encoder, heads, datasets, zeroshot_sd) -> dict[str, float] | None:
    """Single-task accuracies on ``datasets`` (measured once and cached), for normalised accuracy."""
    cache = load_individual(args)
    todo = [d for d in datasets if d not in cache]
    if todo:
        print(f"measuring fine-tuned accuracies on {todo} (once; cached in {individual_path(args)})", flush=True)
        evaluate_finetuned(args, ckpts, encoder, heads, todo)
        load_into(encoder, zeroshot_sd)
        cache = load_individual(args)
    return {d: cache[d] for d in datasets}


def requested(args, merge: str, tasks: list[str], datasets: list[str]) -> dict:
    """What the user asked for (before defaults are filled in): run.sh skips a run whose
    request is already in results.jsonl."""
    request = {"merge": merge, "tasks": tasks, "datasets": datasets, "seed": args.seed}
    if merge in ("zeroshot", "finetuned"):
        return request
    options = merge_func.resolve_options(merge, SimpleNamespace(**vars(args)))
    options.pop("device", None)
    options["scaling_coef"] = args.scaling_coef if args.scaling_coef is not None else options["scaling_coef"]
    request.update(options=options, svc=args.calibrate)
    if args.calibrate:
        request.update(alpha=args.alpha, svc_keys=args.svc_keys, svc_target=args.svc_target,
                       svc_row_space=args.svc_row_space, svc_dtype=args.svc_dtype)
    return request


def calibrate(args, merged: TaskVector, tvs: list[TaskVector], alpha: float) -> TaskVector:
    return svc(merged, tvs, alpha, target=args.svc_target, row_space=args.svc_row_space, keys=args.svc_keys,
               dtype=DTYPES[args.svc_dtype], device=args.device_obj if args.device_obj.type == "cuda" else None)


# --- main -----------------------------------------------------------------------------

def run(args) -> dict:
    threads = utils.set_threads(args.threads)
    utils.seed_everything(args.seed)
    args.device_obj = pick_device(args.device)
    args.data_location = args.data_location or os.path.join(args.base_dir, "data")
    if args.data_source == "hf":  # the registry's builders read FusionBench's hub datasets (src/datasets/hf_sets.py)
        args.data_location = HUB_LOCATION
    args.inputs = InputCache(args.input_cache_dir or os.path.join(args.base_dir, "cache", "inputs"), args.input_cache)
    times: dict[str, float] = {}

    if args.model.startswith("demo") and args.source == "local":  # the offline benchmark builds its own zoo
        from src.demo.zoo import ensure_zoo

        with utils.timer(times, "zoo_seconds"):
            ensure_zoo(args.model, os.path.join(args.base_dir, "checkpoints"), rebuild=args.rebuild)

    reference = args.merge.lower()
    merge = reference if reference in ("zeroshot", "finetuned") else merge_func.canonical_name(args.merge)
    tasks = resolve_tasks(args.tasks or default_tasks(args.model))
    datasets = resolve_tasks(args.eval_datasets) if args.eval_datasets else tasks
    request = requested(args, merge, tasks, datasets)
    if args.source != "local" or args.data_source != "local":
        request.update(source=args.source, data_source=args.data_source)
    results = Path(args.logs) / args.model / "results.jsonl"
    if args.source == "hf":  # FusionBench's checkpoints from the Hugging Face hub cache (clip/hub.py): layout hf
        if args.checkpoint_layout not in (None, "hf"):
            raise ValueError(f"--source hf gives the 'hf' checkpoint layout, not {args.checkpoint_layout!r}")
        ckpts = hub_checkpoints(args.model, tasks, args.base_dir, download=args.download)
    else:
        ckpts = clip.find_checkpoints(args.model, args.base_dir, tasks, layout=args.checkpoint_layout)
    if args.data_source == "hf":  # every hub split this run reads is cached (or fetched) before any work
        tuned = merge not in ("zeroshot", "finetuned") and "auto" in (args.scaling_coef, args.alpha)
        ensure_hub_splits(datasets + ([f"{t}Val" for t in tasks] if tuned else []), download=args.download)
    ckpts.check(args.model)
    # the same request on other checkpoints (a rebuilt zoo, new downloads) is not done yet
    done = {"request": request, "checkpoints": fingerprint(ckpts)}
    if args.skip_existing and any(all(r.get(k) == v for k, v in done.items()) for r in utils.read_jsonl(results)):
        print(f"skipping: {results} already has this run ({merge}{' + SVC' if args.calibrate else ''})", flush=True)
        return {"skipped": True, "request": request}
    print(ckpts.describe(), flush=True)

    with utils.timer(times, "load_seconds"):
        zeroshot_sd = ckpts.load_zeroshot(args.model)
        encoder = clip.build_image_encoder(args.model, zeroshot_sd)
        heads = load_heads(args, ckpts, datasets)
    record: dict = {"model": args.model, "merge": merge, "svc": False, "alpha": None, "scaling_coef": None,
                    "tasks": tasks, "layout": ckpts.layout, "seed": args.seed, "threads": threads,
                    "device": str(args.device_obj), "source": args.source, "data_source": args.data_source, **done}

    if merge == "finetuned":
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate_finetuned(args, ckpts, encoder, heads, datasets)
        return finish(args, record, accuracy, times)
    if merge == "zeroshot":
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate(args, encoder, heads, datasets)
        return finish(args, record, accuracy, times)

    config = SimpleNamespace(**vars(args))
    options = merge_func.resolve_options(merge, config)
    options.pop("device", None)
    record["options"] = options
    tvs = load_task_vectors(ckpts, zeroshot_sd, tasks)
    auto_coef, auto_alpha = args.scaling_coef == "auto", args.alpha == "auto"
    if auto_coef:
        config.scaling_coef = 1.0  # every method's update is linear in its coefficient
    with utils.timer(times, "merge_seconds"):
        merged = merge_func.get_merge_method(merge)(TaskVector.mean(tvs), tvs, config)
    alpha = None
    if args.calibrate:
        alpha = default_alpha(merge, len(tasks)) if args.alpha is None or auto_alpha else check_alpha(args.alpha)

    if auto_coef or (args.calibrate and auto_alpha):
        val = [f"{t}Val" for t in tasks]
        individual = individual_for(args, ckpts, encoder, heads, val, zeroshot_sd)
        base = {k: zeroshot_sd[k] for k in merged.vector}
        params = encoder.state_dict()

        def scorer(update_for):
            def score(value):
                tuning.apply_in_place(params, base, update_for(value), 1.0)
                return evaluate(args, encoder, heads, val)
            return score

        coef = 1.0
        if auto_coef:
            grid = tuning.default_grid(merge)
            update = (lambda c: calibrate(args, c * merged, tvs, alpha)) if args.calibrate else (lambda c: c * merged)
            with utils.timer(times, "tuning_seconds"):
                chosen = tuning.select_coefficient(grid, scorer(update), individual)
            coef = chosen.best
            record.update(chosen.as_log("scaling_coef"))
            print(f"scaling_coef chosen on validation: {coef} ({chosen.criterion} {chosen.score:.2f})", flush=True)
        if args.calibrate and auto_alpha:
            with utils.timer(times, "tuning_seconds"):
                chosen = tuning.select_coefficient(tuning.alpha_grid(len(tasks)),
                                                   scorer(lambda a: calibrate(args, coef * merged, tvs, a)), individual)
            alpha = chosen.best
            record.update(chosen.as_log("alpha"))
            print(f"alpha chosen on validation: {alpha} ({chosen.criterion} {chosen.score:.2f})", flush=True)
        if auto_coef:
            merged = coef * merged
            options["scaling_coef"] = coef
    record["scaling_coef"] = options["scaling_coef"]

    if args.calibrate:
        with utils.timer(times, "svc_seconds"):
            merged = calibrate(args, merged, tvs, alpha)
        record.update(svc=True, alpha=alpha, svc_keys=args.svc_keys, svc_target=args.svc_target,
                      svc_row_space=args.svc_row_space, svc_dtype=args.svc_dtype)
    with utils.timer(times, "apply_seconds"):
        merged_sd = merged.apply_to(zeroshot_sd, scaling_coef=1.0)
        load_into(encoder, merged_sd)
    if args.save_merged:
        meta = {"method": merge, "options": options, "svc": args.calibrate, "alpha": alpha, "tasks": tasks,
                "model": args.model,
                "sources": {"zeroshot": str(ckpts.zeroshot), **{t: str(p) for t, p in ckpts.finetuned.items()}}}
        clip.save_merged(args.save_merged, merged_sd, meta)
        print(f"merged encoder written to {args.save_merged}", flush=True)
    with utils.timer(times, "eval_seconds"):
        accuracy = evaluate(args, encoder, heads, datasets)
    return finish(args, record, accuracy, times)


def finish(args, record: dict, accuracy: dict[str, float], times: dict[str, float]) -> dict:
    """Print the table, write the text log and append the JSON line."""
    now = datetime.now()
    record = {"time": now.isoformat(timespec="seconds"), **record, "accuracy": accuracy,
              "avg": sum(accuracy.values()) / len(accuracy)}
    individual = load_individual(args)
    if all(d in individual for d in accuracy):
        record["normalized"] = tuning.normalized_accuracy(accuracy, {d: individual[d] for d in accuracy})
    for key in ("merge_seconds", "svc_seconds", "eval_seconds"):
        record[key] = round(times.get(key, 0.0), 3)
    record.update({k: round(v, 3) for k, v in times.items() if k not in record})

    lines = [f"command: {' '.join(sys.argv)}", "config: " + json.dumps(
        {k: v for k, v in vars(args).items() if k != "device_obj"}, default=str, sort_keys=True), ""]
    lines += [f"{name}: {acc:.2f}%" for name, acc in accuracy.items()]
    lines.append(f"Avg ACC: {record['avg']:.2f}%")
    if "normalized" in record:
        lines.append(f"Normalized ACC: {record['normalized']:.2f}%")
    if record.get("svc"):
        lines.append(f"SVC alpha: {record['alpha']}")
    lines.append("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    folder = Path(args.logs) / args.model
    suffix = f"{record['merge']}{'_svc' if record.get('svc') else ''}"
    utils.atomic_write_text(folder / f"log_{now:%Y%m%d_%H%M%S}_{suffix}.txt", text)
    utils.append_jsonl(folder / "results.jsonl", record)
    return record


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (clip.CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {message}") from None


if __name__ == "__main__":
    main()
