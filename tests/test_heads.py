"""Zero-shot heads from a tiny randomly initialised open_clip CLIP (real architecture, real tokenizer)."""
import os
from types import SimpleNamespace

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from src.datasets import templates as T
from src.heads import build_zeroshot_head, get_classification_head, head_path, save_head


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=16,
                 vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=4, image_size=8),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp(2) != exp(init), so the test sees the scale actually applied
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


def reference_weights(model, classnames, templates):
    """All prompts in one batch, then the per-class reduction: an independent route to the same numbers."""
    texts = [t(c) for c in classnames for t in templates]
    with torch.no_grad():
        emb = model.encode_text(open_clip.tokenize(texts))
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return emb / emb.norm(dim=-1, keepdim=True) * torch.exp(torch.tensor(2.0))


def test_build_matches_reference(model):
    names, templates = ["annual crop land", "forest", "river"], T.TEMPLATES["EuroSAT"]
    head = build_zeroshot_head(model, open_clip.tokenize, names, templates)
    assert head.normalize and head.weight.shape == (3, 16) and torch.count_nonzero(head.bias) == 0
    torch.testing.assert_close(head.weight, reference_weights(model, names, templates), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((3,), torch.exp(torch.tensor(2.0)).item()))


def test_head_picks_matching_text(model):
    names = ["cat", "dog", "car", "house"]
    head = build_zeroshot_head(model, open_clip.tokenize, names, [lambda c: f"a photo of a {c}."])
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize([f"a photo of a {c}." for c in names]))
        logits = head(5.0 * text)  # the head normalises its input, so the scale must not matter
    assert logits.argmax(dim=1).tolist() == [0, 1, 2, 3]


def test_fer2013_list_classnames_as_tsv(model):
    assert T.TEMPLATES["FER2013"][0](["happy", "smiling"]) == "a photo of a ['happy', 'smiling'] looking face."
    head = build_zeroshot_head(model, open_clip.tokenize, T.FER2013, T.TEMPLATES["FER2013"])
    assert head.weight.shape == (7, 16)


def test_build_rejects_bad_input(model):
    with pytest.raises(ValueError, match="text tower"):
        build_zeroshot_head(torch.nn.Linear(2, 2), open_clip.tokenize, ["a"], [lambda c: c])
    with pytest.raises(ValueError, match="at least one"):
        build_zeroshot_head(model, open_clip.tokenize, [], [lambda c: c])


def test_get_head_builds_caches_and_loads(model, tmp_path):
    ckpt = tmp_path / "checkpoints" / "ViT-B-32"
    with pytest.raises(FileNotFoundError, match="head_MNIST.pt not found"):
        get_classification_head("ViT-B-32", "MNIST", ckpt, str(tmp_path / "data"))
    built = get_classification_head("ViT-B-32", "MNIST", ckpt, str(tmp_path / "data"), clip_model=model,
                                    tokenizer=open_clip.tokenize)  # no data: registered class names
    assert head_path(ckpt, "MNIST").is_file() and built.weight.shape == (10, 16)
    torch.testing.assert_close(built.weight, reference_weights(model, T.DIGITS, T.TEMPLATES["MNIST"]))
    stamp = head_path(ckpt, "MNIST").stat().st_mtime_ns
    loaded = get_classification_head("ViT-B-32", "MNIST", ckpt, str(tmp_path / "data"), clip_model=model)  # cached
    assert torch.equal(loaded.weight, built.weight) and loaded.normalize
    assert head_path(ckpt, "MNIST").stat().st_mtime_ns == stamp  # read, not rebuilt: its key matches
    with pytest.raises(ValueError, match="head_MNIST.pt: which text tower built this cached head cannot be checked"):
        get_classification_head("ViT-B-32", "MNIST", ckpt, str(tmp_path / "data"))  # no text tower: no trust


def test_get_head_uses_class_names_from_data(model, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("banded", "zigzagged"):
            os.makedirs(data / "dtd" / split / name)
            for i in range(5):
                Image.new("RGB", (8, 8)).save(data / "dtd" / split / name / f"{i}.png")
    head = get_classification_head("ViT-B-32", "DTD", tmp_path / "ckpt", str(data), clip_model=model,
                                   tokenizer=open_clip.tokenize)
    assert head.weight.shape == (2, 16)  # the 2 folders, not the 47 registered DTD classes
    torch.testing.assert_close(head.weight, reference_weights(model, ["banded", "zigzagged"], T.TEMPLATES["DTD"]))


def test_heads_are_cached_per_convention(model, tmp_path):
    ckpt, data = tmp_path / "ckpt", str(tmp_path / "data")
    assert head_path(ckpt, "MNIST", "fusionbench") == ckpt / "head_MNIST.pt"  # same names and templates
    assert head_path(ckpt, "STL10", "tsv") == ckpt / "head_STL10_tsv.pt"  # TSV: the 18 CIFAR templates
    kwargs = dict(clip_model=model, tokenizer=open_clip.tokenize)
    letters = get_classification_head("ViT-B-32", "EMNIST", ckpt, data, convention="fusionbench", **kwargs)
    digits = get_classification_head("ViT-B-32", "EMNIST", ckpt, data, convention="tsv", **kwargs)
    assert letters.weight.shape == (26, 16) and digits.weight.shape == (10, 16)  # no head read for the other
    assert (ckpt / "head_EMNIST_fusionbench.pt").is_file() and (ckpt / "head_EMNIST.pt").is_file()
    torch.testing.assert_close(letters.weight, reference_weights(model, T.FB_EMNIST_LETTERS, T.FB_EMNIST_TEMPLATES))
    again = get_classification_head("ViT-B-32", "EMNIST", ckpt, data, convention="fusionbench", **kwargs)  # cached
    assert torch.equal(again.weight, letters.weight)
    stl = get_classification_head("ViT-B-32", "STL10", ckpt, data, convention="tsv", **kwargs)
    torch.testing.assert_close(stl.weight, reference_weights(model, T.STL10, T.CIFAR_TEMPLATES))


def test_released_heads_are_read_only_under_their_convention(model, tmp_path, monkeypatch):
    """A TSV release's head_STL10Val.pt (CIFAR templates) is not the task_vectors STL10 head, and an old
    head_EMNIST.pt (digits) is never the fusionbench letters head. Heads cached here are read with their key."""
    import src.heads
    from src.heads import cache_key, load_heads

    monkeypatch.setattr(src.heads, "create_model", lambda name, pretrained=None: model)  # the text tower, offline
    monkeypatch.setattr(src.heads, "text_model_from_hf", lambda name, folder: model)
    data = str(tmp_path / "data")

    def save(name, rows, task=None, convention=None):
        head = build_zeroshot_head(model, open_clip.tokenize, [f"c{i}" for i in range(rows)], [lambda c: c])
        save_head(head, tmp_path / name, cache_key(model, task, data, convention) if task else None)

    save("head_STL10Val.pt", 3)  # the TSV release
    save("head_STL10.pt", 4, "STL10", "task_vectors")  # built earlier under task_vectors
    save("head_EMNIST.pt", 10, "EMNIST", "tsv")
    save("head_EMNIST_fusionbench.pt", 26, "EMNIST", "fusionbench")
    tsv = SimpleNamespace(layout="tsv", root=tmp_path, heads={"STL10": tmp_path / "head_STL10Val.pt"})
    assert load_heads("ViT-B-32", tsv, ["STL10Val"], "tsv", data)["STL10"].weight.shape[0] == 3
    assert load_heads("ViT-B-32", tsv, ["STL10"], "task_vectors", data)["STL10"].weight.shape[0] == 4
    hf = SimpleNamespace(layout="hf", root=tmp_path, zeroshot=tmp_path, heads={"EMNIST": tmp_path / "head_EMNIST.pt"})
    assert load_heads("ViT-B-32", hf, ["EMNIST"], "fusionbench", data)["EMNIST"].weight.shape[0] == 26
    assert load_heads("ViT-B-32", hf, ["EMNIST"], "tsv", data)["EMNIST"].weight.shape[0] == 10
