"""Small helpers shared by main.py, clip/ and src/: seeding, threads, timing, `<Task>Val` split names, and
safe writes of logs, results and checkpoints (an interrupted run never leaves half a file; concurrent
runs never overwrite or lose each other's output).

The bottom layer: this module imports nothing from the project, so every package may import it."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


# ----------------------------------------------------------------------------- <Task>Val split names
VAL_SUFFIX = "Val"  # "<Task>Val" names the validation split of <Task> (task_vectors' convention)


def is_val(name: str) -> bool:
    """Whether ``name`` names a validation split, e.g. ``MNISTVal``. Case-insensitive, as typed task names are
    (no registered task name ends in 'val': the dataset registry refuses such names)."""
    return len(name) > len(VAL_SUFFIX) and name.lower().endswith(VAL_SUFFIX.lower())


def task_of(name: str) -> str:
    """The task a split name belongs to: ``MNISTVal`` -> ``MNIST``; ``MNIST`` -> ``MNIST``."""
    return name[: -len(VAL_SUFFIX)] if is_val(name) else name


def val_of(name: str) -> str:
    """The validation split name of a task (or of one of its splits): ``MNIST`` -> ``MNISTVal``."""
    return task_of(name) + VAL_SUFFIX


# ----------------------------------------------------------------------------- files
def _new_file_mode() -> int:
    """Permissions a plain open() would give a new file (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` across processes, also across machines sharing a POSIX
    file system (fcntl record locks, which NFS honours). The lock file is left in place: deleting it
    would let two writers lock two different files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    try:
        import fcntl
    except ImportError:  # Windows: the filelock package (a torch dependency) does the same there
        from filelock import FileLock

        with FileLock(str(lock_path)):
            yield
        return
    with open(lock_path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file next to it, which is
    flushed to disk and renamed over ``path``. An interrupted write leaves neither half a file nor the
    temporary one. An existing file keeps its permissions; a new one gets the ones open() would give it
    (not mkstemp's 0600). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # whatever wrote it (safetensors, json) may not have synced
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one strict-JSON line (NaN/inf refused) under a cross-process lock.

    The file is never rewritten: the line goes out in one O_APPEND write, so concurrent runs
    (run.sh, Slurm arrays) never lose a line, and an interrupted run leaves the earlier lines intact.
    A damaged last line (no newline) is closed first so the new record starts on its own line."""
    path = Path(path)
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")  # ValueError on NaN/inf
    with locked(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Parsed JSON of ``path`` (``default`` if it does not exist); a damaged file is named in the error."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or fix it by hand") from None


def update_json(path: str | os.PathLike, update: Callable[[Any], Any], default: Any = None) -> Any:
    """Read-modify-write a JSON file under the cross-process lock; returns what was written.
    ``update`` gets the current content (``default`` when the file is new) and returns the new one."""
    path = Path(path)
    with locked(path):
        value = update(read_json(path, default))
        atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return value


def iter_jsonl(path: str | os.PathLike, warn: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each usable line of a JSONL file. A line that is not UTF-8 or not a
    JSON object is skipped, with a warning naming file:line, so one damaged line never stops a table
    or a later run."""
    path = Path(path)
    if not path.exists():
        return
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = "not UTF-8" if isinstance(err, UnicodeDecodeError) else f"not JSON: {err.msg}"
            if warn:
                warnings.warn(f"{path}:{lineno}: skipped damaged line ({problem})", stacklevel=2)
            continue
        if isinstance(record, dict):
            yield lineno, record
        elif warn:
            warnings.warn(f"{path}:{lineno}: skipped line (not a JSON object)", stacklevel=2)


def read_jsonl(path: str | os.PathLike, warn: bool = True) -> list[dict[str, Any]]:
    """Records of a JSONL file, damaged lines skipped with a file:line warning (see iter_jsonl)."""
    return [record for _, record in iter_jsonl(path, warn)]


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a file that did not exist: ``path`` itself, else ``<stem>_2<suffix>``,
    ``<stem>_3<suffix>``... Creation is exclusive (O_EXCL), so runs finishing in the same second,
    in several processes or on several machines sharing the folder, never overwrite each other's
    file. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return candidate
    raise FileExistsError(f"{path} and 9,998 numbered variants exist; clean up {path.parent}")
