"""Top-1 evaluation of an image encoder + classification head on the registry's datasets, and the cache of
fine-tuned accuracies that normalised accuracy divides by."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from tqdm.auto import tqdm

import utils
from clip.factory import load_into
from src.datasets import conventions
from src.datasets.registry import get_dataset
from utils import task_of


def pick_device(name: str | None = None) -> torch.device:
    """`name` ('cuda', 'cuda:1', 'mps', 'cpu'), or the best available one when None / 'auto'."""
    if name and name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available on this machine (use cpu or auto)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_deterministic(seed: int) -> None:
    """Seed torch and prefer deterministic kernels (evaluation itself draws no random numbers)."""
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):  # task_vectors-style {"images": ..., "labels": ...}
        return batch["images"], batch["labels"]
    return batch[0], batch[1]


@torch.no_grad()
def evaluate(image_encoder: torch.nn.Module, head: torch.nn.Module, loader, device: str | torch.device,
             progress: bool | None = None, desc: str = "", amp: bool = False) -> float:
    """Top-1 accuracy in percent of head(image_encoder(x)) over `loader`.

    progress: tqdm bar; None shows it only when stderr is a terminal. amp: float16 autocast, CUDA only; it is
    faster but not bit-comparable with the fp32 numbers of the reference code, hence off by default.
    """
    device = torch.device(device)
    image_encoder.eval().to(device)
    head.eval().to(device)
    use_amp = amp and device.type == "cuda"
    show = sys.stderr.isatty() if progress is None else progress
    correct, total = 0, 0
    for batch in tqdm(loader, desc=desc, disable=not show, leave=False):
        images, labels = _batch(batch)
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device)
        with torch.autocast(device_type="cuda", enabled=use_amp):
            logits = head(image_encoder(images))
        correct += (logits.argmax(dim=1) == labels).sum().item()
        total += labels.numel()
    if total == 0:
        raise ValueError(f"{desc or 'dataset'}: no images to evaluate")
    return 100.0 * correct / total


def check_head_finite(head: torch.nn.Module, name: str) -> None:
    """No head with NaN/inf weights is evaluated: its logits are NaN, argmax picks class 0, and chance accuracy
    would be logged (and normalised, and cached) as a result."""
    bad = [key for key, t in head.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{name}: the classification head's {' and '.join(bad)} hold NaN/inf values, so nothing "
                         "was evaluated; rebuild the head (delete its cached file) from a finite text tower")


def evaluate_tasks(image_encoder: torch.nn.Module, tasks: list[str], heads: Mapping[str, torch.nn.Module],
                   preprocess, data_location: str, device: str | torch.device | None = None,
                   batch_size: int = 128, num_workers: int = 2, progress: bool | None = None,
                   amp: bool = False, seed: int = 0, download: bool = False, convention: str | None = None,
                   provenance: dict | None = None, input_cache=None, source: str = "local") -> dict[str, float]:
    """Top-1 % per dataset, keyed by registered name. `XVal` evaluates X's validation split with the head
    `heads["XVal"]`, or `heads["X"]` when there is none (task_vectors' Val heads equal the test ones). The data
    follow `convention` (src.datasets.conventions: EMNIST is letters under fusionbench) and are read from `source`
    ("local": folders under `data_location`; "hf": FusionBench's Hugging Face datasets, src/datasets/hf_sets.py).

    provenance: a dict filled in place with, per dataset, where its images came from and how many were
    evaluated ({"source": folder or file, "split": ..., "n": ...}; see `DatasetSplit.provenance`).
    input_cache: a `src.input_cache.InputCache`: inputs are normalised on the device, and the splits it
    stores are decoded once (same accuracy, bit for bit)."""
    make_deterministic(seed)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    # the convention's preprocessing (FusionBench's centre crop) before the input cache keys on it
    preprocess = conventions.preprocess_for(preprocess, convention)
    for task in tasks:  # before any data is read (and again below, under each split's registered name)
        given = heads.get(task, heads.get(task_of(task)))
        if given is not None:
            check_head_finite(given, task)
    results = {}
    for task in tasks:
        plan = input_cache.plan(preprocess) if input_cache is not None else None
        if plan is not None:
            split = input_cache.split(task, data_location, plan, device, batch_size, num_workers, lambda: get_dataset(
                task, plan.pixels, data_location, batch_size=batch_size, num_workers=num_workers, download=download,
                convention=convention, source=source), source=source)
        else:
            split = get_dataset(task, preprocess, data_location, batch_size=batch_size, num_workers=num_workers,
                                download=download, convention=convention, source=source)
        head = heads.get(split.name, heads.get(task_of(split.name)))
        if head is None:
            raise KeyError(f"no classification head for {split.name}; heads given for: {', '.join(heads)}")
        check_head_finite(head, split.name)
        results[split.name] = evaluate(image_encoder, head, split.loader, device, progress, split.name, amp)
        if provenance is not None:
            provenance[split.name] = split.provenance
    return results


def describe_tasks(tasks: list[str], data_location: str, download: bool = False,
                   convention: str | None = None, source: str = "local") -> dict[str, dict]:
    """Provenance of each dataset as `evaluate_tasks` would record it, without evaluating anything."""
    splits = [get_dataset(task, None, data_location, num_workers=0, download=download, convention=convention,
                          source=source) for task in tasks]
    return {split.name: split.provenance for split in splits}


def check_finite(record: dict, accuracy: dict[str, float]) -> None:
    """Nothing is cached or logged when an accuracy or a logged value is NaN/inf (an empty split, a diverged
    merge): strict JSON would refuse the line after the text log was already written."""
    bad = _non_finite({**record, "accuracy": accuracy})
    if not accuracy or bad:
        raise ValueError(f"no finite result to log ({', '.join(bad) or 'no dataset evaluated'}); nothing was "
                         "written: check that the datasets are not empty and the merged weights are finite")


def _non_finite(value, where: str = "") -> list[str]:
    """Paths of the NaN/inf floats inside nested dicts and lists, e.g. ``scaling_coef_curve[2].avg``."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{where}={value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}[{i}]")]
    return []


@dataclass
class Evaluator:
    """`evaluate_tasks` with one run's data and device settings, so each call names only what changes."""

    data_location: str
    device: torch.device
    convention: str | None = None
    batch_size: int = 128
    num_workers: int = 2
    progress: bool | None = None
    amp: bool = False
    seed: int = 42
    download: bool = False
    input_cache: object | None = None  # src.input_cache.InputCache
    source: str = "local"  # where the datasets come from: local folders, or "hf" (the Hugging Face hub)

    def __call__(self, encoder, heads: Mapping, datasets: list[str], provenance: dict | None = None) -> dict[str, float]:
        return evaluate_tasks(encoder, datasets, heads, encoder.val_preprocess, self.data_location, device=self.device,
                              batch_size=self.batch_size, num_workers=self.num_workers, progress=self.progress,
                              amp=self.amp, seed=self.seed, download=self.download, convention=self.convention,
                              provenance=provenance, input_cache=self.input_cache, source=self.source)

    def describe(self, datasets: list[str]) -> dict[str, dict]:
        return describe_tasks(datasets, self.data_location, download=self.download, convention=self.convention,
                              source=self.source)


# ----------------------------------------------------------------------------- fine-tuned accuracies
class FinetunedCache:
    """Fine-tuned accuracies measured once per checkpoints and data, for normalised accuracy.

    File layout: {dataset: {checkpoint fingerprint: {"acc": top-1 %, "data": provenance}}}; an entry counts only
    for the same checkpoint fingerprint and exactly the same data provenance, anything else is stale."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _checked(self, cache) -> dict:
        if not isinstance(cache, dict):
            raise ValueError(f"{self.path} is not a JSON object; delete it (it is a cache and is rebuilt)")
        return cache

    def check(self) -> None:
        """A damaged cache stops the run before any work."""
        self._checked(utils.read_json(self.path, {}))

    def known(self, checkpoints: str, data: dict[str, dict]) -> dict[str, float]:
        cache = self._checked(utils.read_json(self.path, {}))
        known = {}
        for name, info in data.items():
            entry = cache.get(name)
            hit = entry.get(checkpoints) if isinstance(entry, dict) else None  # a bare number: the old, unkeyed format
            if isinstance(hit, dict) and hit.get("data") == info and isinstance(hit.get("acc"), (int, float)):
                known[name] = hit["acc"]
        return known

    def store(self, checkpoints: str, accuracy: dict[str, float], data: dict[str, dict]) -> None:
        """Add measured accuracies (locked read-modify-write: concurrent runs lose nothing)."""
        def update(cache):
            self._checked(cache)
            check_finite({}, accuracy)  # a NaN fine-tuned accuracy is never cached
            for name, acc in accuracy.items():
                entry = cache.get(name) if isinstance(cache.get(name), dict) else {}
                entry[checkpoints] = {"acc": acc, "data": data[name]}
                cache[name] = entry
            return cache

        utils.update_json(self.path, update, default={})


def evaluate_finetuned(evaluate: Evaluator, ckpts, encoder, heads: Mapping, datasets: list[str], cache: FinetunedCache,
                       checkpoints: str, provenance: dict | None = None) -> dict[str, float]:
    """Each fine-tuned encoder of `ckpts` on its own task's split; stored in `cache` under `checkpoints`."""
    accuracy, data = {}, {}
    for name in datasets:
        base = utils.task_of(name)
        if base not in ckpts.finetuned:
            raise ValueError(f"no fine-tuned checkpoint for {base}: --eval-datasets must be among the merged tasks")
        load_into(encoder, ckpts.load_finetuned(base), source=str(ckpts.finetuned[base]))
        accuracy.update(evaluate(encoder, heads, [name], data))
    cache.store(checkpoints, accuracy, data)
    if provenance is not None:
        provenance.update(data)
    return accuracy


def finetuned_accuracies(evaluate: Evaluator, ckpts, encoder, heads: Mapping, datasets: list[str],
                         cache: FinetunedCache, checkpoints: str, restore: Mapping,
                         data: dict | None = None) -> dict[str, float]:
    """Single-task accuracies on `datasets` for these checkpoints and this data (`data`: provenance per dataset,
    looked up when not given), measured once and cached, for normalised accuracy. The encoder is left holding
    `restore`. Datasets of tasks without a fine-tuned checkpoint are left out."""
    datasets = [d for d in datasets if utils.task_of(d) in ckpts.finetuned]
    data = data if data is not None else evaluate.describe(datasets)
    known = cache.known(checkpoints, {d: data[d] for d in datasets})
    todo = [d for d in datasets if d not in known]
    if todo:
        print(f"measuring fine-tuned accuracies on {todo} (once for these checkpoints and data; cached in "
              f"{cache.path})", flush=True)
        known.update(evaluate_finetuned(evaluate, ckpts, encoder, heads, todo, cache, checkpoints))
        load_into(encoder, restore)
    return {d: known[d] for d in datasets}
