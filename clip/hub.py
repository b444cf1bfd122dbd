"""Checkpoints from the Hugging Face hub (``--source hf``): FusionBench's CLIP fine-tunes.

``--model ViT-B-32 --tasks 8`` becomes the zero-shot ``openai/clip-vit-base-patch32`` and the fine-tuned
``tanganke/clip-vit-base-patch32_<task id>`` (task ids of FusionBench's ``config/model/clip-vit``, e.g.
``stanford-cars``, ``oxford_flowers102``, ``emnist_letters``). Only ``config.json`` and the weights are
fetched (safetensors when the repository has them), and only with ``download=True`` (``--download``);
otherwise the standard hub cache alone is read (``local_files_only``). The snapshot folders then go
through the same safe loader as local Hugging Face folders (``clip.hf``): nothing is unpickled unsafely.

``huggingface_hub`` is optional: ``pip install -e ".[hf]"`` (the ``hf`` extra of pyproject.toml).
"""
from __future__ import annotations

import importlib
import os
import re
import stat
from pathlib import Path
from typing import Callable

import torch

from clip.checkpoint import CheckpointError
from clip.hf import MissingWeights, _weight_files, hf_to_open_clip, load_hf_folder
from clip.layout import HF_NAMES, HF_TASK_IDS, CheckpointSet
from utils import task_of

INSTALL_HINT = 'pip install -e ".[hf]"'
ZEROSHOT_OWNER, FINETUNED_OWNER = "openai", "tanganke"
SAFETENSORS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PYTORCH_BIN = ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def require(module: str, why: str):
    """Import an optional dependency, or stop with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"{why} needs the optional package {module!r}: {INSTALL_HINT}") from None


def repo_ids(model: str, tasks: list[str]) -> tuple[str, dict[str, str]]:
    """(zero-shot repo id, {task: fine-tuned repo id}) under FusionBench's names."""
    name = HF_NAMES.get(model, model)
    ids = {t: f"{FINETUNED_OWNER}/{name}_{HF_TASK_IDS.get(task_of(t), task_of(t).lower())}" for t in tasks}
    return f"{ZEROSHOT_OWNER}/{name}", ids


def hub_cache_dir() -> str:
    return require("huggingface_hub.constants", "--source hf / --data-source hf").HF_HUB_CACHE


def fetch_command(repo_id: str, repo_type: str = "model") -> str:
    return f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")


def repo_folder(repo_id: str, repo_type: str = "model") -> Path:
    """``<hub cache>/<models|datasets>--<org>--<name>``: where the hub cache keeps ``repo_id``."""
    kind = "dataset" if repo_type == "dataset" else "model"
    return Path(hub_cache_dir()) / f"{kind}s--{repo_id.replace('/', '--')}"


_REVISION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,254}")  # a commit hash: one path component, no '..'


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_ref(repo: Path, refetch: str, error: Callable[[str], Exception] = CheckpointError) -> None:
    """refs/main must name one snapshot folder: huggingface_hub joins its text to ``snapshots/`` as it is, so
    '../../..' or an absolute path would lead out of the cache."""
    ref = repo / "refs" / "main"
    try:
        mode = os.stat(ref).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise error(f"{ref}: cannot be read ({err}); delete it and fetch the repository again ({refetch})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{ref}: not a regular file; delete it and fetch the repository again ({refetch})")
    with open(ref, "rb") as f:
        value = f.read(256).decode("utf-8", "replace")
    if not _REVISION.fullmatch(value):
        raise error(f"{ref} holds {value[:80]!r}, not a revision (a commit hash): it would lead outside "
                    f"{repo / 'snapshots'}; delete it and fetch the repository again ({refetch})")


def check_snapshot(folder: Path, repo: Path, refetch: str, error: Callable[[str], Exception] = CheckpointError) -> None:
    """Refuse a snapshot that reads outside its repository in the hub cache: the folder must resolve to a child
    of ``<repo>/snapshots``, and every link inside it (the hub links snapshot files to ``<repo>/blobs``) must
    resolve inside ``repo`` to a regular file. Folder links are refused (the hub never writes them)."""
    real_repo = os.path.realpath(repo)
    real = os.path.realpath(folder)
    if os.path.dirname(real) != os.path.join(real_repo, "snapshots"):
        raise error(f"{folder} is a link to {real}, outside {repo / 'snapshots'}: a hub snapshot is a folder of its "
                    f"repository; delete {repo} and fetch it again ({refetch})")
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not _inside(target, real_repo):
                    raise error(f"{path} is a link to {target}, outside {repo}: a hub snapshot only links to its "
                                f"repository's blobs; delete {repo} and fetch it again ({refetch})")
                if name in dirs:
                    raise error(f"{path} is a link to a folder ({target}), which the hub cache never writes; delete "
                                f"{repo} and fetch it again ({refetch})")
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                if os.path.islink(path) and name in files:  # a link to a missing blob: incomplete, said by the caller
                    continue
                raise error(f"{path}: cannot be read ({err}); delete {repo} and fetch it again ({refetch})") from None
            if not (stat.S_ISDIR(mode) if name in dirs else stat.S_ISREG(mode)):
                raise error(f"{path}: not a regular file (a FIFO, device or socket); delete {repo} and fetch it again "
                            f"({refetch})")


def snapshot(repo_id: str, *, repo_type: str = "model", download: bool = False,
             allow_patterns: list[str] | None = None, error: Callable[[str], Exception] = CheckpointError) -> Path:
    """The local snapshot folder of ``repo_id``: from the hub cache only, or fetched when ``download``.

    A repository missing from the cache raises ``error`` naming the id, the flag and the command that fetches it;
    a refs/main, snapshot folder or file that leads outside the repository's folder in the cache raises a
    CheckpointError naming it (``check_snapshot``), before anything in it is read.
    """
    hub = require("huggingface_hub", "--source hf / --data-source hf")
    kind = "dataset" if repo_type == "dataset" else "model"
    repo, refetch = repo_folder(repo_id, repo_type), f"`{fetch_command(repo_id, repo_type)}`"
    if not download:
        _check_ref(repo, refetch)
    try:
        folder = Path(hub.snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                                            local_files_only=not download))
    except Exception as err:  # every hub failure (missing, incomplete, offline, unknown repo) becomes one line
        if not type(err).__module__.startswith("huggingface_hub") and not isinstance(err, OSError):
            raise
        if not download:
            raise error(f"{kind} {repo_id} is not (completely) in the Hugging Face cache {hub_cache_dir()}; "
                        f"run again with --download to fetch it, or fetch it first with "
                        f"`{fetch_command(repo_id, repo_type)}`") from None
        raise error(f"could not download {kind} {repo_id} from the Hugging Face hub "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    check_snapshot(folder, repo, refetch)
    return folder


class NotCached(CheckpointError):
    """A hub repository (or its weights) missing from the cache: listed with the others missing."""


def _has_weights(folder: Path) -> bool:
    """Whether the weight files are there; a malformed index (e.g. naming a shard outside the folder) raises."""
    try:
        return all(f.is_file() for f in _weight_files(folder))
    except MissingWeights:
        return False


def fetch_model(repo_id: str, download: bool = False) -> Path:
    """Snapshot folder of a CLIP model repository with config.json and its weights."""
    folder = snapshot(repo_id, download=download, allow_patterns=SAFETENSORS, error=NotCached)
    if not _has_weights(folder) and download:  # an older repository without safetensors
        folder = snapshot(repo_id, download=True, allow_patterns=PYTORCH_BIN, error=NotCached)
    if not (folder / "config.json").is_file() or not _has_weights(folder):
        raise NotCached(f"model {repo_id}: the cached snapshot {folder} lacks config.json or its weights; "
                        f"run again with --download (or `{fetch_command(repo_id)}`)")
    return folder


def hub_checkpoints(model: str, tasks: list[str], base_dir: str | Path, download: bool = False) -> CheckpointSet:
    """A ``hf``-layout CheckpointSet of the hub snapshots of ``model`` and ``tasks``.

    Heads (built once from the zero-shot model's text tower) live in ``<base_dir>/checkpoints/<model>/hf/``,
    apart from the task_vectors heads, which follow another convention.
    """
    zs_id, ft_ids = repo_ids(model, tasks)
    found, missing = {}, []
    for key, repo in [("zeroshot", zs_id), *ft_ids.items()]:
        try:
            found[key] = fetch_model(repo, download)
        except NotCached as err:  # anything else (a malformed or escaping snapshot) stops at once
            missing.append(str(err))
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(ft_ids) + 1} hub checkpoints are missing:\n  "
                              + "\n  ".join(missing))
    root = Path(base_dir) / "checkpoints" / model / "hf"
    heads = {t: root / f"head_{task_of(t)}.pt" for t in tasks}
    return CheckpointSet("hf", root, found["zeroshot"], {t: found[t] for t in tasks}, heads)


# ----------------------------------------------------------------------------- text tower
def hf_text_layers_to_open_clip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``text_model.encoder.layers.*`` -> open_clip ``transformer.resblocks.*`` (q/k/v stacked)."""
    text = {k: v for k, v in tensors.items() if k.startswith("text_model.encoder.layers.")}
    return {k: v for k, v in hf_to_open_clip(text, text=True).items() if k.startswith("transformer.resblocks.")}


def text_model_from_hf(model_name: str, folder: str | Path) -> torch.nn.Module | None:
    """An open_clip CLIP ``model_name`` (text tower included) loaded from a HF ``CLIPModel`` folder, to build
    zero-shot heads without a second download; None when the folder has no text tower (CLIPVisionModel).
    The folder is read once, by the same safe reader as every checkpoint (``clip.hf.load_hf_folder``)."""
    from clip.factory import create_model

    folder = Path(folder)
    sd = load_hf_folder(folder, text=True)
    if sd.meta.get("model_type") != "clip" or not any(k.startswith("model.transformer.") for k in sd):
        return None
    state = {k[len("model."):]: v for k, v in sd.materialize().items()}
    model = create_model(model_name)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{folder}: the checkpoint does not fit {model_name} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, shapes {shapes[:2]}); is --model its architecture?")
    model.load_state_dict(state)
    return model.eval()
