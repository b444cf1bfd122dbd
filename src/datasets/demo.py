"""Registers the generated demo tasks (src/demo/tasks.py) in the dataset registry.

Task set "demo" holds all eight tasks, "demo-micro" the three used by the test-sized model. The data
is generated in memory from a fixed seed, so `location` is not used and nothing is ever downloaded.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from src.datasets.registry import register_dataset, register_task_set
from src.demo import tasks as T

MICRO_TASKS = ("Digits", "Shapes", "Colors")


class GeneratedDataset(Dataset):
    """(preprocess(PIL image), label) pairs over one generated split."""

    def __init__(self, task: str, split: str, preprocess=None):
        self.images, self.labels = T.generate(task, split)
        self.classnames = list(T.TASKS[task].classnames)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(np.asarray(self.images[i]))
        return (self.preprocess(img) if self.preprocess is not None else img), int(self.labels[i])


def _builder(task: str):
    def build(split: str, preprocess, location: str) -> Dataset:
        return GeneratedDataset(task, split, preprocess)
    return build


for _task in T.TASK_NAMES:
    _spec = T.TASKS[_task]
    register_dataset(_task, _builder(_task), list(_spec.classnames), list(_spec.templates), val_from_train=False)
register_task_set("demo", list(T.TASK_NAMES))
register_task_set("demo-micro", list(MICRO_TASKS))
