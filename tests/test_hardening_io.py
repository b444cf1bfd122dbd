"""Checkpoint and hub IO hardening: an input is never written, nothing is read from outside what was asked
for, malformed files give one line naming them, config files are parsed once, caches key on content."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_bytes
from safetensors.torch import save_file

import clip
from clip.checkpoint import CheckpointError
from clip.save import check_save_path

VISION_CFG = {"model_type": "clip_vision_model"}


def weights(value: float = 1.0) -> bytes:
    return st_bytes({"vision_model.post_layernorm.weight": torch.full((4,), value)})


def hub_snapshot(cache: Path, repo_id: str, files: dict, kind: str = "model", rev: str | None = None) -> Path:
    """``<cache>/<kind>s--<org>--<name>`` as huggingface_hub writes it: blobs named by their SHA-256, snapshot
    files that are relative symlinks to them, refs/main holding the revision."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    rev = rev or hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "blobs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        data = data.encode() if isinstance(data, str) else data
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def hf_folder(folder: Path, config=VISION_CFG, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        (folder / "model.safetensors").write_bytes(weights())
        return folder
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    keys = ["vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"]
    for name, key in zip(names, keys):
        save_file({key: torch.ones(4)}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(zip(keys, names))}))
    return folder


# ----------------------------------------------------------------------------- 2: an input is never written
def test_save_path_that_is_a_file_of_an_input_is_refused_with_or_without_overwrite(tmp_path):
    snap = hub_snapshot(tmp_path / "hub", "openai/clip-x", {"config.json": json.dumps(VISION_CFG),
                                                              "model.safetensors": weights()})
    sharded = hf_folder(tmp_path / "sharded", shards=2)
    single = tmp_path / "zeroshot.safetensors"
    single.write_bytes(weights())
    os.link(single, tmp_path / "hardlink.safetensors")
    (tmp_path / "symlink.safetensors").symlink_to(single)
    cases = [
        (snap / "model.safetensors", [snap]),  # a hub snapshot's symlink to its blob
        (snap / "model.safetensors", [snap / "model.safetensors"]),
        (sharded / "model-00002-of-00002.safetensors", [sharded]),  # a shard of a folder-shaped input
        (sharded / "model.safetensors.index.safetensors", [sharded]),  # its sidecar .json is the index
        (sharded / "config.safetensors", [sharded]),  # its sidecar is config.json
        (tmp_path / "hardlink.safetensors", [single]),
        (tmp_path / "symlink.safetensors", [single]),
    ]
    for overwrite in (True, False):
        for path, sources in cases:
            with pytest.raises(ValueError, match=r"^--save-merged \S+: \S+ is an input checkpoint of this merge"
                                                 r"( \(the same file as \S+\))?; give another path$"):
                check_save_path(path, sources, overwrite=overwrite, label="--save-merged")
    blob = (snap / "model.safetensors").resolve()
    before = blob.read_bytes()
    meta = {"method": "TA", "options": {}, "alpha": None, "tasks": ["MNIST"], "sources": {"zeroshot": str(snap)}}
    with pytest.raises(ValueError, match="an input checkpoint of this merge"):
        clip.save_merged(snap / "model.safetensors", {"w": torch.zeros(2)}, meta, overwrite=True)
    assert (snap / "model.safetensors").is_symlink() and blob.read_bytes() == before
    # files next to the inputs that are not inputs are fine
    assert check_save_path(sharded / "merged.safetensors", [sharded]) == sharded / "merged.safetensors"
    assert check_save_path(tmp_path / "out" / "m.safetensors", [snap, single, sharded])


# ----------------------------------------------------------------------------- 3: nothing read from outside the cache
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, offline mode on (nothing touches the network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    cache = tmp_path / "home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_hub_files_that_resolve_outside_the_cache_are_refused(hub_cache, tmp_path):
    from clip import hub

    elsewhere = hf_folder(tmp_path / "elsewhere")  # a valid model outside the cache, which must not be read
    snap = hub_snapshot(hub_cache, "tanganke/x", {"config.json": json.dumps(VISION_CFG)})
    (snap / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a link to .*elsewhere.*outside .*models--"
                                              r"tanganke--x.*fetch it again") as err:
        hub.fetch_model("tanganke/x")
    one_line(err)
    # a whole snapshot folder that is a link to another place
    repo = hub_cache / "models--tanganke--y"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("a" * 40)).symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"snapshots.* is a link to .*elsewhere.*outside") as err:
        hub.fetch_model("tanganke/y")
    one_line(err)
    # a sharded snapshot whose shard is a link outside
    snap = hub_snapshot(hub_cache, "tanganke/z", {"config.json": json.dumps(VISION_CFG),
                                                  "model.safetensors.index.json": json.dumps(
                                                      {"weight_map": {"w": "model-1.safetensors"}})})
    (snap / "model-1.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model-1\.safetensors is a link to .*outside"):
        hub.fetch_model("tanganke/z")
    # the ordinary layout (files linked to blobs of their repository) is read
    ok = hub_snapshot(hub_cache, "tanganke/ok", {"config.json": json.dumps(VISION_CFG), "model.safetensors": weights()})
    assert hub.fetch_model("tanganke/ok") == ok
    assert "model.visual.ln_post.weight" in clip.load_state_dict(ok)


@pytest.mark.parametrize("ref", ["../../..", "ABSOLUTE", "../../../../elsewhere"])
def test_hub_refs_that_leave_the_snapshots_folder_are_refused(hub_cache, tmp_path, ref):
    from clip import hub

    elsewhere = hf_folder(tmp_path / "elsewhere")
    hf_folder(tmp_path / "home")  # what "../../.." reaches: a valid model outside the cache
    snap = hub_snapshot(hub_cache, "tanganke/x", {"config.json": json.dumps(VISION_CFG), "model.safetensors": weights()})
    ref = str(elsewhere) if ref == "ABSOLUTE" else ref
    (snap.parent.parent / "refs" / "main").write_text(ref)
    with pytest.raises(CheckpointError, match=r"refs/main holds .*, not a revision .*delete it and fetch") as err:
        hub.fetch_model("tanganke/x")
    one_line(err)
