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
import math
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
from clip.save import check_save_path as check_save_path_of
from src import tuning
from src.datasets import conventions
from src.datasets.folder_sets import canonical_split_folders, set_split_folders
from src.datasets.hf_sets import ensure_hub_splits
from src.datasets.registry import NAMED_SETS, check_requirements, resolve_tasks
from src.eval import describe_tasks, evaluate_tasks, pick_device
from src.input_cache import MODES as INPUT_CACHE_MODES, InputCache
from src.linalg import KEY_FILTERS
from src.modeling import build_image_encoder
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


def _finite(text: str) -> float:
    """A float that is a real number: nan/inf would reach the merge and the logs (strict JSON refuses them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _coef(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number or 'auto', got {text!r}") from None


def _alpha(text: str) -> float | str:
    value = _coef(text)
    if value != "auto" and value <= 0:
        raise argparse.ArgumentTypeError(f"SVC alpha must be finite and > 0 (the paper's default is 1/K), got {text!r}")
    return value


def _int_from(low: int):
    """argparse type: an integer >= ``low`` (0 threads or a negative batch size would fail after the work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, ``error: ...`` (exit code 1), like every other refused input."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (python main.py --help lists the options)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="ViT-B-32, ViT-B-16, ViT-L-14, demo, demo-micro")
    p.add_argument("--merge", default="TA",
                   help=f"{', '.join(merge_func.MERGE_METHODS)}, or zeroshot / finetuned for the reference rows")
    p.add_argument("--c", "--calibrate", dest="calibrate", action="store_true", help="apply SVC after merging")
    p.add_argument("--alpha", type=_alpha, default=None,
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
    p.add_argument("--batch-size", type=_int_from(1), default=128)
    p.add_argument("--num-workers", type=_int_from(0), default=None,
                   help="data-loading processes (default 2; 0 for demo models, whose data are in memory)")
    p.add_argument("--download", action="store_true",
                   help="allow the network (never used silently): torchvision datasets it can fetch, and with "
                        "--source/--data-source hf the hub's checkpoints and datasets")
    p.add_argument("--amp", action="store_true", help="fp16 autocast for evaluation on CUDA (faster, not bit-exact)")
    p.add_argument("--seed", type=int, default=42, help="global seed (the official runs use 42)")
    p.add_argument("--threads", type=_int_from(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--logs", default="logs", help="log folder; results go to <logs>/<model>/")
    p.add_argument("--save-merged", default=None, metavar="PATH",
                   help="write the merged encoder to PATH (.safetensors) and its description to PATH's .json")
    p.add_argument("--overwrite", action="store_true", help="let --save-merged replace an existing file")
    p.add_argument("--rebuild", action="store_true", help="demo models: rebuild the checkpoint zoo")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if results.jsonl already holds a run of exactly this configuration")
    svc_group = p.add_argument_group("SVC options")
    svc_group.add_argument("--svc-target", "--target", dest="svc_target", type=int, default=None,
                           help="calibrate against one task only (official --target)")
    svc_group.add_argument("--svc-row-space", action="store_true", help="use right singular vectors (ablation)")
    svc_group.add_argument("--svc-keys", default="official", choices=sorted(KEY_FILTERS),
                           help="official (2-D, no text_projection/embedding: 49 matrices on ViT-B/32) or all2d")
    svc_group.add_argument("--svc-dtype", choices=sorted(DTYPES), default="float32")
    methods = p.add_argument_group("merge-method options (default: the method's documented default)")
    seen = {"scaling_coef", "device"}
    for name, options in merge_func.METHOD_OPTIONS.items():
        for option, default in options.items():
            if option in seen:
                continue
            seen.add(option)
            kind = type(default) if isinstance(default, (int, str)) else _finite
            kind = _str2bool if isinstance(default, bool) else kind
            methods.add_argument(f"--{option}", type=kind, default=None,
                                 help=f"{name} (default {default if default is not None else '1/K'})")
    data = p.add_argument_group("evaluation data and coefficient search")
    data.add_argument("--split-folder", action="append", default=[], metavar="TASK=NAME",
                      help="read TASK's split from folder NAME (needed when both of its names exist and differ): "
                           "DTD=val|test, SUN397=val|test (test split), EuroSAT=val|valid (EuroSATVal); "
                           "task_vectors names them val, the official SVC code test / valid")
    data.add_argument("--coef-grid", choices=tuning.COEF_GRIDS, default="default",
                      help="grid of --scaling_coef auto: default (0.05..1; 0.1..3 for TSV-M/Iso), tsv "
                           "(TSV/Iso code: 1/30..1; 0.1..3 for TSV-M/Iso) or task_vectors (0.05..1 for all)")
    evaluation = p.add_argument_group("evaluation conventions")
    evaluation.add_argument("--convention", choices=("auto", *conventions.CONVENTIONS), default="auto",
                            help="whose class names, templates and data the heads follow: task_vectors, tsv or "
                                 "fusionbench (default auto: the checkpoint layout's, hf -> fusionbench)")
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


def split_folders(pairs: list[str]) -> dict[str, str]:
    """--split-folder TASK=NAME pairs -> {TASK: NAME}."""
    choices = {}
    for pair in pairs:
        task, sep, folder = pair.partition("=")
        if not sep or not task.strip() or not folder.strip():
            raise ValueError(f"--split-folder {pair!r}: expected TASK=NAME, e.g. DTD=test")
        choices[task.strip()] = folder.strip()
    return choices


# --- pipeline pieces ----------------------------------------------------------------

def default_tasks(model: str) -> str:
    resolve_tasks("8")  # loads registered task-set plugins
    return model if model in NAMED_SETS else "8"


def load_task_vectors(ckpts, zeroshot, tasks: list[str]) -> list[TaskVector]:
    """Lazy task vectors: tensors are read per parameter, never K whole models."""
    return [TaskVector(zeroshot, ckpts.load_finetuned(t, zeroshot)) for t in tasks]


def load_heads(args, ckpts, tasks: list[str], convention: str) -> dict:
    """The released head when it was made with `convention`'s class names and templates, else the one cached for
    the convention (src.heads.head_path), else one built from CLIP's text tower and cached."""
    from src.heads import get_classification_head, head_path, load_head

    heads, missing = {}, []
    released_under = conventions.released_heads_convention(ckpts.layout)
    for task in tasks:
        base = utils.task_of(task)
        released = ckpts.heads.get(base)
        if released and Path(released).exists() and conventions.same_definitions(base, convention, released_under):
            heads[base] = load_head(released)
        elif head_path(ckpts.root, base, convention).exists():
            heads[base] = load_head(head_path(ckpts.root, base, convention))
        else:
            missing.append(base)
    if missing:  # build from CLIP's text tower (needs the released OpenAI weights once)
        print(f"building zero-shot heads for {missing} from {args.model}'s text tower ({convention} convention)",
              flush=True)
        text_model = None
        if ckpts.layout == "hf":  # a Hugging Face CLIPModel zero-shot folder has the text tower: no download
            from clip.hub import text_model_from_hf
            text_model = text_model_from_hf(args.model, ckpts.zeroshot)
        text_model = text_model or clip.create_model(args.model, pretrained="openai")  # QuickGELU, as OpenAI's
        for base in missing:
            heads[base] = get_classification_head(args.model, base, ckpts.root, args.data_location,
                                                  clip_model=text_model, convention=convention,
                                                  source=args.data_source)
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


def load_individual(args, checkpoints: str, data: dict[str, dict]) -> dict[str, float]:
    """Cached fine-tuned accuracies measured on these checkpoints (``fingerprint``) and on exactly
    this data (provenance per dataset, as in results.jsonl); anything else is stale and left out.

    File layout: {dataset: {checkpoint fingerprint: {"acc": top-1 %, "data": provenance}}}."""
    path = individual_path(args)
    cache = utils.read_json(path, {})
    if not isinstance(cache, dict):
        raise ValueError(f"{path} is not a JSON object; delete it (it is a cache and is rebuilt)")
    known = {}
    for name, info in data.items():
        entry = cache.get(name)
        hit = entry.get(checkpoints) if isinstance(entry, dict) else None  # a bare number: the old, unkeyed format
        if isinstance(hit, dict) and hit.get("data") == info and isinstance(hit.get("acc"), (int, float)):
            known[name] = hit["acc"]
    return known


def store_individual(args, checkpoints: str, accuracy: dict[str, float], data: dict[str, dict]) -> None:
    """Add measured fine-tuned accuracies to the cache (locked read-modify-write: concurrent runs lose nothing)."""
    path = individual_path(args)

    def update(cache):
        if not isinstance(cache, dict):
            raise ValueError(f"{path} is not a JSON object; delete it (it is a cache and is rebuilt)")
        check_finite({}, accuracy)  # a NaN fine-tuned accuracy is never cached
        for name, acc in accuracy.items():
            entry = cache.get(name) if isinstance(cache.get(name), dict) else {}
            entry[checkpoints] = {"acc": acc, "data": data[name]}
            cache[name] = entry
        return cache

    utils.update_json(path, update, default={})


def evaluate_finetuned(args, ckpts, encoder, heads, datasets: list[str],
                       provenance: dict | None = None) -> dict[str, float]:
    """Each fine-tuned encoder on its own task's split; cached for normalised accuracy."""
    accuracy, data = {}, {}
    for name in datasets:
        base = utils.task_of(name)
        if base not in ckpts.finetuned:
            raise SystemExit(f"no fine-tuned checkpoint for {base}: --eval-datasets must be among the merged tasks")
        load_into(encoder, ckpts.load_finetuned(base), source=str(ckpts.finetuned[base]))
        accuracy.update(evaluate(args, encoder, heads, [name], data))
    store_individual(args, fingerprint(ckpts), accuracy, data)
    if provenance is not None:
        provenance.update(data)
    return accuracy


def evaluate(args, encoder, heads, datasets: list[str], provenance: dict | None = None) -> dict[str, float]:
    return evaluate_tasks(encoder, datasets, heads, encoder.val_preprocess, args.data_location, device=args.device_obj,
                          batch_size=args.batch_size, num_workers=args.num_workers,
                          progress=False if args.no_progress else None, amp=args.amp, seed=args.seed,
                          download=args.download, convention=args.eval_convention, provenance=provenance,
                          input_cache=getattr(args, "inputs", None), source=args.data_source)


def individual_for(args, ckpts, encoder, heads, datasets, restore, data: dict | None = None) -> dict[str, float]:
    """Single-task accuracies on ``datasets`` for these checkpoints and this data (``data``: provenance
    per dataset, looked up when not given), measured once and cached, for normalised accuracy. The
    encoder is left holding ``restore``. Datasets of tasks without a fine-tuned checkpoint are left out."""
    datasets = [d for d in datasets if utils.task_of(d) in ckpts.finetuned]
    data = data if data is not None else describe_tasks(datasets, args.data_location, download=args.download,
                                                         convention=args.eval_convention, source=args.data_source)
    known = load_individual(args, fingerprint(ckpts), {d: data[d] for d in datasets})
    todo = [d for d in datasets if d not in known]
    if todo:
        print(f"measuring fine-tuned accuracies on {todo} (once for these checkpoints and data; cached in "
              f"{individual_path(args)})", flush=True)
        known.update(evaluate_finetuned(args, ckpts, encoder, heads, todo))
        load_into(encoder, restore)
    return {d: known[d] for d in datasets}


def requested(args, merge: str, tasks: list[str], datasets: list[str]) -> dict:
    """What the user asked for (before defaults are filled in): run.sh skips a run whose
    request is already in results.jsonl."""
    request = {"merge": merge, "tasks": tasks, "datasets": datasets, "seed": args.seed}
    if args.split_folder:  # only when given, so requests logged before the flag existed still match
        request["split_folders"] = canonical_split_folders(split_folders(args.split_folder))
    if args.coef_grid != "default" and args.scaling_coef == "auto":
        request["coef_grid"] = args.coef_grid
    if getattr(args, "convention", "auto") != "auto":  # auto follows the checkpoints (in the fingerprint)
        request["convention"] = args.convention
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


def plan(args) -> dict:
    """What a run is, without loading any weights: merge name, tasks, evaluated datasets, the
    located checkpoints (ckpts), the `request` and checkpoint fingerprint (`checkpoints`) that
    identify it in results.jsonl (`results`), and whether that file already holds it (`done`).
    --skip-existing and src.sweep both decide "already done" here."""
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
    args.eval_convention = conventions.resolve(args.convention, ckpts.layout)
    conventions.check_layout(ckpts.layout, args.eval_convention, tasks)  # EMNIST: the fine-tune's own data
    check_requirements(datasets)
    ckpts.check(args.model)
    # the same request on other checkpoints (a rebuilt zoo, new downloads) is not done yet
    key = {"request": request, "checkpoints": fingerprint(ckpts)}
    done = any(all(r.get(k) == v for k, v in key.items()) for r in utils.read_jsonl(results))
    return {"merge": merge, "tasks": tasks, "datasets": datasets, "ckpts": ckpts, "results": results, **key,
            "done": done}


def calibrate(args, merged: TaskVector, tvs: list[TaskVector], alpha: float) -> TaskVector:
    return svc(merged, tvs, alpha, target=args.svc_target, row_space=args.svc_row_space, keys=args.svc_keys,
               dtype=DTYPES[args.svc_dtype], device=args.device_obj if args.device_obj.type == "cuda" else None)


# --- checks before any work -------------------------------------------------------------

SVC_OPTIONS = ("alpha", "svc_target", "svc_row_space", "svc_keys", "svc_dtype")
REFERENCE_ROWS = ("zeroshot", "finetuned")


def _check_writable(folder: Path, what: str) -> None:
    """``folder`` is a writable folder or can be created: refused now, not after the evaluation."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {existing} is not writable; give another path")


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag as the user types it (the first long spelling)."""
    return {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.dest) for a in parser._actions}


def ignored_flags(args, merge: str) -> list[str]:
    """Warnings for flags that were given but change nothing in this run."""
    parser = build_parser()
    flag = _flag_names(parser)
    given = [dest for dest in vars(args) if dest in flag and getattr(args, dest) != parser.get_default(dest)]
    method_options = {o for options in merge_func.METHOD_OPTIONS.values() for o in options} - {"device"}
    found = []
    for dest in given:
        if merge in REFERENCE_ROWS and dest in {"calibrate", "save_merged", "overwrite", *SVC_OPTIONS, *method_options}:
            found.append(f"{flag[dest]} has no effect with --merge {merge} (nothing is merged)")
        elif dest in SVC_OPTIONS and not args.calibrate:
            found.append(f"{flag[dest]} has no effect without --c (it is an SVC option)")
        elif dest in method_options and dest not in merge_func.METHOD_OPTIONS.get(merge, {}):
            owners = [m for m, options in merge_func.METHOD_OPTIONS.items() if dest in options]
            found.append(f"{flag[dest]} has no effect with --merge {merge} (it is an option of {', '.join(owners)})")
        elif dest == "overwrite" and not args.save_merged:
            found.append("--overwrite has no effect without --save-merged")
        elif dest == "rebuild" and not args.model.startswith("demo"):
            found.append(f"--rebuild has no effect on {args.model} (it rebuilds the demo zoos)")
    return found


def check_save_path(args, ckpts=None) -> None:
    """--save-merged: a .safetensors file that is not an input and is only replaced with --overwrite."""
    if not args.save_merged or args.merge.lower() in REFERENCE_ROWS:
        return
    path = Path(args.save_merged)
    _check_writable(path.parent, f"--save-merged {path}")
    sources = [] if ckpts is None else [ckpts.zeroshot, *ckpts.finetuned.values(), *ckpts.heads.values()]
    check_save_path_of(path, sources, overwrite=args.overwrite, label="--save-merged")


def validate(args) -> None:
    """Refuse bad input before anything is built, read or evaluated; warn about flags that do nothing."""
    reference = args.merge.lower()
    merge = reference if reference in REFERENCE_ROWS else merge_func.canonical_name(args.merge)
    for flag, value in (("--tasks", args.tasks), ("--eval-datasets", args.eval_datasets)):
        if value is not None and not value.strip(",\t\n "):
            raise ValueError(f"{flag} is empty: give 8, 14, 20, a named set or A,B,C (or leave {flag} out)")
    tasks = resolve_tasks(args.tasks or default_tasks(args.model))
    datasets = resolve_tasks(args.eval_datasets) if args.eval_datasets else tasks
    unmerged = [d for d in datasets if utils.task_of(d) not in tasks]
    if merge == "finetuned" and unmerged:  # each dataset is evaluated with its own task's fine-tuned model
        raise ValueError(f"--merge finetuned: no fine-tuned model among --tasks for {unmerged}; "
                         "--eval-datasets must be among the merged tasks (or their Val splits)")
    if args.calibrate and args.svc_target is not None and not -len(tasks) <= args.svc_target < len(tasks):
        raise ValueError(f"--svc-target {args.svc_target} is out of range for {len(tasks)} tasks "
                         f"(0 .. {len(tasks) - 1}, the index in --tasks)")
    try:
        device = pick_device(args.device)
    except RuntimeError:  # torch.device("foo")
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {args.device}: not a device; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    _check_writable(Path(args.logs) / args.model, f"--logs {args.logs}")
    for name in ("results.jsonl", "individual_accuracies.json"):
        file = Path(args.logs) / args.model / name
        if file.is_dir() or (file.exists() and not os.access(file, os.W_OK)):
            raise ValueError(f"--logs {args.logs}: {file} cannot be written; give another --logs")
    check_save_path(args)
    for warning in ignored_flags(args, merge):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.amp and device.type != "cuda":
        print(f"warning: --amp has no effect on {device.type} (fp16 autocast is for CUDA)", file=sys.stderr, flush=True)


def _non_finite(value, where: str = "") -> list[str]:
    """Paths of the NaN/inf floats inside nested dicts and lists, e.g. ``scaling_coef_curve[2].avg``."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{where}={value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def check_finite(record: dict, accuracy: dict[str, float]) -> None:
    """Nothing is logged when an accuracy or a logged value is NaN/inf (an empty split, a diverged merge):
    strict JSON would refuse the line after the text log was already written."""
    bad = _non_finite({**record, "accuracy": accuracy})
    if not accuracy or bad:
        raise ValueError(f"no finite result to log ({', '.join(bad) or 'no dataset evaluated'}); nothing was "
                         "written: check that the datasets are not empty and the merged weights are finite")


# --- main -----------------------------------------------------------------------------

def run(args) -> dict:
    validate(args)
    threads = utils.set_threads(args.threads)
    utils.seed_everything(args.seed)
    args.device_obj = pick_device(args.device)
    args.data_location = args.data_location or os.path.join(args.base_dir, "data")
    if args.num_workers is None:  # worker processes only add start-up time to generated in-memory data
        args.num_workers = 0 if args.model.startswith("demo") and args.data_source == "local" else 2
    set_split_folders(split_folders(args.split_folder))  # before any dataset is read
    utils.read_json(individual_path(args), {})  # a damaged cache stops the run before any work
    args.inputs = InputCache(args.input_cache_dir or os.path.join(args.base_dir, "cache", "inputs"), args.input_cache)
    times: dict[str, float] = {}

    if args.model.startswith("demo") and args.source == "local":  # the offline benchmark builds its own zoo
        from src.demo.zoo import ensure_zoo

        with utils.timer(times, "zoo_seconds"):
            ensure_zoo(args.model, os.path.join(args.base_dir, "checkpoints"), rebuild=args.rebuild)

    planned = plan(args)
    merge, tasks, datasets, ckpts = planned["merge"], planned["tasks"], planned["datasets"], planned["ckpts"]
    request, results = planned["request"], planned["results"]
    done = {"request": request, "checkpoints": planned["checkpoints"]}
    check_save_path(args, ckpts)  # never overwrite an input checkpoint
    if args.skip_existing and planned["done"]:
        print(f"skipping: {results} already has this run ({merge}{' + SVC' if args.calibrate else ''})", flush=True)
        return {"skipped": True, "request": request}
    print(ckpts.describe(), flush=True)

    with utils.timer(times, "load_seconds"):
        zeroshot_sd = ckpts.load_zeroshot(args.model)
        encoder = build_image_encoder(args.model, zeroshot_sd)
        heads = load_heads(args, ckpts, datasets, args.eval_convention)
    record: dict = {"model": args.model, "merge": merge, "svc": False, "alpha": None, "scaling_coef": None,
                    "tasks": tasks, "layout": ckpts.layout, "convention": args.eval_convention, "seed": args.seed,
                    "threads": threads, "device": str(args.device_obj), "source": args.source,
                    "data_source": args.data_source, **done, "data": {}}

    if merge == "finetuned":
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate_finetuned(args, ckpts, encoder, heads, datasets, record["data"])
        return finish(args, record, accuracy, times)
    if merge == "zeroshot":
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate(args, encoder, heads, datasets, record["data"])
        check_finite(record, accuracy)  # before the fine-tuned models are measured for it
        with utils.timer(times, "individual_seconds"):  # for normalised accuracy, once per checkpoints and data
            individual_for(args, ckpts, encoder, heads, datasets, zeroshot_sd, record["data"])
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
        record["val_data"] = {}

        def scorer(update_for):
            def score(value):
                tuning.apply_in_place(params, base, update_for(value), 1.0)
                return evaluate(args, encoder, heads, val, record["val_data"])
            return score

        coef = 1.0
        if auto_coef:
            grid = tuning.coefficient_grid(merge, args.coef_grid)
            record["scaling_coef_grid_name"] = args.coef_grid
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
        clip.save_merged(args.save_merged, merged_sd, meta, overwrite=args.overwrite)
        print(f"merged encoder written to {args.save_merged}", flush=True)
    with utils.timer(times, "eval_seconds"):
        accuracy = evaluate(args, encoder, heads, datasets, record["data"])
    check_finite(record, accuracy)
    with utils.timer(times, "individual_seconds"):  # for normalised accuracy, once per checkpoints and data
        individual_for(args, ckpts, encoder, heads, datasets, merged_sd, record["data"])
    return finish(args, record, accuracy, times)


def finish(args, record: dict, accuracy: dict[str, float], times: dict[str, float]) -> dict:
    """Print the table, write the text log and append the JSON line."""
    check_finite(record, accuracy)
    now = datetime.now()
    record = {"time": now.isoformat(timespec="seconds"), **record, "accuracy": accuracy,
              "avg": sum(accuracy.values()) / len(accuracy)}
    individual = load_individual(args, record["checkpoints"], record["data"])  # these checkpoints, this data
    zero = [d for d in accuracy if d in individual and not individual[d] > 0]
    if zero:  # undefined, so not logged; the absolute accuracies still are
        print(f"warning: no normalised accuracy: the fine-tuned model scores 0 on {', '.join(zero)}", file=sys.stderr)
    elif all(d in individual for d in accuracy):
        record["normalized"] = tuning.normalized_accuracy(accuracy, {d: individual[d] for d in accuracy})
    for key in ("merge_seconds", "svc_seconds", "eval_seconds"):
        record[key] = round(times.get(key, 0.0), 3)
    record.update({k: round(v, 3) for k, v in times.items() if k not in record})

    lines = [f"command: {' '.join(sys.argv)}", "config: " + json.dumps(
        {k: v for k, v in vars(args).items() if k != "device_obj"}, default=str, sort_keys=True), ""]
    lines += [f"data {name}: {info['source']} ({info['split']} split, {info['n']} images)"
              for name, info in {**record.get("val_data", {}), **record["data"]}.items()]
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
    # never overwritten: runs finishing in the same second (run.sh, sweep workers) get _2, _3...
    utils.write_new_text(folder / f"log_{now:%Y%m%d_%H%M%S}_{suffix}.txt", text)
    utils.append_jsonl(folder / "results.jsonl", record)
    return record


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; atomic writes have removed their temporary files
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except SystemExit as err:  # raised deep inside with a plain message
        if isinstance(err.code, str) and not err.code.startswith("error: "):
            raise SystemExit(f"error: {err.code}") from None
        raise
    # bad input: CheckpointError, DatasetNotFoundError (a FileNotFoundError), an unknown key or value,
    # a file that cannot be written (PermissionError, NotADirectoryError, a full disk: OSError)
    except (clip.CheckpointError, OSError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {message}") from None


if __name__ == "__main__":
    main()
