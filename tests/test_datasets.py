"""Dataset registry: tiny fake datasets in the expected layouts, Val splits, task specs, missing-data errors."""
import os
import struct
import sys

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.transforms import ToTensor

from src.datasets import registry
from src.datasets import templates as T
from src.datasets.registry import (TASK_SETS, DatasetNotFoundError, get_dataset, register_dataset,
                                   register_task_set, resolve_tasks, split_train_val)


def write_png(path, value: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def write_image_folder(root, classes, per_class=2, ext="png") -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(os.path.join(root, name, f"{name}_{i}.{ext}"), 10 * c + i)


def write_idx(raw_dir, prefix, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST idx files (the format torchvision's MNIST family reads)."""
    os.makedirs(raw_dir, exist_ok=True)
    n, rows, cols = images.shape
    with open(os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())
    with open(os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def fake_digits(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 256, (n, 6, 6)).astype(np.uint8)
    images[:, 0, 0] = labels  # pixel (0, 0) carries the label so the test can check image/label pairing
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    for prefix, n, seed in (("train", 50, 0), ("t10k", 20, 1)):
        write_idx(tmp_path / "MNIST" / "raw", prefix, *fake_digits(n, seed))
    return str(tmp_path)


# ---- task specs ---------------------------------------------------------------------------------------------
def test_task_sets_and_order():
    assert TASK_SETS[8] == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert TASK_SETS[14][8:] == ["STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013"]
    assert TASK_SETS[20][14:] == ["CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]
    assert resolve_tasks("20") == TASK_SETS[20] and resolve_tasks(" 14 ") == TASK_SETS[14]
    assert resolve_tasks("mnist, dtd,CARS") == ["MNIST", "DTD", "Cars"]
    assert resolve_tasks("MNISTVal,eurosatval") == ["MNISTVal", "EuroSATVal"]
    for task in TASK_SETS[20]:  # every task is registered with names and templates
        spec = registry.get_spec(task)
        assert spec.classnames and spec.templates


def test_resolve_tasks_errors():
    with pytest.raises(ValueError, match="unknown dataset 'Imagenet'.*MNIST.*task sets: 8, 14, 20"):
        resolve_tasks("MNIST,Imagenet")
    with pytest.raises(ValueError, match="twice"):
        resolve_tasks("MNIST,mnist")
    with pytest.raises(ValueError, match="empty"):
        resolve_tasks(" , ")


def test_named_task_set(monkeypatch):
    monkeypatch.setattr(registry, "NAMED_SETS", dict(registry.NAMED_SETS))
    register_task_set("Pair", ["MNIST", "SVHN"])
    assert resolve_tasks("pair") == ["MNIST", "SVHN"]


def test_template_counts_match_the_original():
    counts = {"Cars": 8, "DTD": 8, "EuroSAT": 3, "GTSRB": 3, "MNIST": 1, "RESISC45": 18, "SUN397": 2, "SVHN": 1,
              "FER2013": 6, "PCAM": 1, "OxfordIIITPet": 1, "RenderedSST2": 1, "EMNIST": 1, "FashionMNIST": 2,
              "KMNIST": 1, "CIFAR10": 18, "CIFAR100": 18}
    assert {k: len(T.TEMPLATES[k]) for k in counts} == counts
    assert T.TEMPLATES["MNIST"][0]("7") == 'a photo of the number: "7".'
    assert T.TEMPLATES["RESISC45"][6]("lake") == "satellite imagery of a lake."
    sizes = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "GTSRB": 43, "DTD": 47, "CIFAR100": 100,
             "Flowers102": 102, "Food101": 101, "OxfordIIITPet": 37, "FER2013": 7, "PCAM": 2}
    assert {k: len(T.CLASSNAMES[k]) for k in sizes} == sizes
    assert all(len(set(map(str, names))) == len(names) for names in T.CLASSNAMES.values())


def test_classnames_equal_torchvision_class_attributes():
    assert T.FASHION_MNIST == tvd.FashionMNIST.classes
    assert T.KMNIST == tvd.KMNIST.classes
    assert T.DIGITS == tvd.EMNIST.classes_split_dict["digits"]
    assert T.RENDERED_SST2 == ["negative", "positive"]


# ---- Val split ----------------------------------------------------------------------------------------------
def test_val_split_matches_task_vectors_convention():
    train, val = split_train_val(TensorDataset(torch.zeros(60000)))
    assert (len(train), len(val)) == (55000, 5000)  # val = min(10%, 5000)
    assert train.indices[0] == 36044  # task_vectors asserts this for MNISTVal
    train, val = split_train_val(TensorDataset(torch.zeros(1234)))
    assert len(val) == 123 and len(train) == 1111
    perm = torch.randperm(1234, generator=torch.Generator().manual_seed(0)).tolist()
    assert train.indices == perm[:1111] and val.indices == perm[1111:]
    with pytest.raises(ValueError, match="too few"):
        split_train_val(TensorDataset(torch.zeros(9)), "Tiny")


def test_mnist_through_registry(mnist_root):
    test = get_dataset("MNIST", ToTensor(), mnist_root, batch_size=7, num_workers=0)
    assert test.name == "MNIST" and len(test.dataset) == 20 and test.classnames == T.DIGITS
    assert test.test_dataset is test.dataset and test.test_loader is test.loader
    images, labels = next(iter(test.loader))
    assert images.shape == (7, 1, 6, 6)
    assert torch.equal((images[:, 0, 0, 0] * 255).round().long(), labels)  # pairing preserved

    val = get_dataset("mnistval", ToTensor(), mnist_root, num_workers=0)
    again = get_dataset("MNISTVal", ToTensor(), mnist_root, num_workers=0)
    train = get_dataset("MNIST", ToTensor(), mnist_root, num_workers=0, split="train")
    assert val.name == "MNISTVal" and len(val.dataset) == 5 and len(train.dataset) == 45
    assert val.dataset.indices == again.dataset.indices  # deterministic
    assert not set(val.dataset.indices) & set(train.dataset.indices)
    assert val.templates is registry.get_spec("MNIST").templates


def test_emnist_is_transposed_as_tsv(tmp_path):
    images, labels = fake_digits(20, 2)
    write_idx(tmp_path / "EMNIST" / "raw", "emnist-digits-test", images, labels)
    split = get_dataset("EMNIST", ToTensor(), str(tmp_path), num_workers=0)
    image, label = split.dataset[3]
    assert label == labels[3]
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(images[3]).T)


def test_emnist_follows_the_convention(tmp_path):
    images, _ = fake_digits(26, 3)
    letters = np.arange(1, 27)  # torchvision's EMNIST letters: 1..26 (0 is 'N/A')
    write_idx(tmp_path / "EMNIST" / "raw", "emnist-letters-test", images, letters)
    write_idx(tmp_path / "EMNIST" / "raw", "emnist-letters-train", *fake_digits(30, 4))
    fb = get_dataset("EMNIST", ToTensor(), str(tmp_path), num_workers=0, convention="fusionbench")
    assert len(fb.dataset) == 26 and fb.classnames == [chr(65 + i) for i in range(26)]
    assert fb.templates[0]("A") == 'a photo of the digit character: "A".'
    image, label = fb.dataset[3]
    assert label == 3  # 'd' -> 3 = 'D', FusionBench's 0..25 labels (HF tanganke/emnist_letters)
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(images[3]))  # stored as is
    val = get_dataset("EMNISTVal", None, str(tmp_path), num_workers=0, convention="fusionbench")
    assert len(val.dataset) == 3 and val.classnames == fb.classnames  # Val: 10 % of the letters' train split
    # the digits (TSV) are another dataset: their files are missing here
    with pytest.raises(DatasetNotFoundError, match="emnist-digits"):
        get_dataset("EMNIST", None, str(tmp_path), convention="tsv")


def test_fusionbench_names_win_over_names_from_the_data(tmp_path):
    for prefix, n, seed in (("train", 20, 0), ("t10k", 12, 1)):
        write_idx(tmp_path / "FashionMNIST/FashionMNIST/raw", prefix, *fake_digits(n, seed))
    assert get_dataset("FashionMNIST", None, str(tmp_path), num_workers=0).classnames[0] == "T-shirt/top"
    fb = get_dataset("FashionMNIST", None, str(tmp_path), num_workers=0, convention="fusionbench")
    assert fb.classnames[0] == "T - shirt / top" and fb.classnames[1:] == T.FASHION_MNIST[1:]
    with pytest.raises(ValueError, match="unknown convention"):
        get_dataset("FashionMNIST", None, str(tmp_path), num_workers=0, convention="openai")


def test_pcam_without_h5py_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    with pytest.raises(registry.MissingDependencyError, match="PCAM needs the optional package h5py.*pip install h5py"):
        get_dataset("PCAM", None, str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="pip install h5py"):  # what main.py reports before any work
        registry.check_requirements(["MNIST", "PCAMVal"])
    registry.check_requirements(["MNIST", "EMNIST"])


# ---- folder layouts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("test_dir", ["val", "test"])  # task_vectors / SVC
def test_dtd_layouts(tmp_path, test_dir):
    classes = ["banded", "blotchy", "polka-dotted"]
    write_image_folder(tmp_path / "dtd" / "train", classes, per_class=4)
    write_image_folder(tmp_path / "dtd" / test_dir, classes, per_class=1)
    test = get_dataset("DTD", ToTensor(), str(tmp_path), num_workers=0)
    assert test.classnames == classes and len(test.dataset) == 3
    val = get_dataset("DTDVal", ToTensor(), str(tmp_path), num_workers=0)
    assert len(val.dataset) == 1 and val.classnames == classes


def test_class_folder_mismatch_is_an_error(tmp_path):
    write_image_folder(tmp_path / "sun397" / "train", ["a_abbey", "b_bar"], per_class=5)
    write_image_folder(tmp_path / "sun397" / "val", ["a_abbey"], per_class=1)
    with pytest.raises(ValueError, match="class folders"):
        get_dataset("SUN397", None, str(tmp_path), num_workers=0)


def test_sun397_names_from_folders(tmp_path):
    folders = ["a_abbey", "a_apartment_building_outdoor", "j_jail_cell", "j_jail_indoor"]
    write_image_folder(tmp_path / "sun397" / "train", folders, per_class=3)
    write_image_folder(tmp_path / "sun397" / "test", folders, per_class=1)  # SVC name for the test split
    split = get_dataset("SUN397", ToTensor(), str(tmp_path), num_workers=0)
    assert split.classnames == ["abbey", "apartment building outdoor", "jail cell", "jail indoor"]
    positions = [T.SUN397.index(n) for n in split.classnames]
    assert positions == sorted(positions)  # the registered list follows the same folder order ('jail_cell' first)


@pytest.mark.parametrize("val_dir", ["val", "valid"])
def test_eurosat_layouts_and_names(tmp_path, val_dir):
    classes = ["AnnualCrop", "HerbaceousVegetation", "Industrial", "SeaLake"]
    base = tmp_path / "EuroSAT_splits"
    write_image_folder(base / "train", classes, per_class=3)
    write_image_folder(base / val_dir, classes, per_class=2)
    write_image_folder(base / "test", classes, per_class=1)
    val = get_dataset("EuroSATVal", ToTensor(), str(tmp_path), num_workers=0)
    assert val.name == "EuroSATVal" and len(val.dataset) == 8  # the folder split, not cut from train
    assert val.classnames == ["annual crop land", "brushland or shrubland",
                              "industrial buildings or commercial buildings", "lake or sea"]
    assert len(get_dataset("EuroSAT", None, str(tmp_path), num_workers=0).dataset) == 4
    assert len(get_dataset("EuroSAT", None, str(tmp_path), num_workers=0, split="train").dataset) == 12


def test_resisc45_file_lists(tmp_path):
    root = tmp_path / "resisc45" / "NWPU-RESISC45"
    write_image_folder(root, ["airplane", "sea_ice"], per_class=3, ext="jpg")
    (tmp_path / "resisc45" / "resisc45-test.txt").write_text("airplane_2.jpg\nsea_ice_0.jpg\n")
    split = get_dataset("RESISC45", ToTensor(), str(tmp_path), num_workers=0)
    assert split.classnames == ["airplane", "sea ice"]
    assert sorted(os.path.basename(p) for p, _ in split.dataset.samples) == ["airplane_2.jpg", "sea_ice_0.jpg"]


@pytest.mark.parametrize("svc_layout", [False, True])
def test_cars_mat_annotations(tmp_path, svc_layout):
    import scipy.io

    base = tmp_path / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
    for i in range(3):
        write_png(str(base / "cars_test" / f"{i:05d}.jpg"), 40 * i)
    os.makedirs(base / "devkit")
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    annos = np.array([(f"{i:05d}.jpg", c) for i, c in enumerate([3, 1, 2])],
                     dtype=[("fname", object), ("class", int)])
    target = base / "devkit" if svc_layout else base
    scipy.io.savemat(target / "cars_test_annos_withlabels.mat", {"annotations": annos})
    split = get_dataset("Cars", ToTensor(), str(tmp_path), num_workers=0)
    assert split.classnames == names
    assert [label for _, label in split.dataset.samples] == [2, 0, 1]  # 1-based .mat classes
    image, label = split.dataset[0]
    assert image.shape == (3, 8, 8) and label == 2


# ---- registry mechanics -------------------------------------------------------------------------------------
def test_registered_builder_splits(monkeypatch):
    registry._load_plugins()  # register the built-in tasks before copying the registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []

    def build(split, preprocess, location):
        calls.append(split)
        n = 40 if split == "train" else 7
        return TensorDataset(torch.arange(n), torch.zeros(n))

    register_dataset("Toy", build, ["a", "b"], [lambda c: c])
    register_dataset("ToyFolder", build, ["a", "b"], [lambda c: c], val_from_train=False)
    assert len(get_dataset("ToyVal", None, "", num_workers=0).dataset) == 4 and calls == ["train"]
    assert len(get_dataset("ToyFolderVal", None, "", num_workers=0).dataset) == 7 and calls[-1] == "val"
    with pytest.raises(ValueError, match="Val"):
        register_dataset("BadVal", build, ["a"], [lambda c: c])
    with pytest.raises(ValueError, match="cannot be downloaded"):
        get_dataset("Toy", None, "", download=True)


def test_data_source_is_an_explicit_value(monkeypatch):
    """`source` picks the builder ("local": the task's own; others through register_source), never the location."""
    registry._load_plugins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    assert registry.data_sources()[:2] == ["local", "hf"]  # hf_sets registers itself
    local, remote = [], []

    def build(split, preprocess, location):
        local.append((split, location))
        return TensorDataset(torch.arange(40), torch.zeros(40))

    def build_elsewhere(spec, split, preprocess, download, convention):
        remote.append((spec.name, split, download, convention))
        return TensorDataset(torch.arange(30), torch.zeros(30))

    register_dataset("Toy", build, ["a", "b"], [lambda c: c])
    registry.register_source("elsewhere", build_elsewhere)
    assert len(get_dataset("Toy", None, "hf://looks-like-a-hub", num_workers=0).dataset) == 40  # a path, nothing more
    assert local == [("test", "hf://looks-like-a-hub")] and remote == []
    val = get_dataset("ToyVal", None, "/data", num_workers=0, source="elsewhere")
    assert len(val.dataset) == 3 and remote == [("Toy", "train", False, None)] and len(local) == 1
    with pytest.raises(ValueError, match="unknown data source 'nowhere'; choose one of local, hf"):
        get_dataset("Toy", None, "", num_workers=0, source="nowhere")
    with pytest.raises(ValueError, match="tasks' own builders"):
        registry.register_source("local", build_elsewhere)


def test_split_name_helpers():
    import utils

    assert [utils.task_of(n) for n in ("MNISTVal", "MNIST", "mnistval", "Val")] == ["MNIST", "MNIST", "mnist", "Val"]
    assert utils.is_val("EuroSATVal") and utils.is_val("eurosatVAL") and not utils.is_val("EuroSAT")
    assert not utils.is_val("Val")  # no task before the suffix
    assert utils.val_of("DTD") == utils.val_of("DTDVal") == "DTDVal"


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"MNIST.*MNIST/raw.*--download"):
        get_dataset("MNIST", None, str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"dtd/val or .*dtd/test.*task_vectors/issues/1"):
        get_dataset("DTD", None, str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"cars_test_annos_withlabels.mat"):
        get_dataset("Cars", None, str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="cannot be fetched automatically"):
        get_dataset("FER2013", None, str(tmp_path))
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        get_dataset("SUN397", None, str(tmp_path), download=True)


@pytest.mark.parametrize("task,raw_dir,names", [
    ("FashionMNIST", "FashionMNIST/FashionMNIST/raw", T.FASHION_MNIST),  # TSV root: <loc>/FashionMNIST
    ("KMNIST", "KMNIST/KMNIST/raw", T.KMNIST),
])
def test_mnist_family_roots(tmp_path, task, raw_dir, names):
    for prefix, n, seed in (("train", 20, 0), ("t10k", 12, 1)):
        write_idx(tmp_path / raw_dir, prefix, *fake_digits(n, seed))
    split = get_dataset(task, ToTensor(), str(tmp_path), num_workers=0)
    assert len(split.dataset) == 12 and split.classnames == names
    assert len(get_dataset(task + "Val", None, str(tmp_path), num_workers=0).dataset) == 2


def test_gtsrb_torchvision_layout(tmp_path):
    base = tmp_path / "gtsrb"
    for c in range(3):
        for i in range(4):
            write_png(str(base / "GTSRB" / "Training" / f"{c:05d}" / f"{i}.ppm"), 20 * c)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate([2, 0, 1]):
        write_png(str(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm"), 20 * c)
        rows.append(f"{i:05d}.ppm;8;8;0;0;7;7;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    test = get_dataset("GTSRB", ToTensor(), str(tmp_path), num_workers=0)
    assert [test.dataset[i][1] for i in range(3)] == [2, 0, 1] and test.classnames == T.GTSRB
    val = get_dataset("GTSRBVal", None, str(tmp_path), num_workers=0)
    assert len(val.dataset) == 1 and len(get_dataset("GTSRB", None, str(tmp_path), split="train").dataset) == 11


def test_rendered_sst2_layout(tmp_path):
    for split in ("train", "test"):
        for c in ("negative", "positive"):
            for i in range(5):
                write_png(str(tmp_path / "RenderedSST2" / "rendered-sst2" / split / c / f"{i}.png"), i)
    split = get_dataset("RenderedSST2", ToTensor(), str(tmp_path), num_workers=0)
    assert len(split.dataset) == 10 and split.classnames == ["negative", "positive"]
