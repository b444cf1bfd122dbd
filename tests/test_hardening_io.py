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


# ----------------------------------------------------------------------------- 4: malformed files, one line each
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny Hugging Face CLIPModel folder (demo-micro sizes: text_model_from_hf builds demo-micro from it)."""
    transformers = pytest.importorskip("transformers")
    from tests.test_hub import demo_micro_clip_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip_hf")
    transformers.CLIPModel(demo_micro_clip_config()).eval().save_pretrained(folder)
    return folder


def copy_folder(src: Path, dst: Path, change=None, name: str = "model.safetensors") -> Path:
    """``src`` copied to ``dst`` with its tensors passed through ``change(dict) -> dict``."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors = change(tensors) if change else tensors
    if name.endswith(".bin"):
        torch.save(tensors, dst / name)
    else:
        save_file(tensors, dst / name, metadata={"format": "pt"})
    return dst


def with_gap(path: Path, gap: int = 8) -> None:
    """Rewrite a safetensors file with ``gap`` unused bytes before its first tensor (offsets shifted)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for key, h in header.items():
        if key != "__metadata__":
            h["data_offsets"] = [o + gap for o in h["data_offsets"]]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * gap + raw[8 + n:])


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_qkv_projections_of_different_widths_are_one_line(clip_folder, tmp_path, tower):
    from clip import hub

    key = f"{tower}_model.encoder.layers.0.self_attn.k_proj.weight"
    folder = copy_folder(clip_folder, tmp_path / "narrow", lambda t: {**t, key: t[key][:, :16].contiguous()})
    pattern = r"model\.safetensors: .*layers\.0\.self_attn\.[qkv]_proj\.weight .*shapes .*malformed"
    with pytest.raises(CheckpointError, match=pattern) as err:
        hub.text_model_from_hf("demo-micro", folder)
    one_line(err)
    if tower == "vision":  # the image encoder alone does not read the text transformer
        with pytest.raises(CheckpointError, match=pattern):
            clip.load_state_dict(folder)  # refused when opened, not as a read error later


def test_safetensors_with_a_gap_or_trailing_bytes_is_one_line(clip_folder, tmp_path):
    from clip import hub

    folder = copy_folder(clip_folder, tmp_path / "gap")
    with_gap(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*gap of 8 bytes before tensor") as err:
        hub.text_model_from_hf("demo-micro", folder)
    one_line(err)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*gap of 8 bytes"):
        clip.load_state_dict(folder)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(weights() + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"trailing\.safetensors: .*8 bytes after the last tensor"):
        clip.load_state_dict(trailing)


def test_pytorch_bin_with_a_numpy_scalar_is_read_once_through_the_safe_loader(clip_folder, tmp_path, monkeypatch):
    import numpy as np

    from clip import hub

    folder = copy_folder(clip_folder, tmp_path / "bin", lambda t: {**t, "step": np.float64(3.0)},
                         name="pytorch_model.bin")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called: checkpoints are read by clip's allow-listed unpickler only")

    monkeypatch.setattr(torch, "load", no_torch_load)
    from_bin = hub.text_model_from_hf("demo-micro", folder)
    from_st = hub.text_model_from_hf("demo-micro", clip_folder)
    assert from_bin is not None
    for (k, a), (_, b) in zip(from_bin.state_dict().items(), from_st.state_dict().items()):
        assert torch.equal(a, b), k


def test_hub_index_pointing_outside_the_folder_says_so(hub_cache):
    from clip import hub

    for repo in ("tanganke/x", "openai/x"):
        hub_snapshot(hub_cache, repo, {"config.json": json.dumps(VISION_CFG), "model.safetensors.index.json":
                                       json.dumps({"weight_map": {"w": "../other/model.safetensors"}})})
    with pytest.raises(CheckpointError, match=r"index\.json: shard '\.\./other/model\.safetensors' lies outside the "
                                              r"folder") as err:
        hub.fetch_model("tanganke/x")
    assert "lacks config.json or its weights" not in one_line(err)
    with pytest.raises(CheckpointError, match=r"index\.json: shard .* lies outside") as err:
        hub.hub_checkpoints("x", ["MNIST"], hub_cache.parent)
    assert "missing" not in str(err.value)


# ----------------------------------------------------------------------------- 5: each config parsed once
@pytest.mark.filterwarnings("ignore:.*identical to the zero-shot")
def test_each_config_is_parsed_once_per_version(clip_folder, tmp_path, monkeypatch):
    """A large config.json (under the cap) costs one parse, not one per open: opening the zero-shot folder, its
    text tower for heads, the fine-tune filled from it and the checks all reuse it until the file changes."""
    from clip import hub
    from clip.layout import CheckpointSet

    zs = copy_folder(clip_folder, tmp_path / "zs")
    config = json.loads((zs / "config.json").read_text())
    (zs / "config.json").write_text(json.dumps({**config, "padding": ["zs"] * 1000}))
    ft = copy_folder(clip_folder, tmp_path / "ft")
    (ft / "config.json").write_text(json.dumps({**config, "padding": ["ft"] * 1000}))
    parses = []
    loads = json.loads

    def counting(text, *args, **kwargs):
        text_ = text.decode() if isinstance(text, (bytes, bytearray)) else text
        for who in ("zs", "ft"):
            if f'"padding": ["{who}"' in text_:
                parses.append(who)
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    ckpts = CheckpointSet("hf", tmp_path, zs, {"MNIST": ft}, {})
    clip.load_state_dict(zs)
    assert hub.text_model_from_hf("demo-micro", zs) is not None
    ckpts.check()
    ckpts.load_finetuned("MNIST")
    clip.load_state_dict(ft)
    assert sorted(parses) == ["ft", "zs"], parses
    # a changed file is parsed again
    (ft / "config.json").write_text(json.dumps({**config, "padding": ["ft"] * 1001}))
    clip.load_state_dict(ft)
    assert sorted(parses) == ["ft", "ft", "zs"], parses


# ----------------------------------------------------------------------------- 6: caches key on content
def test_replacing_a_finetune_in_place_changes_the_fingerprint(tmp_path):
    from clip.layout import CheckpointSet, content_identity

    zs, mnist, eurosat = (hf_folder(tmp_path / n) for n in ("zs", "mnist", "eurosat"))
    ckpts = CheckpointSet("hf", tmp_path, zs, {"MNIST": mnist, "EuroSAT": eurosat}, {})
    before, identity = ckpts.fingerprint(), content_identity(mnist)
    assert ckpts.fingerprint() == before and content_identity(mnist) == identity  # nothing touched: the same
    os.utime(mnist)  # the folder's own times do not matter
    assert ckpts.fingerprint() == before
    weights_file = mnist / "model.safetensors"
    st = os.stat(weights_file)
    with open(weights_file, "wb") as f:  # in place, as cp does: same name, same size, the folder untouched
        f.write(weights(2.0))
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time
    assert os.stat(weights_file).st_size == st.st_size
    assert content_identity(mnist) != identity and ckpts.fingerprint() != before
    changed = ckpts.fingerprint()
    (mnist / "config.json").write_text(json.dumps({**VISION_CFG, "note": 1}))  # a config is content too
    assert ckpts.fingerprint() != changed
    assert content_identity(zs) != content_identity(mnist)


def test_file_checkpoints_and_released_heads_are_in_the_fingerprint(tmp_path):
    from clip.layout import CheckpointSet
    from src.heads import save_head
    from src.modeling import ClassificationHead

    zs, ft = tmp_path / "zeroshot.pt", tmp_path / "MNIST" / "finetuned.pt"
    ft.parent.mkdir()
    torch.save({"model.w": torch.ones(4)}, zs)
    torch.save({"model.w": torch.full((4,), 2.0)}, ft)
    head = tmp_path / "head_MNIST.pt"
    ckpts = CheckpointSet("task_vectors", tmp_path, zs, {"MNIST": ft}, {"MNIST": head})
    missing_head = ckpts.fingerprint()
    save_head(ClassificationHead(True, torch.ones(3, 4), torch.zeros(3)), head)  # what main.py builds and caches
    assert ckpts.fingerprint() == missing_head  # a head built from the zero-shot is not another input
    torch.save(ClassificationHead(True, torch.ones(3, 4), torch.zeros(3)), head)  # a released head (pickled module)
    released = ckpts.fingerprint()
    assert released != missing_head
    torch.save(ClassificationHead(True, torch.full((3, 4), 3.0), torch.zeros(3)), head)
    assert ckpts.fingerprint() != released
    before = ckpts.fingerprint()
    torch.save({"model.w": torch.full((4,), 5.0)}, ft)  # the same name and size, other weights
    assert ckpts.fingerprint() != before


def test_hub_snapshot_identity_is_its_blob_hashes(hub_cache):
    from clip.layout import content_identity

    files = {"config.json": json.dumps(VISION_CFG), "model.safetensors": weights()}
    snap = hub_snapshot(hub_cache, "tanganke/x", files)
    identity = content_identity(snap)
    for f in snap.iterdir():
        os.utime(f.resolve())  # a touched blob is the same content
    assert content_identity(snap) == identity
    other = hub_snapshot(hub_cache, "tanganke/x", {**files, "model.safetensors": weights(2.0)}, rev="b" * 40)
    assert content_identity(other) != identity
