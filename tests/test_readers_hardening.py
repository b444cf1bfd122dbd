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


# ----------------------------------------------------------------------------- 2. one bad line never stops a reader
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
DEEP_OBJECT = '{"merge": "TA", "accuracy": {"MNIST": 1.0}, "options": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}"
HUGE_INT = '{"merge": "TA", "accuracy": {"MNIST": 1' + "0" * 5000 + "}}"  # ValueError: > 4300 digits


def _sweep_rows():
    """A TA coefficient sweep, its SVC runs and the references: every table and plot has something to show."""
    rows = [_row("zeroshot", {"MNIST": 40.0, "DTD": 50.0}), _row("finetuned", {"MNIST": 99.0, "DTD": 80.0})]
    rows += [_row("TA", {"MNIST": 60.0 + c, "DTD": 80.0}, scaling_coef=c) for c in (0.1, 0.3, 0.5)]
    rows += [_row("TA", {"MNIST": 62.0 + a, "DTD": 81.0}, svc=True, alpha=a) for a in (0.25, 1.0)]
    return rows


def _write(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def _every_reader(folder, capsys):
    """src.results (with published numbers), src.plots bars/scaling/alpha and utils.read_jsonl on ``folder``:
    each must finish; returns the warnings and the stderr they gave."""
    from src import plots

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        utils.read_jsonl(folder / "results.jsonl")
        results.main([str(folder), "--reference"])
        assert "| Method |" in capsys.readouterr().out
        for command in (["bars"], ["scaling", "--merge", "TA"], ["alpha", "--merge", "TA"]):
            paths = plots.main([command[0], str(folder), *command[1:], "--out", str(folder / command[0])])
            assert paths and all(p.stat().st_size for p in paths)
    return " ".join(str(w.message) for w in caught) + capsys.readouterr().err


@pytest.mark.parametrize("line, why", [(DEEP, "nested more than 64 deep"), (DEEP_OBJECT, "nested more than 64 deep"),
                                       (HUGE_INT, "4300 digits")])
def test_a_deep_or_unparsable_line_is_skipped_and_named_by_every_reader(tmp_path, capsys, line, why):
    folder = _write(tmp_path / "ViT-B-32", [json.dumps(r) for r in _sweep_rows()[:4]] + [line]
                    + [json.dumps(r) for r in _sweep_rows()[4:]])
    said = _every_reader(folder, capsys)
    assert f"{folder / 'results.jsonl'}:5: skipped damaged line" in said and why in said


BAD_FIELDS = [("tasks", 5), ("tasks", ["MNIST", 1]), ("options", "xyz"), ("normalized", "abc"),
              ("normalized", {"MNIST": "x"}), ("accuracy", {"a": "x"}), ("accuracy", {"Avg": 50.0}), ("request", []),
              ("svc", "yes"), ("merge", 3), ("model", [1]), ("data", 5), ("layout", 7), ("checkpoints", {"a": 1}),
              ("convention", ["x"]), ("alpha", "zz"), ("scaling_coef", [1]), ("svc_target", "0"),
              ("svc_row_space", "no"), ("avg", "high"), ("scaling_coef_selected", "x"), ("scaling_coef_grid", "x"),
              ("scaling_coef_curve", "abc"), ("scaling_coef_curve", [{"coef": "x", "avg": 1.0}]),
              ("alpha_curve", [{"coef": 0.5, "avg": "x"}])]


@pytest.mark.parametrize("name, value", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_an_ill_typed_field_is_skipped_and_named_by_every_reader(tmp_path, capsys, name, value):
    bad = {**_row("TA", scaling_coef=0.3), name: value}
    folder = _write(tmp_path / "ViT-B-32", [json.dumps(r) for r in _sweep_rows()[:3]] + [json.dumps(bad)]
                    + [json.dumps(r) for r in _sweep_rows()[3:]])
    said = _every_reader(folder, capsys)
    where = f"{folder / 'results.jsonl'}:4: skipped line ("
    assert where in said and (repr(name) in said.split(where, 1)[1].split(")")[0] or name in ("merge", "accuracy"))


def test_the_shape_check_accepts_what_main_py_writes():
    """Every field main.py and src.tuning write, at its real type, passes (null or missing fields too)."""
    row = {**_row("TIES", svc=True, alpha=0.125, options={"ties_k": 20}), "layout": "task_vectors",
           "convention": "task_vectors", "checkpoints": "abc", "source": "local", "data": {"MNIST": {"n": 5}},
           "request": {"merge": "TIES"}, "svc_keys": "official", "svc_target": None, "svc_row_space": False,
           "svc_dtype": "float32", "avg": 70.0, "normalized": 80.0, "scaling_coef_selected": 0.3,
           "scaling_coef_grid": [0.1, 0.3], "scaling_coef_grid_name": "default",
           "scaling_coef_curve": [{"coef": 0.1, "accuracy": {"MNIST": 1.0}, "avg": 1.0, "normalized": None}],
           "alpha_curve": [{"coef": 0.5, "avg": float("nan")}]}
    assert results.row_problem(row) is None
    assert results.row_problem({"merge": "TA", "accuracy": {"MNIST": 1.0}}) is None


SUBMITTED_LINES = ['{"job_id": "1", "runs": 5}', '{"job_id": "2", "runs": [["x"]]}', '{"job_id": true, "runs": []}',
                   '{"runs": ["k"]}', DEEP, "{broken", '{"job_id": "3", "runs": ["k"]}']


def test_a_damaged_submitted_jsonl_never_stops_the_sweep(workdir, tmp_path, capsys, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "submitted.jsonl").write_text("\n".join(SUBMITTED_LINES) + "\n")
    monkeypatch.setattr(sweep, "job_state", lambda folder, job_id: "COMPLETED")
    assert sweep.main(["--model", "demo-micro", "--methods", "TA", "--launcher", "local", "--dry-run",
                       "--folder", str(jobs), "--logs", str(tmp_path / "logs"), "--",
                       "--base_dir", str(workdir)]) == 0
    captured = capsys.readouterr()
    assert "4 runs: 0 already in" in captured.out
    for lineno in range(1, 7):
        assert f"{jobs / 'submitted.jsonl'}:{lineno}: skipped" in captured.err
    assert f"{jobs / 'submitted.jsonl'}:7:" not in captured.err


def test_a_fine_tuned_accuracy_of_zero_never_divides_by_zero(tmp_path, capsys):
    """A valid fine-tuned line with 0% on a dataset: the runs it would normalise get no normalised accuracy."""
    folder = _write(tmp_path / "ViT-B-32", [json.dumps(_row("finetuned", {"MNIST": 0.0, "DTD": 80.0})),
                                            json.dumps(_row("TA"))])
    results.main([str(folder)])
    assert "| TA | **60.00** | **80.00** | **70.00** | - |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3. cost linear in the logs
def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def test_a_line_with_many_datasets_is_read_in_linear_time(tmp_path):
    """50,000 accuracy keys: about 4 min before (quadratic: list membership per dataset, a pandas call per
    column and per cell), a second or two now; the bound leaves room for a loaded machine."""
    tasks = [f"task{i:05d}" for i in range(50_000)]
    acc = {t: 50.0 + i % 50 for i, t in enumerate(tasks)}
    folder = _write(tmp_path / "ViT-B-32", [json.dumps(_row("finetuned", acc)), json.dumps(_row("TA", acc))])
    text, seconds = _timed(lambda: results.render(results.summarize(results.load_results(folder)), "csv"))
    assert seconds < 40, f"{seconds:.0f} s"
    assert text.count("\n") == 3 and text.splitlines()[2].startswith("TA,50.00*,51.00*")


def test_many_configurations_are_read_in_linear_time(tmp_path):
    """20,000 lines, each its own configuration (coefficient): no list.index per configuration."""
    lines = [json.dumps(_row("TA", {"MNIST": 50.0, "DTD": 60.0}, scaling_coef=i / 1000)) for i in range(20_000)]
    folder = _write(tmp_path / "ViT-B-32", lines)
    table, seconds = _timed(lambda: results.summarize(results.load_results(folder)))
    assert seconds < 40, f"{seconds:.0f} s"
    assert len(table.mean) == 20_000 and table.mean.index[1] == "TA (coef=0.001)"


def test_a_line_over_the_size_cap_is_skipped_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "results.jsonl"
    big = json.dumps(_row("TA", {f"t{i}": 1.0 for i in range(200)}))
    path.write_text(json.dumps(_row("TA")) + "\n" + big + "\n" + big[:-1] + "\n" + json.dumps(_row("TIES")) + "\n")
    with pytest.warns(UserWarning) as caught:
        rows = utils.read_jsonl(path)
    assert [r["merge"] for r in rows] == ["TA", "TIES"]
    said = " ".join(str(w.message) for w in caught)
    assert f"{path}:2: skipped line (longer than" in said and f"{path}:3: skipped line (longer than" in said


# ----------------------------------------------------------------------------- 4. --decimals
@pytest.mark.parametrize("value", ["-1", "x", "1000000000"])
def test_decimals_out_of_range_is_one_line(tmp_path, capsys, value):
    folder = _write(tmp_path / "ViT-B-32", [json.dumps(_row("TA"))])
    with pytest.raises(SystemExit) as info:
        results.main([str(folder), "--decimals", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m src.results: error: argument --decimals:")
    results.main([str(folder), "--decimals", "0"])
    assert "| TA | **60** | **80** | **70** |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 5. local launchers on the same logs
SWEEP_FLAGS = ["--threads", "1", "--no-progress", "--num-workers", "0"]


def _stub_main(tmp_path, sleep=0.0):
    """A main.py that records its arguments (one line per run, O_APPEND) and sleeps."""
    stub = tmp_path / "stub_main.py"
    stub.write_text("import os, sys, time\n"
                    f"fd = os.open({str(tmp_path / 'calls')!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
                    "os.write(fd, (' '.join(sys.argv[1:]) + '\\n').encode())\n"
                    f"time.sleep({sleep})\n")
    return stub


def _start_of(pid):
    """A process's start time as /proc gives it (None where there is no /proc, or once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _sweep_args(workdir, logs, *args):
    return ["--model", "demo-micro", "--methods", "TA", "--logs", str(logs), *args, "--", "--base_dir", str(workdir),
            *SWEEP_FLAGS]


def test_runs_held_by_a_live_local_launcher_are_skipped_and_a_dead_ones_claim_is_void(workdir, tmp_path, capsys,
                                                                                   monkeypatch):
    logs = tmp_path / "logs"
    runs = sweep.sweep_runs("demo-micro", ["TA"], extra=["--logs", str(logs), "--base_dir", str(workdir),
                                                         *SWEEP_FLAGS])
    todo, _ = sweep.pending(runs, False)
    key = {run.label: run.key for run in todo}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        jobs = logs / "demo-micro" / "sweep"
        for pid, labels in ((live.pid, ["zeroshot", "finetuned"]), (dead.pid, ["TA"])):
            utils.append_jsonl(jobs / "submitted.jsonl", {"launcher": "local", "pid": pid, "host": socket.gethostname(),
                                                          "start": _start_of(pid),
                                                          "runs": [key[label] for label in labels]})
        monkeypatch.setattr(sweep, "MAIN", _stub_main(tmp_path))
        assert sweep.main(_sweep_args(workdir, logs, "--launcher", "local", "--no-table")) == 0
    finally:
        live.kill()
        live.wait()
    out = capsys.readouterr().out
    assert f"zeroshot is held by the local launcher pid {live.pid}" in out and "4 runs: 0 already in" in out
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sorted(c.split("--merge ")[1].split(" --")[0] for c in calls) == ["TA", "TA"]  # TA and TA+SVC
    records = utils.read_jsonl(jobs / "submitted.jsonl")
    mine = [r for r in records if r.get("pid") == os.getpid()]
    assert sorted(mine[0]["runs"]) == sorted([key["TA"], key["TA+SVC"]]) and mine[-1]["released"] is True
    # the launcher that held them is gone now: its claim is void, and a dry run would run them
    assert sweep.main(_sweep_args(workdir, logs, "--launcher", "local", "--dry-run")) == 0
    assert capsys.readouterr().out.count("python main.py") == 4


@pytest.mark.process
def test_two_local_launchers_started_together_run_each_run_once(workdir, tmp_path):
    stub = _stub_main(tmp_path, sleep=12)  # the second launcher plans while the first one's runs are running
    code = "import sys; from pathlib import Path; from src import sweep; sweep.MAIN = Path(sys.argv[1]); " \
           "sys.exit(sweep.main(sys.argv[2:]))"
    argv = [sys.executable, "-c", code, str(stub), *_sweep_args(workdir, tmp_path / "logs", "--launcher", "local",
                                                                "--workers", "4", "--no-table")]
    launchers = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 4 and len(set(calls)) == 4, calls
    assert sum(out.count("is held by the local launcher") for out in outputs) == 4, outputs
