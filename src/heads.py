"""Zero-shot classification heads: load `head_<Task>.pt`, or build one from a CLIP text tower and cache it.

clip/ reads and writes head files as plain data (`clip.checkpoint.HeadData`); the `ClassificationHead`
modules are made here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

import utils
from clip.checkpoint import HeadData, read_head, write_head
from clip.factory import create_model, get_tokenizer
from clip.hub import text_model_from_hf
from src.datasets import conventions
from src.datasets.registry import DatasetNotFoundError, get_dataset, get_spec
from src.modeling import ClassificationHead


def load_head(path: str | os.PathLike) -> ClassificationHead:
    """A head file (a pickled task_vectors/TSV ``ClassificationHead``, read safely, or ``save_head`` output)."""
    data = read_head(path)
    return ClassificationHead(data.normalize, data.weight, data.bias)


def save_head(head: ClassificationHead, path: str | os.PathLike) -> None:
    """Save ``head`` as a plain state dict (weight, bias, normalize) that ``load_head`` reads back."""
    write_head(HeadData(bool(head.normalize), head.weight, head.bias), path)


@torch.no_grad()
def build_zeroshot_head(clip_model: torch.nn.Module, tokenizer: Callable, classnames: list,
                        templates: list[Callable[[str], str]], device: str | torch.device = "cpu"
                        ) -> ClassificationHead:
    """Per class: embed every template, L2-normalise each, average, re-normalise; stack; times exp(logit_scale).

    Same computation as task_vectors' `build_classification_head`; the head L2-normalises image features.
    """
    if not classnames or not templates:
        raise ValueError("building a zero-shot head needs at least one class name and one template")
    if not hasattr(clip_model, "encode_text"):
        raise ValueError("building a zero-shot head needs a CLIP model with its text tower (encode_text)")
    clip_model.eval().to(device)
    weights = []
    for classname in classnames:
        tokens = tokenizer([template(classname) for template in templates]).to(device)
        embeddings = clip_model.encode_text(tokens)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        embedding = embeddings.mean(dim=0)
        weights.append(embedding / embedding.norm())
    weights = torch.stack(weights) * clip_model.logit_scale.exp()
    return ClassificationHead(normalize=True, weights=weights.float().cpu())


def head_path(checkpoint_dir: str | Path, task: str, convention: str | None = None) -> Path:
    """Where the head of `task` is cached, next to the checkpoints. `head_<Task>.pt` holds the task_vectors
    definitions (the task_vectors release ships these files); a convention whose class names, templates or data
    differ for `task` caches its head as `head_<Task>_<convention>.pt`, so no head is ever read for a convention
    it was not built for."""
    if conventions.same_definitions(task, convention, conventions.DEFAULT):
        return Path(checkpoint_dir) / f"head_{task}.pt"
    return Path(checkpoint_dir) / f"head_{task}_{convention}.pt"


def task_classnames(task: str, data_location: str, convention: str | None = None, source: str = "local") -> list:
    """Class names as the original derives them (from the data when it does), else the registered list."""
    spec = get_spec(task, convention)
    if spec.fixed_names:
        return spec.classnames
    try:
        return get_dataset(task, None, data_location, num_workers=0, convention=convention, source=source).classnames
    except DatasetNotFoundError:
        return spec.classnames


def get_classification_head(model_name: str, task: str, checkpoint_dir: str | Path, data_location: str,
                            clip_model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
                            tokenizer: Callable | None = None, convention: str | None = None,
                            source: str = "local") -> ClassificationHead:
    """Load `head_path(checkpoint_dir, task, convention)`, or build it with `clip_model`'s text tower from the
    convention's class names and templates, and save it there.

    `clip_model` must carry the real text weights of `model_name` (the task_vectors checkpoints do not contain
    the text transformer), e.g. `clip.create_model(model_name, pretrained="openai")` (QuickGELU, as the OpenAI weights).
    Class names found in the data are read from `source` ("local" folders under `data_location`, or "hf").
    """
    path = head_path(checkpoint_dir, task, convention)
    if path.exists():
        return load_head(path)
    if clip_model is None:
        raise FileNotFoundError(
            f"classification head {path} not found. Put the released head_{task}.pt there (it ships with the "
            f"task_vectors checkpoints), or pass a CLIP model with its {model_name} text tower to build it.")
    tokenizer = tokenizer or get_tokenizer(model_name)
    names, templates = task_classnames(task, data_location, convention, source), get_spec(task, convention).templates
    head = build_zeroshot_head(clip_model, tokenizer, names, templates, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head(head, path)
    return head


def load_heads(model_name: str, ckpts, datasets: list[str], convention: str, data_location: str,
               source: str = "local") -> dict:
    """The head of each dataset's task: the released one when it was made with `convention`'s class names and
    templates, else the one cached for the convention (`head_path`), else one built from CLIP's text tower and
    cached (a Hugging Face zero-shot folder has the text tower; otherwise the OpenAI weights are needed once)."""
    heads, missing = {}, []
    released_under = conventions.released_heads_convention(ckpts.layout)
    for task in datasets:
        base = utils.task_of(task)
        released = ckpts.heads.get(base)
        if released and Path(released).exists() and conventions.same_definitions(base, convention, released_under):
            heads[base] = load_head(released)
        elif head_path(ckpts.root, base, convention).exists():
            heads[base] = load_head(head_path(ckpts.root, base, convention))
        else:
            missing.append(base)
    if missing:
        print(f"building zero-shot heads for {missing} from {model_name}'s text tower ({convention} convention)",
              flush=True)
        text_model = text_model_from_hf(model_name, ckpts.zeroshot) if ckpts.layout == "hf" else None
        text_model = text_model or create_model(model_name, pretrained="openai")  # QuickGELU, as OpenAI's
        for base in missing:
            heads[base] = get_classification_head(model_name, base, ckpts.root, data_location,
                                                  clip_model=text_model, convention=convention, source=source)
    return heads
