"""Zero-shot classification heads: load `head_<Task>.pt`, or build one from a CLIP text tower and cache it.

A head built here is cached with its key (`cache_key`): the content hash of the text tower that built it
(`text_tower_key`: every text-side weight, i.e. token and positional embeddings, transformer, ln_final,
text_projection, logit_scale) and the hash of the prompts it embedded (`definitions_key`: the convention's
class names in every template). A cached head is used only when both match this run's; a head cached with
another key, or with none (cached before heads were keyed), is rebuilt, and the run says why. The released
heads of the task_vectors / TSV checkpoint layouts are trusted as released under their convention. Every head
is checked finite when it is built and when it is read.

clip/ reads and writes head files as plain data (`clip.checkpoint.HeadData`); the `ClassificationHead`
modules are made here."""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Callable

import torch

import utils
from clip.checkpoint import HeadData, read_head, read_pickle, write_head
from clip.factory import create_model, get_tokenizer
from clip.hub import text_model_from_hf
from src.datasets import conventions
from src.datasets.registry import LOCAL, DatasetNotFoundError, get_dataset, get_spec
from src.modeling import ClassificationHead

KEY_FIELDS = ("text_tower", "definitions")  # stored as strings inside a built head's file


def check_head(head: torch.nn.Module, name: str) -> None:
    """ValueError naming ``name`` when a head's weight or bias holds NaN/inf: every logit would be NaN, argmax
    would pick class 0, and the run would log chance accuracy as a result."""
    bad = [key for key, t in head.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{name}: the classification head's {' and '.join(bad)} hold NaN/inf values; delete the "
                         "file to rebuild it, and check that the text tower it comes from is finite")


def load_head(path: str | os.PathLike) -> ClassificationHead:
    """A head file (a pickled task_vectors/TSV ``ClassificationHead``, read safely, or ``save_head`` output),
    checked finite."""
    data = read_head(path)
    head = ClassificationHead(data.normalize, data.weight, data.bias)
    check_head(head, str(path))
    return head


def save_head(head: ClassificationHead, path: str | os.PathLike, key: dict[str, str] | None = None) -> None:
    """Save ``head`` as a plain state dict (weight, bias, normalize) that ``load_head`` reads back; ``key``
    (``cache_key``) is stored in the same file, as strings, and read back by ``read_head_key``. Written
    atomically; a head with NaN/inf values is refused."""
    check_head(head, str(path))
    if key is None:
        write_head(HeadData(bool(head.normalize), head.weight, head.bias), path)
        return
    weight = head.weight.detach().cpu().clone()
    bias = head.bias.detach().cpu().clone() if head.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    payload = {"weight": weight, "bias": bias, "normalize": bool(head.normalize), **{k: str(v) for k, v in key.items()}}
    utils.atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_head_key(path: str | os.PathLike) -> dict[str, str]:
    """The key stored in a head file by ``save_head`` ({} for a released head or one cached before keys)."""
    obj, files = read_pickle(path)
    for f in files:
        f.close()
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if k in KEY_FIELDS and isinstance(v, str)}


_TEXT_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def text_tower_key(clip_model: torch.nn.Module) -> str:
    """Content hash of a CLIP model's text side: every state-dict entry outside ``visual.`` (token and positional
    embeddings, transformer, ln_final, text_projection, logit_scale), names, dtypes, shapes and bytes. Hashed once
    per model and run (remembered until one of those tensors changes)."""
    state = [(k, v) for k, v in clip_model.state_dict().items() if not k.startswith("visual.")]
    if not state:
        raise ValueError("the model has no text tower (only visual.* weights): zero-shot heads need one")
    stamp = tuple((k, v.data_ptr(), v._version) for k, v in state)
    remembered = _TEXT_KEYS.get(clip_model)
    if remembered is not None and remembered[0] == stamp:
        return remembered[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(state, key=lambda kv: kv[0]):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    key = digest.hexdigest()[:32]
    _TEXT_KEYS[clip_model] = (stamp, key)
    return key


def definitions_key(classnames: list, templates: list[Callable[[str], str]]) -> str:
    """Hash of the prompts a head embeds: every template applied to every class name, in order."""
    prompts = [[template(name) for template in templates] for name in classnames]
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:32]


@torch.no_grad()
def build_zeroshot_head(clip_model: torch.nn.Module, tokenizer: Callable, classnames: list,
                        templates: list[Callable[[str], str]], device: str | torch.device = "cpu",
                        name: str = "zero-shot head") -> ClassificationHead:
    """Per class: embed every template, L2-normalise each, average, re-normalise; stack; times exp(logit_scale).

    Same computation as task_vectors' `build_classification_head`; the head L2-normalises image features.
    A text tower giving NaN/inf (or all-zero) embeddings is refused, naming the class (``name``: what is built).
    """
    if not classnames or not templates:
        raise ValueError("building a zero-shot head needs at least one class name and one template")
    if not hasattr(clip_model, "encode_text"):
        raise ValueError("building a zero-shot head needs a CLIP model with its text tower (encode_text)")
    clip_model.eval().to(device)
    scale = clip_model.logit_scale.exp()
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name}: the text tower's logit_scale is {clip_model.logit_scale.item()}, not finite; "
                         "the zero-shot model's weights are damaged: download or rebuild it")
    weights = []
    for classname in classnames:
        tokens = tokenizer([template(classname) for template in templates]).to(device)
        embeddings = clip_model.encode_text(tokens)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        embedding = embeddings.mean(dim=0)
        embedding = embedding / embedding.norm()
        if not torch.isfinite(embedding).all():
            raise ValueError(f"{name}: the text tower gives NaN/inf (or zero) embeddings for class {classname!r}; "
                             "the zero-shot model's text weights are damaged: download or rebuild it")
        weights.append(embedding)
    weights = torch.stack(weights) * scale
    return ClassificationHead(normalize=True, weights=weights.float().cpu())


def head_path(checkpoint_dir: str | Path, task: str, convention: str | None = None) -> Path:
    """Where the head of `task` is cached, next to the checkpoints. `head_<Task>.pt` holds the task_vectors
    definitions (the task_vectors release ships these files); a convention whose class names, templates or data
    differ for `task` caches its head as `head_<Task>_<convention>.pt`, so no head is ever read for a convention
    it was not built for. A built head also carries its key (`cache_key`), checked whenever it is read."""
    if conventions.same_definitions(task, convention, conventions.DEFAULT):
        return Path(checkpoint_dir) / f"head_{task}.pt"
    return Path(checkpoint_dir) / f"head_{task}_{convention}.pt"


def task_classnames(task: str, data_location: str, convention: str | None = None, source: str = "local") -> list:
    """Class names as the original derives them (from the local data when it does), else the registered list.
    Hub datasets (source "hf") are matched to the registered list by name, so that list is theirs."""
    spec = get_spec(task, convention)
    if spec.fixed_names or source != LOCAL:
        return spec.classnames
    try:
        return get_dataset(task, None, data_location, num_workers=0, convention=convention, source=source).classnames
    except DatasetNotFoundError:
        return spec.classnames


def cache_key(clip_model: torch.nn.Module, task: str, data_location: str, convention: str | None = None,
              source: str = "local") -> dict[str, str]:
    """The key a head of `task` built from `clip_model`'s text tower is cached with (see the module docstring)."""
    names, templates = task_classnames(task, data_location, convention, source), get_spec(task, convention).templates
    return {"text_tower": text_tower_key(clip_model), "definitions": definitions_key(names, templates)}


def stale_reason(stored: dict[str, str], wanted: dict[str, str | None]) -> str | None:
    """Why a cached head with key `stored` is not the head `wanted` describes; None when it is."""
    if not all(stored.get(k) for k in KEY_FIELDS):
        return "it carries no key of the text tower and class names it was built from (cached before heads were keyed)"
    if wanted.get("text_tower") is None:
        return "no text tower was given to check it against"
    if stored["text_tower"] != wanted["text_tower"]:
        return (f"it was built from another text tower (key {stored['text_tower'][:12]}; this run's text tower has "
                f"key {wanted['text_tower'][:12]})")
    if stored["definitions"] != wanted["definitions"]:
        return "it was built from other class names or prompt templates"
    return None


def get_classification_head(model_name: str, task: str, checkpoint_dir: str | Path, data_location: str,
                            clip_model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
                            tokenizer: Callable | None = None, convention: str | None = None,
                            source: str = "local") -> ClassificationHead:
    """Load `head_path(checkpoint_dir, task, convention)` when its stored key matches `clip_model`'s text tower
    and the convention's class names and templates; else build it with that text tower and save it there with
    its key (a stale or unkeyed cached head is rebuilt, saying why).

    `clip_model` must carry the real text weights of `model_name` (the task_vectors checkpoints do not contain
    the text transformer), e.g. `clip.create_model(model_name, pretrained="openai")` (QuickGELU, as the OpenAI weights).
    Without it no cached head can be checked, so none is used. Class names found in the data are read from
    `source` ("local" folders under `data_location`, or "hf").
    """
    path = head_path(checkpoint_dir, task, convention)
    if clip_model is None:
        if path.exists():
            raise ValueError(f"{path}: which text tower built this cached head cannot be checked without one; pass "
                             f"the CLIP model with the {model_name} text tower (the head is rebuilt if it differs)")
        raise FileNotFoundError(
            f"classification head {path} not found. Put the released head_{task}.pt there (it ships with the "
            f"task_vectors checkpoints), or pass a CLIP model with its {model_name} text tower to build it.")
    names, templates = task_classnames(task, data_location, convention, source), get_spec(task, convention).templates
    key = {"text_tower": text_tower_key(clip_model), "definitions": definitions_key(names, templates)}
    if path.exists():
        reason = stale_reason(read_head_key(path), key)
        if reason is None:
            return load_head(path)
        print(f"rebuilding {path}: {reason}", flush=True)
    tokenizer = tokenizer or get_tokenizer(model_name)
    head = build_zeroshot_head(clip_model, tokenizer, names, templates, device,
                               name=f"{task} zero-shot head from {model_name}'s text tower")
    save_head(head, path, key)
    return head


def load_heads(model_name: str, ckpts, datasets: list[str], convention: str, data_location: str,
               source: str = "local") -> dict:
    """The head of each dataset's task: the released one when it was made with `convention`'s class names and
    templates, else the one cached for the convention (`head_path`) when its key matches the text tower, else one
    built from CLIP's text tower and cached (a Hugging Face zero-shot folder has the text tower; otherwise the
    OpenAI weights are needed). The text tower is loaded (and hashed once) whenever a head is not a released one."""
    heads, todo = {}, []
    released_under = conventions.released_heads_convention(ckpts.layout)  # None: the layout ships no heads
    for task in datasets:
        base = utils.task_of(task)
        if base in heads or base in todo:
            continue
        released = ckpts.heads.get(base) if released_under else None
        if released and Path(released).exists() and conventions.same_definitions(base, convention, released_under):
            heads[base] = load_head(released)  # trusted as released
        else:
            todo.append(base)
    if todo:
        print(f"zero-shot heads for {todo} ({convention} convention): cached ones are checked against "
              f"{model_name}'s text tower, the others are built from it", flush=True)
        text_model = text_model_from_hf(model_name, ckpts.zeroshot) if ckpts.layout == "hf" else None
        text_model = text_model or create_model(model_name, pretrained="openai")  # QuickGELU, as OpenAI's
        for base in todo:
            heads[base] = get_classification_head(model_name, base, ckpts.root, data_location,
                                                  clip_model=text_model, convention=convention, source=source)
    return heads
