"""Find the zero-shot and fine-tuned checkpoints of a model under a base folder.

Layouts (``root`` is tried as ``<base_dir>/checkpoints/<model>``, ``<base_dir>/<model>``, ``<base_dir>``):
- ``task_vectors``: ``root/zeroshot.pt``, ``root/<Task>/finetuned.pt``, heads ``root/head_<Task>.pt``
  (the task_vectors release used by the official SVC code).
- ``tsv``: ``root/MNISTVal/nonlinear_zeroshot.pt``, ``root/<Task>Val/nonlinear_finetuned.pt``, heads
  ``root/head_<Task>Val.pt`` (TSV / tall-masks 14/20-task release, also iso-merging).
- ``hf``: Hugging Face folders ``root/<hf-name>_<task-id>/`` (also ``tanganke/...`` and hub-cache
  ``models--tanganke--<hf-name>_<task-id>/snapshots/*``), zero-shot ``root/<hf-name>`` (or
  ``openai/...``); e.g. FusionBench's ``clip-vit-base-patch32_sun397``. Heads as in task_vectors.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from clip.checkpoint import (WHERE_CHECKPOINTS_COME_FROM, CheckpointError, StateDict, check_compatible, read_pickle,
                             warn_if_identical)
from clip.factory import load_state_dict
from utils import task_of, val_of

LAYOUTS = ("task_vectors", "tsv", "hf")
HF_NAMES = {"ViT-B-32": "clip-vit-base-patch32", "ViT-B-16": "clip-vit-base-patch16",
            "ViT-L-14": "clip-vit-large-patch14"}
# FusionBench's model ids (tanganke/clip-vit-base-patch32_<id>). Its "EMNIST" fine-tune is EMNIST *letters*: it
# is only evaluated under the fusionbench convention (letters data and head, src/datasets/conventions.py), and
# main.py refuses it with another convention's EMNIST (digits).
HF_TASK_IDS = {"SUN397": "sun397", "Cars": "stanford-cars", "RESISC45": "resisc45", "EuroSAT": "eurosat",
               "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd", "Flowers102": "oxford_flowers102",
               "PCAM": "pcam", "FER2013": "fer2013", "OxfordIIITPet": "oxford-iiit-pet", "STL10": "stl10",
               "CIFAR100": "cifar100", "CIFAR10": "cifar10", "Food101": "food101", "FashionMNIST": "fashion_mnist",
               "EMNIST": "emnist_letters", "KMNIST": "kmnist", "RenderedSST2": "rendered-sst2"}


IDENTITY_BYTES = 1 << 20  # hashed at each end of a file: the safetensors header / a zip's first records, and more
_CONTENT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|config\.json$|.*\.index\.json$")
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # the hub cache names blobs by their git SHA-1 / SHA-256


def _file_identity(path: Path) -> str:
    """A hub blob's name (its content hash) and size, or else size, mtime_ns and a SHA-256 of the file's first and
    last MiB: cheap, and it changes when weights are replaced in place under the same name."""
    real = Path(os.path.realpath(path))
    st = os.stat(real)
    if real != Path(os.path.abspath(path)) and real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return f"blob {real.name} {st.st_size}"
    h = hashlib.sha256()
    with open(real, "rb") as f:
        h.update(f.read(IDENTITY_BYTES))
        if st.st_size > IDENTITY_BYTES:
            f.seek(max(IDENTITY_BYTES, st.st_size - IDENTITY_BYTES))
            h.update(f.read(IDENTITY_BYTES))
    return f"{st.st_size} {st.st_mtime_ns} {h.hexdigest()[:32]}"


def content_identity(path: str | os.PathLike) -> str:
    """What identifies a checkpoint's content, cheaply (no full read), for cache keys.

    A file: its size, mtime_ns and a SHA-256 of its first and last MiB. A folder (Hugging Face model folder,
    hub snapshot): the same for every weight and config file inside it (``*.safetensors``, ``*.bin``, ``*.pt``,
    ``*.pth``, ``*.ckpt``, ``config.json``, ``*.index.json``), by relative path; a hub snapshot file counts
    by the blob hash the cache names it by. Replacing weights in place changes it; touching nothing keeps it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        return hashlib.sha256(_file_identity(path).encode()).hexdigest()[:32]
    files = sorted(os.path.relpath(os.path.join(top, name), path) for top, _, names in os.walk(path)
                   for name in names if _CONTENT_FILES.fullmatch(name))
    listing = [(rel, _file_identity(path / rel)) for rel in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


def _built_head(path: Path) -> bool:
    """A head written by ``src.heads.save_head`` (a plain dict of weight, bias, normalize): built from the zero-shot
    model's text tower, so not an input of its own."""
    try:
        obj, files = read_pickle(path)
    except CheckpointError:
        return False
    for f in files:
        f.close()
    return isinstance(obj, dict) and set(obj) <= {"weight", "bias", "normalize"}


@dataclass
class CheckpointSet:
    """Where a model's checkpoints are. ``heads`` are the expected head paths (they may not exist
    yet: ``src.heads`` builds and caches missing ones)."""

    layout: str
    root: Path
    zeroshot: Path
    finetuned: dict[str, Path] = field(default_factory=dict)
    heads: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"checkpoint layout '{self.layout}' at {self.root}: zero-shot {self.zeroshot}, "
                f"{len(self.finetuned)} fine-tuned ({', '.join(self.finetuned)})")

    def fingerprint(self) -> str:
        """Short id of the checkpoints' content (``content_identity``): the zero-shot, every fine-tuned input and
        the released heads (a head that is missing or was built from the zero-shot counts as 'built'). Runs and
        cached accuracies keyed by it are never reused after a checkpoint is replaced in place."""
        heads = {t: "built" if not Path(p).exists() or _built_head(Path(p)) else content_identity(p)
                 for t, p in sorted(self.heads.items())}
        what = {"layout": self.layout, "zeroshot": content_identity(self.zeroshot),
                "finetuned": {t: content_identity(p) for t, p in sorted(self.finetuned.items())}, "heads": heads}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]

    def load_zeroshot(self, model_name: str | None = None) -> StateDict:
        return load_state_dict(self.zeroshot, model_name=model_name)

    def load_finetuned(self, task: str, zeroshot: StateDict | None = None) -> StateDict:
        """Lazy state dict of ``task``'s fine-tuned model. Hugging Face vision-only fine-tunes
        lack the projection and text side (frozen in FusionBench): those come from the zero-shot."""
        ft = load_state_dict(self.finetuned[task])
        if self.layout == "hf":
            ft = ft.fill_missing_from(zeroshot if zeroshot is not None else self.load_zeroshot())
        return ft

    def check(self, model_name: str | None = None) -> None:
        """Cheap checks before merging: same keys/shapes everywhere (headers only), optional
        architecture check against ``model_name``, and a warning for fine-tuned == zero-shot."""
        zs = self.load_zeroshot(model_name)
        for task in self.finetuned:
            ft = self.load_finetuned(task, zs)
            check_compatible(zs, ft)
            warn_if_identical(zs, ft)


def _roots(model: str, base_dir: Path) -> list[Path]:
    return [base_dir / "checkpoints" / model, base_dir / model, base_dir]


def _first(paths) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _hf_folder(root: Path, name: str, owner: str) -> Path | None:
    cands = [root / name, root / owner / name]
    cache = root / f"models--{owner}--{name}" / "snapshots"
    if cache.is_dir():
        cands += sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return _first(p for p in cands if (p / "config.json").is_file())


def _candidate(layout: str, root: Path, model: str, tasks: list[str]) -> tuple[Path | None, dict, dict]:
    """(zero-shot path or None, found fine-tuned {task: path}, expected heads) for one layout/root."""
    if layout == "task_vectors":
        zs = root / "zeroshot.pt"
        ft = {t: root / task_of(t) / "finetuned.pt" for t in tasks}
        heads = {t: root / f"head_{task_of(t)}.pt" for t in tasks}
    elif layout == "tsv":
        zs = root / "MNISTVal" / "nonlinear_zeroshot.pt"
        ft = {t: root / val_of(t) / "nonlinear_finetuned.pt" for t in tasks}
        heads = {t: root / f"head_{val_of(t)}.pt" for t in tasks}
    else:
        hf = HF_NAMES.get(model, model)
        zs = _hf_folder(root, hf, "openai") or _hf_folder(root, "zeroshot", "openai") or root / hf
        ft = {}
        for t in tasks:
            tid = HF_TASK_IDS.get(task_of(t), task_of(t).lower())
            ft[t] = (_hf_folder(root, f"{hf}_{tid}", "tanganke") or _hf_folder(root, task_of(t), "tanganke")
                     or root / f"{hf}_{tid}")
        heads = {t: root / f"head_{task_of(t)}.pt" for t in tasks}
    return (zs if zs.exists() else None), {t: p for t, p in ft.items() if p.exists()}, heads


def expected_layout(model: str, base_dir: Path, tasks: list[str]) -> str:
    t = tasks[0] if tasks else "SUN397"
    hf = HF_NAMES.get(model, model)
    return (f"Expected one of these layouts under {base_dir} (or {base_dir}/checkpoints/{model}, {base_dir}/{model}):\n"
            f"  task_vectors: zeroshot.pt, {task_of(t)}/finetuned.pt, head_{task_of(t)}.pt\n"
            f"  tsv:          MNISTVal/nonlinear_zeroshot.pt, {val_of(t)}/nonlinear_finetuned.pt\n"
            f"  hf:           {hf}/ (config.json + model.safetensors), "
            f"{hf}_{HF_TASK_IDS.get(task_of(t), 'task')}/\n"
            f"{WHERE_CHECKPOINTS_COME_FROM}")


def find_checkpoints(model: str, base_dir: str | os.PathLike, tasks: list[str], layout: str | None = None) -> CheckpointSet:
    """Locate the zero-shot and per-task fine-tuned checkpoints; say which layout was found.

    ``layout`` forces one of ``task_vectors``, ``tsv``, ``hf``; by default the first layout with
    a zero-shot checkpoint and every requested task wins. Missing files raise a CheckpointError
    listing them, the expected layout and where the public checkpoints come from.
    """
    base_dir = Path(base_dir)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    if not base_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {base_dir} does not exist.\n{expected_layout(model, base_dir, tasks)}")
    best = None  # the most complete partial match, for the error message
    for lay in ([layout] if layout else LAYOUTS):
        for root in _roots(model, base_dir):
            zs, ft, heads = _candidate(lay, root, model, tasks)
            if zs is not None and len(ft) == len(tasks):
                return CheckpointSet(lay, root, zs, ft, heads)
            score = (zs is not None) + len(ft)
            if score and (best is None or score > best[0]):
                best = (score, lay, root, zs, ft)
    if best is None:
        raise CheckpointError(f"no {model} checkpoints found under {base_dir}"
                              f"{f' in layout {layout!r}' if layout else ''}.\n{expected_layout(model, base_dir, tasks)}")
    _, lay, root, zs, ft = best
    missing = [t for t in tasks if t not in ft]
    what = ([] if zs is not None else ["the zero-shot checkpoint"]) + [f"task {t}" for t in missing]
    raise CheckpointError(f"incomplete '{lay}' checkpoint layout at {root}: missing {', '.join(what)}.\n"
                          f"{expected_layout(model, base_dir, tasks)}")
