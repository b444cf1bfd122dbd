"""Nothing read is trusted without a check: special files in place of results, cache, job-record and lock files
are refused before any work; one bad line (depth, types, size) is skipped and named, never a traceback; reading
is linear in the size of the logs; src.results --decimals, two local launchers on the same logs, and newlines in
src.sweep's arguments (run.sh reads its run list line by line)."""
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import utils
from src import results, sweep
from src.args import build_parser, validate
from tests.conftest import ROOT


# ----------------------------------------------------------------------------- helpers
def _within(seconds, fn, fifo=None):
    """fn()'s outcome ({"value": ...} or {"error": ...}); fails if it is still running after ``seconds``
    (a FIFO it blocks on is then opened both ways, so the thread ends and the session goes on)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: B036 - SystemExit included: it is what the CLIs raise
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"still blocked after {seconds} s")
    return outcome


def _special(path, kind):
    """Make ``path`` a special file of ``kind``; returns the FIFO to unblock, if any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if kind == "directory":
        path.mkdir()
    else:  # a symlink to a character device
        path.symlink_to(kind)
    return None


KINDS = ["fifo", "directory", "/dev/null"]


def _row(merge="TA", acc=None, **fields):
    acc = {"MNIST": 60.0, "DTD": 80.0} if acc is None else acc
    return {"time": "2026-01-01", "model": "ViT-B-32", "merge": merge, "svc": False, "alpha": None,
            "scaling_coef": 0.3, "tasks": list(acc), "accuracy": acc, "seed": 0, "options": {}, **fields}


def _main_args(logs, *extra):
    return build_parser().parse_args(["--model", "demo-micro", "--logs", str(logs), *extra])


# ----------------------------------------------------------------------------- 1. special files
@pytest.mark.parametrize("kind", KINDS)
def test_readers_refuse_a_special_file_at_once(tmp_path, kind):
    for reader, name in ((utils.read_jsonl, "results.jsonl"), (utils.read_json, "individual_accuracies.json")):
        path = tmp_path / name
        fifo = _special(path, kind)
        outcome = _within(5, lambda: reader(path), fifo)
        assert isinstance(outcome.get("error"), ValueError), outcome
        message = str(outcome["error"])
        assert str(path) in message and "not a regular file" in message and "remove it" in message


def test_a_symlink_to_dev_zero_is_refused_not_read_forever(tmp_path):
    """In a separate process whose memory is capped: before the check, reading /dev/zero never ended."""
    for name in ("results.jsonl", "individual_accuracies.json"):
        (tmp_path / name).symlink_to("/dev/zero")
    code = ("import resource, sys, utils\n"
            "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))\n"
            "for reader, name in ((utils.read_jsonl, 'results.jsonl'), (utils.read_json, 'individual_accuracies.json')):\n"
            "    try:\n"
            "        reader(sys.argv[1] + '/' + name)\n"
            "    except ValueError as err:\n"
            "        print(err)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("a character device (through the symlink to /dev/zero)" in line for line in lines)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["results.jsonl", "individual_accuracies.json", "results.jsonl.lock",
                                  "individual_accuracies.json.lock"])
def test_main_refuses_special_results_cache_and_lock_files_before_any_work(tmp_path, kind, name):
    """src.args.validate, main.py's first step: refused in one line naming the file, before anything is read."""
    path = tmp_path / "logs" / "demo-micro" / name
    fifo = _special(path, kind)
    outcome = _within(5, lambda: validate(_main_args(tmp_path / "logs")), fifo)
    assert isinstance(outcome.get("error"), ValueError), outcome
    message = str(outcome["error"])
    assert str(path) in message and "not a regular file" in message and "--logs" in message
    assert "\n" not in message


def test_main_py_says_it_in_one_line(tmp_path):
    import main

    fifo = _special(tmp_path / "logs" / "demo-micro" / "results.jsonl", "fifo")
    outcome = _within(5, lambda: main.main(["--model", "demo-micro", "--logs", str(tmp_path / "logs"),
                                            "--base_dir", str(tmp_path)]), fifo)
    err = outcome.get("error")
    assert isinstance(err, SystemExit) and err.code.startswith("error: ") and "FIFO" in err.code
    assert not (tmp_path / "checkpoints").exists()  # refused before the demo zoo is built


def test_writers_refuse_a_special_lock_or_target(tmp_path):
    (tmp_path / "results.jsonl.lock").mkdir()  # used to fail with IsADirectoryError, after the evaluation
    with pytest.raises(utils.NotRegularFileError, match="results.jsonl.lock is a directory"):
        utils.append_jsonl(tmp_path / "results.jsonl", {"a": 1})
    fifo = _special(tmp_path / "b.jsonl", "fifo")
    outcome = _within(5, lambda: utils.append_jsonl(fifo, {"a": 1}), fifo)
    assert isinstance(outcome.get("error"), utils.NotRegularFileError), outcome
    fifo = _special(tmp_path / "c.json.lock", "fifo")
    outcome = _within(5, lambda: utils.update_json(tmp_path / "c.json", lambda c: c, default={}), fifo)
    assert isinstance(outcome.get("error"), utils.NotRegularFileError), outcome


@pytest.mark.parametrize("kind", ["fifo", "/dev/null"])
def test_src_results_refuses_a_special_results_file_in_one_line(tmp_path, kind):
    folder = tmp_path / "ViT-B-32"
    fifo = _special(folder / "results.jsonl", kind)
    for path in (folder, folder / "results.jsonl"):
        outcome = _within(5, lambda: results.main([str(path)]), fifo)
        err = outcome.get("error")
        assert isinstance(err, SystemExit) and isinstance(err.code, str), outcome
        assert err.code.startswith("error: ") and str(folder / "results.jsonl") in err.code and "\n" not in err.code


@pytest.mark.parametrize("name", ["results.jsonl", "individual_accuracies.json", "sweep/submitted.jsonl",
                                  "sweep/submitted.jsonl.lock"])
def test_sweep_refuses_special_files_before_any_work(tmp_path, name):
    """Even --dry-run read sweep/submitted.jsonl: a FIFO there hung src.sweep. Refused before the zoo is built."""
    path = tmp_path / "logs" / "demo-micro" / name
    fifo = _special(path, "fifo")
    outcome = _within(10, lambda: sweep.main(["--model", "demo-micro", "--methods", "TA", "--launcher", "local",
                                              "--dry-run", "--logs", str(tmp_path / "logs"), "--",
                                              "--base_dir", str(tmp_path)]), fifo)
    err = outcome.get("error")
    assert isinstance(err, SystemExit) and isinstance(err.code, str), outcome
    assert err.code.startswith("error: ") and str(path) in err.code and "FIFO" in err.code
    assert not (tmp_path / "checkpoints").exists()
