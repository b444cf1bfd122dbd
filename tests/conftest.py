"""Shared test settings: one torch thread (deterministic float reductions, no
contention on 2-core CI machines) and the repository root on sys.path."""
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


MAIN_FLAGS = ["--threads", "1", "--no-progress", "--num-workers", "0"]  # quiet, single-threaded main.py runs


@pytest.fixture(scope="session")
def micro_zoo_files(tmp_path_factory):
    """The demo-micro zoo, built once per test session (read-only: copy it before changing anything)."""
    from src.demo.zoo import ensure_zoo

    base = tmp_path_factory.mktemp("zoo")
    ensure_zoo("demo-micro", str(base / "checkpoints"))
    return base / "checkpoints"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, micro_zoo_files):
    """A project folder of the test module's own with a copy of the demo-micro zoo (tests may change it)."""
    base = tmp_path_factory.mktemp("project")
    shutil.copytree(micro_zoo_files, base / "checkpoints")
    return base


def cli(base, *args):
    """main.py on demo-micro in the project folder ``base``, logging to ``base/logs``."""
    import main

    return main.main(["--model", "demo-micro", "--base_dir", str(base), "--logs", str(base / "logs"), *MAIN_FLAGS,
                      *args])
