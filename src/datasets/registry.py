"""Dataset registry: task names -> builders, class names, templates; task sets; `<Task>Val` splits.

A builder is `build(split, preprocess, location)` with split in {"train", "val", "test"} returning a
torch Dataset of (image, label). Builders of data that torchvision can fetch also accept `download=True`;
nothing is downloaded unless the caller asks for it.

Where the images come from is the explicit `source` of `get_dataset` / `load_split`: "local" (the task's own
builder, reading under `location`) or another registered source (`register_source`): "hf", FusionBench's
Hugging Face datasets, registered by src/datasets/hf_sets.py.
"""
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from src.datasets import conventions
from utils import is_val, task_of, val_of

Builder = Callable[..., Dataset]
# source builder: build(spec, split, preprocess, download, convention) -> Dataset; `spec` carries the convention's
# class names (src.datasets.conventions)
SourceBuilder = Callable[["DatasetSpec", str, Callable | None, bool, str | None], Dataset]
LOCAL = "local"  # the source every task has: its registered builder

# task_vectors convention for `<Task>Val`: 10% of train, at most 5000 images, seed 0, random_split [train, val].
VAL_FRACTION = 0.1
MAX_VAL_SAMPLES = 5000
VAL_SEED = 0

TASK_SETS: dict[int, list[str]] = {
    8: ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"],  # official SVC order
}
TASK_SETS[14] = TASK_SETS[8] + ["STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013"]
TASK_SETS[20] = TASK_SETS[14] + ["CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]

NAMED_SETS: dict[str, list[str]] = {}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the folder expected and how to get the data."""


class MissingDependencyError(DatasetNotFoundError):
    """A dataset's files cannot be read without an optional package; the message names the pip command."""


@dataclass
class DatasetSpec:
    name: str
    build: Builder
    classnames: list
    templates: list[Callable[[str], str]]
    val_from_train: bool = True
    requires: tuple[str, ...] = ()  # optional packages needed to read the files (PCAM: h5py)
    fixed_names: bool = False  # the convention prescribes `classnames`: they win over names found in the data


_REGISTRY: dict[str, DatasetSpec] = {}
_SOURCES: dict[str, SourceBuilder] = {}


def register_dataset(name: str, build: Builder, classnames: list, templates: list[Callable[[str], str]],
                     val_from_train: bool = True, requires: tuple[str, ...] = ()) -> None:
    """Register a task. With `val_from_train` the registry cuts "val" out of "train" itself. A builder that
    takes a `convention` keyword gets the run's convention (src.datasets.conventions)."""
    if is_val(name):
        raise ValueError(f"dataset name {name!r} must not end in 'Val': '<Task>Val' names the validation split")
    _REGISTRY[name] = DatasetSpec(name, build, list(classnames), list(templates), val_from_train, tuple(requires))


def register_task_set(name: str, tasks: list[str]) -> None:
    """Register a named task set usable wherever a task spec is accepted (e.g. `--tasks demo`)."""
    NAMED_SETS[name.lower()] = list(tasks)


def register_source(name: str, build: SourceBuilder) -> None:
    """Register a data source other than "local": `get_dataset(..., source=name)` builds every split with
    `build(spec, split, preprocess, download, convention)` instead of the task's own builder."""
    if name == LOCAL:
        raise ValueError(f"{LOCAL!r} is the tasks' own builders; register another source name")
    _SOURCES[name] = build


def data_sources() -> list[str]:
    _load_plugins()
    return [LOCAL, *_SOURCES]


def _load_plugins() -> None:
    """Import the built-in dataset families, the hub source and, when present, the embedded demo tasks
    (they self-register)."""
    for module in ("src.datasets.folder_sets", "src.datasets.torchvision_sets", "src.datasets.hf_sets",
                   "src.datasets.demo"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def _parse(name: str) -> tuple[str, bool]:
    """(registered task name, is it the 'Val' split) for a case-insensitive name; ValueError if unknown."""
    _load_plugins()
    lookup = {key.lower(): key for key in _REGISTRY}
    key = name.strip().lower()
    if key in lookup:
        return lookup[key], False
    if is_val(key) and task_of(key) in lookup:
        return lookup[task_of(key)], True
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(_REGISTRY))} "
                     f"(append 'Val' for the validation split)")


def _canonical(name: str) -> str:
    """Registered spelling of a task name, keeping a 'Val' suffix."""
    base, val = _parse(name)
    return val_of(base) if val else base


def resolve_tasks(spec: str) -> list[str]:
    """'8' | '14' | '20' | a named set (e.g. 'demo') | 'A,B,C' (case-insensitive) -> registered task names."""
    _load_plugins()
    spec = str(spec).strip()
    if spec.isdigit() and int(spec) in TASK_SETS:
        return list(TASK_SETS[int(spec)])
    if spec.lower() in NAMED_SETS:
        return list(NAMED_SETS[spec.lower()])
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError(f"empty task list {spec!r}; use 8, 14, 20, {', '.join(sorted(NAMED_SETS))} or A,B,C")
    try:
        tasks = [_canonical(name) for name in names]
    except ValueError as err:
        sets = ", ".join([str(k) for k in TASK_SETS] + sorted(NAMED_SETS))
        raise ValueError(f"{err}; task sets: {sets}") from None
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task list {spec!r} names a task twice")
    return tasks


def dataset_names() -> list[str]:
    """All registered task names."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_spec(name: str, convention: str | None = None) -> DatasetSpec:
    """Registration record of a task ('XVal' resolves to X), with what `convention` changes applied."""
    spec = _REGISTRY[_parse(name)[0]]
    changed = conventions.override(spec.name, convention)
    if changed is None:
        return spec
    return replace(spec, classnames=list(changed.classnames) if changed.classnames is not None else spec.classnames,
                   templates=list(changed.templates) if changed.templates is not None else spec.templates,
                   fixed_names=changed.classnames is not None)


def check_requirements(names: list[str]) -> None:
    """Raise MissingDependencyError, naming the pip command, if a task needs an optional package not installed."""
    for name in names:
        spec = get_spec(name)
        for module in spec.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise MissingDependencyError(f"{spec.name} needs the optional package {module} to read its files: "
                                             f"pip install {module}") from None


def split_train_val(train: Dataset, name: str = "") -> tuple[Subset, Subset]:
    """Deterministic [train, val] split of a train set, exactly as task_vectors builds `<Task>Val`."""
    total = len(train)
    n_val = min(int(total * VAL_FRACTION), MAX_VAL_SAMPLES)
    if n_val <= 0 or n_val >= total:
        raise ValueError(f"{name or 'dataset'}: train split has {total} images, too few to cut a "
                         f"{VAL_FRACTION:.0%} validation split")
    parts = random_split(train, [total - n_val, n_val], generator=torch.Generator().manual_seed(VAL_SEED))
    return parts[0], parts[1]


def _call_build(spec: DatasetSpec, split: str, preprocess, location: str, download: bool,
                convention: str | None = None, source: str = LOCAL) -> Dataset:
    check_requirements([spec.name])
    parameters = inspect.signature(spec.build).parameters
    kwargs = {"convention": conventions.check_convention(convention or conventions.DEFAULT)} \
        if "convention" in parameters else {}
    if source != LOCAL:  # e.g. --data-source hf: FusionBench's hub datasets (hf_sets.py); `location` is unused
        if source not in _SOURCES:
            raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(data_sources())}")
        return _SOURCES[source](get_spec(spec.name, convention), split, preprocess, download, convention)
    if not download:
        return spec.build(split, preprocess, location, **kwargs)
    if "download" not in parameters:
        raise ValueError(f"{spec.name} cannot be downloaded automatically; prepare it by hand "
                         f"(see the error without --download for the layout expected)")
    return spec.build(split, preprocess, location, download=True, **kwargs)


def _source_of(dataset: Dataset) -> str:
    """Where a dataset's images come from: the folder or file its builder names (`source`), torchvision's
    `root`, else its class (data generated in memory)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    source = getattr(dataset, "source", None) or getattr(dataset, "root", None)
    if isinstance(source, dict) and "repo" in source:  # a hub dataset (hf_sets.py): id, config and commit
        config = f"/{source['config']}" if source.get("config") else ""
        return f"hf://{source['repo']}{config}@{source.get('revision')}"
    if source:
        return os.path.abspath(source) if os.path.exists(source) else str(source)
    return f"{type(dataset).__module__}.{type(dataset).__name__}"


def _classnames_of(dataset: Dataset, default: list) -> list:
    """Class names derived from the data when the builder attached them (as the original does), else default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, "classnames", default))


@dataclass
class DatasetSplit:
    """One split of one task, ready for evaluation (loader does not shuffle)."""
    name: str
    classnames: list
    templates: list[Callable[[str], str]]
    dataset: Dataset
    loader: DataLoader = field(repr=False)
    split: str = "test"  # "train", "val" or "test"
    source: str = ""  # folder or file the images were read from (see `provenance`)
    cut_from_train: bool = False  # val (or the train remainder) cut out of the train split with seed 0
    convention: str | None = None  # set when the convention changes this task's data, names or templates
    crop: str | None = None  # "floor": centre crop as FusionBench's CLIPImageProcessor (conventions.crop_rule)

    @property
    def provenance(self) -> dict:
        """Where the evaluated images came from, for results.jsonl: source, split, image count."""
        info = {"source": self.source, "split": self.split, "n": len(self.dataset)}
        if self.cut_from_train:
            info["cut"] = f"{VAL_FRACTION:.0%} of train (at most {MAX_VAL_SAMPLES}), seed {VAL_SEED}"
        if self.convention:  # other class names/templates (heads) or data: other accuracies
            info["convention"] = self.convention
        if self.crop:  # other pixels than torchvision's centre crop
            info["crop"] = self.crop
        return info

    # aliases: the original code reads `dataset.test_dataset` / `dataset.test_loader`
    @property
    def test_dataset(self) -> Dataset:
        return self.dataset

    @property
    def test_loader(self) -> DataLoader:
        return self.loader


def load_split(name: str, split: str, preprocess, location: str, download: bool = False,
               convention: str | None = None, source: str = LOCAL) -> Dataset:
    """The raw torch Dataset of one split of a task ("train" is the remainder after cutting "val"), read from
    `source` ("local": the task's builder under `location`; "hf": the hub)."""
    spec = get_spec(name)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    preprocess = conventions.preprocess_for(preprocess, convention)  # fusionbench: FusionBench's centre crop
    if split == "test" or not spec.val_from_train:
        return _call_build(spec, split, preprocess, location, download, convention, source)
    train, val = split_train_val(_call_build(spec, "train", preprocess, location, download, convention, source),
                                 spec.name)
    return train if split == "train" else val


def get_dataset(name: str, preprocess, location: str, batch_size: int = 128, num_workers: int = 2,
                split: str | None = None, download: bool = False, convention: str | None = None,
                source: str = LOCAL) -> DatasetSplit:
    """Task `name` ("XVal" -> split "val" of X, else "test" unless `split` is given) with a non-shuffled loader;
    data, class names and templates follow `convention` (default task_vectors, src.datasets.conventions). The
    images come from `source`: "local" (folders under `location`) or a registered source such as "hf". The
    convention's preprocessing applies (`conventions.preprocess_for`: FusionBench's centre crop) and is recorded
    in the provenance."""
    base, is_val_name = _parse(name)
    split = split or ("val" if is_val_name else "test")
    spec = get_spec(base, convention)
    dataset = load_split(base, split, preprocess, location, download, convention, source)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    label = val_of(base) if split == "val" else base
    names = spec.classnames if spec.fixed_names else _classnames_of(dataset, spec.classnames)
    return DatasetSplit(label, names, spec.templates, dataset, loader, split=split, source=_source_of(dataset),
                        cut_from_train=spec.val_from_train and split != "test",
                        convention=convention if conventions.override(base, convention) is not None else None,
                        crop=conventions.crop_rule(convention))
