"""Tasks read with torchvision's dataset classes, at the roots task_vectors / TSV use under --data-location.

Nothing is fetched unless the caller passes download=True (`--download`); FER2013 cannot be downloaded by
torchvision (Kaggle) and must be placed by hand as <data-location>/fer2013/fer2013.csv (or icml_face_data.csv).
"""
import inspect
import os
from typing import Callable

import torchvision.datasets as tvd
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from src.datasets import conventions
from src.datasets import templates as T
from src.datasets.registry import DatasetNotFoundError, register_dataset


class EMNISTOrientation:
    """preprocess, then rotate -90 degrees and flip horizontally (EMNIST images are stored transposed), as TSV.

    A class rather than a closure so that DataLoader workers can pickle it under the spawn start method.
    """

    def __init__(self, preprocess: Callable | None):
        self.preprocess = preprocess

    def __call__(self, image):
        image = self.preprocess(image) if self.preprocess is not None else image
        return TF.hflip(TF.rotate(image, -90))


def _letter_index(label: int) -> int:
    """torchvision's EMNIST letters are labelled 1..26 (0 is 'N/A'); FusionBench's copy 0..25 = A..Z."""
    return label - 1


def _emnist(root: str, train: bool, transform, download: bool, convention: str) -> Dataset:
    """TSV (and task_vectors, which has no EMNIST): the digits, transposed upright as TSV's
    src/datasets/emnist.py does. FusionBench: the letters as HF tanganke/emnist_letters stores them, i.e. the raw
    EMNIST files untransposed (its loading script was adapted from HF's mnist.py, which reshapes the idx bytes
    as they are), labels 0..25."""
    if conventions.variant("EMNIST", convention) == "letters":
        return tvd.EMNIST(root, split="letters", train=train, transform=transform, target_transform=_letter_index,
                          download=download)
    return tvd.EMNIST(root, split="digits", train=train, transform=EMNISTOrientation(transform), download=download)


def _torchvision_task(task: str, subdir: str, expected: str, make: Callable, names_from_data: bool,
                      downloadable: bool = True) -> Callable:
    """Builder around a torchvision class: `make(root, train, transform, download[, convention])` builds one
    split; `make` gets the run's convention when it takes one (EMNIST)."""
    takes_convention = "convention" in inspect.signature(make).parameters

    def build(split: str, preprocess, location: str, download: bool = False,
              convention: str = conventions.DEFAULT) -> Dataset:
        if split not in ("train", "test"):
            raise ValueError(f"{task} has no {split!r} split ({task}Val is cut from train)")
        root = os.path.join(location, subdir) if subdir else location
        extra = {"convention": convention} if takes_convention else {}
        try:
            dataset = make(root, split == "train", preprocess, download, **extra)
        except (RuntimeError, FileNotFoundError) as err:
            if download:
                raise
            how = ("re-run with --download to fetch it with torchvision" if downloadable
                   else "download it by hand (it cannot be fetched automatically)")
            raise DatasetNotFoundError(f"{task}: no data found at {os.path.join(root, expected)} ({err}). "
                                       f"Put the torchvision {task} files there or {how}.") from None
        if names_from_data:  # TSV takes the names from torchvision's `.classes`
            dataset.classnames = list(dataset.classes)
        return dataset

    if downloadable:
        return build

    def build_local(split: str, preprocess, location: str, convention: str = conventions.DEFAULT) -> Dataset:
        return build(split, preprocess, location, convention=convention)

    return build_local


def _split(train: bool) -> str:
    return "train" if train else "test"


# name: (subdir under --data-location, expected files, make(root, train, transform, download), names from data)
_TASKS = {
    "MNIST": ("", "MNIST/raw", lambda r, t, tf, d: tvd.MNIST(r, train=t, transform=tf, download=d), False),
    "SVHN": ("svhn", "{train,test}_32x32.mat",
             lambda r, t, tf, d: tvd.SVHN(r, split=_split(t), transform=tf, download=d), False),
    "GTSRB": ("", "gtsrb/GTSRB/{Training,Final_Test/Images} + gtsrb/GT-final_test.csv",
              lambda r, t, tf, d: tvd.GTSRB(r, split=_split(t), transform=tf, download=d), False),
    "STL10": ("stl10", "stl10_binary",
              lambda r, t, tf, d: tvd.STL10(r, split=_split(t), transform=tf, download=d), True),
    "OxfordIIITPet": ("OxfordIIITPet", "oxford-iiit-pet",
                      lambda r, t, tf, d: tvd.OxfordIIITPet(r, split="trainval" if t else "test", transform=tf,
                                                            download=d), True),
    "Flowers102": ("flowers102", "flowers-102",
                   lambda r, t, tf, d: tvd.Flowers102(r, split=_split(t), transform=tf, download=d), False),
    "CIFAR100": ("", "cifar-100-python", lambda r, t, tf, d: tvd.CIFAR100(r, train=t, transform=tf, download=d),
                 True),
    "PCAM": ("PCAM", "pcam",
             lambda r, t, tf, d: tvd.PCAM(r, split=_split(t), transform=tf, download=d), False),
    "CIFAR10": ("", "cifar-10-batches-py", lambda r, t, tf, d: tvd.CIFAR10(r, train=t, transform=tf, download=d),
                True),
    "Food101": ("food101", "food-101",
                lambda r, t, tf, d: tvd.Food101(r, split=_split(t), transform=tf, download=d), True),
    "FashionMNIST": ("FashionMNIST", "FashionMNIST/raw",
                     lambda r, t, tf, d: tvd.FashionMNIST(r, train=t, transform=tf, download=d), True),
    "RenderedSST2": ("RenderedSST2", "rendered-sst2",
                     lambda r, t, tf, d: tvd.RenderedSST2(r, split=_split(t), transform=tf, download=d), True),
    # TSV uses the `digits` split (10 classes). FusionBench's "EMNIST" is `emnist_letters` (26 letters, HF
    # tanganke/emnist_letters), a different task: numbers from the two are not comparable.
    "EMNIST": ("", "EMNIST/raw/emnist-digits-* (emnist-letters-* under the fusionbench convention)", _emnist, True),
    "KMNIST": ("KMNIST", "KMNIST/raw", lambda r, t, tf, d: tvd.KMNIST(r, train=t, transform=tf, download=d), True),
}

_REQUIRES = {"PCAM": ("h5py",)}  # torchvision reads PCAM's .h5 files with h5py (an optional extra)

for _name, (_subdir, _expected, _make, _from_data) in _TASKS.items():
    register_dataset(_name, _torchvision_task(_name, _subdir, _expected, _make, _from_data),
                     T.CLASSNAMES[_name], T.TEMPLATES[_name], requires=_REQUIRES.get(_name, ()))

# TSV reads FER2013 from the Hugging Face copy `Jeneral/fer-2013` (train 28,709 / test 7,178 = PublicTest +
# PrivateTest); torchvision's reader of the Kaggle csv gives the same splits, possibly in another train order
# (which changes which images FER2013Val draws).
register_dataset("FER2013", _torchvision_task(
    "FER2013", "", "fer2013/fer2013.csv",
    lambda r, t, tf, d: tvd.FER2013(r, split=_split(t), transform=tf), False, downloadable=False),
    T.FER2013, T.TEMPLATES["FER2013"])
