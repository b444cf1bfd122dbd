"""clip.checkpoint: every format written here by the tests themselves, read lazily and safely."""
import json
import struct
import sys
import warnings
import zipfile

import open_clip
import pytest
import torch
import torchvision.transforms as T
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from torch import nn

import clip
from clip.checkpoint import CheckpointError, to_keys
from src.heads import load_head, save_head
from src.modeling import ClassificationHead, ImageClassifier, ImageEncoder, build_image_encoder

EXECUTED = []  # set by the legacy classes if anything ever runs their code at load time


def tiny_clip(width: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=width, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
        quick_gelu=True)


def expected_keys(model: nn.Module) -> dict:
    """What load_state_dict must return: the task_vectors ImageEncoder state dict."""
    return {"model." + k: v for k, v in model.state_dict().items() if not k.startswith("transformer.")}


# Throwaway classes that pickle under the names the task_vectors release used.
class LegacyVisualTransformer(open_clip.transformer.VisionTransformer):
    __module__, __qualname__ = "open_clip.model", "VisualTransformer"

    def __setstate__(self, state):
        EXECUTED.append("VisualTransformer.__setstate__")
        super().__setstate__(state)


class LegacyImageEncoder(nn.Module):
    __module__, __qualname__ = "src.modeling", "ImageEncoder"

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train_preprocess = T.Compose([T.RandomResizedCrop(32, scale=(0.9, 1.0),
                                                               interpolation=T.InterpolationMode.BICUBIC),
                                           T.ToTensor()])
        self.val_preprocess = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
                                         T.CenterCrop(32), T.ToTensor()])
        self.cache_dir = None

    def __setstate__(self, state):
        EXECUTED.append("ImageEncoder.__setstate__")
        super().__setstate__(state)


class LegacyHead(nn.Linear):
    __module__, __qualname__ = "src.modeling", "ClassificationHead"

    def __init__(self, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = True
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros(weights.shape[0]))


def save_legacy(obj, path) -> None:
    """torch.save ``obj`` while the legacy names resolve (pickle checks them); afterwards they are
    gone again, as with a current open_clip."""
    import src.modeling
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(open_clip.model, "VisualTransformer", LegacyVisualTransformer, raising=False)
        mp.setattr(src.modeling, "ImageEncoder", LegacyImageEncoder)
        mp.setattr(src.modeling, "ClassificationHead", LegacyHead)
        torch.save(obj, path)
    assert not hasattr(open_clip.model, "VisualTransformer")


def save_legacy_encoder(path, model: nn.Module) -> None:
    model.visual.__class__ = LegacyVisualTransformer
    del model.transformer  # task_vectors' ImageEncoder(keep_lang=False) deletes the text transformer
    save_legacy(LegacyImageEncoder(model), path)


def test_legacy_pickled_image_encoder(tmp_path):
    model = tiny_clip()
    want = expected_keys(model)
    save_legacy_encoder(tmp_path / "zeroshot.pt", model)
    raw = (tmp_path / "zeroshot.pt").read_bytes()
    assert b"open_clip.model" in raw and b"VisualTransformer" in raw and b"src.modeling" in raw

    sd = clip.load_state_dict(tmp_path / "zeroshot.pt")
    assert list(sd) == list(want)  # same keys, same order as module.state_dict()
    for k, v in want.items():
        assert sd.info(k) == (v.shape, v.dtype)
        assert torch.equal(sd[k], v), k
    assert "model.transformer.resblocks.0.attn.in_proj_weight" not in sd
    assert "model.attn_mask" not in sd  # non-persistent buffer
    assert EXECUTED == []


def test_legacy_classification_head(tmp_path):
    w = torch.randn(5, 32)
    save_legacy(LegacyHead(w), tmp_path / "head_MNIST.pt")
    head = load_head(tmp_path / "head_MNIST.pt")
    assert isinstance(head, ClassificationHead) and head.normalize
    assert torch.equal(head.weight, w) and torch.equal(head.bias, torch.zeros(5))
    # save_head / load_head round trip
    save_head(head, tmp_path / "head_copy.pt")
    again = load_head(tmp_path / "head_copy.pt")
    assert torch.equal(again.weight, w) and again.normalize
    with pytest.raises(CheckpointError, match="classification head"):
        clip.load_state_dict(tmp_path / "head_MNIST.pt")


def test_plain_state_dict_without_prefix_and_model_name(tmp_path):
    """The TSV <Task>Val/nonlinear_*.pt files: state dicts, maybe unprefixed, with 'model_name'."""
    model = tiny_clip()
    want = expected_keys(model)
    plain = {k[len("model."):]: v for k, v in want.items()}
    torch.save({"model_name": "ViT-B-32", **plain}, tmp_path / "nonlinear_finetuned.pt")
    sd = clip.load_state_dict(tmp_path / "nonlinear_finetuned.pt")
    assert set(sd) == set(want)
    assert all(torch.equal(sd[k], want[k]) for k in want)
    # with the prefix and the text transformer present (a full open_clip model): transformer dropped
    torch.save({"model." + k: v for k, v in model.state_dict().items()}, tmp_path / "full.pt")
    assert set(clip.load_state_dict(tmp_path / "full.pt")) == set(want)


def test_non_contiguous_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"model.a": base.t(), "model.b": base[1:3, 2:5], "model.c": base}, tmp_path / "views.pt")
    sd = clip.load_state_dict(tmp_path / "views.pt")
    assert torch.equal(sd["model.a"], base.t()) and torch.equal(sd["model.b"], base[1:3, 2:5])
    assert torch.equal(sd["model.c"], base)


def test_safetensors_and_dtypes(tmp_path):
    want = {"model.x": torch.randn(3, 4), "model.h": torch.randn(5).half(), "model.i": torch.arange(3)}
    save_file(want, tmp_path / "m.safetensors")
    sd = clip.load_state_dict(tmp_path / "m.safetensors")
    assert sd.info("model.h") == (torch.Size([5]), torch.float16)
    assert all(torch.equal(sd[k], v) for k, v in want.items())


def test_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    torch.save({"model.a": torch.ones(1000), "model.b": torch.zeros(10)}, tmp_path / "two.pt")
    sd = clip.load_state_dict(tmp_path / "two.pt")
    import clip.checkpoint as ck
    sizes = []
    real = ck._File.read_into
    monkeypatch.setattr(ck._File, "read_into", lambda self, buf, off: (sizes.append(len(buf)), real(self, buf, off)))
    assert len(sd) == 2 and sizes == []  # opening reads no tensor data
    sd["model.b"]
    assert sizes == [40]


# ----------------------------------------------------------------------------- bad input
def _zip_with_pickle(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def test_malicious_reduce_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    _zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(CheckpointError, match=r"os\.system") as err:
        clip.load_state_dict(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value)
    assert not marker.exists()


class Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_disallowed_function_via_torch_save(tmp_path, capsys):
    torch.save({"model.w": torch.ones(2), "x": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match=r"builtins\.print"):
        clip.load_state_dict(tmp_path / "evil2.pt")
    assert "executed!" not in capsys.readouterr().out


def test_unknown_function_called_is_refused(tmp_path):
    payload = b"\x80\x02cmypkg.util\nrun_me\n)R."
    _zip_with_pickle(tmp_path / "f.pt", payload)
    with pytest.raises(CheckpointError, match=r"mypkg\.util\.run_me.*not on the allow-list"):
        clip.load_state_dict(tmp_path / "f.pt")
    assert "mypkg" not in sys.modules


def test_truncated_and_corrupted_files(tmp_path):
    torch.save({"model.w": torch.randn(256, 256)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt.*(truncated|corrupted)"):
        clip.load_state_dict(tmp_path / "trunc.pt")
    bad = bytearray(data)
    i = bad.index(b"_rebuild")
    bad[i: i + 8] = b"XXXXXXXX"  # corrupt data.pkl (CRC no longer matches)
    (tmp_path / "crc.pt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"crc\.pt.*corrupted"):
        clip.load_state_dict(tmp_path / "crc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        clip.load_state_dict(tmp_path / "empty.pt")
    save_file({"model.w": torch.randn(64, 64)}, tmp_path / "ok.safetensors")
    st = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(st[:-100])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors.*truncated"):
        clip.load_state_dict(tmp_path / "trunc.safetensors")


def test_missing_file_explains_layout(tmp_path):
    with pytest.raises(CheckpointError) as err:
        clip.load_state_dict(tmp_path / "nope" / "zeroshot.pt")
    msg = str(err.value)
    assert "nope/zeroshot.pt" in msg and "task_vectors" in msg and "tall_masks" in msg


def test_nan_is_named(tmp_path):
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    torch.save({"model.good": torch.ones(3), "model.visual.bad": w}, tmp_path / "nan.pt")
    sd = clip.load_state_dict(tmp_path / "nan.pt")  # opening reads nothing
    assert torch.equal(sd["model.good"], torch.ones(3))
    with pytest.raises(CheckpointError, match=r"nan\.pt.*'model\.visual\.bad'.*NaN"):
        sd["model.visual.bad"]
    with pytest.raises(CheckpointError, match="model.visual.bad"):
        sd.validate()
    save_file({"model.inf": torch.tensor([1.0, float("inf")])}, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match="model.inf"):
        clip.load_state_dict(tmp_path / "inf.safetensors").validate()


def test_architecture_mismatch_names_key_and_shapes(tmp_path):
    a, b = to_keys(tiny_clip(64).state_dict()), to_keys(tiny_clip(32).state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatch.*'model\.visual\.[^']+': \(\d+.*\) vs \(\d+"):
        clip.check_compatible(a, b)
    b2 = dict(a)
    b2.pop("model.visual.proj")
    with pytest.raises(CheckpointError, match=r"only in first.*model\.visual\.proj"):
        clip.check_compatible(a, b2, name_a="first", name_b="second")
    clip.check_compatible(a, dict(a))  # same architecture: no error
    with pytest.raises(CheckpointError, match="ViT-B-32"):
        clip.check_architecture(a, "ViT-B-32")


def test_identical_finetuned_warns(tmp_path):
    sd = to_keys(tiny_clip().state_dict())
    save_file(sd, tmp_path / "zs.safetensors")
    save_file(sd, tmp_path / "ft.safetensors")
    zs, ft = clip.load_state_dict(tmp_path / "zs.safetensors"), clip.load_state_dict(tmp_path / "ft.safetensors")
    with pytest.warns(UserWarning, match="zero"):
        assert clip.warn_if_identical(zs, ft)
    other = dict(sd)
    other["model.visual.proj"] = other["model.visual.proj"] + 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not clip.warn_if_identical(zs, other)


# ----------------------------------------------------------------------------- models and saving
def test_modeling_head_and_classifier():
    model = tiny_clip()
    enc = ImageEncoder(model)
    assert not hasattr(enc.model, "transformer")
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    text = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    head = ClassificationHead(True, text * 100.0)
    logits = ImageClassifier(enc, head)(x)
    want = 100.0 * torch.nn.functional.normalize(feats, dim=-1) @ text.t()
    assert torch.allclose(logits, want, atol=1e-4) and torch.equal(head.bias, torch.zeros(4))


def test_build_image_encoder_vit_b_32():
    ref = clip.create_model("ViT-B-32")
    assert isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    sd = to_keys(ref.state_dict())
    assert len([k for k, v in sd.items() if v.is_floating_point()]) == 158
    enc = build_image_encoder("ViT-B-32", sd)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(enc(x), ref.encode_image(x))
    train_tf, val_tf = clip.get_preprocess("ViT-B-32")
    assert "CenterCrop" in repr(val_tf) and "bicubic" in repr(val_tf).lower()
    bad = dict(sd)
    bad["model.visual.proj"] = torch.zeros(768, 256)
    with pytest.raises(CheckpointError, match=r"model\.visual\.proj.*\(768, 256\).*\(768, 512\)"):
        build_image_encoder("ViT-B-32", bad)


def test_save_merged_round_trip(tmp_path):
    sd = to_keys(tiny_clip().state_dict())
    save_file(sd, tmp_path / "zs.safetensors")
    torch.save(sd, tmp_path / "ft.pt")
    merged = {k: v * 2 for k, v in sd.items()}
    side = clip.save_merged(tmp_path / "out" / "merged.safetensors", merged,
                            {"method": "TA", "options": {"scaling_coef": 0.3}, "alpha": 0.125, "tasks": ["MNIST"],
                             "sources": {"zeroshot": tmp_path / "zs.safetensors", "MNIST": tmp_path / "ft.pt"}})
    info = json.loads(side.read_text())
    assert info["method"] == "TA" and info["alpha"] == 0.125 and info["tasks"] == ["MNIST"]
    assert info["sources"][1]["name"] == "MNIST"
    assert info["sources"][1]["sha256"] == clip.sha256_of(tmp_path / "ft.pt")
    import hashlib
    assert info["sources"][0]["sha256"] == hashlib.sha256((tmp_path / "zs.safetensors").read_bytes()).hexdigest()
    back = clip.load_state_dict(tmp_path / "out" / "merged.safetensors")
    assert set(back) == set(merged) and all(torch.equal(back[k], merged[k]) for k in merged)
    assert json.loads(back.meta["merge_info"])["method"] == "TA"


def test_demo_names_are_delegated():
    demo = pytest.importorskip("src.demo.model", reason="src/demo/model.py (embedded benchmark) not in this checkout")
    name = demo.DEMO_MODELS[0]
    model = clip.create_model(name)
    sd = to_keys(model.state_dict())
    enc = build_image_encoder(name, sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), model.encode_image(x))
    assert set(clip.factory.expected_shapes(name)) == set(sd)
    with pytest.raises(ValueError, match="unknown model"):
        clip.create_model("ViT-X-99")


def test_text_tower_for_heads_uses_quick_gelu(monkeypatch, tmp_path):
    """src.heads.load_heads builds missing heads from the OpenAI text tower, with QuickGELU as the weights
    were trained (a plain open_clip.create_model(name, pretrained='openai') gives GELU). Nothing is
    downloaded: open_clip.create_model is replaced by one that records its arguments and builds
    the same architecture with pretrained=None on the meta device."""
    import types

    import src.heads

    real, calls = open_clip.create_model, []

    def fake_create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs.get("force_quick_gelu", False)))
        kwargs["device"] = "meta"
        with torch.device("meta"):
            return real(name, pretrained=None, **kwargs)

    built = {}
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr(src.heads, "get_classification_head",
                        lambda model_name, task, root, data, clip_model, convention, source:
                        built.setdefault(task, clip_model))
    src.heads.load_heads("ViT-B-32", types.SimpleNamespace(heads={}, root=tmp_path, layout="task_vectors"),
                         ["MNISTVal"], "task_vectors", str(tmp_path))
    assert calls == [("ViT-B-32", "openai", True)]
    text_model = built["MNIST"]
    assert isinstance(text_model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(text_model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    with pytest.raises(ValueError, match="only None or 'openai'"):
        clip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    demo = pytest.importorskip("src.demo.model", reason="src/demo/model.py (embedded benchmark) not in this checkout")
    with pytest.raises(ValueError, match="no pretrained weights"):
        clip.create_model(demo.DEMO_MODELS[0], pretrained="openai")
