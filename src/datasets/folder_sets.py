"""Tasks stored in the task_vectors folder layouts under --data-location: Cars, DTD, EuroSAT, RESISC45, SUN397.

Layouts (task_vectors; the official SVC code's variants are accepted too):
  stanford_cars/{cars_train, cars_test, devkit/cars_meta.mat, devkit/cars_train_annos.mat}
      + cars_test_annos_withlabels.mat in stanford_cars/ (task_vectors) or stanford_cars/devkit/ (SVC)
  dtd/{train, val}                    ImageFolder; test split = `val` (task_vectors) or `test` (SVC)
  EuroSAT_splits/{train, val, test}   ImageFolder; validation split = `val` (task_vectors) or `valid` (SVC)
  resisc45/NWPU-RESISC45/<class>/*.jpg + resisc45/resisc45-{train,val,test}.txt (file names per split)
  sun397/{train, val}                 ImageFolder, folders like `a_abbey`; test = `val` or `test` (SVC)
These splits are not what torchvision downloads, so none of these tasks can be fetched with --download.

When both names of a split exist (e.g. dtd/val and dtd/test) the split is never guessed: identical folders
are used either way (said once), different ones stop the run until `set_split_folders` (main.py
--split-folder TASK=NAME) picks one; `check_split_folders` makes that check up front, before any work (src.runs.plan).
Every dataset carries `source`, the folder or file it was read from.
"""
import functools
import os
import re

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from src.datasets import templates as T
from src.datasets.registry import DatasetNotFoundError, register_dataset
from utils import is_val, task_of

PREP_HELP = ("Prepare the splits as task_vectors does (https://github.com/mlfoundations/task_vectors/issues/1) "
             "and pass the folder that contains them as --data-location.")


# Split folders that the reference codes name differently: (task, split) -> {folder name: whose name it is}.
# task_vectors: src/datasets/{dtd,sun397,eurosat}.py; official SVC code: the same files, edited.
SPLIT_FOLDERS: dict[tuple[str, str], dict[str, str]] = {
    ("DTD", "test"): {"val": "task_vectors", "test": "the official SVC code"},
    ("SUN397", "test"): {"val": "task_vectors", "test": "the official SVC code"},
    ("EuroSAT", "val"): {"val": "task_vectors", "valid": "the official SVC code"},
}
SPLIT_BASES = {"DTD": "dtd", "SUN397": "sun397", "EuroSAT": "EuroSAT_splits"}  # folder holding those splits
_chosen: dict[str, str] = {}  # task -> folder name picked by the user (main.py --split-folder)


def canonical_split_folders(choices: dict[str, str]) -> dict[str, str]:
    """Checked {task: folder} choices with registered task spellings ({"dtd": "test"} -> {"DTD": "test"})."""
    names = {task.lower(): (task, folders) for (task, _), folders in SPLIT_FOLDERS.items()}
    picked = {}
    for task, folder in choices.items():
        if task.lower() not in names:
            raise ValueError(f"--split-folder {task}={folder}: only {', '.join(t for t, _ in names.values())} "
                             f"have split folders with two names")
        name, folders = names[task.lower()]
        if folder not in folders:
            raise ValueError(f"--split-folder {task}={folder}: {name}'s folder is one of {', '.join(folders)}")
        picked[name] = folder
    return picked


def set_split_folders(choices: dict[str, str]) -> None:
    """Pick the folder of each ambiguous split by task, e.g. {"DTD": "test"}; replaces earlier choices."""
    picked = canonical_split_folders(choices)
    _chosen.clear()
    _chosen.update(picked)


def _file_list(path: str) -> list[tuple[str, int]]:
    return sorted((os.path.relpath(os.path.join(root, f), path), os.path.getsize(os.path.join(root, f)))
                  for root, _, files in os.walk(path) for f in files)


@functools.lru_cache(maxsize=None)
def _same_files(a: str, b: str) -> bool:
    """Same relative file names and sizes (a copy or link of one split): either folder gives the same numbers."""
    same = _file_list(a) == _file_list(b)
    if same:
        print(f"{a} and {b} hold the same files; reading {a}", flush=True)
    return same


def _split_dir(task: str, base: str, split: str, chosen: dict[str, str] | None = None) -> str:
    """Folder of `split` under `base`: the user's pick (`chosen`, else `set_split_folders`'), the only one of its
    names that exists, or either of two identical ones; two different ones are an error naming both and the
    flag that picks one."""
    folders = SPLIT_FOLDERS.get((task, split), {split: ""})
    chosen = _chosen if chosen is None else chosen
    if task in chosen and (task, split) in SPLIT_FOLDERS:
        return _first_dir(task, [os.path.join(base, chosen[task])])
    paths = [os.path.join(base, name) for name in folders]
    found = [p for p in paths if os.path.isdir(p)]
    if len(found) > 1 and not _same_files(*found):
        options = " or ".join(f"--split-folder {task}={name}" for name in folders)
        described = " and ".join(f"{p} (the {split} split of {who})" for p, who in zip(paths, folders.values()))
        raise ValueError(f"{task}: both {described} exist and hold different files, so which one is the {split} "
                         f"split is ambiguous; pick one with {options}")
    return _first_dir(task, found or paths)


def check_split_folders(names: list[str], location: str, choices: dict[str, str] | None = None) -> None:
    """Before any work: every split folder that evaluating `names` (e.g. "DTD", "EuroSATVal") reads under
    `location` is unambiguous, by the same rule as the builders (`_split_dir`); `choices`: the --split-folder
    picks ({task: folder}; default: `set_split_folders`'). One ValueError for all ambiguous splits. Missing
    folders are left to the builders, which name them. The test split is always checked: the zero-shot heads
    read their class names from it."""
    chosen = canonical_split_folders(choices) if choices is not None else None
    problems = []
    for name in dict.fromkeys(names):
        task = next((t for t in SPLIT_BASES if t.lower() == task_of(name).lower()), None)
        if task is None:
            continue
        for split in ("test", "val") if is_val(name) else ("test",):
            if (task, split) not in SPLIT_FOLDERS:
                continue
            try:
                _split_dir(task, os.path.join(location, SPLIT_BASES[task]), split, chosen)
            except DatasetNotFoundError:
                pass
            except ValueError as err:
                if str(err) not in problems:
                    problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))


def _first_dir(task: str, candidates: list[str]) -> str:
    """First existing folder among the accepted layout variants, else a DatasetNotFoundError naming them."""
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise DatasetNotFoundError(f"{task}: folder {' or '.join(candidates)} not found. {PREP_HELP}")


def _first_file(task: str, candidates: list[str]) -> str:
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DatasetNotFoundError(f"{task}: file {' or '.join(candidates)} not found. {PREP_HELP}")


def _class_folders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def _image_folder(task: str, split_dir: str, train_dir: str, preprocess) -> ImageFolder:
    """ImageFolder whose classes must match the train folder's (labels index the train class list)."""
    if split_dir != train_dir and os.path.isdir(train_dir):
        if _class_folders(split_dir) != _class_folders(train_dir):
            raise ValueError(f"{task}: class folders of {split_dir} differ from those of {train_dir}, so labels "
                             f"would not match the class names. Re-create the splits with the same class folders.")
    return ImageFolder(split_dir, transform=preprocess)


class ImageList(Dataset):
    """(path, label) samples read as RGB PIL images."""

    def __init__(self, samples: list[tuple[str, int]], transform=None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), label


def build_cars(split: str, preprocess, location: str) -> Dataset:
    import scipy.io

    base = os.path.join(location, "stanford_cars")
    devkit = os.path.join(base, "devkit")
    if split == "train":
        annos = _first_file("Cars", [os.path.join(devkit, "cars_train_annos.mat")])
        images = _first_dir("Cars", [os.path.join(base, "cars_train")])
    elif split == "test":
        annos = _first_file("Cars", [os.path.join(base, "cars_test_annos_withlabels.mat"),
                                     os.path.join(devkit, "cars_test_annos_withlabels.mat")])
        images = _first_dir("Cars", [os.path.join(base, "cars_test")])
    else:
        raise ValueError(f"Cars has no {split!r} split")
    meta = _first_file("Cars", [os.path.join(devkit, "cars_meta.mat")])
    records = scipy.io.loadmat(annos, squeeze_me=True)["annotations"]
    samples = [(os.path.join(images, str(r["fname"])), int(r["class"]) - 1) for r in records]  # .mat is 1-based
    dataset = ImageList(samples, preprocess)
    dataset.source = f"{os.path.abspath(images)} (labels: {os.path.abspath(annos)})"
    names = scipy.io.loadmat(meta, squeeze_me=True)["class_names"].tolist()
    dataset.classnames = [str(name).replace("_", " ") for name in names]
    return dataset


def _train_test_folders(name: str, folder: str, split: str, preprocess, location: str) -> Dataset:
    """`<folder>/train`, or for test `<folder>/val` (task_vectors' name of the original test partition)
    or `<folder>/test` (the SVC code's name); see `_split_dir` when both exist."""
    if split not in ("train", "test"):
        raise ValueError(f"{name} has no {split!r} split ({name}Val is cut from train)")
    base = os.path.join(location, folder)
    return _image_folder(name, _split_dir(name, base, split), os.path.join(base, "train"), preprocess)


def build_dtd(split: str, preprocess, location: str) -> Dataset:
    dataset = _train_test_folders("DTD", "dtd", split, preprocess, location)
    dataset.classnames = [c.replace("_", " ") for c in dataset.classes]
    return dataset


_EUROSAT_OPENAI = {
    "annual crop": "annual crop land", "forest": "forest", "herbaceous vegetation": "brushland or shrubland",
    "highway": "highway or road", "industrial area": "industrial buildings or commercial buildings",
    "pasture": "pasture land", "permanent crop": "permanent crop land",
    "residential area": "residential buildings or homes or apartments", "river": "river", "sea lake": "lake or sea",
}


def eurosat_classname(folder: str) -> str:
    """'HerbaceousVegetation' -> 'brushland or shrubland': CamelCase -> words, '+ area' after '-al', OpenAI words."""
    camel_words = re.findall(r"[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))", folder.replace("_", " "))
    words = " ".join(w.lower() for w in camel_words)
    words = words + " area" if words.endswith("al") else words
    if words not in _EUROSAT_OPENAI:
        raise ValueError(f"EuroSAT: unexpected class folder {folder!r}; expected the 10 EuroSAT RGB classes")
    return _EUROSAT_OPENAI[words]


def build_eurosat(split: str, preprocess, location: str) -> Dataset:
    base = os.path.join(location, "EuroSAT_splits")
    split_dir = _split_dir("EuroSAT", base, split)  # val: `val` (task_vectors) or `valid` (SVC)
    dataset = _image_folder("EuroSAT", split_dir, os.path.join(base, "train"), preprocess)
    dataset.classnames = [eurosat_classname(c) for c in dataset.classes]
    return dataset


def build_resisc45(split: str, preprocess, location: str) -> Dataset:
    root = _first_dir("RESISC45", [os.path.join(location, "resisc45", "NWPU-RESISC45")])
    listing = _first_file("RESISC45", [os.path.join(location, "resisc45", f"resisc45-{split}.txt")])
    with open(listing) as f:
        keep = {line.strip() for line in f if line.strip()}
    dataset = ImageFolder(root, transform=preprocess, is_valid_file=lambda p: os.path.basename(p) in keep)
    dataset.source = f"{os.path.abspath(root)} (files listed in {os.path.abspath(listing)})"
    dataset.classnames = [c.replace("_", " ") for c in dataset.classes]
    return dataset


def build_sun397(split: str, preprocess, location: str) -> Dataset:
    dataset = _train_test_folders("SUN397", "sun397", split, preprocess, location)
    dataset.classnames = [c[2:].replace("_", " ") for c in dataset.classes]  # drop the `a_` letter prefix
    return dataset


register_dataset("SUN397", build_sun397, T.SUN397, T.TEMPLATES["SUN397"])
register_dataset("Cars", build_cars, T.CARS, T.TEMPLATES["Cars"])
register_dataset("RESISC45", build_resisc45, T.RESISC45, T.TEMPLATES["RESISC45"])
register_dataset("EuroSAT", build_eurosat, T.EUROSAT, T.TEMPLATES["EuroSAT"], val_from_train=False)
register_dataset("DTD", build_dtd, T.DTD, T.TEMPLATES["DTD"])
