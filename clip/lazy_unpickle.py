"""The allow-listed unpickler: the security boundary of the checkpoint reader.

``unpickle(data)`` turns the bytes of a ``torch.save`` ``data.pkl`` into plain Python objects and
``TensorRef``s (where a tensor's bytes are, never the bytes themselves). Nothing named in the
file is imported or run. This module reads no file; ``clip.checkpoint`` finds the storages.

What a pickle may do, and why:

- name anything (GLOBAL / STACK_GLOBAL): nothing is imported. A name becomes
  * our own stand-in for the few functions torch.save uses (``torch._utils._rebuild_tensor_v2``,
    ``_rebuild_parameter``, ``_rebuild_from_type_v2``, ``collections.OrderedDict``, ``torch.Size``,
    ``_codecs.encode`` for protocol-2 bytes, ``copyreg._reconstructor`` for protocol 0/1, ...);
  * a plain container or scalar type from ``builtins`` (dict, list, tuple, set, frozenset, int,
    float, complex, bool, str, slice); every other builtin (eval, getattr, ...) is refused at once;
  * a ``Record`` class for a capitalised name (a class such as ``src.modeling.ImageEncoder``):
    calling it builds an inert record that only stores its arguments and state, so the
    ``_parameters`` / ``_buffers`` / ``_modules`` of pickled ``nn.Module``s can be walked;
  * a ``Refuse`` for any other function: passing it around is harmless, calling it is refused.
  Names from modules such as os, subprocess, sys, pickle or importlib are refused at once.
- call (REDUCE, NEWOBJ, OBJ, INST) only the above. Containers are called with at most one plain
  container argument, scalars with scalar arguments, so no call can turn a small file into a
  huge object (``str(x)`` of a shared, deeply nested list would).
- set state (BUILD) only on a ``Record`` (stored, nothing runs) or on a dict (torch's
  ``_metadata`` attribute of state dicts, dropped). BUILD on anything else, such as an
  allow-listed function, is refused: it would change that object for the whole process.
- use dict keys and set members that are strings, numbers, None, bytes or flat tuples of them:
  hashing a deeply nested or heavily shared tuple could take exponential time or crash.
- not use copyreg extension codes (EXT1/2/4): they go through a process-wide registry and cache.

Resource bounds (``Refused`` beyond them):

- ``MAX_PICKLE_BYTES`` (256 MiB): size of a ``data.pkl`` (checked by the caller before reading);
- ``MAX_OPERATIONS`` (10 million): pickle opcodes run plus items made by container calls, so the
  objects built stay proportional to that count;
- ``MAX_TENSORS`` (100,000) and ``MAX_DEPTH`` (64): modules + tensors, and module (or state-dict
  wrapper) nesting, when ``clip.checkpoint`` flattens the result (a ViT-L/14 has about 400 tensors
  and 7 levels). Nothing else walks the result recursively (no repr, no hashing of nested values);
- ``MAX_EXPANDED_VIEW_BYTES`` (64 MiB): a view that repeats storage elements (stride 0, as from
  ``expand``, or overlapping strides) may not materialise more than that. Views must lie inside
  their storage, with non-negative offsets and strides.

The pure-Python ``pickle._Unpickler`` is used (data.pkl of a CLIP model is small) because its
per-opcode dispatch table can be replaced: the C unpickler lets only ``find_class`` and
``persistent_load`` be overridden, not BUILD or REDUCE.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import math
import pickle
from typing import Any

import torch

MAX_PICKLE_BYTES = 256 * 1024 ** 2
MAX_OPERATIONS = 10_000_000
MAX_TENSORS = 100_000
MAX_DEPTH = 64
MAX_EXPANDED_VIEW_BYTES = 64 * 1024 ** 2


class Refused(Exception):
    """The pickle does something outside the allow-list or the bounds; nothing of it ran."""


# ----------------------------------------------------------------------------- what a pickle yields
class StorageRef:
    """A storage named by a pickle's persistent id: ``nbytes`` bytes at member ``data/<key>``.
    ``location`` is filled in by the caller once it has checked the archive."""

    __slots__ = ("key", "dtype", "nbytes", "location")

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int):
        self.key, self.dtype, self.nbytes, self.location = key, dtype, nbytes, None


class TensorRef:
    """A tensor found in a pickle: its storage plus the (checked) view parameters."""

    __slots__ = ("storage", "dtype", "shape", "stride", "storage_offset")

    def __init__(self, storage: StorageRef, storage_offset: int, size, stride, dtype: torch.dtype | None = None):
        self.storage, self.dtype = storage, dtype or storage.dtype
        self.shape, self.stride, self.storage_offset = torch.Size(size), tuple(stride), storage_offset


class Record:
    """Inert stand-in for an instance of a class named in a pickle: keeps arguments and state."""

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
        """The instance dict (slot state merged in); {} when the state is not a dict."""
        st = self._state
        if isinstance(st, tuple) and len(st) == 2:  # (dict state, slot state)
            st = {**(st[0] if isinstance(st[0], dict) else {}), **(st[1] if isinstance(st[1], dict) else {})}
        return st if isinstance(st, dict) else {}

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


class Refuse:
    """A function named in a pickle: referring to it is harmless, calling it is refused."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value):
        raise AttributeError("read-only")


class _StorageType:
    """``torch.FloatStorage`` etc. as named in a persistent id: only its dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# ----------------------------------------------------------------------------- allow-listed functions
def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(type(v) is int for v in values):
        raise Refused(f"a tensor's {what} is not a list of integers (corrupted file)")
    return tuple(values)


def _check_view(storage, storage_offset, size, stride, dtype=None) -> TensorRef:
    """A TensorRef whose view stays inside its storage and does not blow up when read."""
    if not isinstance(storage, StorageRef):
        raise Refused("a tensor is rebuilt from something that is not a storage (corrupted file)")
    size, stride = _ints(size, "shape"), _ints(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0:
        raise Refused("a tensor's storage offset is negative or not an integer (corrupted file)")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(st < 0 for st in stride):
        raise Refused(f"a tensor has shape {size} and strides {stride}: negative or mismatched (corrupted file)")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise Refused("a tensor's dtype is not a torch dtype (corrupted file)")
    t = TensorRef(storage, storage_offset, size, stride, dtype)
    numel = math.prod(size)
    if numel:
        span = 1 + sum((s - 1) * st for s, st in zip(size, stride))
        if (storage_offset + span) * t.dtype.itemsize > storage.nbytes:
            raise Refused(f"a tensor of shape {size} points past the end of its storage (corrupted file)")
        if numel > span and numel * t.dtype.itemsize > MAX_EXPANDED_VIEW_BYTES:
            raise Refused(f"a tensor of shape {size} repeats its {span} stored elements (stride 0 or overlapping "
                          f"strides) and would take {numel * t.dtype.itemsize} bytes, more than the "
                          f"{MAX_EXPANDED_VIEW_BYTES} bytes allowed; save a contiguous copy (tensor.contiguous())")
    return t


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _check_view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=None, backward_hooks=None,
                       dtype=None, metadata=None):
    return _check_view(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise Refused("a parameter is rebuilt from something that is not a tensor (corrupted file)")
    return data


_TENSOR_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch.Tensor subclasses: only a tensor rebuild may be applied; the type and state are dropped
    if not any(func is f for f in _TENSOR_REBUILDS) or not isinstance(args, tuple):
        raise Refused(f"_rebuild_from_type_v2 applies {_name_of(func)}, not a tensor rebuild")
    return func(*args)


def _codecs_encode(obj, encoding):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')
    if type(obj) is not str or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode called with unexpected arguments")
    return codecs.encode(obj, "latin1")


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1 objects): an inert record for any class
    if isinstance(cls, type) and issubclass(cls, Record):
        return cls(state)
    if base is object and cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise Refused(f"copyreg._reconstructor for {_name_of(cls)}")


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
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
}
# our stand-ins, named by the first torch name they stand for (refusal messages)
_SAFE_FUNCTIONS = {id(f): f"{m}.{n}" for (m, n), f in reversed(SAFE_GLOBALS.items()) if not isinstance(f, type)}
# Lowercase names that are classes or data, kept as inert records when called (numpy values stored as
# attributes, e.g. a best accuracy, are never model weights here).
_INERT_CALLABLES = {("functools", "partial"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct")}
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, frozenset)
_SCALARS = (int, float, complex, bool, str, slice)
_BUILTINS = {t.__name__: t for t in _CONTAINERS + _SCALARS if t.__module__ == "builtins"}
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
_NEVER = {"os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket", "importlib", "runpy",
          "pty", "code", "codeop", "ctypes", "multiprocessing", "pickle", "_pickle", "marshal", "types",
          "webbrowser", "signal", "operator", "platform", "asyncio", "threading", "pdb", "timeit", "cProfile",
          "profile", "trace", "urllib", "http", "ftplib", "smtplib", "tempfile", "io", "_io", "pathlib", "glob",
          "inspect", "dill", "numpy.testing", "torch.hub", "torch.ops"}
_PLAIN = (str, int, float, complex, bool, type(None), bytes)


def _name_of(obj) -> str:
    """The real name of a callable (module.qualname), as refusal messages give it."""
    if isinstance(obj, Refuse):
        return obj.name
    if id(obj) in _SAFE_FUNCTIONS:
        return _SAFE_FUNCTIONS[id(obj)]
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__} object"


def _one_of(obj, options: tuple) -> bool:
    return any(obj is o for o in options)  # identity: never call a pickled object's __eq__


def _plain_key(key) -> bool:
    """Safe to hash: a scalar, or a flat tuple of scalars."""
    return type(key) in _PLAIN or (type(key) is tuple and len(key) <= 16 and all(type(k) in _PLAIN for k in key))


def _check_keys(keys, what: str) -> None:
    for k in keys:
        if not _plain_key(k):
            raise Refused(f"{what} is a {type(k).__name__}, not a string, number or flat tuple")


# ----------------------------------------------------------------------------- the unpickler
_OP = {name: getattr(pickle, name)[0] for name in (
    "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD", "SETITEM", "SETITEMS", "DICT", "ADDITEMS",
    "FROZENSET", "APPEND", "APPENDS")}


class _Unpickler(pickle._Unpickler):
    """``pickle._Unpickler`` with every call, state change and hash going through the policy above."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, StorageRef] = {}
        self.records: dict[tuple[str, str], type] = {}  # one inert class per name, for this file only
        self.operations = 0

    def _count(self, n: int = 1) -> None:
        self.operations += n
        if self.operations > MAX_OPERATIONS:
            raise Refused(f"the pickle builds more than {MAX_OPERATIONS} objects or items; a CLIP checkpoint "
                          "needs a few thousand (an expansion attack or not a checkpoint)")

    # -- names
    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names used by protocol 2
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "builtins":
            if name in _BUILTINS:
                return _BUILTINS[name]
            if name == "object":  # the base argument of copyreg._reconstructor; calling it is refused
                return object
            raise Refused(f"the pickle refers to {full}, which is not on the allow-list; refusing to load it")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        if any(module == m or module.startswith(m + ".") for m in _NEVER):
            raise Refused(f"the pickle refers to {full}, which is not on the allow-list; refusing to load it")
        if name.rsplit(".", 1)[-1][:1].isupper() or (module, name) in _INERT_CALLABLES:
            key = (module, name)
            if key not in self.records:  # a class: calling it only builds an inert record
                self.records[key] = type(name.rsplit(".", 1)[-1], (Record,), {"__module__": module, "__qualname__": name})
            return self.records[key]
        return Refuse(full)

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"unexpected persistent id (a {type(pid).__name__}); not a torch.save checkpoint")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise Refused(f"unknown storage type {_name_of(storage_type)}")
        if type(key) is not str or not key or len(key) > 100 or type(numel) is not int or numel < 0:
            raise Refused("malformed storage reference (key must be a short string, size a non-negative integer)")
        ref = StorageRef(key, dtype, numel * dtype.itemsize)
        old = self.storages.setdefault(key, ref)
        if (old.dtype, old.nbytes) != (ref.dtype, ref.nbytes):
            raise Refused(f"storage {key} is declared twice with different types or sizes (corrupted file)")
        return old

    # -- calls
    def _call(self, func, args: tuple, kwargs: dict | None = None, *, new: bool = False):
        """The only place a pickle calls anything. ``new``: NEWOBJ (``cls.__new__``), records only."""
        if isinstance(func, type) and issubclass(func, Record):
            return func(*args, **(kwargs or {}))
        if kwargs:
            raise Refused(f"the pickle calls {_name_of(func)} with keyword arguments")
        if _one_of(func, _CONTAINERS):
            if new and not _one_of(func, (tuple, frozenset)):
                args = ()  # NEWOBJ of dict/list/set: __new__ ignores its arguments; SETITEMS/APPENDS fill it
            if len(args) > 1 or (args and type(args[0]) not in (list, tuple, dict, collections.OrderedDict)):
                raise Refused(f"the pickle calls {_name_of(func)} on something that is not a plain container")
            if args and _one_of(func, (dict, collections.OrderedDict)) and type(args[0]) in (list, tuple):
                if not all(type(p) in (list, tuple) and len(p) == 2 for p in args[0]):
                    raise Refused(f"the pickle calls {_name_of(func)} on something that is not a list of pairs")
                _check_keys((p[0] for p in args[0]), "a dict key")
            elif args and _one_of(func, (set, frozenset)):
                _check_keys(args[0], "a set member")
            out = func(*args)
            self._count(len(out))
            return out
        if new:
            raise Refused(f"the pickle builds {_name_of(func)} with NEWOBJ; only records of pickled classes may be")
        if _one_of(func, _SCALARS + (torch.device,)):
            if not all(type(a) in (int, float, bool, str, type(None)) for a in args):
                raise Refused(f"the pickle calls {_name_of(func)} on something that is not a number or string")
            return func(*args)
        if func is torch.Size:
            if len(args) != 1 or type(args[0]) not in (list, tuple) or not all(type(v) is int for v in args[0]):
                raise Refused("the pickle calls torch.Size on something that is not a list of integers")
            return func(*args)
        if id(func) in _SAFE_FUNCTIONS:
            return func(*args)
        if isinstance(func, Refuse):
            raise Refused(f"the pickle calls {func.name}, which is not on the allow-list (torch tensor/storage "
                          "rebuilds and plain containers); refusing to run it")
        raise Refused(f"the pickle calls {_name_of(func)}, which is not on the allow-list; refusing to run it")

    def load_reduce(self):
        args = self.stack.pop()
        if type(args) is not tuple:
            raise Refused("REDUCE with arguments that are not a tuple (corrupted file)")
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple:
            raise Refused("NEWOBJ with arguments that are not a tuple (corrupted file)")
        self.append(self._call(cls, args, new=True))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple or type(kwargs) is not dict:
            raise Refused("NEWOBJ_EX with malformed arguments (corrupted file)")
        self.append(self._call(cls, args, kwargs, new=True))

    def load_obj(self):
        args = self.pop_mark()
        if not args:
            raise Refused("OBJ without a class (corrupted file)")
        self.append(self._call(args[0], tuple(args[1:])))

    def load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        self.append(self._call(self.find_class(module, name), tuple(self.pop_mark())))

    # -- state changes
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Record):
            Record.__setstate__(inst, state)
        elif type(inst) in (dict, collections.OrderedDict) and type(state) is dict:
            pass  # the _metadata attribute torch puts on state dicts: not needed
        else:
            raise Refused(f"the pickle changes the state of {_name_of(inst)} (BUILD); only records of "
                          "pickled classes may get state")

    def _target(self, allowed: tuple, what: str):
        target = self.stack[-1]
        if not (type(target) in allowed or isinstance(target, Record)):
            raise Refused(f"the pickle {what} {_name_of(target)}")
        return target

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        _check_keys([key], "a dict key")
        self._target((dict, collections.OrderedDict), "sets an item of")[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        _check_keys(items[::2], "a dict key")
        target = self._target((dict, collections.OrderedDict), "sets items of")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        _check_keys(items[::2], "a dict key")
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_additems(self):
        items = self.pop_mark()
        _check_keys(items, "a set member")
        target = self.stack[-1]
        if type(target) is not set:
            raise Refused(f"the pickle adds set members to {_name_of(target)}")
        target.update(items)

    def load_frozenset(self):
        items = self.pop_mark()
        _check_keys(items, "a set member")
        self.append(frozenset(items))

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "appends to").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "appends to").extend(items)


def _counted(fn):
    def op(self):
        self._count()
        fn(self)
    return op


_Unpickler.dispatch = {code: _counted(fn) for code, fn in pickle._Unpickler.dispatch.items()}
_Unpickler.dispatch.update({_OP[name]: _counted(getattr(_Unpickler, "load_" + name.lower())) for name in _OP})


def _no_extensions(self):
    # EXT1/2/4 look names up in copyreg's process-wide extension registry and cache the result there
    raise Refused("the pickle uses copyreg extension codes, which torch.save never writes")


_Unpickler.dispatch.update({getattr(pickle, op)[0]: _no_extensions for op in ("EXT1", "EXT2", "EXT4")})


def unpickle(data: bytes) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data`` under the allow-list. Returns the object and the storages it names
    (key -> StorageRef; the caller checks they exist and sets their ``location``)."""
    if len(data) > MAX_PICKLE_BYTES:
        raise Refused(f"the pickle has {len(data)} bytes, more than the {MAX_PICKLE_BYTES} allowed")
    u = _Unpickler(data)
    return u.load(), u.storages
