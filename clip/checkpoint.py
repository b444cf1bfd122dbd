"""Read every checkpoint format into one lazy, read-only state dict.

Formats: ``torch.save`` zip archives (whole pickled modules such as the task_vectors
``src.modeling.ImageEncoder``, or plain state dicts), ``.safetensors`` files and
Hugging Face CLIP folders (see ``clip.hf``). Pickles are read by an allow-listed
unpickler: tensor/storage rebuilds and plain containers are allowed, every other class
becomes an inert record (its ``_parameters``/``_buffers``/``_modules`` are walked to get
the flat state dict) and a call to any other function is refused. Nothing in a file runs.

Tensor bytes are not read when a file is opened: ``StateDict[key]`` reads that one tensor
with ``os.preadv`` at its offset (no mmap, so resident memory stays one tensor).
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import json
import math
import os
import pickle
import struct
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

PathLike = str | os.PathLike

WHERE_CHECKPOINTS_COME_FROM = """\
Public checkpoints:
  - task_vectors release (8 tasks, used by the official SVC code): see the 'Checkpoints' link in
    the README of github.com/mlfoundations/task_vectors; unpack to <base_dir>/checkpoints/<model>/.
  - TSV / tall-masks release (8/14/20 tasks, <Task>Val/nonlinear_finetuned.pt): see the README of
    github.com/AntoAndGar/task_singular_vectors (checkpoints of github.com/nik-dim/tall_masks).
  - FusionBench fine-tunes as Hugging Face folders: tanganke/clip-vit-base-patch32_<task> (and the
    pretrained openai/clip-vit-base-patch32), downloaded with huggingface_hub.snapshot_download."""


class CheckpointError(ValueError):
    """Any problem with a checkpoint file or folder (message names the file and what to do)."""


class _Refused(Exception):
    """Raised inside the unpickler; turned into a CheckpointError that names the file."""


# ----------------------------------------------------------------------------- file reads
class _File:
    """A lazily opened read-only file descriptor shared by the tensors of one file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._finalizer = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._finalizer = weakref.finalize(self, os.close, self._fd)
        return self._fd

    def read_into(self, buf: memoryview, offset: int) -> None:
        got, fd = 0, self.fd()
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n <= 0:
                raise CheckpointError(f"{self.path}: file ends before byte {offset + len(buf)}: it is truncated; "
                                      "download or copy it again")
            got += n

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._fd = None


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class _FileTensor:
    """A tensor stored at ``offset`` bytes of a file (a view: storage offset and strides)."""

    def __init__(self, file: _File, offset: int, dtype: torch.dtype, shape, stride=None, storage_offset: int = 0):
        self.file, self.offset, self.dtype = file, offset, dtype
        self.shape = torch.Size(shape)
        self.stride = tuple(stride) if stride is not None else _contiguous_stride(tuple(self.shape))
        self.storage_offset = storage_offset

    @property
    def nbytes_span(self) -> int:
        """Bytes of storage this view touches, from its first element."""
        if self.shape.numel() == 0:
            return 0
        span = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return span * self.dtype.itemsize

    def read(self) -> Tensor:
        if self.shape.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        nbytes = self.nbytes_span
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.file.read_into(memoryview(buf.numpy()), self.offset + self.storage_offset * self.dtype.itemsize)
        flat = buf.view(self.dtype)
        if self.stride == _contiguous_stride(tuple(self.shape)) and flat.numel() == self.shape.numel():
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.stride).clone()


class _MemTensor:
    """A tensor already in memory (compressed zip members, small test inputs)."""

    def __init__(self, tensor: Tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def read(self) -> Tensor:
        return self.tensor.clone()  # callers may modify what they get


class _Derived:
    """A tensor computed from other entries on access (e.g. Hugging Face q/k/v -> in_proj)."""

    def __init__(self, fn: Callable[..., Tensor], sources: list, shape, dtype: torch.dtype):
        self.fn, self.sources, self.shape, self.dtype = fn, sources, torch.Size(shape), dtype

    def read(self) -> Tensor:
        return self.fn(*[s.read() for s in self.sources])


# ----------------------------------------------------------------------------- StateDict
class StateDict(Mapping):
    """Read-only ``Mapping[str, Tensor]`` whose tensors are read from disk on access.

    ``info(key)`` gives (shape, dtype) without reading; ``path`` is the source file/folder.
    With ``check_finite`` (default) a floating tensor holding NaN/inf raises a CheckpointError
    naming the key when it is read; ``validate()`` reads every tensor once to check them all.
    """

    def __init__(self, path: PathLike, entries: Mapping[str, Any], *, files: list[_File] = (),
                 check_finite: bool = True, meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self._entries = dict(entries)
        self._files = list(files)
        self.check_finite = check_finite
        self.meta = dict(meta or {})  # e.g. the format it was read from, safetensors metadata

    def __getitem__(self, key: str) -> Tensor:
        entry = self._entries[key]
        try:
            t = entry.read()
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: could not read tensor {key!r} ({e}); the file may be "
                                  "truncated or corrupted: download or copy it again") from e
        if self.check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.path}: tensor {key!r} {tuple(t.shape)} contains {bad} NaN/inf values; "
                                  "the checkpoint is broken (diverged fine-tuning or a bad conversion): "
                                  "re-create or re-download it")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def info(self, key: str) -> tuple[torch.Size, torch.dtype]:
        e = self._entries[key]
        return torch.Size(e.shape), e.dtype

    def shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {k: self.info(k) for k in self._entries}

    def validate(self) -> None:
        """Read every tensor once (one at a time) so NaN/inf or truncation show up now."""
        for key in self._entries:
            if self.check_finite:
                self[key]
            else:
                self._entries[key].read()

    def fill_missing_from(self, base: "StateDict") -> "StateDict":
        """A StateDict with ``base``'s tensors for keys this one lacks (e.g. a Hugging Face
        CLIPVisionModel fine-tune has no projection or text side: those stayed at the zero-shot
        values). Keys follow ``base``'s order; nothing is read now."""
        missing = [k for k in base._entries if k not in self._entries]
        entries = {k: self._entries.get(k) or base._entries[k] for k in base._entries}
        entries.update({k: e for k, e in self._entries.items() if k not in entries})
        return StateDict(self.path, entries, files=self._files + base._files, check_finite=self.check_finite,
                         meta={**self.meta, "filled_from": str(base.path), "filled_keys": missing})

    def materialize(self) -> dict[str, Tensor]:
        """An eager ``dict`` copy of every tensor."""
        return {k: self[k] for k in self._entries}

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __repr__(self) -> str:
        return f"StateDict({str(self.path)!r}, {len(self)} tensors)"


# ----------------------------------------------------------------------------- safe unpickler
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}
_DTYPE_NAMES.update(float=torch.float32, double=torch.float64, half=torch.float16, long=torch.int64,
                    int=torch.int32, short=torch.int16)
# Modules whose names never belong in a checkpoint: refused as soon as they are named.
_NEVER = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
          "code", "codeop", "ctypes", "multiprocessing", "pickle", "_pickle", "marshal", "types",
          "webbrowser", "signal", "operator", "platform", "asyncio", "threading", "pdb", "timeit",
          "cProfile", "profile", "trace", "urllib", "http", "ftplib", "smtplib", "tempfile", "io",
          "_io", "pathlib", "glob", "inspect", "dill", "numpy.testing", "torch.hub", "torch.ops"}
# Plain containers only (not bytes/bytearray: bytes(10**12) would allocate on call).
_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "complex", "int", "float", "bool", "str"}
# Lowercase names that are classes, kept as inert records when called.
_INERT_CALLABLES = {("functools", "partial")}


class _StorageRef:
    def __init__(self, file: _File | None, offset: int, nbytes: int, dtype: torch.dtype, data: bytes | None = None):
        self.file, self.offset, self.nbytes, self.dtype, self.data = file, offset, nbytes, dtype, data


class _TensorRef:
    """A tensor found in a pickle: its storage plus the view parameters."""

    def __init__(self, storage: _StorageRef, storage_offset: int, size, stride, dtype: torch.dtype | None = None):
        self.storage, self.dtype = storage, dtype or storage.dtype
        self.shape, self.stride, self.storage_offset = torch.Size(size), tuple(stride), storage_offset

    def entry(self):
        s = self.storage
        if s.data is None:
            return _FileTensor(s.file, s.offset, self.dtype, self.shape, self.stride, self.storage_offset)
        flat = torch.frombuffer(bytearray(s.data), dtype=torch.uint8).view(self.dtype) if s.nbytes else \
            torch.empty(0, dtype=self.dtype)
        return _MemTensor(flat.as_strided(self.shape, self.stride, self.storage_offset).clone())


def _check_view(t: _TensorRef) -> _TensorRef:
    span = 0 if t.shape.numel() == 0 else 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride))
    if (t.storage_offset + span) * t.dtype.itemsize > t.storage.nbytes:
        raise _Refused(f"a tensor of shape {tuple(t.shape)} points past the end of its storage (corrupted file)")
    return t


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _check_view(_TensorRef(storage, storage_offset, size, stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _check_view(_TensorRef(storage, storage_offset, size, stride, dtype))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)  # func came through find_class, so it is allow-listed or refuses to run


def _codecs_encode(obj, encoding="latin1"):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')
    if not isinstance(obj, str) or not isinstance(encoding, str):
        raise _Refused("_codecs.encode called with unexpected arguments")
    return codecs.encode(obj, encoding)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1 objects): build an inert record for any class
    if isinstance(cls, type) and issubclass(cls, _Record):
        return cls(state)
    if base is object and cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise _Refused(f"copyreg._reconstructor for {cls!r}")


def _numpy_scalar(dtype, data=None):
    import numpy as np
    return np.frombuffer(data, dtype=dtype)[0].copy()


def _numpy_dtype(name, align=False, copy=False):
    import numpy as np
    if not isinstance(name, str):
        raise _Refused("numpy.dtype called with a non-string argument")
    return np.dtype(name)


def _numpy_array(*args):
    # numpy arrays stored as attributes (never model weights here): kept as an inert record
    return _record_class("numpy", "ndarray")()


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
}


class _Record:
    """Inert stand-in for a class named in a pickle: keeps arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._args, obj._state, obj._items = args, {}, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):  # dict subclasses: SETITEMS after NEWOBJ
        self._items[key] = value

    def append(self, value):  # list subclasses: APPENDS after NEWOBJ
        self._items[len(self._items)] = value

    def extend(self, values):
        for v in values:
            self.append(v)

    def state(self) -> dict:
        st = self._state
        if isinstance(st, tuple):  # (dict state, slot state)
            st = {**(st[0] or {}), **(st[1] or {})}
        return st if isinstance(st, dict) else {}

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


_RECORD_CLASSES: dict[tuple[str, str], type] = {}


def _record_class(module: str, name: str) -> type:
    """The inert record class standing for ``module.name`` (one per name, so isinstance works)."""
    key = (module, name)
    if key not in _RECORD_CLASSES:
        _RECORD_CLASSES[key] = type(name.rsplit(".", 1)[-1], (_Record,), {"__module__": module, "__qualname__": name})
    return _RECORD_CLASSES[key]


class _Refuse:
    """A function named in a pickle: referring to it is harmless, calling it is refused."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise _Refused(f"the pickle calls {self.name}, which is not on the allow-list (torch tensor/storage "
                       "rebuilds and plain containers); refusing to run it")


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: io.BytesIO, storages: Callable[[str, torch.dtype, int], _StorageRef]):
        super().__init__(data)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names used by protocol 2
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "builtins":
            if name in _SAFE_BUILTINS:
                return getattr(__import__("builtins"), name)
            raise _Refused(f"the pickle refers to {full}, which is not on the allow-list; refusing to load it")
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage-type", _STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        if module.split(".")[0] in _NEVER or module in _NEVER:
            raise _Refused(f"the pickle refers to {full}, which is not on the allow-list; refusing to load it")
        if name.rsplit(".", 1)[-1][:1].isupper() or (module, name) in _INERT_CALLABLES:
            return _record_class(module, name)  # a class: calling it only builds an inert record
        return _Refuse(full)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _Refused(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if isinstance(storage_type, tuple) and storage_type[0] == "storage-type":
            dtype = storage_type[1]
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise _Refused(f"unknown storage type {storage_type!r}")
        return self._storages(key, dtype, numel)


# ----------------------------------------------------------------------------- torch zip files
def _zip_member_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError("bad zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pickle(path: PathLike) -> tuple[Any, list[_File]]:
    """Safely unpickle a ``torch.save`` zip archive. Tensors come back as lazy references.

    Returns the top-level object (dicts, lists, inert records) and the opened files.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05") or head[:1] == b"\x80":
            raise CheckpointError(f"{path}: this is a legacy (pre torch 1.6) or raw pickle file, not a torch zip "
                                  "archive; re-save it with torch>=1.6 (torch.save(obj.state_dict(), path)) "
                                  "in an environment that can load it") from e
        raise CheckpointError(f"{path}: not a valid torch checkpoint ({e}); the file is truncated or corrupted: "
                              "download or copy it again") from e
    with zf, open(path, "rb") as raw:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkls:
            raise CheckpointError(f"{path}: zip archive without data.pkl: not a torch.save checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little",):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported; re-save on a little-endian machine")
        try:
            data = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read its data.pkl ({e}); the file is corrupted: "
                                  "download or copy it again") from e
        file = _File(path)
        size = os.path.getsize(path)
        storages: dict[str, _StorageRef] = {}

        def storage(key: str, dtype: torch.dtype, numel: int) -> _StorageRef:
            if key in storages:
                return storages[key]
            member = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise _Refused(f"storage {member} is missing from the archive (truncated or corrupted file)")
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise _Refused(f"storage {member} has {info.file_size} bytes, {nbytes} expected (corrupted file)")
            if info.compress_type == zipfile.ZIP_STORED:
                offset = _zip_member_offset(raw, info)
                if offset + nbytes > size:
                    raise _Refused(f"storage {member} extends past the end of the file (truncated file)")
                ref = _StorageRef(file, offset, nbytes, dtype)
            else:  # not written by torch.save, but keep it readable
                ref = _StorageRef(None, 0, nbytes, dtype, zf.read(member)[:nbytes])
            storages[key] = ref
            return ref

        try:
            obj = _SafeUnpickler(io.BytesIO(data), storage).load()
        except _Refused as e:
            raise CheckpointError(f"{path}: {e}. Nothing in it was executed. If you trust the file, convert it to "
                                  "a state dict in its original environment and save that.") from None
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle stream
            raise CheckpointError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupted or "
                                  "not a checkpoint: download or copy it again") from e
    return obj, [file]


def _module_tensors(rec: _Record, prefix: str, out: dict[str, _TensorRef]) -> None:
    """Flatten an inert nn.Module record exactly as ``module.state_dict()`` would."""
    st = rec.state()
    skip = st.get("_non_persistent_buffers_set") or set()
    for name, t in (st.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in (st.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (st.get("_modules") or {}).items():
        if isinstance(child, _Record):
            _module_tensors(child, prefix + name + ".", out)


def is_module_record(obj: Any) -> bool:
    return isinstance(obj, _Record) and ("_parameters" in obj.state() or "_modules" in obj.state())


def flat_tensors(obj: Any, path: PathLike) -> dict[str, _TensorRef]:
    """The flat ``name -> tensor`` view of an unpickled object (module record or state dict)."""
    if is_module_record(obj):
        out: dict[str, _TensorRef] = {}
        _module_tensors(obj, "", out)
        return out
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, _TensorRef)}
        if not tensors:
            for wrapper in ("state_dict", "model_state_dict", "model"):
                if isinstance(obj.get(wrapper), (Mapping, _Record)):
                    return flat_tensors(obj[wrapper], path)
        scalars = (_TensorRef, str, int, float, bool, type(None))
        bad = [k for k, v in obj.items() if not isinstance(v, scalars) and type(v).__module__ != "numpy"]
        if bad:
            raise CheckpointError(f"{path}: entry {bad[0]!r} of the state dict is a {type(obj[bad[0]]).__name__}, "
                                  "not a tensor; expected a flat state dict")
        return tensors  # scalars such as 'model_name' are ignored
    kind = obj.qualified_name() if isinstance(obj, _Record) else type(obj).__name__
    raise CheckpointError(f"{path}: holds a {kind}, not a module or a state dict of tensors")


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: PathLike) -> tuple[dict[str, _FileTensor], dict[str, str], _File]:
    """Parse a safetensors header; return lazy entries, its metadata and the file."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: empty or truncated safetensors file; download or copy it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes): "
                                  "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e}); download or copy it again") from e
    file, base = _File(path), 8 + n
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for key, h in header.items():
        dtype = _ST_DTYPES.get(h.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {h.get('dtype')!r}")
        begin, end = h["data_offsets"]
        numel = math.prod(h["shape"])
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} size does not match its shape (corrupted file)")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {base + end} but the file has {size} bytes: "
                                  "it is truncated; download or copy it again")
        entries[key] = _FileTensor(file, base + begin, dtype, h["shape"])
    return entries, meta, file


# ----------------------------------------------------------------------------- key convention
TEXT_SIDE_KEYS = ("model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
                  "model.ln_final.bias", "model.text_projection", "model.logit_scale")


def to_convention(keys: list[str]) -> dict[str, str]:
    """Map raw keys to ``model.`` + open_clip key, dropping the text transformer (old -> new)."""
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    keys_s = [k[len(strip):] for k in keys]
    add = "" if any(k.startswith("model.") for k in keys_s) else "model."
    out = {}
    for raw, k in zip(keys, keys_s):
        new = add + k
        if new.startswith("model.transformer.") or new == "model.attn_mask":
            continue  # text transformer is not part of the image encoder's state dict
        out[raw] = new
    return out


def load_state_dict(path: PathLike, *, model_name: str | None = None, check_finite: bool = True) -> StateDict:
    """Open any checkpoint as a lazy ``StateDict`` in the ``model.<open_clip key>`` convention.

    ``path``: a torch ``.pt``/``.pth`` (pickled ImageEncoder/CLIP module or a state dict, with or
    without the ``model.`` prefix), a ``.safetensors`` file (also ``save_merged`` output) or a
    Hugging Face CLIP folder. With ``model_name`` the keys and shapes are checked against that
    open_clip architecture.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}\n{WHERE_CHECKPOINTS_COME_FROM}")
    if path.is_dir():
        from clip.hf import is_hf_folder, load_hf_folder
        if not is_hf_folder(path):
            raise CheckpointError(f"{path} is a folder without config.json: expected a Hugging Face CLIP folder "
                                  f"(config.json + model.safetensors or pytorch_model.bin)\n{WHERE_CHECKPOINTS_COME_FROM}")
        sd = load_hf_folder(path, check_finite=check_finite)
    else:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: the file is empty (interrupted download or copy); get it again")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"PK":
            obj, files = read_pickle(path)
            if isinstance(obj, _Record) and type(obj).__qualname__.endswith("ClassificationHead"):
                raise CheckpointError(f"{path} is a classification head, not an image encoder: use clip.load_head")
            raw = flat_tensors(obj, path)
            entries = {new: raw[old].entry() for old, new in to_convention(list(raw)).items()}
            sd = StateDict(path, entries, files=files, check_finite=check_finite, meta={"format": "torch"})
        else:
            entries, meta, file = read_safetensors(path)
            entries = {new: entries[old] for old, new in to_convention(list(entries)).items()}
            sd = StateDict(path, entries, files=[file], check_finite=check_finite,
                           meta={"format": "safetensors", **meta})
    if not len(sd):
        raise CheckpointError(f"{path}: no tensors found")
    if model_name is not None:
        check_architecture(sd, model_name)
    return sd


# ----------------------------------------------------------------------------- checks
def _shape_of(sd: Mapping, key: str) -> tuple:
    info = getattr(sd, "info", None)
    return tuple(info(key)[0]) if info is not None else tuple(sd[key].shape)


def check_compatible(sd_a: Mapping, sd_b: Mapping, *, name_a: str | None = None, name_b: str | None = None) -> None:
    """Raise a CheckpointError naming the first differing keys/shapes of two state dicts."""
    name_a = name_a or str(getattr(sd_a, "path", "first checkpoint"))
    name_b = name_b or str(getattr(sd_b, "path", "second checkpoint"))
    only_a = [k for k in sd_a if k not in sd_b]
    only_b = [k for k in sd_b if k not in sd_a]
    problems = []
    if only_a:
        problems.append(f"{len(only_a)} keys only in {name_a} (first: {only_a[:3]})")
    if only_b:
        problems.append(f"{len(only_b)} keys only in {name_b} (first: {only_b[:3]})")
    diff = [(k, _shape_of(sd_a, k), _shape_of(sd_b, k)) for k in sd_a if k in sd_b]
    diff = [d for d in diff if d[1] != d[2]]
    if diff:
        k, sa, sb = diff[0]
        problems.append(f"{len(diff)} shape mismatches, first {k!r}: {sa} vs {sb}")
    if problems:
        raise CheckpointError("architecture mismatch between checkpoints: " + "; ".join(problems)
                              + ". Use checkpoints of the same model (e.g. all ViT-B-32).")


def expected_shapes(model_name: str) -> dict[str, tuple]:
    """Key -> shape of the ImageEncoder state dict of ``model_name`` (built on the meta device)."""
    from clip.factory import create_model
    model = create_model(model_name, device="meta")
    return {k: tuple(v.shape) for k, v in to_keys(model.state_dict()).items()}


def to_keys(open_clip_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP state dict -> our convention (``model.`` prefix, no text transformer)."""
    return {new: open_clip_state[old] for old, new in to_convention(list(open_clip_state)).items()}


class _Shapes(dict):
    def info(self, key):
        return torch.Size(self[key]), torch.float32


def check_architecture(sd: Mapping, model_name: str) -> None:
    """Raise a CheckpointError if ``sd`` does not match ``model_name``'s keys and shapes."""
    check_compatible(sd, _Shapes(expected_shapes(model_name)), name_b=f"open_clip {model_name}")


def warn_if_identical(zeroshot: Mapping, finetuned: Mapping) -> bool:
    """Warn (and return True) if a fine-tuned checkpoint equals the zero-shot one: a zero task vector.

    Visual keys are compared first, so ordinary checkpoints exit after reading one tensor or two.
    """
    keys = sorted((k for k in zeroshot if k in finetuned), key=lambda k: ".visual." not in k)
    for k in keys:
        if not torch.equal(zeroshot[k], finetuned[k]):
            return False
    warnings.warn(f"{getattr(finetuned, 'path', 'fine-tuned checkpoint')} is identical to the zero-shot "
                  f"{getattr(zeroshot, 'path', 'checkpoint')}: its task vector is zero. Check that the right "
                  "fine-tuned file is in place.", stacklevel=2)
    return True


# ----------------------------------------------------------------------------- heads
def load_head(path: PathLike):
    """Load a classification head: pickled task_vectors/TSV ``ClassificationHead`` or ``save_head`` output."""
    from src.modeling import ClassificationHead
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classification head not found: {path}. Heads are built from the zero-shot model "
                              "and the class names (src.heads.get_classification_head builds and caches them).")
    obj, files = read_pickle(path)
    try:
        normalize = True
        if isinstance(obj, _Record):
            normalize = bool(obj.state().get("normalize", True))
        elif isinstance(obj, Mapping) and "normalize" in obj:
            normalize = bool(obj["normalize"])
        raw = flat_tensors(obj, path)
        if "weight" not in raw:
            raise CheckpointError(f"{path}: no 'weight' tensor: not a classification head")
        weight = raw["weight"].entry().read().clone()
        bias = raw["bias"].entry().read().clone() if "bias" in raw else None
    finally:
        for f in files:
            f.close()
    if weight.dim() != 2 or not torch.isfinite(weight).all():
        raise CheckpointError(f"{path}: head weight must be a finite 2-D tensor, got shape {tuple(weight.shape)}")
    return ClassificationHead(normalize, weight, bias)


def save_head(head, path: PathLike) -> None:
    """Save a head as a plain state dict (weight, bias, normalize) readable by ``load_head``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": head.weight.detach().cpu().clone(), "bias": head.bias.detach().cpu().clone(),
                "normalize": bool(head.normalize)}, path)
