"""Write a merged image encoder as safetensors plus a JSON sidecar saying how it was made."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from clip.checkpoint import CheckpointError
from utils import atomic_write

PathLike = str | os.PathLike


def sha256_of(path: PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file; for a folder (Hugging Face), of its files in name order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def sidecar_path(path: PathLike) -> Path:
    return Path(path).with_suffix(".json")


def _input_files(sources: Iterable[PathLike]) -> tuple[dict[str, Path], dict[tuple[int, int], Path]]:
    """Every file the ``sources`` consist of, by resolved path and by (device, inode): a file itself, and every
    file inside a folder-shaped input (a Hugging Face folder's config, weights, shards and index; a hub
    snapshot's symlinks resolve to their blobs)."""
    by_path: dict[str, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for src in sources:
        src = Path(src)
        files = [src]
        if src.is_dir():
            files += [Path(d) / f for d, _, names in os.walk(src) for f in names]
        for f in files:
            by_path.setdefault(os.path.realpath(f), f)
            try:
                st = os.stat(f)
            except OSError:
                continue  # not there (yet): compared by path only
            if not stat.S_ISDIR(st.st_mode):
                by_inode.setdefault((st.st_dev, st.st_ino), f)
    return by_path, by_inode


def check_save_path(path: PathLike, sources: Iterable[PathLike] = (), overwrite: bool = False,
                    label: str = "save_merged") -> Path:
    """Refuse a path whose writing would lose data: not a ``.safetensors`` file (``x.json`` would
    be overwritten by its own sidecar), an existing file or sidecar without ``overwrite``, or a file
    of one of the ``sources`` (the checkpoints the merge reads), even with ``overwrite``. Files are
    compared resolved (symlinks, hub snapshot files pointing to blobs, hard links), and a folder-shaped
    source counts with every file inside it. ``label`` starts the error (main.py passes ``--save-merged``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} {path}: a folder; give a file path ending in .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{label} {path}: does not end in .safetensors (the weights are safetensors and "
                         f"the description goes to {sidecar_path(path).name}); give a .safetensors path")
    by_path, by_inode = _input_files(sources)
    for target in (path, sidecar_path(path)):
        same = by_path.get(os.path.realpath(target))
        if same is None:
            try:
                st = os.stat(target)
                same = by_inode.get((st.st_dev, st.st_ino))
            except OSError:
                pass
        if same is not None:
            also = "" if os.path.abspath(target) == os.path.abspath(same) else f" (the same file as {same})"
            raise ValueError(f"{label} {path}: {target} is an input checkpoint of this merge{also}; give another path")
        if target.is_dir():
            raise ValueError(f"{label} {path}: {target} is a folder; give another path")
        if target.exists() and not overwrite:
            raise ValueError(f"{label} {path}: {target} exists; give another path or allow replacing it "
                             "(--overwrite; overwrite=True in Python)")
    return path


def save_merged(path: PathLike, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any],
                overwrite: bool = False) -> Path:
    """Save ``state_dict`` to ``path`` (safetensors) and ``<path stem>.json`` describing it.

    ``meta`` holds at least ``method``, ``options``, ``alpha``, ``tasks`` and ``sources``
    (paths of the checkpoints used, a list or a ``{name: path}`` dict); each source gets its
    SHA-256. The same JSON is stored in the safetensors metadata. Returns the sidecar path.
    ``clip.load_state_dict(path)`` reads the file back. ``path`` must end in ``.safetensors``,
    must not be a source, and replaces an existing file only with ``overwrite`` (``check_save_path``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    required = ("method", "options", "alpha", "tasks", "sources")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"save_merged: meta lacks {missing} (needs {list(required)})")
    sources = meta["sources"]
    items = list(sources.items() if isinstance(sources, Mapping) else ((None, s) for s in sources))
    check_save_path(path, [src for _, src in items], overwrite)
    described = []
    for name, src in items:
        src = Path(src)
        if not src.exists():
            raise CheckpointError(f"save_merged: source checkpoint {src} does not exist")
        entry = {"path": str(src.resolve()), "sha256": sha256_of(src)}
        if name is not None:
            entry = {"name": name, **entry}
        described.append(entry)
    info = {**{k: v for k, v in meta.items() if k != "sources"}, "sources": described,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "file": path.name, "num_tensors": len(state_dict)}
    text = json.dumps(info, indent=2, sort_keys=False, default=str)
    tensors = {k: state_dict[k].detach().to("cpu").contiguous().clone() for k in state_dict}
    path.parent.mkdir(parents=True, exist_ok=True)
    # each file is replaced atomically: an interrupted save leaves neither half a file nor a temporary one
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"merge_info": text}))
    side = sidecar_path(path)
    atomic_write(side, lambda tmp: Path(tmp).write_text(text + "\n"))
    return side
