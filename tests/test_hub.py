"""--source hf / --data-source hf on a fake hub cache (the real layout, tiny transformers models, parquet
datasets); nothing touches the network: the hub and datasets libraries run with offline mode on."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import utils
from clip.checkpoint import CheckpointError
from src.datasets.registry import DatasetNotFoundError, get_dataset, resolve_tasks
from src.heads import save_head
from src.modeling import ClassificationHead, build_image_encoder
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers", reason="the fake hub's models are written by transformers")
datasets = pytest.importorskip("datasets", reason="--data-source hf needs the optional datasets package")
huggingface_hub = pytest.importorskip("huggingface_hub", reason="--source hf needs huggingface_hub")
import huggingface_hub.constants  # noqa: E402

from clip import hub  # noqa: E402
from src.datasets import hf_sets  # noqa: E402

TASKS = ["MNIST", "EuroSAT"]
# the fake EuroSAT copy names its classes with EuroSAT's folder names (matched to ours by name)
EUROSAT_HUB_NAMES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                     "PermanentCrop", "Residential", "River", "SeaLake"]


def demo_micro_clip_config(text_act: str = "quick_gelu"):
    """A transformers CLIPConfig with the sizes of the `demo-micro` open_clip model."""
    from src.demo.model import get_demo_tokenizer

    vocab = get_demo_tokenizer("demo-micro").vocab_size
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                  image_size=32, hidden_act="quick_gelu")
    text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
                max_position_embeddings=16, hidden_act=text_act, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                pad_token_id=0)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def snapshot_dir(cache: Path, kind: str, repo_id: str) -> Path:
    """hub/<kind>s--<org>--<name>/snapshots/<rev>/ with refs/main holding <rev>, as huggingface_hub writes it."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    rev = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    folder = repo / "snapshots" / rev
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_split(path: Path, n: int, n_classes: int, seed: int, gray: bool, names: list[str] | None = None) -> None:
    """A parquet file in the hub's image format: {"image": {"bytes", "path"}, "label": ClassLabel} (named
    ``names``, else the placeholder names '0', '1', ... of a ClassLabel made from a class count)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    images = []
    for y in labels:  # class-dependent brightness, so accuracies are not all equal
        a = np.clip(rng.normal(20 * y + 40, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(a[:, :, 0] if gray else a))
    label = datasets.ClassLabel(names=names) if names else datasets.ClassLabel(num_classes=n_classes)
    feats = datasets.Features({"image": datasets.Image(), "label": label})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=feats).to_parquet(str(path))


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """HF_HOME with openai/demo-micro (CLIPModel), tanganke/demo-micro_{mnist,eurosat} (CLIPVisionModel) and the
    datasets ylecun/mnist (mnist/<split>-*.parquet) and tanganke/eurosat (data/<split>-*.parquet)."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    torch.manual_seed(0)
    zeroshot = transformers.CLIPModel(demo_micro_clip_config()).eval()
    zeroshot.save_pretrained(snapshot_dir(cache, "model", "openai/demo-micro"))
    for i, task in enumerate(["mnist", "eurosat"]):
        vision = transformers.CLIPVisionModel(zeroshot.config.vision_config).eval()
        tower = getattr(vision, "vision_model", vision)
        tower.load_state_dict(zeroshot.vision_model.state_dict())
        with torch.no_grad():
            for p in tower.parameters():
                p.add_(0.02 * (i + 1) * torch.randn_like(p))
        vision.save_pretrained(snapshot_dir(cache, "model", f"tanganke/demo-micro_{task}"))
    mnist = snapshot_dir(cache, "dataset", "ylecun/mnist")
    eurosat = snapshot_dir(cache, "dataset", "tanganke/eurosat")
    for split, n in (("train", 200), ("test", 12)):
        write_split(mnist / "mnist" / f"{split}-00000-of-00001.parquet", n, 10, seed=len(split), gray=True)
        write_split(eurosat / "data" / f"{split}-00000-of-00001.parquet", n, 10, seed=len(split) + 7, gray=False,
                    names=EUROSAT_HUB_NAMES)
    sst2 = snapshot_dir(cache, "dataset", "nateraw/rendered-sst2")  # an image-folder layout: <split>/<class>/*.png
    from PIL import Image
    for i in range(6):
        path = sst2 / "test" / ("negative", "positive")[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 20), 40 * i).save(path)
    return home


@pytest.fixture
def offline(fake_hub, tmp_path, monkeypatch):
    """In-process: the libraries' cache locations on the fake hub, offline mode on."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return fake_hub


def test_missing_optional_packages_say_what_to_install(offline, monkeypatch, tmp_path, capsys):
    args = ["--model", "demo-micro", "--tasks", "MNIST", "--base_dir", str(tmp_path), "--logs", str(tmp_path / "l")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"--data-source hf needs the optional package 'datasets': "
                                         r"pip install -e \"\.\[hf\]\""):
        main.main(args + ["--source", "hf", "--data-source", "hf"])
    assert "zero-shot heads" not in capsys.readouterr().out  # said before any work
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", None)
    with pytest.raises(SystemExit, match=r"needs the optional package 'huggingface_hub.*pip install -e \"\.\[hf\]\""):
        main.main(args + ["--source", "hf"])
    assert not (tmp_path / "l").exists()


def test_repo_ids_follow_fusionbench_names():
    """Checked against FusionBench's config/model/clip-vit/download_TALL20_models.sh and TALL20 model lists."""
    zs, ft = hub.repo_ids("ViT-B-32", resolve_tasks("20"))
    assert zs == "openai/clip-vit-base-patch32"
    ids = "sun397 stanford-cars resisc45 eurosat svhn gtsrb mnist dtd stl10 oxford-iiit-pet oxford_flowers102 " \
          "cifar100 pcam fer2013 cifar10 food101 fashion_mnist rendered-sst2 emnist_letters kmnist"
    assert sorted(ft.values()) == sorted(f"tanganke/clip-vit-base-patch32_{t}" for t in ids.split())
    assert hub.repo_ids("ViT-L-14", ["Cars"]) == ("openai/clip-vit-large-patch14",
                                                  {"Cars": "tanganke/clip-vit-large-patch14_stanford-cars"})
    assert hub.repo_ids("ViT-B-16", ["EMNIST"])[1]["EMNIST"] == "tanganke/clip-vit-base-patch16_emnist_letters"
    assert set(hf_sets.HUB_DATASETS) == set(resolve_tasks("20"))
    assert hf_sets.HUB_DATASETS["Food101"].test == "validation"
    assert hf_sets.HUB_DATASETS["SVHN"] == hf_sets.HubSet("ufldl-stanford/svhn", config="cropped_digits")


def test_download_fetches_config_and_weights_only_safetensors_first(tmp_path, monkeypatch):
    """--download: what is asked of huggingface_hub (a stand-in records the calls; no network)."""
    calls, has_safetensors = [], {"tanganke/a": True, "tanganke/b": False}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def snapshot_download(repo_id, *, repo_type=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, repo_type, list(allow_patterns), local_files_only))
        folder = tmp_path / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        if "model.safetensors" in allow_patterns and has_safetensors[repo_id]:
            (folder / "model.safetensors").write_bytes(b"")
        if "pytorch_model.bin" in allow_patterns:
            (folder / "pytorch_model.bin").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.fetch_model("tanganke/a", download=True).parent.parent.name == "models--tanganke--a"
    assert calls == [("tanganke/a", "model", hub.SAFETENSORS, False)]
    calls.clear()
    hub.fetch_model("tanganke/b", download=True)  # an older repository without safetensors
    assert calls == [("tanganke/b", "model", hub.SAFETENSORS, False), ("tanganke/b", "model", hub.PYTORCH_BIN, False)]
    calls.clear()
    with pytest.raises(CheckpointError, match="tanganke/b.*lacks config.json or its weights.*--download"):
        (tmp_path / "models--tanganke--b" / "snapshots" / ("0" * 40) / "pytorch_model.bin").unlink()
        hub.fetch_model("tanganke/b")  # offline: the cache only, no fallback fetch
    assert calls == [("tanganke/b", "model", hub.SAFETENSORS, True)]
    calls.clear()
    monkeypatch.setattr(hf_sets, "split_files", lambda folder, hub_set, split: [folder / f"{split}.parquet"])
    hf_sets.ensure_hub_splits(["Food101", "MNISTVal"], download=True)  # only the splits evaluated are fetched
    assert [(c[0], c[1], c[3]) for c in calls] == [("ethz/food101", "dataset", False),
                                                   ("ylecun/mnist", "dataset", False)]
    assert calls[0][2] == ["*validation-*", "*validation/*", "*validation.*", "README.md"]
    assert calls[1][2] == ["*train-*", "*train/*", "*train.*", "README.md"]


def test_hub_checkpoints_resolve_to_cached_snapshots(offline, tmp_path):
    found = hub.hub_checkpoints("demo-micro", TASKS, tmp_path)
    assert found.layout == "hf"
    assert found.zeroshot.parent.name == "snapshots" and "models--openai--demo-micro" in str(found.zeroshot)
    assert found.heads["MNIST"] == tmp_path / "checkpoints" / "demo-micro" / "hf" / "head_MNIST.pt"
    found.check("demo-micro")
    ft = found.load_finetuned("MNIST")
    assert ft.meta["format"] == "huggingface" and "model.visual.proj" in ft.meta["filled_keys"]


def test_missing_hub_checkpoints_name_the_repo_and_the_flag(offline, tmp_path):
    with pytest.raises(CheckpointError) as err:
        hub.hub_checkpoints("demo-micro", ["MNIST", "DTD", "Cars"], tmp_path)
    text = str(err.value)
    assert "2 of 4 hub checkpoints are missing" in text
    assert "tanganke/demo-micro_dtd" in text and "tanganke/demo-micro_stanford-cars" in text
    assert "--download" in text and "hf download tanganke/demo-micro_dtd" in text
    with pytest.raises(SystemExit, match="tanganke/demo-micro_dtd.*--download"):
        main.main(["--model", "demo-micro", "--tasks", "MNIST,DTD", "--source", "hf", "--base_dir", str(tmp_path),
                   "--logs", str(tmp_path / "logs"), "--no-progress"])


def test_missing_hub_dataset_or_split_is_a_clear_error(offline, tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError,
                       match=r"tanganke/dtd.*--download.*hf download tanganke/dtd --repo-type dataset"):
        get_dataset("DTD", None, "unused", num_workers=0, source="hf")
    hub_set = hf_sets.HubSet("ylecun/mnist")
    with pytest.raises(DatasetNotFoundError, match=r"no 'validation' split files of dataset ylecun/mnist.*--download"):
        hf_sets.load_hub_split("MNIST", hf_sets.HubSet("ylecun/mnist", test="validation"), "test", None)
    assert len(hf_sets.load_hub_split("MNIST", hub_set, "test", None)) == 12
    with pytest.warns(UserWarning, match="ylecun/mnist has 10 classes but the task's class names list 26"):
        hf_sets.load_hub_split("MNIST", hub_set, "test", None, n_classes=26)  # e.g. EMNIST digits vs letters
    # main checks every split it will read before any work, and lists all that are missing
    hf_sets.ensure_hub_splits(["MNIST", "MNISTVal", "EuroSAT"])
    with pytest.raises(DatasetNotFoundError, match=r"1 hub dataset splits are missing:\n  dataset tanganke/dtd"):
        hf_sets.ensure_hub_splits(["MNIST", "MNISTVal", "DTDVal"])
    with pytest.raises(SystemExit, match=r"(?s)missing.*tanganke/dtd.*--download"):
        main.main(["--model", "demo-micro", "--tasks", "MNIST,EuroSAT", "--eval-datasets", "MNIST,DTD", "--source",
                   "hf", "--data-source", "hf", "--base_dir", str(tmp_path), "--logs", str(tmp_path / "logs")])
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()  # nothing done
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "MNIST", hf_sets.HubSet("ylecun/mnist", test="validation"))
    with pytest.raises(DatasetNotFoundError, match="ylecun/mnist: no 'validation' split files"):
        hf_sets.ensure_hub_splits(["MNIST"])


def test_hub_datasets_load_offline_with_our_val_rule(offline):
    test = get_dataset("MNIST", None, "unused", num_workers=0, source="hf")
    assert test.name == "MNIST" and len(test.dataset) == 12
    image, label = test.dataset[0]
    assert image.mode == "RGB" and image.size == (32, 32) and isinstance(label, int)
    assert test.dataset.cache_fingerprint()["files"] == ["mnist/test-00000-of-00001.parquet"]
    sst2 = get_dataset("RenderedSST2", None, "unused", num_workers=0, source="hf").dataset
    assert [sst2[i][1] for i in range(len(sst2))] == [0, 0, 0, 1, 1, 1] and sst2[0][0].mode == "RGB"  # folder order
    val = get_dataset("EuroSATVal", None, "unused", num_workers=0, source="hf")  # a val folder locally: cut here
    assert val.name == "EuroSATVal" and len(val.dataset) == 20  # 10 % of the 200 train rows, seed 0
    from src.datasets.registry import split_train_val
    train = hf_sets.load_hub_split("EuroSAT", hf_sets.HUB_DATASETS["EuroSAT"], "train", None)
    assert list(val.dataset.indices) == list(split_train_val(train)[1].indices)


def test_image_and_label_columns_of_the_hub_layouts():
    """uoft-cs-style CIFAR-100 (img, coarse_label, fine_label) and FusionBench's FER2013 webdataset (jpg, cls)."""
    from PIL import Image

    def columns(features, task):
        rows = {name: [Image.new("RGB", (2, 2))] if isinstance(f, datasets.Image) else [0]
                for name, f in features.items()}
        data = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
        return hf_sets._columns(data, hf_sets.HUB_DATASETS[task], task)

    coarse, fine = datasets.ClassLabel(names=["a", "b"]), datasets.ClassLabel(names=["x", "y", "z"])
    assert columns({"img": datasets.Image(), "coarse_label": coarse, "fine_label": fine}, "CIFAR100") == \
        ("img", "fine_label")
    assert columns({"jpg": datasets.Image(), "cls": datasets.Value("int64"), "__key__": datasets.Value("string")},
                   "FER2013") == ("jpg", "cls")
    with pytest.raises(ValueError, match=r"columns \['text'\]"):
        columns({"text": datasets.Value("int64")}, "MNIST")


def test_text_tower_converted_from_hf_matches_transformers(tmp_path):
    """Heads for --source hf come from the zero-shot CLIPModel's own text tower (no second download)."""
    torch.manual_seed(3)
    model = transformers.CLIPModel(demo_micro_clip_config(text_act="gelu")).eval()  # demo-micro uses GELU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "zs")
    ours = hub.text_model_from_hf("demo-micro", tmp_path / "zs")
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(2, vocab - 2, (3, 16))
    ids[:, 9:] = 0
    ids[:, 8] = vocab - 1  # end of text: the largest id, where both models pool
    with torch.no_grad():
        want = model.get_text_features(input_ids=ids)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        got = ours.encode_text(ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    vision = transformers.CLIPVisionModel(model.config.vision_config)
    vision.save_pretrained(tmp_path / "vision")
    assert hub.text_model_from_hf("demo-micro", tmp_path / "vision") is None  # no text tower: caller falls back


def open_clip_style_preprocess(name):
    """demo-micro with open_clip's evaluation transform, so that the input cache applies."""
    import open_clip

    from src.demo.model import MEAN, STD, TrainTransform
    return TrainTransform(), open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)


def test_auto_coefficient_reads_cached_validation_inputs_with_identical_results(offline, tmp_path, monkeypatch):
    import src.demo.model

    monkeypatch.setattr(src.demo.model, "get_demo_preprocess", open_clip_style_preprocess)
    # heads = mean zero-shot feature per class on the train split, so accuracies are neither 0 nor 100
    from src.heads import cache_key

    found = hub.hub_checkpoints("demo-micro", TASKS, tmp_path)
    encoder = build_image_encoder("demo-micro", found.load_zeroshot()).eval()
    text_model = hub.text_model_from_hf("demo-micro", found.zeroshot)  # heads are cached with its key
    for task in TASKS:
        x, y = next(iter(get_dataset(task, encoder.val_preprocess, "unused", split="train", batch_size=1000,
                                     num_workers=0, source="hf").loader))
        with torch.no_grad():
            f = torch.nn.functional.normalize(encoder(x), dim=-1)
        weights = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(10)])
        save_head(ClassificationHead(normalize=True, weights=100 * weights), found.heads[task],
                  cache_key(text_model, task, "unused", "fusionbench", "hf"))
    common = ["--model", "demo-micro", "--tasks", "MNIST,EuroSAT", "--source", "hf", "--data-source", "hf",
              "--base_dir", str(tmp_path), "--threads", "1", "--no-progress", "--num-workers", "0",
              "--merge", "TA", "--scaling_coef", "auto"]
    plain = main.main(common + ["--logs", str(tmp_path / "logs-plain"), "--input-cache", "off"])
    cached = main.main(common + ["--logs", str(tmp_path / "logs-cached")])
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "inputs").iterdir())
    assert entries == ["EuroSATVal", "MNISTVal"]  # auto: validation splits only
    for key in ("accuracy", "scaling_coef", "scaling_coef_curve"):
        assert cached[key] == plain[key]
    assert 0 < plain["avg"] < 100 and len({p["avg"] for p in plain["scaling_coef_curve"]}) > 1
    assert cached["source"] == cached["data_source"] == "hf" and cached["layout"] == "hf"
    assert cached["request"]["source"] == "hf"


@pytest.mark.process
def test_main_runs_end_to_end_from_the_hub_cache_offline(fake_hub, tmp_path):
    """The real command line in a fresh process, with the hub and datasets libraries in offline mode."""
    env = {**os.environ, "HF_HOME": str(fake_hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--model", "demo-micro", "--tasks", "MNIST,EuroSAT",
           "--source", "hf", "--data-source", "hf", "--merge", "TA", "--c", "--base_dir", str(tmp_path),
           "--logs", str(tmp_path / "logs"), "--threads", "1", "--no-progress", "--num-workers", "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint layout 'hf'" in out.stdout
    record = utils.read_jsonl(tmp_path / "logs" / "demo-micro" / "results.jsonl")[-1]
    assert set(record["accuracy"]) == set(TASKS) and record["layout"] == "hf" and record["svc"] is True
    for task, acc in record["accuracy"].items():
        assert f"{task}: {acc:.2f}%" in out.stdout
    heads = tmp_path / "checkpoints" / "demo-micro" / "hf"
    assert sorted(p.name for p in heads.iterdir()) == ["head_EuroSAT.pt", "head_MNIST.pt"]  # from the text tower


def test_fer2013_hub_labels_are_mapped_onto_our_class_order():
    """clip-benchmark/wds_fer2013 (FusionBench's FER2013) puts `neutral` fourth; our class lists (torchvision's
    order, FusionBench's names or TSV's synonym lists) put it last. The labels must follow the head's rows."""
    from PIL import Image

    from src.datasets.hf_sets import HUB_DATASETS, HubImageDataset, hub_label_map
    from src.datasets.registry import get_spec

    hub = HUB_DATASETS["FER2013"]
    rows = [{"jpg": Image.new("L", (4, 4)), "cls": i} for i in range(7)]  # one image of each hub label
    for convention in ("fusionbench", "tsv"):
        names = get_spec("FER2013", convention).classnames
        mapping = hub_label_map("FER2013", hub, names)
        data = HubImageDataset(rows, "jpg", "cls", label_map=mapping)
        ours = [n[0] if isinstance(n, list) else n for n in names]
        assert [ours[data[i][1]] for i in range(7)] == list(hub.label_names)
        assert data.cache_fingerprint()["label_map"] == mapping  # cached labels never outlive a new mapping
    with pytest.raises(ValueError, match="do not match"):
        hub_label_map("FER2013", hub, ["angry", "happy"])


# ----------------------------------------------------------------------------- hub data checked when read
def write_rows(cache: Path, repo: str, columns: dict, features: dict, folder: str = "data") -> None:
    """A one-split ('test') parquet copy of a hub dataset ``repo`` in the fake hub cache."""
    snap = snapshot_dir(cache, "dataset", repo)
    path = snap / folder / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))


def gray(n: int):
    from PIL import Image
    return [Image.new("L", (32, 32), 10 * i) for i in range(n)]  # demo-micro's input size


def test_hub_labels_outside_the_classes_are_refused(offline, monkeypatch):
    """Labels 10..19 (another copy's numbering) and -1 (an unlabelled row) were evaluated and logged; FER2013's
    -1 even became 'surprised' through Python's negative indexing. They stop the read now, naming the
    dataset, the split and the values."""
    cache = offline / "hub"
    write_rows(cache, "test/mnist-shifted", {"image": gray(4), "label": [10, 11, 19, 3]},
               {"image": datasets.Image(), "label": datasets.Value("int64")})
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "MNIST", hf_sets.HubSet("test/mnist-shifted"))
    with pytest.raises(ValueError, match=r"^MNIST: split 'test' of hub dataset test/mnist-shifted \(column 'label'\) "
                                         r"has labels outside \[0, 10\): 10, 11, 19 \(3 of 4 rows\)") as err:
        get_dataset("MNIST", None, "unused", num_workers=0, source="hf")
    assert "\n" not in str(err.value)
    write_rows(cache, "test/fer-unlabelled", {"jpg": gray(3), "cls": [0, -1, 6]},
               {"jpg": datasets.Image(), "cls": datasets.Value("int64")})
    fer = hf_sets.HUB_DATASETS["FER2013"]
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "FER2013", hf_sets.HubSet("test/fer-unlabelled", image="jpg",
                                                                         label="cls", label_names=fer.label_names))
    with pytest.raises(ValueError, match=r"FER2013: split 'test' of hub dataset test/fer-unlabelled \(column 'cls'\) "
                                         r"has labels outside \[0, 7\): -1 "):
        get_dataset("FER2013", None, "unused", num_workers=0, convention="fusionbench", source="hf")
    mapped = hf_sets.HubImageDataset([{"jpg": gray(1)[0], "cls": -1}], "jpg", "cls", label_map=[0, 1, 2, 3, 6, 4, 5])
    with pytest.raises(ValueError, match="label -1 of row 0 is outside the 7 classes"):
        mapped[0]  # never the last class through negative indexing


def test_hub_class_names_are_matched_to_ours_by_name(offline, monkeypatch):
    """A copy that names its classes (a ClassLabel) in another order is mapped by name (case, spaces and
    underscores aside), for every hub dataset, not only FER2013; a name we do not know is an error naming it."""
    from src.datasets import templates as T
    from src.datasets.registry import get_spec

    cache = offline / "hub"
    hub_order = ["Neutral", "angry", "Disgusted", "fearful", "happy", "sad", "surprised"]  # neutral first here
    write_rows(cache, "test/fer-named", {"jpg": gray(7), "cls": list(range(7))},
               {"jpg": datasets.Image(), "cls": datasets.ClassLabel(names=hub_order)})
    fer = hf_sets.HUB_DATASETS["FER2013"]
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "FER2013", hf_sets.HubSet("test/fer-named", image="jpg", label="cls",
                                                                         label_names=fer.label_names))
    for convention in ("fusionbench", "tsv"):
        data = get_dataset("FER2013", None, "unused", num_workers=0, convention=convention, source="hf").dataset
        ours = [n[0] if isinstance(n, list) else n for n in get_spec("FER2013", convention).classnames]
        assert [ours[data[i][1]] for i in range(7)] == [n.lower() for n in hub_order]  # the copy's own names win
    eurosat = list(reversed(T.EUROSAT))  # another dataset, our words in the reverse order, with underscores
    write_rows(cache, "test/eurosat-reversed", {"image": gray(10), "label": list(range(10))},
               {"image": datasets.Image(), "label": datasets.ClassLabel(names=[n.replace(" ", "_") for n in eurosat])})
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "EuroSAT", hf_sets.HubSet("test/eurosat-reversed"))
    data = get_dataset("EuroSAT", None, "unused", num_workers=0, source="hf").dataset
    assert [data[i][1] for i in range(10)] == list(range(9, -1, -1))
    write_rows(cache, "test/fer-contempt", {"jpg": gray(2), "cls": [0, 1]},
               {"jpg": datasets.Image(), "cls": datasets.ClassLabel(names=hub_order[:6] + ["contempt"])})
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "FER2013", hf_sets.HubSet("test/fer-contempt", image="jpg", label="cls"))
    with pytest.raises(ValueError, match=r"^FER2013: the classes of test/fer-contempt do not match the task's class "
                                         r"names: 'contempt' is not among 7 known") as err:
        get_dataset("FER2013", None, "unused", num_workers=0, convention="fusionbench", source="hf")
    assert "\n" not in str(err.value)


def test_hub_image_column_of_strings_is_refused(offline, monkeypatch):
    """File paths (or text) where images belong gave a raw AttributeError traceback mid-evaluation."""
    write_rows(offline / "hub", "test/mnist-paths", {"image": ["train/0/1.png", "train/1/2.png"], "label": [0, 1]},
               {"image": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=10)})
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "MNIST", hf_sets.HubSet("test/mnist-paths"))
    with pytest.raises(ValueError, match=r"^MNIST: column 'image' of hub dataset test/mnist-paths \(split 'test'\) "
                                         r"holds string values such as 'train/0/1.png', not images") as err:
        get_dataset("MNIST", None, "unused", num_workers=0, source="hf")
    assert "\n" not in str(err.value)


def test_bad_hub_data_stops_main_before_any_work(offline, tmp_path, monkeypatch, capsys):
    """runs.plan reads every hub split the run evaluates (columns and labels) before heads or merges."""
    write_rows(offline / "hub", "test/mnist-shifted2", {"image": gray(2), "label": [12, 1]},
               {"image": datasets.Image(), "label": datasets.Value("int64")})
    monkeypatch.setitem(hf_sets.HUB_DATASETS, "MNIST", hf_sets.HubSet("test/mnist-shifted2"))
    with pytest.raises(SystemExit, match=r"error: MNIST: split 'test' of hub dataset test/mnist-shifted2 .*: 12 "):
        main.main(["--model", "demo-micro", "--tasks", "MNIST,EuroSAT", "--source", "hf", "--data-source", "hf",
                   "--base_dir", str(tmp_path), "--logs", str(tmp_path / "logs"), "--no-progress"])
    assert "zero-shot heads" not in capsys.readouterr().out and not (tmp_path / "checkpoints").exists()
