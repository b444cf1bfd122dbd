"""Evaluation conventions: whose class names, prompt templates and data a run's zero-shot heads follow.

Each public checkpoint release was fine-tuned against frozen zero-shot heads built by one reference code, so it
is evaluated with that code's heads (class names + templates) and data:

- ``task_vectors``: mlfoundations/task_vectors (src/datasets/templates.py), the 8-task release the official SVC
  code uses. It defines no EMNIST, PCAM, FER2013, ...: those tasks follow TSV (the registered definitions).
- ``tsv``: AntoAndGar/task_singular_vectors (also nik-dim/tall_masks, iso-merging), the 14/20-task release.
- ``fusionbench``: tanganke/fusion_bench, fusion_bench/tasks/clip_classification/<task>.py, whose heads belong
  to its Hugging Face fine-tunes ``tanganke/clip-vit-base-patch32_<task>``.

The registry holds the task_vectors definitions; ``OVERRIDES`` lists everything another convention changes.
The convention follows the checkpoint layout (``convention_for_layout``); ``--convention`` overrides it.

The convention also fixes one step of the image preprocessing: FusionBench's CLIPImageProcessor centre-crops at
the offset ``(L - 224) // 2`` (transformers' ``image_transforms.center_crop``), torchvision's CenterCrop (open_clip,
task_vectors, TSV) at ``round((L - 224) / 2)``; for an odd ``L - 224`` they can land one pixel apart.
``preprocess_for`` swaps the crop for the fusionbench convention, and the data provenance records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torchvision.transforms import CenterCrop, Compose
from torchvision.transforms import functional as TF

from src.datasets import templates as T
from utils import task_of

CONVENTIONS = ("task_vectors", "tsv", "fusionbench")
DEFAULT = "task_vectors"
_BY_LAYOUT = {"task_vectors": "task_vectors", "tsv": "tsv", "hf": "fusionbench"}
REGISTERED_VARIANTS = {"EMNIST": "digits"}  # names the registered data of tasks whose data varies
# centre-crop offset rule of a convention's preprocessing when it is not torchvision's rounding (see the docstring)
CROPS = {"fusionbench": "floor"}


@dataclass(frozen=True)
class Override:
    """What one convention changes for one task; None keeps the registered definition."""
    classnames: list | None = None  # these win over class names derived from the data
    templates: list[Callable[[str], str]] | None = None
    variant: str | None = None  # which data the builder loads (EMNIST: "letters")
    source: str = ""  # the reference file it comes from


_FB = "tanganke/fusion_bench fusion_bench/tasks/clip_classification/"
OVERRIDES: dict[str, dict[str, Override]] = {
    "task_vectors": {},
    # TSV's src/datasets/templates.py maps STL10 to `cifar10_stl10_template` (the 18 CIFAR prompts). The upstream
    # file is not in our search index; its fork Junghwan-brian/task_singular_vectors (same path) shows it.
    "tsv": {"STL10": Override(templates=T.CIFAR_TEMPLATES, source="src/datasets/templates.py")},
    "fusionbench": {
        "Flowers102": Override(classnames=T.FB_FLOWERS102, source=_FB + "flower102.py"),
        "OxfordIIITPet": Override(classnames=T.FB_OXFORD_PETS, source=_FB + "oxford_iiit_pet.py"),
        "CIFAR100": Override(classnames=T.FB_CIFAR100, source=_FB + "cifar100.py"),
        "FER2013": Override(classnames=T.FB_FER2013, source=_FB + "fer2013.py"),
        "Food101": Override(classnames=T.FB_FOOD101, source=_FB + "food101.py"),
        "FashionMNIST": Override(classnames=T.FB_FASHION_MNIST, source=_FB + "fashion_mnist.py"),
        "KMNIST": Override(classnames=T.FB_KMNIST, source=_FB + "kmnist.py"),
        "EMNIST": Override(classnames=T.FB_EMNIST_LETTERS, templates=T.FB_EMNIST_TEMPLATES, variant="letters",
                           source=_FB + "emnist_letters.py"),
    },
}


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)} (or auto)")
    return convention


def convention_for_layout(layout: str) -> str:
    """The convention a checkpoint layout was fine-tuned under: task_vectors, tsv, or hf -> fusionbench."""
    if layout not in _BY_LAYOUT:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(_BY_LAYOUT)}")
    return _BY_LAYOUT[layout]


def resolve(requested: str | None, layout: str) -> str:
    """``requested`` (None or 'auto': the layout's own convention)."""
    return convention_for_layout(layout) if requested in (None, "auto") else check_convention(requested)


def released_heads_convention(layout: str) -> str | None:
    """Convention of the released head files a layout's folder holds: ``head_<Task>Val.pt`` come with the TSV
    release, ``head_<Task>.pt`` with the task_vectors one; None for the hf layout: FusionBench ships no heads, so
    every head in its folder was built here and is trusted only with its key (src.heads)."""
    return None if layout == "hf" else "tsv" if layout == "tsv" else "task_vectors"


def override(task: str, convention: str | None) -> Override | None:
    """What ``convention`` changes for ``task`` (a registered name, no 'Val'), or None."""
    return OVERRIDES[check_convention(convention or DEFAULT)].get(task)


def variant(task: str, convention: str | None) -> str | None:
    """The data variant a builder loads for ``task`` under ``convention`` (None: the registered data)."""
    found = override(task, convention)
    return found.variant if found else None


def _key(task: str, convention: str | None) -> tuple:
    found = override(task, convention) or Override()
    names = tuple(map(str, found.classnames)) if found.classnames is not None else None
    prompts = tuple(t("{}") for t in found.templates) if found.templates is not None else None
    return names, prompts, found.variant


def same_definitions(task: str, first: str | None, second: str | None) -> bool:
    """True when a head built for ``task`` under one convention is valid under the other (same class names,
    templates and data)."""
    return _key(task, first) == _key(task, second)


def check_layout(layout: str, convention: str, tasks: list[str]) -> None:
    """A merged task whose data differ between conventions (EMNIST: digits or letters) can only be evaluated
    under the convention its fine-tune was made for: the hf layout loads FusionBench's letters fine-tune."""
    native = convention_for_layout(layout)
    for task in sorted({task_of(t) for t in tasks}):
        wanted, given = variant(task, native), variant(task, convention)
        if wanted != given:
            def describe(name):
                return name or REGISTERED_VARIANTS.get(task, "registered")
            raise ValueError(
                f"{task}: the '{layout}' checkpoints were fine-tuned on {task} {describe(wanted)} ({native} "
                f"convention), but --convention {convention} evaluates {task} {describe(given)}. Use --convention "
                f"{native} (or auto), or leave {task} out of --tasks.")


# ----------------------------------------------------------------------------- preprocessing
class FloorCenterCrop:
    """Centre crop with the offset rounded down, ``((H - h) // 2, (W - w) // 2)``, as transformers'
    ``image_transforms.center_crop`` (FusionBench's CLIPImageProcessor); an image smaller than the crop is
    zero-padded around it as there. torchvision's ``CenterCrop`` rounds the offset to nearest instead."""

    def __init__(self, size):
        self.size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        if len(self.size) == 1:
            self.size = (self.size[0], self.size[0])

    def __call__(self, img):
        _, height, width = TF.get_dimensions(img)
        crop_h, crop_w = self.size
        return TF.crop(img, (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def crop_rule(convention: str | None) -> str | None:
    """'floor' when ``convention`` centre-crops as FusionBench does, None for torchvision's rounding."""
    return CROPS.get(convention or DEFAULT)


def preprocess_for(preprocess, convention: str | None):
    """``preprocess`` as ``convention`` preprocesses: under fusionbench every torchvision ``CenterCrop`` of a
    ``Compose`` becomes a ``FloorCenterCrop`` of the same size (a new Compose; the given one is not changed).
    Anything else, or another convention, is returned as it is."""
    if crop_rule(convention) != "floor" or not isinstance(preprocess, Compose):
        return preprocess
    steps = [FloorCenterCrop(step.size) if isinstance(step, CenterCrop) else preprocess_for(step, convention)
             for step in preprocess.transforms]
    if all(new is old for new, old in zip(steps, preprocess.transforms)):
        return preprocess
    return Compose(steps)
