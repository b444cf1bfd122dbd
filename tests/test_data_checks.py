"""Nothing cached is trusted without its key, nothing read is trusted without a check: zero-shot heads keyed by
the text tower and prompts that built them, finite heads, FusionBench's centre crop under its convention, and
ambiguous split folders refused before any work. (Hub data checks: tests/test_hub.py.)"""
import os
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import main
import src.heads
from src import runs
from src.args import build_parser
from src.datasets import conventions
from src.datasets import templates as T
from src.datasets.registry import get_dataset
from src.heads import build_zeroshot_head, get_classification_head, load_head, load_heads, save_head
from src.modeling import ClassificationHead
from tests.conftest import MAIN_FLAGS
from tests.test_heads import reference_weights, tiny_clip


# ----------------------------------------------------------------------------- 1. heads keyed by their text tower
def hf_layout(tmp_path, zeroshot):
    """The CheckpointSet fields load_heads reads, as clip.hub.hub_checkpoints gives them for --source hf."""
    root = tmp_path / "checkpoints" / "ViT-B-32" / "hf"
    return SimpleNamespace(layout="hf", root=root, zeroshot=zeroshot, heads={"MNIST": root / "head_MNIST.pt"})


@pytest.fixture
def two_towers(monkeypatch):
    """Two zero-shot models with different text towers, standing for two hub zero-shot folders."""
    towers = {"zs-a": tiny_clip(0), "zs-b": tiny_clip(1)}
    monkeypatch.setattr(src.heads, "text_model_from_hf", lambda name, folder: towers[folder])
    monkeypatch.setattr(src.heads, "get_tokenizer", lambda name: open_clip.tokenize)
    return towers


def test_a_head_cached_from_one_zero_shot_model_is_not_reused_for_another(two_towers, tmp_path, capsys):
    """The head built from zero-shot model A under checkpoints/<model>/hf/ was read for zero-shot model B
    (MNIST 0 % instead of 25 %): it carried no key of the text tower that built it."""
    data = str(tmp_path / "data")
    a = load_heads("ViT-B-32", hf_layout(tmp_path, "zs-a"), ["MNIST"], "fusionbench", data)["MNIST"]
    torch.testing.assert_close(a.weight, reference_weights(two_towers["zs-a"], T.DIGITS, T.TEMPLATES["MNIST"]))
    capsys.readouterr()
    b = load_heads("ViT-B-32", hf_layout(tmp_path, "zs-b"), ["MNIST"], "fusionbench", data)["MNIST"]
    torch.testing.assert_close(b.weight, reference_weights(two_towers["zs-b"], T.DIGITS, T.TEMPLATES["MNIST"]))
    assert "head_MNIST.pt: it was built from another text tower" in capsys.readouterr().out  # said, not silent
    again = load_heads("ViT-B-32", hf_layout(tmp_path, "zs-b"), ["MNIST"], "fusionbench", data)["MNIST"]
    assert torch.equal(again.weight, b.weight) and "rebuilding" not in capsys.readouterr().out  # key matches now


def test_an_unkeyed_cached_head_is_rebuilt_once_with_a_message(two_towers, tmp_path, capsys):
    """A head_<Task>.pt cached before heads were keyed is rebuilt once, saying so; a released head of the
    task_vectors layout is still trusted as released."""
    data, ckpts = str(tmp_path / "data"), hf_layout(tmp_path, "zs-a")
    old = ClassificationHead(normalize=True, weights=torch.randn(10, 16))
    save_head(old, ckpts.heads["MNIST"])  # the former cache format: no key
    head = load_heads("ViT-B-32", ckpts, ["MNIST"], "fusionbench", data)["MNIST"]
    out = capsys.readouterr().out
    assert "head_MNIST.pt: it carries no key of the text tower and class names it was built from" in out
    assert not torch.equal(head.weight, old.weight)
    load_heads("ViT-B-32", ckpts, ["MNIST"], "fusionbench", data)
    assert "rebuilding" not in capsys.readouterr().out  # once
    released = SimpleNamespace(layout="task_vectors", root=tmp_path / "tv", heads={"MNIST": tmp_path / "tv" / "r.pt"})
    save_head(old, released.heads["MNIST"])  # a release's head: no key, trusted as released
    assert torch.equal(load_heads("ViT-B-32", released, ["MNIST"], "task_vectors", data)["MNIST"].weight, old.weight)


def test_a_cached_head_is_rebuilt_when_its_class_names_change(tmp_path, capsys):
    """The key covers the prompts too: DTD's class names come from its folders."""
    model = tiny_clip()
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    def add_class(name):
        for split in ("train", "val"):  # task_vectors' DTD test split is the val folder
            os.makedirs(data / "dtd" / split / name)
            Image.new("RGB", (8, 8)).save(data / "dtd" / split / name / "0.png")

    add_class("banded")
    add_class("zigzagged")
    kwargs = dict(clip_model=model, tokenizer=open_clip.tokenize)
    assert get_classification_head("ViT-B-32", "DTD", ckpt, str(data), **kwargs).weight.shape[0] == 2
    add_class("striped")
    capsys.readouterr()
    assert get_classification_head("ViT-B-32", "DTD", ckpt, str(data), **kwargs).weight.shape[0] == 3
    assert "it was built from other class names or prompt templates" in capsys.readouterr().out
    key = src.heads.read_head_key(ckpt / "head_DTD.pt")
    assert key == src.heads.cache_key(model, "DTD", str(data)) and set(key) == {"text_tower", "definitions"}


def test_text_tower_key_covers_every_text_weight_and_no_visual_one():
    model = tiny_clip()
    key = src.heads.text_tower_key(model)
    assert src.heads.text_tower_key(tiny_clip()) == key  # content, not identity
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
    assert src.heads.text_tower_key(model) == key
    for name in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.bias",
                 "ln_final.weight", "text_projection", "logit_scale"):
        changed = tiny_clip()
        with torch.no_grad():
            changed.state_dict()[name].view(-1)[0] += 0.5
        assert src.heads.text_tower_key(changed) != key, name


# ----------------------------------------------------------------------------- 2. finite heads
def nan_tower():
    model = tiny_clip()
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    return model


def test_a_nan_text_tower_is_refused_when_a_head_is_built(tmp_path):
    """A NaN in the zero-shot text tower made every head NaN, and the run logged 8.33 % per task."""
    with pytest.raises(ValueError, match=r"^MNIST zero-shot head from ViT-B-32's text tower: the text tower gives "
                                         r"NaN/inf \(or zero\) embeddings for class '0'"):
        get_classification_head("ViT-B-32", "MNIST", tmp_path, str(tmp_path / "data"), clip_model=nan_tower(),
                                tokenizer=open_clip.tokenize)
    assert not (tmp_path / "head_MNIST.pt").exists()  # nothing cached
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(float("inf"))
    with pytest.raises(ValueError, match="logit_scale is inf, not finite"):
        build_zeroshot_head(model, open_clip.tokenize, ["a"], [lambda c: c])


def test_heads_with_nan_values_are_refused_when_read_saved_or_evaluated(tmp_path):
    from src.eval import evaluate_tasks

    bad = ClassificationHead(normalize=True, weights=torch.randn(3, 16))
    with torch.no_grad():
        bad.bias[1] = float("nan")  # the weight is checked by clip's reader, the bias was not
    torch.save({"weight": bad.weight.detach(), "bias": bad.bias.detach(), "normalize": True}, tmp_path / "h.pt")
    with pytest.raises(ValueError, match=r"h\.pt: the classification head's bias hold NaN/inf values"):
        load_head(tmp_path / "h.pt")
    with pytest.raises(ValueError, match="NaN/inf"):
        save_head(bad, tmp_path / "again.pt")
    encoder = torch.nn.Linear(4, 16)
    with pytest.raises(ValueError, match=r"^MNIST: the classification head's bias hold NaN/inf values, so nothing "
                                         "was evaluated"):  # before any data is read: there are none here
        evaluate_tasks(encoder, ["MNIST"], {"MNIST": bad}, None, str(tmp_path / "no-data"), device="cpu")


# ----------------------------------------------------------------------------- 4. FusionBench's centre crop
def photo(width=640, height=427):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_fusionbench_convention_crops_as_clip_image_processor():
    """transformers' image_transforms.center_crop (FusionBench's CLIPImageProcessor) takes the offset
    (L - 224) // 2; torchvision's CenterCrop int(round((L - 224) / 2)). A 640 x 427 image resizes to 335 x 224:
    offset 55 (floor) against 56 (torchvision)."""
    from torchvision.transforms import Normalize, Resize, ToTensor

    from clip.factory import get_preprocess

    _, val = get_preprocess("ViT-B-32")
    fusionbench = conventions.preprocess_for(val, "fusionbench")
    assert conventions.preprocess_for(val, "task_vectors") is val and conventions.preprocess_for(val, "tsv") is val
    resized = Resize(224, interpolation=Image.BICUBIC)(photo())
    assert resized.size == (335, 224)
    norm = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    floor, rounded = (norm(ToTensor()(resized.crop((left, 0, left + 224, 224)))) for left in (55, 56))
    assert torch.equal(fusionbench(photo()), floor)
    assert torch.equal(val(photo()), rounded) and not torch.equal(fusionbench(photo()), val(photo()))
    lengths = range(224, 700)
    assert sum((n - 224) // 2 != int(round((n - 224) / 2.0)) for n in lengths) == 119 and len(lengths) == 476
    small = conventions.FloorCenterCrop(224)(Image.new("RGB", (220, 221), (255, 255, 255)))
    assert small.size == (224, 224) and np.asarray(small)[:2].max() == 0  # padded as transformers pads


def test_fusionbench_crop_matches_transformers_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    from clip.factory import get_preprocess

    try:  # transformers 5: the PIL backend; 4.x: the (slow) CLIPImageProcessor, both numpy's floor crop
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    reference = Processor()(images=photo(), return_tensors="pt")["pixel_values"][0]
    ours = conventions.preprocess_for(get_preprocess("ViT-B-32")[1], "fusionbench")(photo())
    assert (reference - ours).abs().max() < 1e-5
    assert (reference - get_preprocess("ViT-B-32")[1](photo())).abs().max() > 0.1  # torchvision's crop is not


def test_the_crop_is_applied_in_evaluation_and_recorded_in_the_provenance(tmp_path, monkeypatch):
    from clip.factory import get_preprocess
    from src.eval import describe_tasks, evaluate_tasks
    from src.input_cache import split_transform

    for name in ("banded", "zigzagged"):
        for split in ("train", "val"):
            os.makedirs(tmp_path / "dtd" / split / name)
            photo().save(tmp_path / "dtd" / split / name / "0.png")  # 640 x 427
    val = get_preprocess("ViT-B-32")[1]
    fb = get_dataset("DTD", val, str(tmp_path), num_workers=0, convention="fusionbench")
    tv = get_dataset("DTD", val, str(tmp_path), num_workers=0, convention="task_vectors")
    assert fb.provenance["crop"] == "floor" and "crop" not in tv.provenance  # task_vectors/tsv: as before
    assert torch.equal(fb.dataset[0][0], conventions.preprocess_for(val, "fusionbench")(photo()))
    assert not torch.equal(fb.dataset[0][0], tv.dataset[0][0])  # crop offsets 55 and 56
    assert describe_tasks(["DTD"], str(tmp_path), convention="fusionbench")["DTD"] == fb.provenance
    assert "FloorCenterCrop" in split_transform(conventions.preprocess_for(val, "fusionbench")).description
    seen = []

    def spy(task, preprocess, *args, **kwargs):
        seen.append(preprocess)
        raise StopIteration

    monkeypatch.setattr("src.eval.get_dataset", spy)
    for convention in ("fusionbench", "task_vectors"):
        with pytest.raises(StopIteration):
            evaluate_tasks(torch.nn.Identity(), ["DTD"], {}, val, str(tmp_path), device="cpu", convention=convention)
    assert "FloorCenterCrop" in repr(seen[0]) and seen[1] is val


# ----------------------------------------------------------------------------- 5. ambiguous split folders
def ambiguous_dtd(root):
    for split in ("train", "val", "test"):
        for name in ("banded", "zigzagged"):
            os.makedirs(root / "dtd" / split / name)
            Image.new("RGB", (8, 8), (len(split), 0, 0)).save(root / "dtd" / split / name / f"{split}.png")
    return root


def test_plan_refuses_ambiguous_split_folders_before_anything_is_loaded(tmp_path):
    data = ambiguous_dtd(tmp_path / "data")
    args = build_parser().parse_args(["--model", "ViT-B-32", "--tasks", "MNIST", "--eval-datasets", "DTD",
                                      "--base_dir", str(tmp_path), "--data-location", str(data)])
    with pytest.raises(ValueError, match=r"^DTD: both .*dtd/val \(the test split of task_vectors\) and .*dtd/test "
                                         r"\(the test split of the official SVC code\) exist and hold different files"
                                         r".*pick one with --split-folder DTD=val or --split-folder DTD=test$"):
        runs.plan(args)  # before the checkpoints are even looked for (there are none here)
    for folder in ("val", "valid"):
        os.makedirs(data / "EuroSAT_splits" / folder / "Forest")
        Image.new("RGB", (8, 8)).save(data / "EuroSAT_splits" / folder / "Forest" / f"{folder}.png")
    tuned = build_parser().parse_args(["--model", "ViT-B-32", "--tasks", "EuroSAT", "--merge", "TA",
                                       "--scaling_coef", "auto", "--split-folder", "DTD=test",
                                       "--base_dir", str(tmp_path), "--data-location", str(data)])
    with pytest.raises(ValueError, match=r"^EuroSAT: both .*EuroSAT_splits/val .* pick one with --split-folder "
                                         r"EuroSAT=val or --split-folder EuroSAT=valid$"):
        runs.plan(tuned)  # EuroSATVal reads the val folder


def test_ambiguous_split_folders_stop_main_before_heads_are_built(workdir, monkeypatch):
    """The missing DTD head was built first (which needs the OpenAI weights), and only then was the run refused."""
    data = ambiguous_dtd(workdir / "dtd-data")
    loaded = []
    monkeypatch.setattr(src.heads, "create_model", lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded"))
    common = ["--model", "demo-micro", "--base_dir", str(workdir), "--logs", str(workdir / "logs"), *MAIN_FLAGS,
              "--merge", "zeroshot", "--eval-datasets", "DTD", "--data-location", str(data)]
    with pytest.raises(SystemExit, match="error: DTD: both .* pick one with --split-folder DTD=val or"):
        main.main(common)
    assert loaded == []
    picked = runs.plan(build_parser().parse_args(common[:-4] + ["--eval-datasets", "DTD", "--data-location",
                                                                str(data), "--split-folder", "DTD=test"]))
    assert picked.datasets == ["DTD"]  # a pick settles it, as in the builders
