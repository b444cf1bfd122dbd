"""clip.layout.find_checkpoints: the three public layouts, and clear errors when files are missing."""
import pytest
import torch

import clip
from clip.checkpoint import CheckpointError

TASKS = ["MNIST", "DTD"]


def _sd(seed: int, width: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model.visual.proj": torch.randn(width, 3, generator=g), "model.logit_scale": torch.tensor(4.6)}


def _write(path, seed: int = 0, width: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_sd(seed, width), path)


def test_task_vectors_layout(tmp_path):
    root = tmp_path / "checkpoints" / "ViT-B-32"
    _write(root / "zeroshot.pt")
    for i, t in enumerate(TASKS):
        _write(root / t / "finetuned.pt", seed=i + 1)
    found = clip.find_checkpoints("ViT-B-32", tmp_path, TASKS)
    assert found.layout == "task_vectors" and found.root == root
    assert found.zeroshot == root / "zeroshot.pt"
    assert found.finetuned == {t: root / t / "finetuned.pt" for t in TASKS}
    assert found.heads == {t: root / f"head_{t}.pt" for t in TASKS}
    assert "task_vectors" in found.describe()
    found.check()  # same keys and shapes, distinct weights: no error, no warning


def test_tsv_layout(tmp_path):
    root = tmp_path / "ViT-B-16"
    _write(root / "MNISTVal" / "nonlinear_zeroshot.pt")
    for i, t in enumerate(TASKS):
        _write(root / f"{t}Val" / "nonlinear_finetuned.pt", seed=i + 1)
    found = clip.find_checkpoints("ViT-B-16", tmp_path, TASKS)
    assert found.layout == "tsv" and found.zeroshot == root / "MNISTVal" / "nonlinear_zeroshot.pt"
    assert found.finetuned["DTD"] == root / "DTDVal" / "nonlinear_finetuned.pt"
    assert found.heads["DTD"] == root / "head_DTDVal.pt"
    assert clip.find_checkpoints("ViT-B-16", tmp_path, ["DTDVal"], layout="tsv").finetuned["DTDVal"].parent.name == "DTDVal"
    with pytest.raises(CheckpointError, match="no ViT-B-16 checkpoints.*task_vectors"):
        clip.find_checkpoints("ViT-B-16", tmp_path, TASKS, layout="task_vectors")


def _hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "clip_vision_model"}')


def test_hf_layout(tmp_path):
    _hf_folder(tmp_path / "clip-vit-base-patch32")
    _hf_folder(tmp_path / "clip-vit-base-patch32_mnist")
    snap = tmp_path / "models--tanganke--clip-vit-base-patch32_dtd" / "snapshots" / "abc123"
    _hf_folder(snap)
    found = clip.find_checkpoints("ViT-B-32", tmp_path, TASKS)
    assert found.layout == "hf" and found.zeroshot == tmp_path / "clip-vit-base-patch32"
    assert found.finetuned == {"MNIST": tmp_path / "clip-vit-base-patch32_mnist", "DTD": snap}


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError) as err:
        clip.find_checkpoints("ViT-B-32", tmp_path / "absent", TASKS)
    msg = str(err.value)
    assert "absent" in msg and "zeroshot.pt" in msg and "nonlinear_finetuned.pt" in msg and "task_vectors" in msg
    with pytest.raises(CheckpointError, match="no ViT-B-32 checkpoints"):
        clip.find_checkpoints("ViT-B-32", tmp_path, TASKS)
    root = tmp_path / "checkpoints" / "ViT-B-32"
    _write(root / "zeroshot.pt")
    _write(root / "MNIST" / "finetuned.pt", seed=1)
    with pytest.raises(CheckpointError, match=r"incomplete 'task_vectors'.*missing task DTD"):
        clip.find_checkpoints("ViT-B-32", tmp_path, TASKS)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        clip.find_checkpoints("ViT-B-32", tmp_path, TASKS, layout="zip")


def test_check_flags_identical_and_mismatched(tmp_path):
    root = tmp_path / "checkpoints" / "ViT-B-32"
    _write(root / "zeroshot.pt", seed=0)
    _write(root / "MNIST" / "finetuned.pt", seed=0)  # same weights as zero-shot
    _write(root / "DTD" / "finetuned.pt", seed=2)
    found = clip.find_checkpoints("ViT-B-32", tmp_path, TASKS)
    with pytest.warns(UserWarning, match=r"MNIST/finetuned\.pt is identical.*zero"):
        found.check()
    _write(root / "DTD" / "finetuned.pt", seed=2, width=5)
    with pytest.raises(CheckpointError, match=r"model\.visual\.proj.*\(4, 3\) vs \(5, 3\)"), \
            pytest.warns(UserWarning, match="identical"):
        found.check()
