"""Evaluation: known predictions, batching, Val splits through the registry, a tiny real CLIP end to end."""
import os
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from src.datasets import registry
from src.datasets.registry import register_dataset
from src.eval import describe_tasks, evaluate, evaluate_tasks, pick_device
from src.modeling import ClassificationHead, ImageEncoder


def known_data(n_classes=4, n=10, wrong=(1, 5, 8), seed=0):
    """Features = one-hot of a class; the label disagrees at the `wrong` indices."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    predicted = labels.clone()
    for i in wrong:
        predicted[i] = (labels[i] + 1) % n_classes
    features = torch.nn.functional.one_hot(predicted, n_classes).float() * 3 + 0.1 * torch.rand(n, n_classes,
                                                                                                  generator=g)
    return features, labels


def identity_head(n_classes=4):
    return ClassificationHead(normalize=True, weights=torch.eye(n_classes) * 100)


@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_evaluate_known_accuracy(batch_size):
    features, labels = known_data()
    loader = DataLoader(TensorDataset(features, labels), batch_size=batch_size)
    assert evaluate(torch.nn.Identity(), identity_head(), loader, "cpu", progress=False) == pytest.approx(70.0)


def test_evaluate_dict_batches_progress_and_empty():
    features, labels = known_data(wrong=())
    loader = [{"images": features[:6], "labels": labels[:6]}, {"images": features[6:], "labels": labels[6:]}]
    assert evaluate(torch.nn.Identity(), identity_head(), loader, "cpu", progress=True) == 100.0
    with pytest.raises(ValueError, match="no images"):
        evaluate(torch.nn.Identity(), identity_head(), [], "cpu", desc="Empty")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cuda", "mps", "cpu"}
    assert pick_device("auto") == pick_device(None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_evaluate_tasks_test_and_val(monkeypatch):
    registry._load_plugins()  # register the built-in tasks before copying the registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    features, labels = known_data(n=50, wrong=tuple(range(0, 50, 5)))  # 80 % correct overall
    register_dataset("Known", lambda split, pre, loc: TensorDataset(features, labels), ["a", "b", "c", "d"],
                     [lambda c: c])
    heads = {"Known": identity_head()}
    results = evaluate_tasks(torch.nn.Identity(), ["known", "KnownVal"], heads, None, "", device="cpu",
                             batch_size=4, num_workers=0, progress=False)
    val_idx = registry.split_train_val(TensorDataset(features, labels))[1].indices
    expected_val = 100.0 * sum(i % 5 != 0 for i in val_idx) / len(val_idx)
    assert results == {"Known": pytest.approx(80.0), "KnownVal": pytest.approx(expected_val)}
    provenance = {}
    again = evaluate_tasks(torch.nn.Identity(), ["known", "KnownVal"], heads, None, "", device="cpu",
                           batch_size=4, num_workers=0, progress=False, provenance=provenance)
    assert again == results  # the same accuracies, with where they came from filled in place
    source = "torch.utils.data.dataset.TensorDataset"  # no folder: the dataset's class is named
    assert provenance == {"Known": {"source": source, "split": "test", "n": 50},
                          "KnownVal": {"source": source, "split": "val", "n": len(val_idx),
                                       "cut": "10% of train (at most 5000), seed 0"}}
    assert describe_tasks(["known", "KnownVal"], "") == provenance
    with pytest.raises(KeyError, match="no classification head for Known"):
        evaluate_tasks(torch.nn.Identity(), ["Known"], {}, None, "", device="cpu", num_workers=0)


def test_tiny_clip_on_fake_mnist_matches_per_image_loop(tmp_path):
    """Real open_clip visual tower + zero-shot-style head on fake MNIST files, batched vs one image at a time."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    os.makedirs(raw)
    images, labels = rng.integers(0, 256, (23, 8, 8), dtype=np.uint8), rng.integers(0, 10, 23).astype(np.uint8)
    for prefix in ("train", "t10k"):  # torchvision's MNIST wants both splits present
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 23, 8, 8) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 23) + labels.tobytes())

    torch.manual_seed(0)
    clip_model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=4,
                                                             image_size=8),
                      text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    encoder = ImageEncoder(clip_model).eval()
    head = ClassificationHead(normalize=True, weights=torch.randn(10, 16) * 100)
    preprocess = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor()])

    acc = evaluate_tasks(encoder, ["MNIST"], {"MNIST": head}, preprocess, str(tmp_path), device="cpu",
                         batch_size=5, num_workers=0, progress=False)["MNIST"]
    from torchvision.datasets import MNIST
    dataset = MNIST(str(tmp_path), train=False, transform=preprocess)
    with torch.no_grad():
        hits = [int(head(encoder(x[None])).argmax()) == y for x, y in dataset]
    assert acc == pytest.approx(100.0 * sum(hits) / len(hits))
    provenance = {}
    evaluate_tasks(encoder, ["MNIST"], {"MNIST": head}, preprocess, str(tmp_path), device="cpu", num_workers=0,
                   progress=False, provenance=provenance)
    assert provenance == {"MNIST": {"source": str(tmp_path), "split": "test", "n": 23}}
    assert 0 < sum(hits) < len(hits)  # a non-trivial mix, so a wrong pairing would be caught
