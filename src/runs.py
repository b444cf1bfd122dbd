"""What a main.py run is, and what it leaves behind.

`plan` decides what a run is without loading any weights: the merge method, the tasks, the evaluated
datasets, the located checkpoints, the evaluation convention, and the `request` plus checkpoint
`fingerprint` that identify the run in results.jsonl. `--skip-existing` and `src.sweep` both decide
"already done" here. `write_results` prints the table, writes the timestamped text log and appends
the results line.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import clip
import merge_func
import utils
from clip.hub import hub_checkpoints
import src.demo.model  # noqa: F401 - registers the demo architectures that plan checks checkpoints against
from src import published, tuning
from src.args import REFERENCE_ROWS, default_tasks, split_folders
from src.datasets import conventions
from src.datasets.folder_sets import canonical_split_folders, check_split_folders
from src.datasets.hf_sets import check_hub_data, ensure_hub_splits
from src.datasets.registry import check_requirements, resolve_tasks
from src.eval import check_finite


@dataclass(frozen=True)
class Plan:
    merge: str  # registry name, or zeroshot / finetuned
    tasks: list[str]  # merged tasks
    datasets: list[str]  # evaluated datasets
    ckpts: clip.CheckpointSet
    convention: str  # evaluation convention (class names, templates, data)
    request: dict  # what the user asked for
    checkpoints: str  # fingerprint of the checkpoint files
    results: Path  # <logs>/<model>/results.jsonl
    done: bool  # results already holds this request on these checkpoints


def method_options(merge: str, args) -> dict:
    """The registered options of `merge`, explicitly: the flag's value where given, else the declared default."""
    return {option: default if getattr(args, option, None) is None else getattr(args, option)
            for option, default in merge_func.METHODS[merge].options.items()}


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
    if merge in REFERENCE_ROWS:
        return request
    options = method_options(merge, args)
    if args.scaling_coef is not None:
        options["scaling_coef"] = args.scaling_coef  # "auto" is part of the request
    request.update(options=options, svc=args.calibrate)
    if args.calibrate:
        request.update(alpha=args.alpha, svc_keys=args.svc_keys, svc_target=args.svc_target,
                       svc_row_space=args.svc_row_space, svc_dtype=args.svc_dtype)
    return request


def fingerprint(ckpts: clip.CheckpointSet) -> str:
    """Short id of the content of the checkpoint files (clip.layout.content_identity: every weight and config
    file of a folder, a hub snapshot's blob hashes): runs made on different checkpoints, e.g. a rebuilt demo zoo
    or a fine-tune replaced in place, are never averaged together, skipped or given stale fine-tuned accuracies."""
    return ckpts.fingerprint()


def plan(args) -> Plan:
    """What a run is, checked, without loading any weights (see the module docstring)."""
    reference = args.merge.lower()
    merge = reference if reference in REFERENCE_ROWS else merge_func.canonical_name(args.merge)
    tasks = resolve_tasks(args.tasks or default_tasks(args.model))
    datasets = resolve_tasks(args.eval_datasets) if args.eval_datasets else tasks
    request = requested(args, merge, tasks, datasets)
    if args.source != "local" or args.data_source != "local":
        request.update(source=args.source, data_source=args.data_source)
    results = Path(args.logs) / args.model / "results.jsonl"
    tuned = merge not in REFERENCE_ROWS and "auto" in (args.scaling_coef, args.alpha)  # reads the <Task>Val splits
    read = datasets + ([f"{t}Val" for t in tasks] if tuned else [])  # every split the run evaluates
    if args.data_source == "local":  # an ambiguous split folder stops the run before heads are built (needs weights)
        check_split_folders(read, args.data_location or os.path.join(args.base_dir, "data"),
                            split_folders(args.split_folder))
    if args.source == "hf":  # FusionBench's checkpoints from the Hugging Face hub cache (clip/hub.py): layout hf
        if args.checkpoint_layout not in (None, "hf"):
            raise ValueError(f"--source hf gives the 'hf' checkpoint layout, not {args.checkpoint_layout!r}")
        ckpts = hub_checkpoints(args.model, tasks, args.base_dir, download=args.download)
    else:
        ckpts = clip.find_checkpoints(args.model, args.base_dir, tasks, layout=args.checkpoint_layout)
    if args.data_source == "hf":  # every hub split this run reads is cached (or fetched) before any work
        ensure_hub_splits(read, download=args.download)
    convention = conventions.resolve(args.convention, ckpts.layout)
    conventions.check_layout(ckpts.layout, convention, tasks)  # EMNIST: the fine-tune's own data
    check_requirements(datasets)
    if args.data_source == "hf":  # images, labels and class names of every hub split checked before any work
        check_hub_data(read, convention)  # fetched just above when --download
    ckpts.check(args.model)
    # the same request on other checkpoints (a rebuilt zoo, new downloads) is not done yet
    checkpoints = fingerprint(ckpts)
    done = any(r.get("request") == request and r.get("checkpoints") == checkpoints for r in utils.read_jsonl(results))
    return Plan(merge, tasks, datasets, ckpts, convention, request, checkpoints, results, done)


def write_results(args, record: dict, accuracy: dict[str, float], times: dict[str, float],
                  finetuned: dict[str, float], settings: dict | None = None) -> dict:
    """Print the table, write the text log (never overwritten) and append the results line. `finetuned`: the
    known fine-tuned accuracies of these checkpoints and data, for normalised accuracy; `settings`: values
    the run resolved from its flags, logged with them."""
    check_finite(record, accuracy)
    now = datetime.now()
    record = {"time": now.isoformat(timespec="seconds"), **record, "accuracy": accuracy,
              "avg": sum(accuracy.values()) / len(accuracy)}
    zero = [d for d in accuracy if d in finetuned and not finetuned[d] > 0]
    if zero:  # undefined, so not logged; the absolute accuracies still are
        print(f"warning: no normalised accuracy: the fine-tuned model scores 0 on {', '.join(zero)}", file=sys.stderr)
    elif all(d in finetuned for d in accuracy):
        record["normalized"] = tuning.normalized_accuracy(accuracy, {d: finetuned[d] for d in accuracy})
    for key in ("merge_seconds", "svc_seconds", "eval_seconds"):
        record[key] = round(times.get(key, 0.0), 3)
    record.update({k: round(v, 3) for k, v in times.items() if k not in record})

    lines = [f"command: {' '.join(sys.argv)}", "config: " + json.dumps({**vars(args), **(settings or {})}, default=str,
                                                                             sort_keys=True), ""]
    lines += [f"data {name}: {info['source']} ({info['split']} split, {info['n']} images)"
              for name, info in {**record.get("val_data", {}), **record["data"]}.items()]
    lines += [f"{name}: {acc:.2f}%" for name, acc in accuracy.items()]
    lines.append(f"Avg ACC: {record['avg']:.2f}%")
    if "normalized" in record:
        lines.append(f"Normalized ACC: {record['normalized']:.2f}%")
    if record.get("svc"):
        lines.append(f"SVC alpha: {record['alpha']}")
    lines += published.log_lines(record)  # zero-shot / fine-tuned rows far from the published values: check the setup
    lines.append("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    folder = Path(args.logs) / args.model
    suffix = f"{record['merge']}{'_svc' if record.get('svc') else ''}"
    # never overwritten: runs finishing in the same second (run.sh, sweep workers) get _2, _3...
    utils.write_new_text(folder / f"log_{now:%Y%m%d_%H%M%S}_{suffix}.txt", text)
    utils.append_jsonl(folder / "results.jsonl", record)
    return record
