"""Top-1 evaluation of an image encoder + classification head on the registry's datasets."""
import sys
from typing import Mapping

import torch
from tqdm.auto import tqdm

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
