"""Read checkpoint files into one lazy, read-only state dict.

Formats: ``torch.save`` zip archives (whole pickled modules such as the task_vectors
``src.modeling.ImageEncoder``, or plain state dicts) and ``.safetensors`` files; Hugging Face
folders are read by ``clip.hf`` on top of this module, and ``clip.factory.load_state_dict``
opens any of them. ``data.pkl`` is read by the allow-listed unpickler of ``clip.lazy_unpickle``
(the security boundary: nothing in a file runs); pickled modules are flattened here exactly as
``module.state_dict()`` would, within its bounds on tensor count and nesting depth. Raw
pickles, pre-1.6 torch files and tar archives are named and refused with how to convert them.

Tensor bytes are not read when a file is opened: ``StateDict[key]`` reads that one tensor
with ``os.preadv`` at its offset (no mmap, so resident memory stays one tensor).

Import order (no cycles): lazy_unpickle <- checkpoint <- hf <- factory.
"""
from __future__ import annotations

import json
import math
import os
import struct
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from clip.lazy_unpickle import (MAX_DEPTH, MAX_PICKLE_BYTES, MAX_TENSORS, Record, Refused, StorageRef, TensorRef,
                                unpickle)

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
    """A tensor stored at ``offset`` bytes of a file or zip member (a view: storage offset and strides)."""

    def __init__(self, file: _File | _ZipMember, offset: int, dtype: torch.dtype, shape, stride=None, storage_offset: int = 0):
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


class _ZipMember:
    """A compressed zip member (not written by torch.save): inflated on access, only as far as needed."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member

    def read_into(self, buf: memoryview, offset: int) -> None:
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                f.seek(offset)
                data = f.read(len(buf))
        except Exception as e:  # zlib/bz2/lzma errors have no common base
            raise CheckpointError(f"{self.path}: cannot inflate {self.member} ({e}); the file is corrupted: "
                                  "download or copy it again") from e
        if len(data) < len(buf):
            raise CheckpointError(f"{self.path}: {self.member} is shorter than its tensors need (corrupted file)")
        buf[:] = data


class Derived:
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


# ----------------------------------------------------------------------------- file formats
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_CONVERT = ("It cannot be read without running code from the file. If you trust it, convert it once in an "
            "environment that can load it: obj = torch.load(path, weights_only=False) (pickle.load for a raw "
            "pickle), then torch.save(obj.state_dict() if it is a module else obj, 'converted.pt') or "
            "safetensors.torch.save_file(state_dict, 'converted.safetensors'), and use the converted file.")
_KINDS = {"legacy": "a legacy torch checkpoint (torch < 1.6, or _use_new_zipfile_serialization=False), not a "
                    "zip archive",
          "tar": "a tar-format torch checkpoint (legacy format of early torch releases), not a zip archive",
          "pickle": "a raw pickle (pickle.dump), not a torch.save zip archive"}


def sniff_format(path: Path) -> str:
    """'zip', 'safetensors', 'legacy', 'tar', 'pickle' or 'unknown', from the first bytes of a file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if (head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5) or (head[:1] in (b"(", b"}", b"]", b"c") and last == b"."):
        return "pickle"
    return "unknown"


def refuse_format(path: Path, kind: str) -> CheckpointError:
    """The error for a file that is not a torch zip archive nor a safetensors file."""
    if kind in _KINDS:
        return CheckpointError(f"{path}: this is {_KINDS[kind]}. {_CONVERT}")
    return CheckpointError(f"{path}: not a torch.save zip archive nor a safetensors file (first bytes unknown); "
                           "the file is corrupted or not a checkpoint: download or copy it again")


# ----------------------------------------------------------------------------- torch zip files
def _zip_member_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise Refused("bad zip local header (corrupted file)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, refusing more than ``limit`` (checked in the header and while inflating)."""
    if info.file_size > limit:
        raise Refused(f"{info.filename} is {info.file_size} bytes uncompressed, more than the {limit} allowed")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{info.filename} inflates to more than {limit} bytes")
    return data


def read_pickle(path: PathLike) -> tuple[Any, list[_File]]:
    """Safely unpickle a ``torch.save`` zip archive. Tensors come back as ``TensorRef``s whose
    storages have a ``location`` (reader, byte offset); nothing else is read.

    Returns the top-level object (dicts, lists, inert records) and the opened files.
    """
    path = Path(path)
    kind = sniff_format(path)
    if kind != "zip":
        raise refuse_format(path, kind)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid torch checkpoint ({e}); the file is truncated or corrupted: "
                              "download or copy it again") from e
    file = _File(path)
    try:
        with zf, open(path, "rb") as raw:
            names = zf.namelist()
            pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkls:
                raise CheckpointError(f"{path}: zip archive without data.pkl: not a torch.save checkpoint")
            prefix = pkls[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and \
                    _read_member(zf, zf.getinfo(f"{prefix}byteorder"), 16).strip() != b"little":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported; re-save on a "
                                      "little-endian machine")
            obj, storages = unpickle(_read_member(zf, zf.getinfo(pkls[0]), MAX_PICKLE_BYTES))
            size = os.path.getsize(path)
            for key, ref in storages.items():
                member = f"{prefix}data/{key}"
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise Refused(f"storage {member} is missing from the archive (truncated or corrupted file)")
                if info.file_size < ref.nbytes:
                    raise Refused(f"storage {member} has {info.file_size} bytes, {ref.nbytes} expected "
                                  "(corrupted file)")
                if info.flag_bits & 0x1:
                    raise Refused(f"storage {member} is encrypted")
                if info.compress_type == zipfile.ZIP_STORED:
                    offset = _zip_member_offset(raw, info)
                    if offset + ref.nbytes > size:
                        raise Refused(f"storage {member} extends past the end of the file (truncated file)")
                    ref.location = (file, offset)
                else:  # not written by torch.save, but keep it readable (inflated on access)
                    ref.location = (_ZipMember(path, member), 0)
    except Refused as e:
        raise CheckpointError(f"{path}: {e}. Nothing in it was executed. If you trust the file, convert it to "
                              "a state dict in its original environment and save that.") from None
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickle stream or zip archive
        raise CheckpointError(f"{path}: cannot unpickle ({type(e).__name__}: {str(e)[:200]}); the file is "
                              "corrupted or not a checkpoint: download or copy it again") from e
    return obj, [file]


# ----------------------------------------------------------------------------- flattening
def _entry(t: TensorRef) -> _FileTensor:
    reader, offset = t.storage.location
    return _FileTensor(reader, offset, t.dtype, t.shape, t.stride, t.storage_offset)


def _short(key: Any) -> str:
    return repr(key[:80]) if isinstance(key, str) else f"a {type(key).__name__}"


def _named_tensors(table: Any, what: str, path: PathLike) -> dict[str, Any]:
    """``_parameters``/``_buffers`` of a module record: a dict of name -> tensor (or None)."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: {what} is a {type(table).__name__}, not a dict (malformed checkpoint)")
    for name, t in table.items():
        if type(name) is not str or not (t is None or isinstance(t, TensorRef)):
            raise CheckpointError(f"{path}: {what}[{_short(name)}] is a {type(t).__name__}, not a tensor "
                                  "(malformed checkpoint)")
    return table


def _module_tensors(root: Record, path: PathLike) -> dict[str, TensorRef]:
    """Flatten an inert nn.Module record exactly as ``module.state_dict()`` would (a module shared
    under two names appears under both), within MAX_TENSORS modules + tensors and MAX_DEPTH levels."""
    out: dict[str, TensorRef] = {}
    on_path: set[int] = set()
    visited = 0

    def walk(rec: Record, prefix: str) -> None:
        nonlocal visited
        visited += 1
        if visited + len(out) > MAX_TENSORS:
            raise CheckpointError(f"{path}: more than {MAX_TENSORS} modules and tensors (shared modules "
                                  "expanding, or not a CLIP checkpoint)")
        if id(rec) in on_path:
            raise CheckpointError(f"{path}: module {prefix[:200].rstrip('.')!r} contains itself (malformed checkpoint)")
        if len(on_path) >= MAX_DEPTH:
            raise CheckpointError(f"{path}: modules nested more than {MAX_DEPTH} deep at {prefix[:200]!r} "
                                  "(malformed checkpoint)")
        st = rec.state()
        skip = st.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise CheckpointError(f"{path}: {prefix}_non_persistent_buffers_set is not a set (malformed checkpoint)")
        tensors = list(_named_tensors(st.get("_parameters"), prefix + "_parameters", path).items())
        tensors += [(n, t) for n, t in _named_tensors(st.get("_buffers"), prefix + "_buffers", path).items()
                    if n not in skip]
        for name, t in tensors:
            if t is not None:
                out[prefix + name] = t
        children = st.get("_modules") or {}
        if not isinstance(children, dict):
            raise CheckpointError(f"{path}: {prefix}_modules is a {type(children).__name__}, not a dict "
                                  "(malformed checkpoint)")
        on_path.add(id(rec))
        for name, child in children.items():
            if isinstance(child, Record):
                walk(child, f"{prefix}{name}.")
        on_path.discard(id(rec))

    walk(root, "")
    return out


def is_module_record(obj: Any) -> bool:
    return isinstance(obj, Record) and ("_parameters" in obj.state() or "_modules" in obj.state())


def flat_tensors(obj: Any, path: PathLike, depth: int = 0) -> dict[str, _FileTensor]:
    """The flat ``name -> lazy tensor`` view of an unpickled object (module record or state dict)."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{path}: state dict wrappers nested more than {MAX_DEPTH} deep (malformed checkpoint)")
    if is_module_record(obj):
        return {k: _entry(t) for k, t in _module_tensors(obj, path).items()}
    if isinstance(obj, dict):
        bad_key = next((k for k in obj if type(k) is not str), None)
        if bad_key is not None:
            raise CheckpointError(f"{path}: state dict key {_short(bad_key)} is not a string (malformed checkpoint)")
        if len(obj) > MAX_TENSORS:
            raise CheckpointError(f"{path}: more than {MAX_TENSORS} entries: not a CLIP checkpoint")
        tensors = {k: v for k, v in obj.items() if isinstance(v, TensorRef)}
        if not tensors:
            for wrapper in ("state_dict", "model_state_dict", "model"):
                if isinstance(obj.get(wrapper), (dict, Record)):
                    return flat_tensors(obj[wrapper], path, depth + 1)
        scalars = (TensorRef, str, int, float, bool, type(None))
        bad = [k for k, v in obj.items()
               if not isinstance(v, scalars) and not (isinstance(v, Record) and type(v).__module__.startswith("numpy"))]
        if bad:
            raise CheckpointError(f"{path}: entry {_short(bad[0])} of the state dict is a {type(obj[bad[0]]).__name__}, "
                                  "not a tensor; expected a flat state dict")
        return {k: _entry(t) for k, t in tensors.items()}  # scalars such as 'model_name' are ignored
    kind = obj.qualified_name() if isinstance(obj, Record) else type(obj).__name__
    raise CheckpointError(f"{path}: holds a {kind}, not a module or a state dict of tensors")


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def _bad_header(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupted safetensors header: {what}; download or copy the file again")


def read_safetensors(path: PathLike) -> tuple[dict[str, _FileTensor], dict[str, str], _File]:
    """Parse and check a safetensors header; return lazy entries, its metadata and the file.

    Every tensor must have a known dtype, a shape of non-negative integers and ``data_offsets``
    ``[begin, end]`` matching dtype x shape, inside the file and not overlapping another tensor.
    """
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
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _bad_header(path, str(e)[:200]) from e
    if not isinstance(header, dict):
        raise _bad_header(path, f"a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad_header(path, "__metadata__ is not an object of strings")
    if len(header) > MAX_TENSORS:
        raise _bad_header(path, f"more than {MAX_TENSORS} tensors")
    file, base = _File(path), 8 + n
    entries, spans = {}, []
    for key, h in header.items():
        if not isinstance(h, dict):
            raise _bad_header(path, f"entry {_short(key)} is a JSON {type(h).__name__}, not an object")
        dtype = _ST_DTYPES.get(h.get("dtype")) if isinstance(h.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {str(h.get('dtype'))[:40]!r}")
        shape, offsets = h.get("shape"), h.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad_header(path, f"tensor {key!r} has shape {str(shape)[:80]}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _bad_header(path, f"tensor {key!r} has data_offsets {str(offsets)[:80]}, not [begin, end] with "
                                    "0 <= begin <= end")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} size does not match its shape (corrupted file)")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {base + end} but the file has {size} bytes: "
                                  "it is truncated; download or copy it again")
        spans.append((begin, end, key))
        entries[key] = _FileTensor(file, base + begin, dtype, shape)
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise _bad_header(path, f"tensors {key_a!r} and {key_b!r} overlap")
    # the format indexes its byte buffer entirely, without holes (the safetensors library refuses anything else)
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise _bad_header(path, f"a gap of {begin - end} bytes before tensor {key!r} (data_offsets must follow "
                                    "each other from 0)")
        end = stop
    if base + end != size:
        raise _bad_header(path, f"{size - base - end} bytes after the last tensor")
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


def to_keys(open_clip_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP state dict -> our convention (``model.`` prefix, no text transformer)."""
    return {new: open_clip_state[old] for old, new in to_convention(list(open_clip_state)).items()}


def load_file(path: PathLike, *, check_finite: bool = True) -> StateDict:
    """A lazy ``StateDict`` (``model.<open_clip key>`` convention) of a torch ``.pt``/``.pth`` zip
    archive (pickled ImageEncoder/CLIP module or a state dict, with or without the ``model.``
    prefix) or a ``.safetensors`` file. ``clip.load_state_dict`` also takes folders and checks
    the architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}\n{WHERE_CHECKPOINTS_COME_FROM}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (interrupted download or copy); get it again")
    kind = sniff_format(path)
    if kind == "zip":
        obj, files = read_pickle(path)
        if isinstance(obj, Record) and type(obj).__qualname__.endswith("ClassificationHead"):
            raise CheckpointError(f"{path} is a classification head, not an image encoder: read it with read_head "
                                  "(src.heads.load_head)")
        raw = flat_tensors(obj, path)
        entries = {new: raw[old] for old, new in to_convention(list(raw)).items()}
        meta = {"format": "torch"}
    elif kind in ("safetensors", "unknown"):  # unknown: the safetensors reader says what is wrong
        raw, st_meta, file = read_safetensors(path)
        entries, files = {new: raw[old] for old, new in to_convention(list(raw)).items()}, [file]
        meta = {"format": "safetensors", **st_meta}
    else:
        raise refuse_format(path, kind)
    if not entries:
        raise CheckpointError(f"{path}: no tensors found")
    return StateDict(path, entries, files=files, check_finite=check_finite, meta=meta)


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
@dataclass(frozen=True)
class HeadData:
    """A classification head as stored: logits = (L2-normalised if ``normalize``) features @ weight.T + bias.
    Plain data: ``src.heads.load_head`` turns it into a ``ClassificationHead``."""

    normalize: bool
    weight: Tensor  # [classes, features]
    bias: Tensor | None = None  # [classes]


def read_head(path: PathLike) -> HeadData:
    """Read a classification head file: a pickled task_vectors/TSV ``ClassificationHead`` (read safely, as
    every checkpoint) or a ``write_head`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classification head not found: {path}. Heads are built from the zero-shot model "
                              "and the class names (src.heads.get_classification_head builds and caches them).")
    obj, files = read_pickle(path)
    try:
        normalize = True
        if isinstance(obj, Record):
            normalize = obj.state().get("normalize", True)
        elif isinstance(obj, dict):
            normalize = obj.get("normalize", True)
        if type(normalize) not in (bool, int):
            raise CheckpointError(f"{path}: 'normalize' is a {type(normalize).__name__}, not a bool "
                                  "(malformed classification head)")
        raw = flat_tensors(obj, path)
        if "weight" not in raw:
            raise CheckpointError(f"{path}: no 'weight' tensor: not a classification head")
        weight = raw["weight"].read().clone()
        bias = raw["bias"].read().clone() if "bias" in raw else None
    finally:
        for f in files:
            f.close()
    if weight.dim() != 2 or not torch.isfinite(weight).all():
        raise CheckpointError(f"{path}: head weight must be a finite 2-D tensor, got shape {tuple(weight.shape)}")
    return HeadData(bool(normalize), weight, bias)


def write_head(head: HeadData, path: PathLike) -> None:
    """Save a head as a plain state dict (weight, bias, normalize) that ``read_head`` reads back. A missing
    bias is stored as zeros (a head's logits always have one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bias = head.bias if head.bias is not None else torch.zeros(head.weight.shape[0], dtype=head.weight.dtype)
    torch.save({"weight": head.weight.detach().cpu().clone(), "bias": bias.detach().cpu().clone(),
                "normalize": bool(head.normalize)}, path)
