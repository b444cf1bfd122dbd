"""Preprocessed-input cache: each evaluation image is decoded and resized once, not once per evaluation.

open_clip's evaluation transform is Resize -> CenterCrop -> RGB -> ToTensor -> Normalize. Every step before
ToTensor yields 8-bit pixels; ToTensor divides them by 255 and Normalize is a per-channel affine map. So the
cache keeps the uint8 pixels after the crop in a memory-mapped ``.npy`` file, and the float input is rebuilt
on the evaluation device with the same float32 operations: bit for bit what the whole transform gives on the
CPU. A transform that cannot be split this way (random steps, lambdas, no final ToTensor + Normalize, e.g.
the demo models' ``ToInput``) is evaluated the usual way, without a cache.

An entry is keyed by the split's name, the identity of its source data (file paths, sizes and modification
times, sample indices of a ``<Task>Val`` split, or hub repository, commit and files), the transform's
description and the number of samples: another transform, split, data folder or dataset version never
reads a stale entry. Entries are written to a temporary folder and renamed into place, so a concurrent or
interrupted run never leaves a partial one.

Nothing read is trusted: an entry's meta.json records the images' shape, the class count and the SHA-256 of
each file (computed while writing), checked when the entry is first opened in a process (one streaming read,
which also brings the file into the page cache); an entry that does not match is rebuilt, with a warning. A
FIFO, device or folder in place of a cache file is refused before anything is opened (InputCacheError). Space
is allocated before the first image is stored (os.posix_fallocate) and written with os.pwrite, not through a
memory map: a full disk is a warning, and the split is evaluated without the cache, leaving nothing behind.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import types
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import Compose, Lambda, Normalize, ToTensor

from utils import is_val

CACHE_VERSION = 2  # 2: meta.json records shape, class count and SHA-256 of each file
MODES = ("auto", "all", "off")  # auto: the <Task>Val splits, which --scaling_coef/--alpha auto read 20-30 times


class PILToUint8:
    """PIL image -> uint8 CHW tensor: exactly the pixels that ToTensor divides by 255."""

    def __call__(self, pic) -> torch.Tensor:
        if not isinstance(pic, Image.Image):
            raise TypeError(f"the input cache expects PIL images before ToTensor, got {type(pic).__name__}")
        if pic.mode in ("1", "I", "I;16", "I;16B", "F"):
            raise ValueError(f"image mode {pic.mode!r} has no plain 8-bit pixels; run with --input-cache off")
        pixels = np.array(pic, np.uint8, copy=True)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "PILToUint8()"


class DeviceNormalize:
    """uint8 [N, C, H, W] -> float32, the same operations as ToTensor + Normalize, on the tensor's device."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a tensor divisor, not the number 255: CUDA multiplies by the reciprocal of a Python scalar,
        # which can differ from the CPU's division in the last bit
        scale = torch.full((1, 1, 1), 255.0, dtype=torch.float32, device=x.device)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return x.to(torch.float32).div_(scale).sub_(mean).div_(std)  # in place: one float buffer per batch


@dataclass(frozen=True)
class SplitTransform:
    """A preprocess split into its 8-bit part (run once, cached) and its float part (run on the device)."""

    pixels: Callable  # PIL image -> uint8 CHW tensor
    normalize: DeviceNormalize
    description: str  # deterministic: part of the cache key


def _describe(step) -> str | None:
    """A deterministic description of a deterministic PIL step, or None when there is none."""
    if isinstance(step, (ToTensor, Normalize, Lambda)) or type(step).__name__.startswith("Random"):
        return None
    if isinstance(step, types.FunctionType):  # e.g. task_vectors' _convert_to_rgb
        return None if step.__name__ == "<lambda>" else f"{step.__module__}.{step.__qualname__}"
    if type(step).__repr__ is object.__repr__:
        return None
    text = f"{type(step).__module__}.{type(step).__qualname__}:{step!r}"
    if not isinstance(step, torch.nn.Module) and hasattr(step, "__dict__"):  # reprs that omit settings
        text += repr(sorted((k, repr(v)) for k, v in vars(step).items()))
    return None if " at 0x" in text else text


def split_transform(preprocess) -> SplitTransform | None:
    """Split a ``Compose([...PIL steps, ToTensor, Normalize])``; None when it cannot be split exactly."""
    steps = list(getattr(preprocess, "transforms", None) or [])
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return None
    described = [_describe(step) for step in steps[:-2]]
    if any(d is None for d in described):
        return None
    norm = steps[-1]
    normalize = DeviceNormalize(norm.mean, norm.std)
    description = " | ".join(described + [f"ToTensor | Normalize({normalize.mean}, {normalize.std})"])
    return SplitTransform(Compose([*steps[:-2], PILToUint8()]), normalize, description)


# ----------------------------------------------------------------------------- keys
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, default=str).encode()).hexdigest()


def _stat(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _walk(folder: Path) -> list:
    return sorted((os.path.relpath(os.path.join(d, f), folder), *_stat(os.path.join(d, f)))
                  for d, _, files in os.walk(folder) for f in files)


def source_fingerprint(dataset: Dataset) -> dict | None:
    """What identifies a dataset's images and labels on disk; None when nothing does (then it is not cached)."""
    if isinstance(dataset, Subset):
        inner = source_fingerprint(dataset.dataset)
        return None if inner is None else {"indices": _digest([int(i) for i in dataset.indices]), "of": inner}
    info: dict = {"type": f"{type(dataset).__module__}.{type(dataset).__qualname__}", "len": len(dataset)}
    if hasattr(dataset, "cache_fingerprint"):  # e.g. hub datasets: repository, commit, files
        return {**info, **dataset.cache_fingerprint()}
    for attr in ("split", "train", "_split", "base_folder"):
        if hasattr(dataset, attr):
            info[attr] = repr(getattr(dataset, attr))
    wrappers, t = [], getattr(dataset, "transform", None)  # e.g. EMNIST's orientation around the preprocess
    while t is not None and not isinstance(t, Compose):
        wrappers.append(type(t).__qualname__)
        t = getattr(t, "preprocess", None)
    info["transform_wrappers"] = wrappers
    for attr in ("targets", "labels", "_labels"):
        if isinstance(getattr(dataset, attr, None), (list, tuple, np.ndarray, torch.Tensor)):
            info["labels"] = _digest(np.asarray(getattr(dataset, attr)).tolist())
    for attr in ("samples", "imgs", "_samples", "_image_files", "_images"):
        items = getattr(dataset, attr, None)
        if isinstance(items, list) and items:
            paths = [s[0] if isinstance(s, (tuple, list)) else s for s in items]
            if all(isinstance(p, (str, os.PathLike)) for p in paths):
                info["files"] = _digest([(str(p), *_stat(p)) for p in paths])
                info["labels_in_files"] = _digest([s[1] for s in items if isinstance(s, (tuple, list))])
                return info
    root = getattr(dataset, "root", None)
    for candidate in ("raw_folder", "_base_folder", "base_folder"):
        value = getattr(dataset, candidate, None)
        if value is not None:
            folder = Path(value) if Path(value).is_absolute() or root is None else Path(root) / value
            if folder.is_dir():
                return {**info, "folder": str(folder), "files": _digest(_walk(folder))}
    if root is not None and Path(root).is_dir():
        return {**info, "folder": str(root), "files": _digest(_walk(Path(root)))}
    return None


def cache_key(name: str, source: dict, transform: str, n: int) -> str:
    return _digest({"version": CACHE_VERSION, "split": name, "source": source, "transform": transform, "n": n})[:24]


# ----------------------------------------------------------------------------- storage
FILES = ("images.npy", "labels.npy", "meta.json")
MAX_META_BYTES = 10_000_000  # meta.json holds the key's description: a few KB
_CHUNK = 1 << 22
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class InputCacheError(ValueError):
    """Something in the cache folder that must not be read nor replaced (a FIFO, a device, a folder where a
    file belongs): the message names it and what to do."""


class _Stale(Exception):
    """An entry whose contents do not match what was written: rebuilt."""


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return what
    return "special file"


def _refuse_special(entry: Path) -> None:
    """Refuse an entry that is not a folder of regular files, before anything in it is opened (opening a FIFO
    blocks, a device reads forever). Missing files are fine: the entry is (re)built."""
    def check(path: Path, want_dir: bool) -> bool:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return False
        except OSError as err:
            raise InputCacheError(f"input cache {path}: cannot be inspected ({err}); remove it, or run with "
                                  "--input-cache off") from None
        ok = stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)
        if not ok and not (want_dir and stat.S_ISREG(mode)):  # a plain file in place of an entry: rebuilt
            raise InputCacheError(f"input cache {path}: a {_kind(mode)}, not a regular "
                                  f"{'folder' if want_dir else 'file'}; remove it (or run with --input-cache off)")
        return ok

    if check(entry, want_dir=True):
        for name in FILES:
            check(entry / name, want_dir=False)


def _sha256(path: Path) -> str:
    """Streaming SHA-256 of a file (about 1 GB/s: the memory map is then read from the page cache)."""
    h, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _open_entry(path: Path, n: int, n_classes: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(memory-mapped images, labels) of a complete entry; None when there is none; ``_Stale`` (saying what does
    not match) when its contents are not what was written: shape and dtype against its meta.json, labels in
    [0, n_classes), and each file against the SHA-256 written with it."""
    _refuse_special(path)
    if not path.is_dir() or not all((path / name).is_file() for name in FILES):
        return None if not path.exists() else _raise_stale("incomplete (files missing)")
    if (path / "meta.json").stat().st_size > MAX_META_BYTES or (path / "labels.npy").stat().st_size > 8 * n + 4096:
        _raise_stale("meta.json or labels.npy is larger than this entry's can be")
    try:
        meta = json.loads((path / "meta.json").read_text())
        shape, sums = tuple(meta["shape"]), meta["sha256"]
        images = np.load(path / "images.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        _raise_stale(f"unreadable ({type(err).__name__}: {str(err)[:120]})")
    if not isinstance(sums, dict) or meta.get("version") != CACHE_VERSION or meta.get("n") != n:
        _raise_stale("meta.json does not describe this entry")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape != shape or shape[0] != n:
        _raise_stale(f"images.npy holds {images.dtype} of shape {images.shape}, {n} uint8 images of "
                     f"shape {shape[1:]} were written")
    if labels.dtype != np.int64 or labels.shape != (n,):
        _raise_stale(f"labels.npy holds {labels.dtype} of shape {labels.shape}, {n} int64 labels were written")
    if n and (labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes)):
        _raise_stale(f"labels.npy holds labels {labels.min()}..{labels.max()}, outside 0..{(n_classes or 1) - 1}")
    for name in ("images.npy", "labels.npy"):
        if _sha256(path / name) != sums.get(name):
            _raise_stale(f"{name} does not match the checksum written with it")
    return images, labels


def _raise_stale(why: str):
    raise _Stale(why)


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


class _File:
    """A file written with os.pwrite into space allocated up front (os.posix_fallocate), so that a full disk is an
    OSError at allocation, never a SIGBUS from a memory map; hashed as it is written."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.pos, self.hash = path, size, 0, hashlib.sha256()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if hasattr(os, "posix_fallocate") and size:
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                    self.close()
                    raise  # ENOSPC, EDQUOT, EFBIG...; a file system without fallocate: plain writes

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self.fd, view, self.pos)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {self.path}")
            self.hash.update(view[:n])
            view, self.pos = view[n:], self.pos + n

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class _Writer:
    """Fills one entry batch by batch in a temporary folder, then renames it into place. A failure to write (a
    full disk, a read-only folder) is said once and the split is evaluated without the cache; nothing is left
    behind."""

    def __init__(self, path: Path, n: int, n_classes: int | None, description: dict, on_done: Callable,
                 replace: bool = False):
        self.path, self.n, self.n_classes, self.description, self.on_done = path, n, n_classes, description, on_done
        self.replace = replace  # the entry in place was found damaged: replace it
        self.tmp: Path | None = None
        self.images: _File | None = None
        self.shape: tuple | None = None
        self.labels = np.empty(n, dtype=np.int64)
        self.pos = 0

    def add(self, images: torch.Tensor, labels) -> bool:
        """Store one batch; False (after a warning, with everything removed) when it could not be stored."""
        try:
            if self.images is None:
                self.shape = (self.n, *images.shape[1:])
                self.tmp = self.path.parent / f".tmp-{self.path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.tmp.mkdir(parents=True)
                header = _npy_header(np.uint8, self.shape)
                self.images = _File(self.tmp / "images.npy", len(header) + math.prod(self.shape))
                self.images.write(header)
            if images.dtype != torch.uint8 or (self.n, *images.shape[1:]) != self.shape:
                self.abort()
                raise ValueError(f"{self.path.name}: images of shape {tuple(images.shape[1:])}, {images.dtype} after "
                                 f"the transform, expected {self.shape[1:]} uint8; run with --input-cache off")
            k = len(images)
            if self.pos + k > self.n:
                raise OSError(errno.EINVAL, f"more than the {self.n} images the split has")
            self.images.write(images.contiguous().numpy())
            self.labels[self.pos:self.pos + k] = torch.as_tensor(labels).numpy()
            self.pos += k
            return True
        except OSError as err:
            return self._give_up(err)

    def _give_up(self, err: BaseException) -> bool:
        warnings.warn(f"input cache not written ({err}); {self.path.name} evaluated without it"
                      + (" (the disk is full)" if getattr(err, "errno", None) in _FULL_DISK else ""), stacklevel=3)
        self.abort()
        return False

    def finish(self) -> None:
        """Write labels and meta.json, rename into place, hand the entry out. Never raises OSError."""
        if self.images is None or self.pos != self.n:
            return self.abort()
        labels = self.labels
        if self.n and (labels.min() < 0 or (self.n_classes is not None and labels.max() >= self.n_classes)):
            warnings.warn(f"input cache not written: {self.path.name} has labels {labels.min()}..{labels.max()} for "
                          f"{self.n_classes} classes", stacklevel=2)
            return self.abort()
        try:
            self.images.close()
            data = _npy_header(np.int64, labels.shape) + labels.tobytes()
            out = _File(self.tmp / "labels.npy", len(data))
            try:
                out.write(data)
            finally:
                out.close()
            meta = {**self.description, "shape": list(self.shape), "n_classes": self.n_classes,
                    "sha256": {"images.npy": self.images.hash.hexdigest(), "labels.npy": out.hash.hexdigest()}}
            text = json.dumps(meta, indent=1, default=str).encode()
            out = _File(self.tmp / "meta.json", len(text))
            try:
                out.write(text)
            finally:
                out.close()
            if self.replace and os.path.lexists(self.path):  # found damaged when it was opened
                _refuse_special(self.path)
                if self.path.is_dir() and not self.path.is_symlink():
                    shutil.rmtree(self.path, ignore_errors=True)
                else:
                    self.path.unlink()
            try:
                os.rename(self.tmp, self.path)
            except OSError:  # another run finished the same entry first (a folder not empty): keep theirs
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        except OSError as err:
            self._give_up(err)
            return
        try:
            arrays = _open_entry(self.path, self.n, self.n_classes)
        except (_Stale, OSError):
            arrays = None
        if arrays is not None:
            self.on_done(arrays)

    def abort(self) -> None:
        if self.images is not None:
            self.images.close()
            self.images = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class DecodedBatches:
    """Batches decoded by a DataLoader (uint8, pinned on CUDA), normalised on the device; optionally stored."""

    def __init__(self, dataset: Dataset, normalize: DeviceNormalize, device: torch.device, batch_size: int,
                 num_workers: int, writer: _Writer | None = None):
        self.dataset, self.normalize, self.device = dataset, normalize, device
        self.batch_size, self.num_workers, self.writer = batch_size, num_workers, writer

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        writer, complete = self.writer, False
        try:
            for images, labels in loader:
                if writer is not None and not writer.add(images, labels):
                    writer = None  # e.g. a full disk: said once, evaluated anyway, nothing left behind
                yield self.normalize(images.to(self.device, non_blocking=True)), labels
            complete = True
        finally:
            if writer is not None:
                writer.finish() if complete else writer.abort()


class CachedBatches:
    """Batches read from a memory-mapped entry; the next one is read (and pinned for CUDA, or normalised when
    evaluating on the CPU, so that it overlaps with the model) while this one runs."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, normalize: DeviceNormalize, device: torch.device,
                 batch_size: int):
        self.images, self.labels, self.normalize = images, labels, normalize
        self.device, self.batch_size = device, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def _read(self, start: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[start:start + self.batch_size]))  # a copy: the map is read-only
        if self.device.type == "cpu":
            return self.normalize(x)
        return x.pin_memory() if self.device.type == "cuda" else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.images), self.batch_size
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, 0)
            for start in range(0, n, bs):
                x = pending.result()
                if start + bs < n:
                    pending = pool.submit(self._read, start + bs)
                if self.device.type != "cpu":
                    x = self.normalize(x.to(self.device, non_blocking=True))
                yield x, torch.from_numpy(self.labels[start:start + bs])


class InputCache:
    """Decides per split whether inputs are stored, and hands out batch iterables for evaluation.

    mode: ``auto`` stores the ``<Task>Val`` splits (the ones coefficient tuning evaluates 20-30 times),
    ``all`` every split, ``off`` none (plain loaders). Entries opened once stay open for the process.
    """

    def __init__(self, folder: str | os.PathLike, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"--input-cache must be one of {', '.join(MODES)}, got {mode!r}")
        self.folder, self.mode = Path(folder), mode
        if mode != "off" and os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise InputCacheError(f"input cache folder {self.folder} is not a folder; remove it, or give another "
                                  "--input-cache-dir (or run with --input-cache off)")
        self._open: dict[tuple, tuple[str, dict, np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"InputCache({str(self.folder)!r}, {self.mode!r})"

    def plan(self, preprocess) -> SplitTransform | None:
        return None if self.mode == "off" else split_transform(preprocess)

    def stores(self, name: str) -> bool:
        return self.mode == "all" or (self.mode == "auto" and is_val(name))

    def split(self, task: str, location, plan: SplitTransform, device, batch_size: int, num_workers: int,
              make_split: Callable, source: str = "local") -> "CacheSplit":
        """``task``'s split as ``.name`` and ``.loader`` (batches of float images on ``device``, labels).

        ``make_split()`` builds the registry's DatasetSplit with ``plan.pixels`` as its transform; it is not
        called again once this process has the entry open. ``source`` is the data source ``make_split`` reads
        ("local" under ``location``, or "hf"): with ``location`` it tells entries apart within the process.
        """
        device = torch.device(device)
        memo = (task, source, str(location), plan.description)
        if memo in self._open:
            name, provenance, images, labels = self._open[memo]
            return CacheSplit(name, CachedBatches(images, labels, plan.normalize, device, batch_size), provenance)
        split = make_split()
        name, dataset, provenance = split.name, split.dataset, getattr(split, "provenance", {})
        source = source_fingerprint(dataset) if self.stores(name) else None
        if source is None:
            return CacheSplit(name, DecodedBatches(dataset, plan.normalize, device, batch_size, num_workers), provenance)
        n = len(dataset)
        n_classes = len(getattr(split, "classnames", None) or []) or None
        path = self.folder / f"{name}-{cache_key(name, source, plan.description, n)}"
        stale = False
        try:
            arrays = _open_entry(path, n, n_classes)  # InputCacheError for a FIFO, device or folder in its place
        except _Stale as why:
            warnings.warn(f"input cache {path}: {why}; rebuilding it (decoding {name} again)", stacklevel=2)
            arrays, stale = None, True
        if arrays is not None:
            self._open[memo] = (name, provenance, *arrays)
            return CacheSplit(name, CachedBatches(*arrays, plan.normalize, device, batch_size), provenance)

        def done(arrays):
            self._open[memo] = (name, provenance, *arrays)

        meta = {"version": CACHE_VERSION, "split": name, "n": n, "transform": plan.description, "source": source}
        writer = _Writer(path, n, n_classes, meta, done, replace=stale)
        return CacheSplit(name, DecodedBatches(dataset, plan.normalize, device, batch_size, num_workers, writer),
                          provenance)


@dataclass
class CacheSplit:
    """What evaluation needs of a split: its registered name, a loader, and where its images came from."""

    name: str
    loader: object
    provenance: dict = field(default_factory=dict)
