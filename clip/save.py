"""Write a merged image encoder as safetensors plus a JSON sidecar saying how it was made."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from clip.checkpoint import CheckpointError

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


def save_merged(path: PathLike, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Save ``state_dict`` to ``path`` (safetensors) and ``<path stem>.json`` describing it.

    ``meta`` holds at least ``method``, ``options``, ``alpha``, ``tasks`` and ``sources``
    (paths of the checkpoints used, a list or a ``{name: path}`` dict); each source gets its
    SHA-256. The same JSON is stored in the safetensors metadata. Returns the sidecar path.
    ``clip.load_state_dict(path)`` reads the file back.
    """
    from safetensors.torch import save_file

    path = Path(path)
    required = ("method", "options", "alpha", "tasks", "sources")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"save_merged: meta lacks {missing} (needs {list(required)})")
    sources = meta["sources"]
    items = sources.items() if isinstance(sources, Mapping) else ((None, s) for s in sources)
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
    save_file(tensors, str(path), metadata={"merge_info": text})
    side = sidecar_path(path)
    side.write_text(text + "\n")
    return side
