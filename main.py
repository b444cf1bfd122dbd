"""Merge fine-tuned CLIP image encoders, optionally calibrate with SVC, evaluate, log.

    python main.py --model ViT-B-32 --merge TA --c          # official SVC run: TA(0.3) + SVC(alpha 1/K)
    python main.py --model demo --merge TA --c              # offline embedded benchmark (built on first use)
    python main.py --model ViT-B-32 --merge TIES --scaling_coef auto --c --alpha auto --tasks 14

Flow: checkpoints -> task vectors -> merge -> calibrate -> apply -> evaluate -> log.
Every run writes logs/<model>/log_<time>_<merge>[_svc].txt and one line of
logs/<model>/results.jsonl (read by ``python -m src.results``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import clip
import merge_func
import utils
from clip.factory import load_into
from src import runs, tuning
from src.args import DTYPES, build_parser, check_save_path, split_folders, validate
from src.datasets.folder_sets import set_split_folders
from src.eval import Evaluator, FinetunedCache, check_finite, evaluate_finetuned, finetuned_accuracies, pick_device
from src.heads import load_heads
from src.input_cache import InputCache
from src.modeling import build_image_encoder
from src.svc import check_alpha, svc
from src.task_vectors import TaskVector


def load_task_vectors(ckpts: clip.CheckpointSet, zeroshot, tasks: list[str]) -> list[TaskVector]:
    """Lazy task vectors: tensors are read per parameter, never K whole models."""
    return [TaskVector(zeroshot, ckpts.load_finetuned(t, zeroshot)) for t in tasks]


def calibrate(args, merged: TaskVector, tvs: list[TaskVector], alpha: float, device: torch.device) -> TaskVector:
    """SVC with the run's --svc-* options (on the GPU when the run has one)."""
    return svc(merged, tvs, alpha, target=args.svc_target, row_space=args.svc_row_space, keys=args.svc_keys,
               dtype=DTYPES[args.svc_dtype], device=device if device.type == "cuda" else None)


def run(args) -> dict:
    # 1. every flag checked before anything is read, built or evaluated
    validate(args)
    threads = utils.set_threads(args.threads)
    utils.seed_everything(args.seed)
    device = pick_device(args.device)
    set_split_folders(split_folders(args.split_folder))  # before any dataset is read
    cache = FinetunedCache(Path(args.logs) / args.model / "individual_accuracies.json")
    cache.check()  # a damaged cache stops the run before any work
    times: dict[str, float] = {}
    if args.model.startswith("demo") and args.source == "local":  # the offline benchmark builds its own zoo
        from src.demo.zoo import ensure_zoo

        with utils.timer(times, "zoo_seconds"):
            ensure_zoo(args.model, os.path.join(args.base_dir, "checkpoints"), rebuild=args.rebuild)
    plan = runs.plan(args)
    ckpts = plan.ckpts
    check_save_path(args, ckpts)  # never overwrite an input checkpoint
    if args.skip_existing and plan.done:
        print(f"skipping: {plan.results} already has this run ({plan.merge}{' + SVC' if args.calibrate else ''})",
              flush=True)
        return {"skipped": True, "request": plan.request}
    print(ckpts.describe(), flush=True)

    # 2. checkpoints and heads
    data_location = args.data_location or os.path.join(args.base_dir, "data")  # unused by --data-source hf
    with utils.timer(times, "load_seconds"):
        zeroshot_sd = ckpts.load_zeroshot(args.model)
        encoder = build_image_encoder(args.model, zeroshot_sd)
        heads = load_heads(args.model, ckpts, plan.datasets, plan.convention, data_location, args.data_source)
    num_workers = args.num_workers
    if num_workers is None:  # worker processes only add start-up time to generated in-memory data
        num_workers = 0 if args.model.startswith("demo") and args.data_source == "local" else 2
    inputs = InputCache(args.input_cache_dir or os.path.join(args.base_dir, "cache", "inputs"), args.input_cache)
    evaluate = Evaluator(data_location, device, plan.convention, args.batch_size, num_workers,
                         False if args.no_progress else None, args.amp, args.seed, args.download, inputs,
                         args.data_source)
    record: dict = {"model": args.model, "merge": plan.merge, "svc": False, "alpha": None, "scaling_coef": None,
                    "tasks": plan.tasks, "layout": ckpts.layout, "convention": plan.convention, "seed": args.seed,
                    "threads": threads, "device": str(device), "source": args.source,
                    "data_source": args.data_source, "request": plan.request, "checkpoints": plan.checkpoints,
                    "data": {}}
    settings = {"data_location": data_location, "num_workers": num_workers}

    def finetuned(datasets: list[str], restore, data: dict | None = None) -> dict[str, float]:
        return finetuned_accuracies(evaluate, ckpts, encoder, heads, datasets, cache, plan.checkpoints, restore, data)

    if plan.merge == "finetuned":  # reference row: each fine-tuned model on its own task
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate_finetuned(evaluate, ckpts, encoder, heads, plan.datasets, cache, plan.checkpoints,
                                          record["data"])
        return finish(args, record, accuracy, times, cache, settings)
    if plan.merge == "zeroshot":  # reference row: the pre-trained encoder
        with utils.timer(times, "eval_seconds"):
            accuracy = evaluate(encoder, heads, plan.datasets, record["data"])
        check_finite(record, accuracy)  # before the fine-tuned models are measured for it
        with utils.timer(times, "individual_seconds"):
            finetuned(plan.datasets, zeroshot_sd, record["data"])
        return finish(args, record, accuracy, times, cache, settings)

    # 3. task vectors -> merge (the method's options from the registry, given explicitly)
    info = merge_func.METHODS[plan.merge]
    options = runs.method_options(plan.merge, args)
    record["options"] = options
    tvs = load_task_vectors(ckpts, zeroshot_sd, plan.tasks)
    auto_coef, auto_alpha = args.scaling_coef == "auto", args.calibrate and args.alpha == "auto"
    config = SimpleNamespace(**{**options, "scaling_coef": 1.0 if auto_coef else options["scaling_coef"]},
                             device=device)  # auto: the update is linear in its coefficient
    with utils.timer(times, "merge_seconds"):
        merged = info.fn(TaskVector.mean(tvs), tvs, config)
    alpha = None
    if args.calibrate:
        alpha = info.default_alpha(len(plan.tasks)) if args.alpha in (None, "auto") else check_alpha(args.alpha)

    # 4. coefficient and alpha chosen on the <Task>Val splits, never on the test splits
    if auto_coef or auto_alpha:
        val = [f"{t}Val" for t in plan.tasks]
        individual = finetuned(val, zeroshot_sd)
        base, params = {k: zeroshot_sd[k] for k in merged.vector}, encoder.state_dict()
        record["val_data"] = {}

        def score(update: TaskVector) -> dict[str, float]:
            tuning.apply_in_place(params, base, update, 1.0)
            return evaluate(encoder, heads, val, record["val_data"])

        with utils.timer(times, "tuning_seconds"):
            coef, alpha, chosen = tuning.choose_on_validation(
                merged, score, individual, alpha=alpha,
                coef_grid=tuning.coefficient_grid(plan.merge, args.coef_grid) if auto_coef else None,
                alpha_grid=tuning.alpha_grid(len(plan.tasks)) if auto_alpha else None,
                calibrate=(lambda update, a: calibrate(args, update, tvs, a, device)) if args.calibrate else None)
        record.update(chosen)
        if auto_coef:
            record["scaling_coef_grid_name"] = args.coef_grid
            merged, options["scaling_coef"] = coef * merged, coef
    record["scaling_coef"] = options["scaling_coef"]

    # 5. calibrate
    if args.calibrate:
        with utils.timer(times, "svc_seconds"):
            merged = calibrate(args, merged, tvs, alpha, device)
        record.update(svc=True, alpha=alpha, svc_keys=args.svc_keys, svc_target=args.svc_target,
                      svc_row_space=args.svc_row_space, svc_dtype=args.svc_dtype)

    # 6. apply to the pre-trained encoder
    with utils.timer(times, "apply_seconds"):
        merged_sd = merged.apply_to(zeroshot_sd, scaling_coef=1.0)
        load_into(encoder, merged_sd)
    if args.save_merged:
        meta = {"method": plan.merge, "options": options, "svc": args.calibrate, "alpha": alpha, "tasks": plan.tasks,
                "model": args.model,
                "sources": {"zeroshot": str(ckpts.zeroshot), **{t: str(p) for t, p in ckpts.finetuned.items()}}}
        clip.save_merged(args.save_merged, merged_sd, meta, overwrite=args.overwrite)
        print(f"merged encoder written to {args.save_merged}", flush=True)

    # 7. evaluate on each dataset's test split
    with utils.timer(times, "eval_seconds"):
        accuracy = evaluate(encoder, heads, plan.datasets, record["data"])
    check_finite(record, accuracy)
    with utils.timer(times, "individual_seconds"):  # for normalised accuracy, once per checkpoints and data
        finetuned(plan.datasets, merged_sd, record["data"])
    return finish(args, record, accuracy, times, cache, settings)


def finish(args, record: dict, accuracy: dict[str, float], times: dict[str, float], cache: FinetunedCache,
           settings: dict) -> dict:
    """8. log: the text log and the results line, with normalised accuracy where the fine-tuned ones are known."""
    return runs.write_results(args, record, accuracy, times, cache.known(record["checkpoints"], record["data"]),
                              settings)


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
