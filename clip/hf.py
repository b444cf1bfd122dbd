"""Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` <-> open_clip key mapping.

HF splits attention into q/k/v projections; open_clip stacks them (rows q, k, v) into
``attn.in_proj_weight``/``in_proj_bias``. ``visual_projection.weight`` (out x in) is the
transpose of open_clip's ``visual.proj``; the rest is renaming. Both use QuickGELU and LayerNorm
eps 1e-5 for OpenAI-style weights, so no rescaling is needed. The text transformer is not
mapped (it is not part of the image encoder's state dict); the text-side embeddings,
``ln_final``, ``text_projection`` and ``logit_scale`` are.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from clip.checkpoint import CheckpointError, Derived, StateDict, flat_tensors, read_pickle, read_safetensors

_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_VISION = {"embeddings.class_embedding": "class_embedding",
           "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
           "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
_TEXT = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
         "text_model.embeddings.position_embedding.weight": "positional_embedding",
         "text_model.final_layer_norm.weight": "ln_final.weight",
         "text_model.final_layer_norm.bias": "ln_final.bias",
         "logit_scale": "logit_scale"}
_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TEXT_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _block_layer(m: re.Match, tower: str, out_prefix: str, keys: set, plan: dict) -> None:
    """One HF encoder-layer key of ``tower`` (matched by ``m``) -> its open_clip ``resblocks`` key; q, k and v
    become one stacked ``in_proj``."""
    i, name, kind = m.groups()
    out = f"{out_prefix}transformer.resblocks.{i}."
    if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        src = [f"{tower}.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
        missing = [s for s in src if s not in keys]
        if missing:
            raise CheckpointError(f"Hugging Face checkpoint has {m.string} but not {missing}")
        plan[out + f"attn.in_proj_{kind}"] = ("qkv", src)
    elif name in _LAYER:
        plan[out + f"{_LAYER[name]}.{kind}"] = ("copy", [m.string])
    else:
        what = "text key" if tower == "text_model" else "key"
        raise CheckpointError(f"unknown Hugging Face CLIP {what} {m.string!r}")


def hf_plan(hf_keys, text: bool = False) -> dict[str, tuple[str, list[str]]]:
    """open_clip key -> (op, HF source keys), op in {"copy", "qkv", "T"}. Unmapped keys raise. The text
    transformer's layers are mapped only with ``text`` (they are not part of the image encoder)."""
    hf_keys = list(hf_keys)
    # transformers >= 5 saves CLIPVisionModel without the "vision_model." prefix
    bare = not any(k.startswith("vision_model.") for k in hf_keys) and any(k.startswith("embeddings.") for k in hf_keys)
    orig = {("vision_model." + k if bare else k): k for k in hf_keys}
    keys = set(orig)
    plan: dict[str, tuple[str, list[str]]] = {}
    for k in sorted(keys):
        if k.endswith("position_ids"):
            continue  # integer buffer, rebuilt by the model
        if k.startswith("vision_model.") and k[len("vision_model."):] in _VISION:
            plan["visual." + _VISION[k[len("vision_model."):]]] = ("copy", [k])
        elif k in _TEXT:
            plan[_TEXT[k]] = ("copy", [k])
        elif k == "visual_projection.weight":
            plan["visual.proj"] = ("T", [k])
        elif k == "text_projection.weight":
            plan["text_projection"] = ("T", [k])
        elif k.startswith("text_model."):
            if text and (m := _TEXT_BLOCK.match(k)):
                _block_layer(m, "text_model", "", keys, plan)
            continue  # text transformer: not part of the image encoder state dict
        elif m := _BLOCK.match(k):
            _block_layer(m, "vision_model", "visual.", keys, plan)
        else:
            raise CheckpointError(f"unknown Hugging Face CLIP key {k!r}")
    return {k: (op, [orig[s] for s in src]) for k, (op, src) in plan.items()}


def _apply(op: str, *tensors: Tensor) -> Tensor:
    if op == "qkv":
        return torch.cat(tensors, dim=0)
    if op == "T":
        return tensors[0].t().contiguous()
    return tensors[0]


def check_parts(op: str, src: list[str], shapes: list, where: str) -> None:
    """The tensors an entry is built from must fit it: q/k/v of one layer of one shape, a transposed
    projection 2-D; else a CheckpointError naming ``where`` (the file) and the keys."""
    shapes = [tuple(s) for s in shapes]
    if op == "qkv" and (len(set(shapes)) != 1 or len(shapes[0]) not in (1, 2)):
        raise CheckpointError(f"{where}: {', '.join(src)} have shapes {', '.join(map(str, shapes))}: the q/k/v "
                              "projections of a layer must have one shape (malformed checkpoint); download it again")
    if op == "T" and len(shapes[0]) != 2:
        raise CheckpointError(f"{where}: {src[0]} has shape {shapes[0]}, not a matrix (malformed checkpoint); "
                              "download it again")


def hf_to_open_clip(state_dict: Mapping[str, Tensor], text: bool = False) -> dict[str, Tensor]:
    """Eager conversion of a HF CLIP state dict to open_clip keys (no ``model.`` prefix)."""
    out = {}
    for k, (op, src) in hf_plan(state_dict.keys(), text).items():
        parts = [state_dict[s] for s in src]
        check_parts(op, src, [p.shape for p in parts], "Hugging Face state dict")
        out[k] = _apply(op, *parts)
    return out


def open_clip_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``hf_to_open_clip`` for the mapped keys (q/k/v split in three equal row blocks)."""
    inv_vision = {v: k for k, v in _VISION.items()}
    inv_text = {v: k for k, v in _TEXT.items()}
    inv_layer = {v: k for k, v in _LAYER.items()}
    out = {}
    for k, t in state_dict.items():
        k = k.removeprefix("model.")
        if k.startswith("visual.transformer.resblocks."):
            i, rest = k[len("visual.transformer.resblocks."):].split(".", 1)
            base = f"vision_model.encoder.layers.{i}."
            name, kind = rest.rsplit(".", 1)
            if name == "attn" and kind.startswith("in_proj_"):
                kind = kind[len("in_proj_"):]
                for p, chunk in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{base}self_attn.{p}_proj.{kind}"] = chunk.clone()
            else:
                out[f"{base}{inv_layer[name]}.{kind}"] = t
        elif k.startswith("visual.") and k[len("visual."):] in inv_vision:
            out["vision_model." + inv_vision[k[len("visual."):]]] = t
        elif k == "visual.proj":
            out["visual_projection.weight"] = t.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()
        elif k in inv_text:
            out[inv_text[k]] = t
    return out


# ----------------------------------------------------------------------------- folders
def is_hf_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


MAX_JSON_BYTES = 100_000_000  # config.json / *.index.json of a CLIP folder are a few KB


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, *.index.json)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} allowed for "
                              "a JSON file of a Hugging Face folder; download the folder again")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]}); download the folder again") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, not an object; download the folder again")
    return obj


def _shard(folder: Path, index: Path, name: Any) -> Path:
    """A shard file named by an index: a relative path inside the folder (no absolute path, no '..')."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map holds a {type(name).__name__}, not a shard file name")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
        raise CheckpointError(f"{index}: shard {name[:200]!r} lies outside the folder; an index may only name files "
                              "inside it (download the folder again)")
    return folder.joinpath(*rel.parts)


class MissingWeights(CheckpointError):
    """A Hugging Face folder without weight files (as opposed to one whose files are malformed)."""


_PARSED: dict[tuple, Any] = {}  # (what, path, stat) -> the little kept of a parsed JSON file
_PARSED_MAX = 256


def _parsed_once(what: str, path: Path, parse: Callable[[Path], Any]) -> Any:
    """``parse(path)``, once per version of the file (path, inode, size, modification and change times): a large
    config.json is parsed once per process, not once per open, and only what the loaders use is kept."""
    st = os.stat(path)
    if st.st_size > MAX_JSON_BYTES:  # checked on every open: a cap lowered later still applies
        raise CheckpointError(f"{path}: {st.st_size} bytes, more than the {MAX_JSON_BYTES} allowed for "
                              "a JSON file of a Hugging Face folder; download the folder again")
    key = (what, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _PARSED:
        value = parse(path)  # errors are raised each time, not kept
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = value
    return _PARSED[key]


def _config(path: Path) -> dict[str, Any]:
    """What the loaders use of a config.json: ``model_type`` and the vision tower's ``hidden_act``, checked."""
    folder = path.parent
    config = _json_object(path)
    model_type = config.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise CheckpointError(f"{folder}: config.json model_type is {str(model_type)[:80]!r}; only Hugging Face CLIP "
                              "(CLIPModel, CLIPVisionModel) folders are supported")
    vision = config.get("vision_config") or config
    if not isinstance(vision, dict):
        raise CheckpointError(f"{folder}: config.json vision_config is a {type(vision).__name__}, not an object")
    act = vision.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise CheckpointError(f"{folder}: vision hidden_act is {str(act)[:80]!r}, but open_clip ViT-B/L CLIP models here "
                              "use QuickGELU; this is not an OpenAI-style CLIP checkpoint")
    return {"model_type": model_type, "hidden_act": act}


def _index_shards(index: Path) -> tuple[tuple[str, ...], ...]:
    """The shard files an index names, as path parts relative to its folder (checked by ``_shard``)."""
    weight_map = _json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' object; download the folder again")
    return tuple(sorted({_shard(index.parent, index, s).relative_to(index.parent).parts
                         for s in weight_map.values()}))


def _weight_files(folder: Path) -> list[Path]:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            return [folder.joinpath(*parts) for parts in _parsed_once("index", index, _index_shards)]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise MissingWeights(f"{folder}: Hugging Face folder without weights: expected model.safetensors, "
                         "pytorch_model.bin or a sharded *.index.json next to config.json")


def load_hf_folder(folder: Path, *, check_finite: bool = True, text: bool = False) -> StateDict:
    """Lazy StateDict (``model.`` + open_clip keys) of a HF CLIPModel/CLIPVisionModel folder; with ``text`` the
    text transformer too (``model.transformer.*``, to build zero-shot heads). Every file is read by the
    safe readers of ``clip.checkpoint`` (no torch.load)."""
    folder = Path(folder)
    model_type = _parsed_once("config", folder / "config.json", _config)["model_type"]
    raw, files = {}, []
    for wf in _weight_files(folder):
        if not wf.is_file():
            raise CheckpointError(f"{wf}: shard listed in the index is missing; download the folder again")
        if wf.suffix == ".safetensors":
            entries, _, file = read_safetensors(wf)
            files.append(file)
        else:
            obj, fs = read_pickle(wf)
            entries = flat_tensors(obj, wf)
            files += fs
        raw.update(entries)
    entries = {}
    for key, (op, src) in hf_plan(raw.keys(), text).items():
        parts = [raw[s] for s in src]
        check_parts(op, src, [p.shape for p in parts], str(getattr(parts[0].file, "path", folder)))
        if op == "copy":
            entries["model." + key] = parts[0]
        else:
            shape = list(parts[0].shape)
            if op == "qkv":
                shape[0] = sum(p.shape[0] for p in parts)
            else:
                shape = shape[::-1]
            entries["model." + key] = Derived(lambda *t, op=op: _apply(op, *t), parts, shape, parts[0].dtype)
    if not any(k.startswith("model.visual.") for k in entries):
        raise CheckpointError(f"{folder}: no vision tower weights found")
    return StateDict(folder, entries, files=files, check_finite=check_finite,
                     meta={"format": "huggingface", "model_type": model_type})
