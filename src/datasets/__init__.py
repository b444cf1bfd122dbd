"""Benchmark datasets: registry, task sets, class names and templates (see registry.py)."""
from src.datasets.registry import (NAMED_SETS, TASK_SETS, DatasetNotFoundError, DatasetSplit, dataset_names,
                                   get_dataset, register_dataset, register_task_set, resolve_tasks)

__all__ = ["NAMED_SETS", "TASK_SETS", "DatasetNotFoundError", "DatasetSplit", "dataset_names", "get_dataset",
           "register_dataset", "register_task_set", "resolve_tasks"]
