"""Small helpers shared by main.py, clip/ and src/: seeding, threads, timing, `<Task>Val` split names, and
safe writes of logs, results and checkpoints (an interrupted run never leaves half a file; concurrent
runs never overwrite or lose each other's output).

The bottom layer: this module imports nothing from the project, so every package may import it."""
from __future__ import annotations

import json
import os
import random
import stat
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
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


class NotRegularFileError(ValueError):
    """A results, cache or lock file that is a FIFO, a device, a directory or a socket (or a symlink to one):
    reading it would block or never end, writing it would fail after the work."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refusal(path: Path, mode: int, fix: str) -> NotRegularFileError:
    via = f" (through the symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
    return NotRegularFileError(f"{path} is {_kind(mode)}{via}, not a regular file; {fix}")


def check_regular_file(path: str | os.PathLike, fix: str = "remove it or move it away, then run again") -> None:
    """Refuse ``path`` and its lock file when they exist (symlinks followed) and are not regular files:
    a FIFO would block every reader, /dev/zero would fill the memory, a directory would lose the results line
    after the work. Called before any work (src.args.validate, src.sweep); a missing file is fine."""
    for file in (Path(path), lock_path(path)):
        try:
            mode = os.stat(file).st_mode
        except (FileNotFoundError, NotADirectoryError):  # a dangling symlink or a missing file is created later
            continue
        except OSError as err:  # a symlink loop, a permission problem: said now, not after the work
            raise NotRegularFileError(f"{file} cannot be checked ({err.strerror}); {fix}") from None
        if not stat.S_ISREG(mode):
            raise _refusal(file, mode, fix)


def _open_regular(path: Path, flags: int, mode: int = 0o666, fix: str = "remove it or move it away") -> int:
    """os.open without ever blocking on a FIFO (O_NONBLOCK, no effect on regular files), refusing anything but a
    regular file (fstat of what was opened, so a swap after a check cannot slip through)."""
    try:
        st_mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # created below (O_CREAT), or FileNotFoundError below
        st_mode = stat.S_IFREG
    if not stat.S_ISREG(st_mode):  # before open: a FIFO opened for writing would fail with ENXIO
        raise _refusal(path, st_mode, fix)
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise _refusal(path, st_mode, fix)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` across processes, also across machines sharing a POSIX
    file system (fcntl record locks, which NFS honours). The lock file is left in place: deleting it
    would let two writers lock two different files. A lock file that is not a regular file is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    try:
        import fcntl
    except ImportError:  # Windows: the filelock package (a torch dependency) does the same there
        from filelock import FileLock

        with FileLock(str(lock)):
            yield
        return
    with os.fdopen(_open_regular(lock, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as handle:
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


def append_jsonl(path: str | os.PathLike, record: dict[str, Any], *, lock_held: bool = False) -> None:
    """Append one strict-JSON line (NaN/inf refused) under a cross-process lock.

    The file is never rewritten: the line goes out in one O_APPEND write, so concurrent runs
    (run.sh, Slurm arrays) never lose a line, and an interrupted run leaves the earlier lines intact.
    A damaged last line (no newline) is closed first so the new record starts on its own line.
    ``lock_held``: the caller already holds ``locked(path)`` (a read-check-append made atomic); locking again
    would not block, but closing the second handle would drop the caller's lock (POSIX record locks)."""
    path = Path(path)
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")  # ValueError on NaN/inf
    with nullcontext() if lock_held else locked(path):
        fd = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
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


MAX_LINE_BYTES = 16 << 20  # a results line is a few kB; longer lines are skipped with a warning, never read whole
MAX_JSON_BYTES = 256 << 20  # read_json: more than any cache of ours
MAX_DEPTH = 64  # a results line nests 4 deep; deeper lines are skipped (later code would recurse into them)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Parsed JSON of ``path`` (``default`` if it does not exist); a damaged file is named in the error, and so
    is one that is not a regular file (NotRegularFileError) or larger than MAX_JSON_BYTES."""
    path = Path(path)
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return default
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB, too large for a cache; "
                         "delete it or move it away")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be one of ours; delete it or fix it by hand") from None
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: JSON errors, integers of > 4300 digits
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or fix it by hand") from None


def update_json(path: str | os.PathLike, update: Callable[[Any], Any], default: Any = None) -> Any:
    """Read-modify-write a JSON file under the cross-process lock; returns what was written.
    ``update`` gets the current content (``default`` when the file is new) and returns the new one."""
    path = Path(path)
    with locked(path):
        value = update(read_json(path, default))
        atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) or (None, why the line is unusable)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except RecursionError:
        return None, f"nested more than {MAX_DEPTH} deep"
    except json.JSONDecodeError as err:
        return None, f"not JSON: {err.msg}"
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        return None, f"not usable JSON: {err}"
    # the bracket count bounds the depth: only lines with many brackets are walked
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        return None, f"nested more than {MAX_DEPTH} deep"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, None


def iter_jsonl(path: str | os.PathLike, warn: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each usable line of a JSONL file, read as a stream (memory bounded by the
    longest line). A line that is not UTF-8, not a JSON object, nested more than MAX_DEPTH deep or longer than
    MAX_LINE_BYTES is skipped, with a warning naming file:line, so one damaged line never stops a table or a
    later run. A path that is not a regular file (a FIFO, /dev/zero, a directory) raises NotRegularFileError
    at once instead of blocking or reading forever."""
    path = Path(path)
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "rb", buffering=1 << 20) as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while True:  # skip the rest of the line, a chunk at a time
                    chunk = f.readline(1 << 20)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                if warn:
                    warnings.warn(f"{path}:{lineno}: skipped line (longer than {MAX_LINE_BYTES >> 20} MiB)",
                                  stacklevel=2)
                continue
            if not raw.strip():
                continue
            record, problem = _parse_line(raw)
            if problem is None:
                yield lineno, record
            elif warn:
                warnings.warn(f"{path}:{lineno}: skipped damaged line ({problem})", stacklevel=2)


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
