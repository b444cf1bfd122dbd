"""Task vectors (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

``tau = theta_finetuned - theta_pretrained`` over the float parameters of the image
encoder. A TaskVector built from checkpoints is lazy: ``vector[key]`` reads the two
tensors of that key from disk and subtracts them, so merge methods that walk the
parameters one at a time never hold K full models in memory.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator, Mapping

import torch
from torch import Tensor


def _load(checkpoint) -> Mapping[str, Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    from clip import load_state_dict  # the one reader of every checkpoint format

    return load_state_dict(checkpoint)


def _info(state_dict: Mapping[str, Tensor], key: str) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of ``state_dict[key]``, without reading data when the mapping can tell."""
    info = getattr(state_dict, "info", None)
    if info is not None:
        return info(key)
    t = state_dict[key]
    return t.shape, t.dtype


def _name(state_dict, fallback: str) -> str:
    return str(getattr(state_dict, "path", fallback))


def max_abs(t: Tensor) -> float:
    """Largest |value| of a float tensor in one ``aminmax`` pass (several times cheaper
    than ``isfinite(t).all()``); NaN or inf when ``t`` holds any."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def check_finite(t: Tensor, what: str) -> float:
    """``max_abs(t)``, or a ValueError naming ``what`` if ``t`` holds NaN or inf."""
    bound = max_abs(t)
    if math.isfinite(bound):
        return bound
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise ValueError(f"{what} has {nan} NaN and {inf} inf values (of {t.numel()}): a merge would spread "
                     "them through the model. Check the checkpoints it was made from (fine-tuned minus "
                     "pre-trained must be finite) before merging.")


def task_label(task_vector: "TaskVector", index: int) -> str:
    """``task vector 3 (/ckpts/MNIST/finetuned.pt)`` for error messages; the path is shown
    when the task vector was built from a checkpoint file."""
    source = getattr(task_vector.vector, "finetuned", None)
    path = getattr(source, "path", None)
    return f"task vector {index}" + (f" ({path})" if path is not None else "")


def check_same_keys(a: Mapping, b: Mapping, what_a: str = "left", what_b: str = "right") -> None:
    """Raise a ValueError naming the keys that differ; never skip silently."""
    if a.keys() == b.keys():
        return
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    raise ValueError(
        f"task vectors have different keys: {len(only_a)} only in {what_a} (e.g. {only_a[:3]}), "
        f"{len(only_b)} only in {what_b} (e.g. {only_b[:3]}). Were they made from the same architecture?"
    )


class DeltaView(Mapping):
    """Read-only mapping ``key -> finetuned[key] - pretrained[key]`` computed on access."""

    def __init__(self, pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]):
        self.pretrained, self.finetuned = pretrained, finetuned
        pre_name, ft_name = _name(pretrained, "pretrained"), _name(finetuned, "fine-tuned")
        self._keys, self._shapes = [], {}
        for key in pretrained.keys():
            shape, dtype = _info(pretrained, key)
            if not dtype.is_floating_point:
                continue  # integer buffers carry no task information (as in the original code)
            if key not in finetuned:
                raise ValueError(f"key {key!r} of {pre_name} is missing from {ft_name}: "
                                 "the two checkpoints are not the same architecture")
            ft_shape, _ = _info(finetuned, key)
            if ft_shape != shape:
                raise ValueError(f"shape mismatch for {key!r}: {tuple(shape)} in {pre_name} vs "
                                 f"{tuple(ft_shape)} in {ft_name}: the checkpoints are not the same architecture")
            self._keys.append(key)
            self._shapes[key] = shape
        extra = [k for k in finetuned.keys() if k not in pretrained]
        if extra:
            raise ValueError(f"{ft_name} has keys absent from {pre_name}: {extra[:5]}")

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self.finetuned[key].float() - self.pretrained[key].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def info(self, key: str) -> tuple[torch.Size, torch.dtype]:
        return self._shapes[key], torch.float32


class MeanView(Mapping):
    """Read-only mapping ``key -> mean_i vector_i[key]`` computed on access."""

    def __init__(self, vectors: list[Mapping[str, Tensor]]):
        self.vectors = vectors

    def __getitem__(self, key: str) -> Tensor:
        return torch.stack([v[key].float() for v in self.vectors]).mean(0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.vectors[0])

    def __len__(self) -> int:
        return len(self.vectors[0])

    def info(self, key: str) -> tuple[torch.Size, torch.dtype]:
        return _info(self.vectors[0], key)[0], torch.float32


class FiniteView(Mapping):
    """Read-only view of a lazy mapping that refuses NaN/inf tensors as they are read."""

    def __init__(self, vector: Mapping[str, Tensor], label: str):
        self.vector, self.label = vector, label

    def __getitem__(self, key: str) -> Tensor:
        t = self.vector[key]
        check_finite(t, f"{self.label} key {key!r}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def info(self, key: str) -> tuple[torch.Size, torch.dtype]:
        return _info(self.vector, key)


def require_finite(task_vectors: list["TaskVector"]) -> list["TaskVector"]:
    """Task vectors that are guaranteed NaN/inf-free, with errors that name the task and key.
    In-memory ones (plain dicts) are checked now, before any merging work; lazy ones are
    wrapped so that each tensor is checked when it is read (checking them now would read
    every checkpoint twice; checkpoint files are already checked by ``clip.load_state_dict``)."""
    out = []
    for i, tv in enumerate(task_vectors):
        label = task_label(tv, i)
        if isinstance(tv.vector, dict):
            for key, t in tv.vector.items():
                check_finite(t, f"{label} key {key!r}")
            out.append(tv)
        else:
            out.append(TaskVector(vector=FiniteView(tv.vector, label)))
    return out


class TaskVector:
    """A task vector: ``vector`` maps parameter names to float tensors.

    ``TaskVector(pretrained_checkpoint, finetuned_checkpoint)`` takes paths (any format
    ``clip.load_state_dict`` reads) or state dicts and is lazy; ``TaskVector(vector=d)``
    wraps an existing mapping. Arithmetic returns eager TaskVectors.
    """

    def __init__(self, pretrained_checkpoint=None, finetuned_checkpoint=None, vector: Mapping[str, Tensor] | None = None):
        if vector is not None:
            self.vector = vector
            return
        if pretrained_checkpoint is None or finetuned_checkpoint is None:
            raise ValueError("TaskVector needs either vector= or both pretrained_checkpoint and finetuned_checkpoint")
        self.vector = DeltaView(_load(pretrained_checkpoint), _load(finetuned_checkpoint))

    # -- helpers ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.vector.keys())

    def shapes(self) -> dict[str, torch.Size]:
        return {k: _info(self.vector, k)[0] for k in self.vector.keys()}

    def materialize(self) -> "TaskVector":
        """An eager copy (a plain dict), e.g. to reuse many times without re-reading disk."""
        return TaskVector(vector={k: v.clone() for k, v in self.vector.items()})

    def _combine(self, other: "TaskVector", op) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        check_same_keys(self.vector, other.vector)
        return TaskVector(vector={k: op(self.vector[k], other.vector[k]) for k in self.vector})

    @staticmethod
    def mean(task_vectors: list["TaskVector"]) -> "TaskVector":
        """Lazy mean of task vectors (the ``task_vector_avg`` handed to merge methods)."""
        if not task_vectors:
            raise ValueError("mean of an empty list of task vectors")
        for i, tv in enumerate(task_vectors[1:], 1):
            check_same_keys(task_vectors[0].vector, tv.vector, "task vector 0", f"task vector {i}")
        return TaskVector(vector=MeanView([tv.vector for tv in task_vectors]))

    # -- arithmetic ---------------------------------------------------------------
    def __add__(self, other):
        return self._combine(other, torch.add)

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # lets sum(list_of_task_vectors) work
            return self
        return self.__add__(other)

    def __sub__(self, other):
        return self._combine(other, torch.sub)

    def __neg__(self):
        return TaskVector(vector={k: -v for k, v in self.vector.items()})

    def __mul__(self, scalar):
        if not isinstance(scalar, numbers.Number):
            return NotImplemented
        return TaskVector(vector={k: scalar * v for k, v in self.vector.items()})

    __rmul__ = __mul__

    def __len__(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        return f"TaskVector({len(self.vector)} tensors)"

    # -- application --------------------------------------------------------------
    def apply_to(self, pretrained, scaling_coef: float = 1.0):
        """``theta_0 + scaling_coef * tau``.

        ``pretrained`` may be a path or state dict (a new state dict is returned, keys
        outside the task vector copied unchanged) or an ``nn.Module`` whose state dict
        uses the same keys (updated in place and returned).
        """
        if isinstance(pretrained, torch.nn.Module):
            params = pretrained.state_dict()
            missing = [k for k in self.vector if k not in params]
            if missing:
                raise KeyError(f"the model has no parameters named {missing[:5]}: is it the same architecture?")
            with torch.no_grad():
                for key in self.vector:
                    p = params[key]
                    p.copy_(p.float() + scaling_coef * self.vector[key].to(p.device, torch.float32))
            return pretrained
        base = _load(pretrained)
        missing = [k for k in self.vector if k not in base]
        if missing:
            raise KeyError(f"{_name(base, 'the pretrained state dict')} has no keys {missing[:5]}: "
                           "is it the same architecture?")
        out = {}
        for key in base.keys():
            t = base[key]
            if key in self.vector:
                t = (t.float() + scaling_coef * self.vector[key].float()).to(t.dtype)
            out[key] = t
        return out
