"""FusionBench's datasets from the Hugging Face hub (``--data-source hf``).

Each task reads the hub dataset FusionBench evaluates on (ids and splits from its
``config/dataset/image_classification`` and ``fusion_bench/dataset``). The files come from the hub cache:
``huggingface_hub.snapshot_download(..., local_files_only=True)``, or with ``--download`` fetched first (only
the split needed), and ``datasets`` reads them from that folder. ``datasets.load_dataset("<org>/<name>")``
is not used: offline it ignores the hub cache's snapshot files and needs its own prepared copy, so one
cache, the hub's, serves models and data, online and offline alike.

``<Task>Val`` follows our rule (10 % of train, at most 5,000, seed 0) on the hub's train split, for every
task. Images are converted to RGB first, as Hugging Face's CLIP processor does.

Nothing read is trusted unchecked: the image column must hold images, every label must lie in
[0, number of classes) (checked on the whole column when a split is read), and a copy that carries its own
class names (a ``ClassLabel`` feature) has its labels matched to the task's class list by name, so that a copy
listing the classes in another order still lines up with the heads' rows (an unknown name is an error).

This module registers ``build_from_hub`` as the registry's data source "hf" (``register_source``), so
``get_dataset(..., source="hf")`` builds every split here. Imports point one way: this module uses the
registry's types; the registry only loads it by name as a self-registering plugin, like the dataset families.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from src.datasets import conventions
from src.datasets.folder_sets import eurosat_classname
from src.datasets.registry import DatasetNotFoundError, DatasetSpec, get_spec, register_source, split_train_val
from utils import is_val

SOURCE = "hf"  # get_dataset(..., source="hf") (main.py --data-source hf) builds every split here
DATA_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset",  # the datasets builder per file type
                **{ext: "imagefolder" for ext in (".png", ".jpg", ".jpeg")}}  # <split>/<class>/<image>


@dataclass(frozen=True)
class HubSet:
    repo: str
    config: str | None = None  # sub-folder of the repository holding this configuration's files
    test: str = "test"  # hub split used as our test split
    image: str = "image"
    label: str = "label"
    # the hub's class names in its label order, for a copy without a ClassLabel feature (FER2013's webdataset):
    # labels are then mapped onto our order by name, so the heads line up. A ClassLabel's own names win.
    label_names: tuple[str, ...] | None = None
    # another wording of the class names that a copy may use, -> one of ours (EuroSAT: 'AnnualCrop' folders)
    alias: Callable[[str], str | None] | None = None


def _eurosat_words(name: str) -> str | None:
    """EuroSAT's folder names ('AnnualCrop', 'SeaLake') -> our OpenAI wording, None when not one of them."""
    try:
        return eurosat_classname(name)
    except ValueError:
        return None


HUB_DATASETS: dict[str, HubSet] = {
    "SUN397": HubSet("tanganke/sun397"),
    "Cars": HubSet("tanganke/stanford_cars"),
    "RESISC45": HubSet("tanganke/resisc45"),
    "EuroSAT": HubSet("tanganke/eurosat", alias=_eurosat_words),
    "SVHN": HubSet("ufldl-stanford/svhn", config="cropped_digits"),
    "GTSRB": HubSet("tanganke/gtsrb"),
    "MNIST": HubSet("ylecun/mnist"),
    "DTD": HubSet("tanganke/dtd"),
    "STL10": HubSet("tanganke/stl10"),
    "OxfordIIITPet": HubSet("timm/oxford-iiit-pet"),
    "Flowers102": HubSet("dpdl-benchmark/oxford_flowers102"),
    "CIFAR100": HubSet("tanganke/cifar100"),
    "PCAM": HubSet("1aurent/PatchCamelyon"),
    "FER2013": HubSet("clip-benchmark/wds_fer2013", image="jpg", label="cls",  # FusionBench's load_fer2013
                      label_names=("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")),
    "CIFAR10": HubSet("tanganke/cifar10"),
    "Food101": HubSet("ethz/food101", test="validation"),
    "FashionMNIST": HubSet("zalando-datasets/fashion_mnist"),
    "RenderedSST2": HubSet("nateraw/rendered-sst2"),
    "EMNIST": HubSet("tanganke/emnist_letters"),  # FusionBench's EMNIST is the letters split
    "KMNIST": HubSet("tanganke/kmnist"),
}


def _patterns(hub: HubSet, split: str) -> list[str]:
    """allow_patterns fetching only one split: `<split>-*.parquet` files or a `<split>/` folder."""
    prefix = f"{hub.config}/" if hub.config else ""
    return [f"{prefix}*{split}-*", f"{prefix}*{split}/*", f"{prefix}*{split}.*", "README.md"]


def split_files(folder: Path, hub: HubSet, split: str) -> list[Path]:
    """Data files of one split in a snapshot: `[<config>/]**/<split>-*.<ext>` or `**/<split>/**/*.<ext>`."""
    base = folder / hub.config if hub.config else folder
    if not base.is_dir():
        return []
    files = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.suffix in DATA_FORMATS and (rel.name.startswith((f"{split}-", f"{split}.")) or split in rel.parts[:-1]):
            files.append(path)
    return files


class HubImageDataset(Dataset):
    """(transform(RGB PIL image), int label) over one split of a ``datasets.Dataset``."""

    def __init__(self, data, image: str, label: str, transform=None, source: dict | None = None,
                 label_map: list[int] | None = None):
        self.data, self.image, self.label, self.transform = data, image, label, transform
        self.source = source or {}
        self.label_map = label_map  # hub label -> index in the task's class list

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        row = self.data[int(index)]
        image = row[self.image].convert("RGB")
        label = int(row[self.label])
        if self.label_map is not None:
            if not 0 <= label < len(self.label_map):  # never Python's negative indexing (-1 -> the last class)
                raise ValueError(f"label {label} of row {index} is outside the {len(self.label_map)} classes of "
                                 f"{self.source.get('repo', 'the hub dataset')}")
            label = self.label_map[label]
        return (self.transform(image) if self.transform is not None else image), label

    def cache_fingerprint(self) -> dict:
        """What identifies these images and labels for the input cache: repository, commit, split, files."""
        return {**self.source, "label_map": self.label_map} if self.label_map is not None else self.source


def _columns(data, hub: HubSet, task: str, split: str = "") -> tuple[str, str]:
    """The image and label columns: FusionBench's names or the usual ones (CIFAR-100: ``fine_label``, never
    ``coarse_label``), else the first Image / ClassLabel feature. The image column must hold images."""
    import datasets

    cols = data.features
    image = next((c for c in (hub.image, "image", "img") if c in cols), None) or next(
        (c for c, f in cols.items() if isinstance(f, datasets.Image)), None)
    label = next((c for c in (hub.label, "label", "fine_label", "labels") if c in cols), None) or next(
        (c for c, f in cols.items() if isinstance(f, datasets.ClassLabel) and c != "coarse_label"), None)
    if image is None or label is None:
        raise ValueError(f"{task}: hub dataset {hub.repo} has columns {list(cols)}; expected an image column "
                         f"({hub.image!r}) and a label column ({hub.label!r})")
    if not isinstance(cols[image], datasets.Image):
        kind = getattr(cols[image], "dtype", type(cols[image]).__name__)
        example = f" such as {str(data[0][image])[:60]!r}" if len(data) and kind == "string" else ""
        raise ValueError(f"{task}: column {image!r} of hub dataset {hub.repo}{f' (split {split!r})' if split else ''} "
                         f"holds {kind} values{example}, not images; this copy is not the image dataset FusionBench "
                         f"evaluates: fetch {hub.repo} again (--download) or give the task a copy with an image column")
    return image, label


def _normalized(name) -> str:
    """A class name compared by its words: case, spaces, underscores (and '-', '/' between words) do not count,
    so 'Annual_Crop', 'annual crop' and 'T - shirt / top' / 'T-shirt/top' match."""
    return "".join(str(name).lower().replace("_", " ").replace("-", " ").replace("/", " ").split())


def _lead(name):
    """A class name, or the leading name of TSV's list of synonyms."""
    return name[0] if isinstance(name, (list, tuple)) and name else name


def _name_index(task: str, classnames: list) -> dict[str, int]:
    """Normalised name -> index in ``classnames``: its names (every synonym of TSV's lists), then, where not taken,
    the same class's name under the other conventions (their class lists share our order)."""
    index: dict[str, int] = {}
    lists = [classnames] + [names for names in (get_spec(task, c).classnames for c in conventions.CONVENTIONS)
                            if len(names) == len(classnames)]
    for names in lists:
        for i, name in enumerate(names):
            for synonym in (name if isinstance(name, (list, tuple)) else [name]):
                index.setdefault(_normalized(synonym), i)
    return index


def hub_label_map(task: str, hub: HubSet, classnames: list, names: list[str] | tuple[str, ...] | None = None
                  ) -> list[int] | None:
    """Hub label -> index in ``classnames`` (a name, or TSV's list of synonyms led by the name), matched by name
    (case, spaces and underscores aside). ``names``: the hub copy's class names in its label order (its ClassLabel
    names), else ``hub.label_names``; None when neither is known or the hub's order is ours. ValueError naming
    every hub class name that is not one of ours."""
    names = list(names) if names is not None else list(hub.label_names) if hub.label_names is not None else None
    if names is None:
        return None
    index = _name_index(task, classnames)

    def ours(name):
        found = index.get(_normalized(name))
        if found is None and hub.alias is not None and hub.alias(str(name)) is not None:
            found = index.get(_normalized(hub.alias(str(name))))
        return found

    mapping = [ours(n) for n in names]
    unknown = [n for n, i in zip(names, mapping) if i is None]
    if unknown:
        raise ValueError(f"{task}: the classes of {hub.repo} do not match the task's class names: "
                         f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} "
                         f"{'is' if len(unknown) == 1 else 'are'} not among {len(classnames)} known "
                         f"({', '.join(map(str, map(_lead, classnames[:8])))}{', ...' if len(classnames) > 8 else ''}), "
                         "so its labels cannot be matched to the heads' rows; use the copy FusionBench evaluates")
    twice = sorted({str(_lead(classnames[i])) for i in mapping if mapping.count(i) > 1})
    if twice:
        raise ValueError(f"{task}: several classes of {hub.repo} ({', '.join(map(str, names))}) match the same "
                         f"class name ({', '.join(twice)}), so its labels cannot be matched to the heads' rows")
    return None if mapping == list(range(len(names))) else mapping


def _class_names(feature) -> list[str] | None:
    """A ClassLabel's names when they name the classes; None for the placeholder names '0', '1', ... that a
    ClassLabel made from a class count carries (they say nothing about the order)."""
    names = list(getattr(feature, "names", None) or [])
    return None if not names or names == [str(i) for i in range(len(names))] else names


def check_labels(task: str, hub: HubSet, split: str, data, label: str, n_classes: int) -> None:
    """Every label of the split lies in [0, n_classes), checked on the whole column at once (no row is decoded);
    else ValueError naming the dataset, the split and the bad values."""
    column = data.data.column(label)
    where = f"{task}: split '{split}' of hub dataset {hub.repo} (column {label!r})"
    if column.null_count:
        raise ValueError(f"{where} has {column.null_count} rows without a label; evaluate a copy with every label")
    values = np.asarray(column.to_numpy())
    if values.dtype.kind not in "iub":
        raise ValueError(f"{where} holds {values.dtype} values, not class indices; use a copy with integer labels")
    values = values.astype(np.int64, copy=False)
    bad = (values < 0) | (values >= n_classes)
    if bad.any():
        shown = np.unique(values[bad])
        listed = ", ".join(map(str, shown[:10])) + (" ..." if len(shown) > 10 else "")
        raise ValueError(f"{where} has labels outside [0, {n_classes}): {listed} ({int(bad.sum())} of {len(values)} "
                         f"rows); they would be scored against the wrong class or none: use the copy FusionBench "
                         "evaluates, with the task's classes")


def load_hub_split(task: str, hub: HubSet, split: str, transform, download: bool = False,
                   n_classes: int | None = None, label_map: list[int] | None = None,
                   classnames: list | None = None) -> HubImageDataset:
    """One hub split ('train' or our 'test') of ``task`` from the hub cache, fetched first when ``download``.

    ``classnames``: the task's class list; when the copy names its classes (ClassLabel) or ``hub.label_names``
    does, labels are mapped onto it by name (``hub_label_map``), else ``label_map`` is used as given. Labels are
    checked to lie in [0, classes) before anything is evaluated."""
    from clip.hub import fetch_command, require, snapshot

    datasets = require("datasets", "--data-source hf")
    hub_split = hub.test if split == "test" else split
    folder = snapshot(hub.repo, repo_type="dataset", download=download, allow_patterns=_patterns(hub, hub_split),
                      error=DatasetNotFoundError)
    files = split_files(folder, hub, hub_split)
    if not files:
        raise DatasetNotFoundError(f"{task}: no '{hub_split}' split files of dataset {hub.repo} in {folder}; run "
                                   f"again with --download, or fetch them with `{fetch_command(hub.repo, 'dataset')}`")
    formats = {DATA_FORMATS[f.suffix] for f in files}
    if len(formats) > 1:
        raise ValueError(f"{task}: split '{hub_split}' of {hub.repo} mixes file formats {sorted(formats)} in {folder}")
    data = datasets.load_dataset(formats.pop(), data_files={hub_split: [str(f) for f in files]}, split=hub_split)
    image, label = _columns(data, hub, task, hub_split)
    feature = data.features[label]
    n_classes = n_classes or (len(classnames) if classnames else None)
    hub_names = _class_names(feature) if isinstance(feature, datasets.ClassLabel) else None
    named = hub_names or (list(hub.label_names) if hub.label_names is not None else None)
    if classnames is not None:
        label_map = hub_label_map(task, hub, classnames, hub_names)
    if n_classes is not None and hub_names is None and isinstance(feature, datasets.ClassLabel) \
            and feature.num_classes != n_classes:  # no names to match: only the count can disagree
        warnings.warn(f"{task}: hub dataset {hub.repo} has {feature.num_classes} classes but the task's class "
                      f"names list {n_classes}; accuracies would be meaningless if the labels differ", stacklevel=2)
    # labels index the hub's own classes when it names them (mapped onto ours), else the task's list
    if label_map is not None:
        check_labels(task, hub, hub_split, data, label, len(label_map))
    elif named is not None and classnames is not None:
        check_labels(task, hub, hub_split, data, label, len(named))
    elif n_classes is not None:
        check_labels(task, hub, hub_split, data, label, n_classes)
    source = {"repo": hub.repo, "revision": folder.name, "config": hub.config, "split": hub_split,
              "files": [str(f.relative_to(folder)) for f in files], "rows": len(data)}
    return HubImageDataset(data, image, label, transform, source, label_map)


def ensure_hub_splits(names: list[str], download: bool = False) -> None:
    """Before any work: every hub split that evaluating ``names`` (e.g. "MNIST", "MNISTVal") reads is in the
    cache, fetched first when ``download``; else one DatasetNotFoundError listing all that are missing."""
    from clip.hub import fetch_command, require, snapshot

    require("datasets", "--data-source hf")  # needed later, to read the files: say so now
    missing = []
    for name in dict.fromkeys(names):
        spec = get_spec(name)
        hub = HUB_DATASETS.get(spec.name)
        if hub is None:
            missing.append(f"{spec.name} has no Hugging Face dataset "
                           f"(--data-source hf covers {', '.join(HUB_DATASETS)})")
            continue
        split = "train" if is_val(name) else hub.test
        try:
            folder = snapshot(hub.repo, repo_type="dataset", download=download, allow_patterns=_patterns(hub, split),
                              error=DatasetNotFoundError)
        except DatasetNotFoundError as err:
            missing.append(str(err))
            continue
        if not split_files(folder, hub, split):
            missing.append(f"dataset {hub.repo}: no '{split}' split files in {folder}; run again with --download, "
                           f"or fetch them with `{fetch_command(hub.repo, 'dataset')}`")
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} hub dataset splits are missing:\n  " + "\n  ".join(missing))


def check_hub_data(names: list[str], convention: str | None = None, download: bool = False) -> None:
    """Before any work: read every hub split that evaluating ``names`` reads, as evaluation will (columns, class
    names and the whole label column; no image is decoded), so that a copy with string images, labels out of
    range or unknown class names stops the run before heads are built or models merged. After the first read
    the ``datasets`` cache makes this a memory map per split, and a process (a sweep planning many runs) checks
    each split once."""
    from src.datasets.registry import load_split

    for name in dict.fromkeys(names):
        key = (name, convention, HUB_DATASETS.get(get_spec(name).name))
        if key not in _CHECKED:
            load_split(name, "val" if is_val(name) else "test", None, "", download, convention, SOURCE)
            _CHECKED.add(key)


_CHECKED: set[tuple] = set()  # (dataset, convention, hub copy) read by check_hub_data in this process


def build_from_hub(spec: DatasetSpec, split: str, preprocess, download: bool = False,
                   convention: str | None = None) -> Dataset:
    """The registry's builder for ``--data-source hf``: split in {'train', 'val', 'test'}; ``spec`` carries
    the class names of the run's convention (src.datasets.conventions)."""
    hub = HUB_DATASETS.get(spec.name)
    if hub is None:
        raise DatasetNotFoundError(f"{spec.name} has no Hugging Face dataset; --data-source hf covers "
                                   f"{', '.join(HUB_DATASETS)}")
    if spec.name == "EMNIST" and convention != "fusionbench":  # the hub copy is the letters, 26 classes
        raise ValueError(f"--data-source hf reads EMNIST letters ({hub.repo}), which only the fusionbench "
                         f"convention evaluates; this run uses the {convention or 'task_vectors'} convention "
                         "(EMNIST digits): use --source hf or --convention fusionbench, or local EMNIST data")
    names = spec.classnames or None
    if split == "test":
        return load_hub_split(spec.name, hub, "test", preprocess, download, classnames=names)
    train = load_hub_split(spec.name, hub, "train", preprocess, download, classnames=names)
    if split == "train" and spec.val_from_train:  # the registry cuts <Task>Val out of it itself
        return train
    rest, val = split_train_val(train, spec.name)  # tasks with a val folder locally (EuroSAT): same rule here
    return val if split == "val" else rest


register_source(SOURCE, build_from_hub)
