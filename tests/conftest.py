"""Shared test settings: one torch thread (deterministic float reductions, no
contention on 2-core CI machines) and the repository root on sys.path."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


MAIN_FLAGS = ["--threads", "1", "--no-progress", "--num-workers", "0"]  # quiet, single-threaded main.py runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A project folder of the test module's own with a built demo-micro zoo (tests may change it)."""
    from src.demo.zoo import ensure_zoo

    base = tmp_path_factory.mktemp("project")
    ensure_zoo("demo-micro", str(base / "checkpoints"))
    return base


def cli(base, *args):
    """main.py on demo-micro in the project folder ``base``, logging to ``base/logs``."""
    import main

    return main.main(["--model", "demo-micro", "--base_dir", str(base), "--logs", str(base / "logs"), *MAIN_FLAGS,
                      *args])
