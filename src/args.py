"""main.py's command line: the flags, their parsing and every check made before any work.

    from src.args import build_parser, validate
    args = build_parser().parse_args(argv); validate(args)

Merge-method options come from merge_func's registry: each keyword-only option of a registered
method is a flag of the same name (``--ties_k``), shared by the methods that declare it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

import merge_func
import utils
from clip.layout import LAYOUTS
from clip.save import check_save_path as check_save_path_of
from src import tuning
from src.datasets import conventions
from src.datasets.registry import NAMED_SETS, resolve_tasks
from src.eval import pick_device
from src.input_cache import MODES as INPUT_CACHE_MODES
from src.linalg import KEY_FILTERS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SVC_OPTIONS = ("alpha", "svc_target", "svc_row_space", "svc_keys", "svc_dtype")
REFERENCE_ROWS = ("zeroshot", "finetuned")  # --merge values that evaluate checkpoints instead of merging
SHARED_OPTIONS = ("scaling_coef",)  # method options that are also main flags, with the same meaning


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
                   help=f"{', '.join(merge_func.METHODS)}, or zeroshot / finetuned for the reference rows")
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
    core, added = {a.dest for a in p._actions}, set()
    for name, info in merge_func.METHODS.items():
        for option, default in info.options.items():
            if option in core and option not in SHARED_OPTIONS:  # e.g. an option named "device" or "tasks"
                raise ValueError(f"merge method {name}: its option {option!r} collides with main.py's --{option} "
                                 "flag; rename the option")
            if option in core or option in added:  # shared with the run, or with another method
                continue
            added.add(option)
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
    hub = p.add_argument_group('Hugging Face hub and evaluation speed (hub: pip install -e ".[hf]")')
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


def default_tasks(model: str) -> str:
    """The --tasks default: a demo model's own task set, else the 8 tasks."""
    resolve_tasks("8")  # loads registered task-set plugins
    return model if model in NAMED_SETS else "8"


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
    method_options = {o for info in merge_func.METHODS.values() for o in info.options}
    found = []
    for dest in given:
        if merge in REFERENCE_ROWS and dest in {"calibrate", "save_merged", "overwrite", *SVC_OPTIONS, *method_options}:
            found.append(f"{flag[dest]} has no effect with --merge {merge} (nothing is merged)")
        elif dest in SVC_OPTIONS and not args.calibrate:
            found.append(f"{flag[dest]} has no effect without --c (it is an SVC option)")
        elif dest in method_options and dest not in merge_func.METHODS[merge].options:
            owners = [m for m, info in merge_func.METHODS.items() if dest in info.options]
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
        # a FIFO, a device, a directory (or a symlink to one) as the file or its lock: reading would block or never
        # end, and the results line would be lost after the evaluation
        try:
            utils.check_regular_file(file, "remove it or move it away, or give another --logs")
        except utils.NotRegularFileError as err:
            raise ValueError(f"--logs {args.logs}: {file} cannot be written: {err}") from None
        if file.exists() and not os.access(file, os.W_OK):
            raise ValueError(f"--logs {args.logs}: {file} cannot be written; give another --logs")
    check_save_path(args)
    for warning in ignored_flags(args, merge):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.amp and device.type != "cuda":
        print(f"warning: --amp has no effect on {device.type} (fp16 autocast is for CUDA)", file=sys.stderr, flush=True)
