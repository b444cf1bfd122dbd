"""Small helpers shared by main.py and the scripts: seeding, threads, timing, and
atomic writes of logs and results (an interrupted run never leaves half a line)."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the official code seeds 42 everywhere)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (None keeps the default) and return the count in use.
    On a shared CPU one thread is often faster than two; the count is logged."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextmanager
def timer(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``times[name]``; CUDA work is synchronised."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line atomically: the file is rewritten through a rename, so a
    reader sees either the old file or the old file plus the whole new line."""
    path = Path(path)
    line = json.dumps(record, sort_keys=False) + "\n"
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + line)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; unreadable lines are skipped (they cannot come from us)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
