"""Results files stay whole: locked appends, locked read-modify-write, damaged lines skipped with
their file:line, strict JSON, permissions kept (utils.append_jsonl / update_json / read_jsonl)."""
import json
import multiprocessing as mp
import os
import stat
from datetime import datetime
from types import SimpleNamespace

import pytest

import utils
from src import runs


def _append_many(path, worker, count):
    for j in range(count):
        utils.append_jsonl(path, {"worker": worker, "j": j, "pad": "x" * 3000})  # > PIPE_BUF: no free atomicity


def _update_many(path, worker, count):
    for j in range(count):
        utils.update_json(path, lambda cache: {**cache, f"{worker}-{j}": j}, default={})


def _run(target, path, workers, count):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(path, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0


def test_concurrent_appends_lose_no_line(tmp_path):
    path = tmp_path / "results.jsonl"
    _run(_append_many, path, 8, 50)
    rows = utils.read_jsonl(path)
    assert len(rows) == 400 and len(path.read_bytes().splitlines()) == 400
    assert sorted((r["worker"], r["j"]) for r in rows) == [(w, j) for w in range(8) for j in range(50)]


def test_concurrent_json_updates_lose_no_entry(tmp_path):
    path = tmp_path / "individual_accuracies.json"
    _run(_update_many, path, 2, 40)
    assert len(json.loads(path.read_text())) == 80


def test_append_keeps_permissions_and_never_rewrites(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n')
    os.chmod(path, 0o664)
    inode = path.stat().st_ino
    utils.append_jsonl(path, {"b": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert path.stat().st_ino == inode  # appended in place, not replaced through a rename
    utils.update_json(tmp_path / "c.json", lambda c: {"x": 1}, default={})
    os.chmod(tmp_path / "c.json", 0o664)
    utils.update_json(tmp_path / "c.json", lambda c: {**c, "y": 2})
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o664


def test_damaged_lines_are_reported_and_later_appends_still_work(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe broken\n[1, 2]\n{"b": 2')  # not UTF-8, not an object, cut short
    with pytest.warns(UserWarning) as caught:
        rows = utils.read_jsonl(path)
    assert rows == [{"a": 1}]
    messages = " ".join(str(w.message) for w in caught)
    assert f"{path}:2" in messages and "UTF-8" in messages and f"{path}:3" in messages and f"{path}:4" in messages
    utils.append_jsonl(path, {"c": 3})
    with pytest.warns(UserWarning):
        assert utils.read_jsonl(path) == [{"a": 1}, {"c": 3}]


def test_results_are_strict_json(tmp_path):
    path = tmp_path / "results.jsonl"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            utils.append_jsonl(path, {"avg": bad})
    assert not path.exists() or path.read_text() == ""


def test_a_corrupted_json_file_is_named(tmp_path):
    path = tmp_path / "individual_accuracies.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="individual_accuracies.json"):
        utils.update_json(path, lambda c: c)


class _SameSecond(datetime):
    """Every process 'finishes' in the same second."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5)


def _finish(logs, worker, _count):
    args = SimpleNamespace(logs=str(logs), model="demo-micro", merge="TA")
    record = {"merge": "TA", "svc": True, "alpha": 0.5, "worker": worker, "checkpoints": "c", "data": {}}
    runs.write_results(args, record, {"Digits": float(worker)}, {}, {})


def test_runs_finishing_in_the_same_second_keep_their_own_text_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "datetime", _SameSecond)  # inherited by the forked processes
    _run(_finish, tmp_path / "logs", 6, 1)
    folder = tmp_path / "logs" / "demo-micro"
    logs = sorted(folder.glob("log_20260102_030405_TA_svc*.txt"))
    assert len(logs) == 6  # log_..._TA_svc.txt, then _2 ... _6
    assert sorted(p.read_text().split("Digits: ")[1].split("%")[0] for p in logs) == [f"{w:.2f}" for w in range(6)]
    assert sorted(r["worker"] for r in utils.read_jsonl(folder / "results.jsonl")) == list(range(6))


def test_write_new_text_never_overwrites(tmp_path):
    first = utils.write_new_text(tmp_path / "log.txt", "one")
    second = utils.write_new_text(tmp_path / "log.txt", "two")
    assert (first.name, second.name) == ("log.txt", "log_2.txt")
    assert first.read_text() == "one" and second.read_text() == "two"
