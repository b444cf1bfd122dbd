"""FusionBench's datasets from the Hugging Face hub (``--data-source hf``).

Each task reads the hub dataset FusionBench evaluates on (ids and splits from its
``config/dataset/image_classification`` and ``fusion_bench/dataset``). The files come from the hub cache:
``huggingface_hub.snapshot_download(..., local_files_only=True)``, or with ``--download`` fetched first (only
the split needed), and ``datasets`` reads them from that folder. ``datasets.load_dataset("<org>/<name>")``
is not used: offline it ignores the hub cache's snapshot files and needs its own prepared copy, so one
cache, the hub's, serves models and data, online and offline alike.

``<Task>Val`` follows our rule (10 % of train, at most 5,000, seed 0) on the hub's train split, for every
task. Images are converted to RGB first, as Hugging Face's CLIP processor does.

This module registers ``build_from_hub`` as the registry's data source "hf" (``register_source``), so
``get_dataset(..., source="hf")`` builds every split here. Imports point one way: this module uses the
registry's types; the registry only loads it by name as a self-registering plugin, like the dataset families.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

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
    # the hub's class names in its label order, when our class lists (the local data's order) differ:
    # labels are then mapped onto our order by name, so the heads line up
    label_names: tuple[str, ...] | None = None


HUB_DATASETS: dict[str, HubSet] = {
    "SUN397": HubSet("tanganke/sun397"),
    "Cars": HubSet("tanganke/stanford_cars"),
    "RESISC45": HubSet("tanganke/resisc45"),
    "EuroSAT": HubSet("tanganke/eurosat"),
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
        label = self.label_map[label] if self.label_map is not None else label
        return (self.transform(image) if self.transform is not None else image), label

    def cache_fingerprint(self) -> dict:
        """What identifies these images and labels for the input cache: repository, commit, split, files."""
        return {**self.source, "label_map": self.label_map} if self.label_map is not None else self.source


def _columns(data, hub: HubSet, task: str) -> tuple[str, str]:
    """The image and label columns: FusionBench's names or the usual ones (CIFAR-100: ``fine_label``, never
    ``coarse_label``), else the first Image / ClassLabel feature."""
    import datasets

    cols = data.features
    image = next((c for c in (hub.image, "image", "img") if c in cols), None) or next(
        (c for c, f in cols.items() if isinstance(f, datasets.Image)), None)
    label = next((c for c in (hub.label, "label", "fine_label", "labels") if c in cols), None) or next(
        (c for c, f in cols.items() if isinstance(f, datasets.ClassLabel) and c != "coarse_label"), None)
    if image is None or label is None:
        raise ValueError(f"{task}: hub dataset {hub.repo} has columns {list(cols)}; expected an image column "
                         f"({hub.image!r}) and a label column ({hub.label!r})")
    return image, label


def load_hub_split(task: str, hub: HubSet, split: str, transform, download: bool = False,
                   n_classes: int | None = None,
                   label_map: list[int] | None = None) -> HubImageDataset:
    """One hub split ('train' or our 'test') of ``task`` from the hub cache, fetched first when ``download``."""
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
    image, label = _columns(data, hub, task)
    feature = data.features[label]
    if n_classes is not None and isinstance(feature, datasets.ClassLabel) and feature.num_classes != n_classes:
        warnings.warn(f"{task}: hub dataset {hub.repo} has {feature.num_classes} classes but the task's class "
                      f"names list {n_classes}; accuracies would be meaningless if the labels differ", stacklevel=2)
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


def hub_label_map(task: str, hub: HubSet, classnames: list) -> list[int] | None:
    """Hub label -> index in ``classnames`` (a name, or TSV's list of synonyms led by the name), or None
    when the hub's order is ours."""
    if hub.label_names is None:
        return None
    ours = [c[0] if isinstance(c, (list, tuple)) else c for c in classnames]
    missing = [n for n in hub.label_names if n not in ours]
    if missing or len(ours) != len(hub.label_names):
        raise ValueError(f"{task}: the classes of {hub.repo} ({', '.join(hub.label_names)}) do not match the "
                         f"task's class names ({', '.join(map(str, ours))})")
    return [ours.index(n) for n in hub.label_names]


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
    n_classes = len(spec.classnames) or None
    label_map = hub_label_map(spec.name, hub, spec.classnames)
    if split == "test":
        return load_hub_split(spec.name, hub, "test", preprocess, download, n_classes, label_map)
    train = load_hub_split(spec.name, hub, "train", preprocess, download, n_classes, label_map)
    if split == "train" and spec.val_from_train:  # the registry cuts <Task>Val out of it itself
        return train
    rest, val = split_train_val(train, spec.name)  # tasks with a val folder locally (EuroSAT): same rule here
    return val if split == "val" else rest


register_source(SOURCE, build_from_hub)
