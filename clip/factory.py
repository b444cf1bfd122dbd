"""Build open_clip models by name, open any checkpoint checked against them, fill them.

CLIP names (ViT-B-32, ViT-B-16, ViT-L-14) use QuickGELU, as the OpenAI weights that the
task_vectors / TSV / FusionBench checkpoints were fine-tuned from (and the text towers their
heads were built with). Other architectures are registered by the package that defines them
(``register_architecture``; the embedded benchmark's ``demo`` / ``demo-micro`` by src/demo/model.py),
so this module knows none of them. ``load_state_dict`` is the one entry point for every checkpoint
format (files via ``clip.checkpoint``, Hugging Face folders via ``clip.hf``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import open_clip
import torch
from torch import Tensor

from clip.checkpoint import (TEXT_SIDE_KEYS, WHERE_CHECKPOINTS_COME_FROM, CheckpointError, StateDict,
                             check_compatible, load_file, to_keys)
from clip.hf import is_hf_folder, load_hf_folder

CLIP_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Architecture:
    """A model architecture beyond open_clip's CLIP names, with everything the pipeline asks of one."""

    create: Callable[[], torch.nn.Module]  # a CLIP-like module (encode_image, encode_text), random weights
    preprocess: Callable[[], tuple[Callable, Callable]]  # (train transform, val transform)
    tokenizer: Callable[[], Callable]
    no_pretrained: str = "it has no pretrained weights"  # why pretrained="openai" is refused


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, architecture: Architecture) -> None:
    """Make ``name`` known to ``create_model``, ``get_preprocess``, ``get_tokenizer`` and the checkpoint checks.
    Registering a name again replaces it (a module reloaded); the CLIP names cannot be replaced."""
    if name in CLIP_MODELS:
        raise ValueError(f"{name!r} is an open_clip CLIP architecture; register other names")
    _ARCHITECTURES[name] = architecture


def registered_architectures() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def _check_name(name: str) -> None:
    if name not in CLIP_MODELS:
        extra = ", ".join(_ARCHITECTURES) or "none yet: the demo models register when src.demo.model is imported"
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(CLIP_MODELS)} or a registered "
                         f"architecture ({extra})")


def create_model(name: str, device: str | torch.device = "cpu", pretrained: str | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` of architecture ``name``, always with QuickGELU in both towers.

    ``pretrained=None``: random weights, nothing downloaded; ``device="meta"`` builds shapes only
    (instant, no memory). ``pretrained="openai"``: the released OpenAI weights (downloaded once by
    open_clip), e.g. the text tower that builds zero-shot heads as task_vectors / TSV did. A plain
    ``open_clip.create_model(name, pretrained="openai")`` would build GELU towers for these weights.
    """
    if pretrained not in (None, "openai"):
        raise ValueError(f"pretrained={pretrained!r}: only None or 'openai' (the weights the checkpoints were "
                         "fine-tuned from, with QuickGELU) are supported")
    extra = _ARCHITECTURES.get(name)
    if extra is not None:
        if pretrained is not None:
            raise ValueError(f"model {name!r}: {extra.no_pretrained}")
        return extra.create().to(device)
    _check_name(name)
    with torch.device(device):
        return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=True, device=device)


def get_tokenizer(name: str) -> Callable:
    """The tokenizer of ``name``'s text tower: callable(str | list[str]) -> LongTensor of token ids."""
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name].tokenizer()
    _check_name(name)
    return open_clip.get_tokenizer(name)


def get_preprocess(name: str) -> tuple[Callable, Callable]:
    """``(train_preprocess, val_preprocess)`` as pickled in task_vectors' ImageEncoder."""
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name].preprocess()
    _check_name(name)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    kw = dict(mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="shortest", interpolation="bicubic")
    return open_clip.image_transform(size, is_train=True, **kw), open_clip.image_transform(size, is_train=False, **kw)


def load_into(module: torch.nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict") -> None:
    """Copy ``state_dict`` into ``module`` one tensor at a time (no second full copy).

    Every visual key must be present with the right shape; missing text-side keys (not used
    for images, absent from Hugging Face vision-only folders) only warn.
    """
    source = str(getattr(state_dict, "path", source))
    target = module.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    bad_shape = [(k, tuple(state_dict.info(k)[0]) if hasattr(state_dict, "info") else tuple(state_dict[k].shape),
                  tuple(target[k].shape)) for k in target if k in state_dict]
    bad_shape = [b for b in bad_shape if b[1] != b[2]]
    hard_missing = [k for k in missing if k not in TEXT_SIDE_KEYS]
    if hard_missing or unexpected or bad_shape:
        parts = []
        if hard_missing:
            parts.append(f"{len(hard_missing)} missing keys (first {hard_missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[:3]})")
        if bad_shape:
            k, got, want = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatches (first {k!r}: {got} in the checkpoint, {want} in the model)")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts)
                              + ". Is --model the architecture the checkpoint was trained with?")
    if missing:
        warnings.warn(f"{source} lacks text-side keys {missing}; they keep random values (image features are "
                      "unaffected)", stacklevel=2)
    with torch.no_grad():
        for k, t in target.items():
            if k in state_dict:
                t.copy_(state_dict[k])


# ----------------------------------------------------------------------------- any checkpoint
def expected_shapes(model_name: str) -> dict[str, tuple]:
    """Key -> shape of the ImageEncoder state dict of ``model_name`` (built on the meta device)."""
    model = create_model(model_name, device="meta")
    return {k: tuple(v.shape) for k, v in to_keys(model.state_dict()).items()}


class _Shapes(dict):
    def info(self, key):
        return torch.Size(self[key]), torch.float32


def check_architecture(sd: Mapping, model_name: str) -> None:
    """Raise a CheckpointError if ``sd`` does not match ``model_name``'s keys and shapes."""
    check_compatible(sd, _Shapes(expected_shapes(model_name)), name_b=f"open_clip {model_name}")


def load_state_dict(path: str | os.PathLike, *, model_name: str | None = None, check_finite: bool = True) -> StateDict:
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
        if not is_hf_folder(path):
            raise CheckpointError(f"{path} is a folder without config.json: expected a Hugging Face CLIP folder "
                                  f"(config.json + model.safetensors or pytorch_model.bin)\n{WHERE_CHECKPOINTS_COME_FROM}")
        sd = load_hf_folder(path, check_finite=check_finite)
    else:
        sd = load_file(path, check_finite=check_finite)
    if model_name is not None:
        check_architecture(sd, model_name)
    return sd
