"""The sweep launcher (src/sweep.py) and run.sh: one run list, local workers, resumability, the
Slurm parameters (no cluster needed), and the results table of the right folder."""
import contextlib
import json
import os
import pickle
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

import utils
from src import args as main_args, sweep
from src.runs import plan
from tests.conftest import ROOT

FLAGS = ["--threads", "1", "--no-progress", "--num-workers", "0"]


def launcher(workdir, logs, *args, extra=()):
    return sweep.main(["--model", "demo-micro", "--methods", "TA", "TIES", "--logs", str(workdir / logs), *args,
                       "--", "--base_dir", str(workdir), *FLAGS, *extra])


def results(workdir, logs):
    return utils.read_jsonl(workdir / logs / "demo-micro" / "results.jsonl")


def key(row):
    return json.dumps(row["request"], sort_keys=True)


def test_run_sh_runs_the_run_list_and_shows_the_table_of_logs_equals_dir(tmp_path):
    runs = sweep.sweep_runs("ViT-B-32", ["TA", "TSV-M"], tuned=True, extra=["--tasks", "14"])
    assert [r.label for r in runs] == ["zeroshot", "finetuned", "TA", "TA+SVC", "TSV-M", "TSV-M+SVC"]
    assert runs[3].argv == ("--model", "ViT-B-32", "--skip-existing", "--merge", "TA", "--c", "--alpha", "auto",
                            "--scaling_coef", "auto", "--tasks", "14")
    assert "--skip-existing" not in sweep.sweep_runs("demo", force=True)[0].argv
    assert [r.label for r in sweep.sweep_runs("demo")][2::2] == list(sweep.METHODS)
    # --logs=DIR (the = form) is where main.py writes: run.sh must show that table, not logs/'s
    elsewhere = tmp_path / "elsewhere"
    row = {"model": "ViT-B-32", "merge": "TA", "svc": False, "tasks": ["Digits"], "accuracy": {"Digits": 42.5}}
    utils.append_jsonl(elsewhere / "ViT-B-32" / "results.jsonl", row)
    # run.sh loops over exactly these runs: a stub PYTHON records every main.py call (src.sweep and src.results
    # are real)
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = main.py ]; then shift; echo "$@" >> {tmp_path}/calls; exit 0; fi\n'
                    f'exec {shlex.quote(sys.executable)} "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "METHODS": "TA TSV-M"}
    out = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "ViT-B-32", "--tuned", "--tasks", "14", "--note=a b",
                          f"--logs={elsewhere}"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [" ".join(r.argv + ("--note=a b", f"--logs={elsewhere}")) for r in runs]
    assert [line for line in out.stdout.splitlines() if line.startswith("===")] == [f"=== ViT-B-32 {r.label}" for r in runs]
    assert "| TA | **42.50** |" in out.stdout


@pytest.mark.process
def test_run_sh_and_the_local_launcher_sweep_the_same_runs_and_skip_what_is_done(workdir, capsys):
    # run.sh runs main.py for each run of the sweep (one method, to keep the test short)
    env = {**os.environ, "METHODS": "TA", "PYTHON": sys.executable}
    args = ["bash", os.path.join(ROOT, "run.sh"), "demo-micro", "--base_dir", str(workdir),
            "--logs", str(workdir / "logs-local"), *FLAGS]
    first = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert [(r["merge"], r["svc"]) for r in results(workdir, "logs-local")] == [
        ("zeroshot", False), ("finetuned", False), ("TA", False), ("TA", True)]
    second = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0 and second.stderr.count("skipping") == 4  # said once each, no main.py started
    assert "=== demo-micro" not in second.stdout
    assert len(results(workdir, "logs-local")) == 4

    # the local launcher, on the same folder with TA and TIES, takes run.sh's four runs as done and runs TIES's two
    assert launcher(workdir, "logs-local", "--launcher", "local", "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "6 runs: 4 already in" in out
    rows = results(workdir, "logs-local")
    assert sorted((r["merge"], r["svc"]) for r in rows) == sorted(
        [("zeroshot", False), ("finetuned", False), ("TA", False), ("TA", True), ("TIES", False), ("TIES", True)])
    table = out[out.index("| Method |"):]
    for label in ("Zero-shot", "Fine-tuned", "TA", "TA +SVC", "TIES", "TIES +SVC"):
        assert f"| {label} |" in table

    # run.sh --force reruns done runs, keeps going past failures and reports them all; the main.py calls it makes
    # (recorded by a stub that then fails) plan to the requests the launcher's runs logged
    stub = workdir / "failing-python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = main.py ]; then shift; printf "%s\\0" "$@" >> {workdir}/sh-calls; '
                    f'printf "\\n" >> {workdir}/sh-calls; exit 1; fi\nexec {shlex.quote(sys.executable)} "$@"\n')
    stub.chmod(0o755)
    failing = subprocess.run(args + ["--force"], env={**env, "METHODS": "TIES", "PYTHON": str(stub)},
                             capture_output=True, text=True, cwd=ROOT)
    assert failing.returncode == 1 and "FAILED (4)" in failing.stderr
    calls = [line.split("\0")[:-1] for line in (workdir / "sh-calls").read_text().splitlines()]
    planned = [plan(main_args.build_parser().parse_args(argv)).request for argv in calls]
    assert sorted(json.dumps(r, sort_keys=True) for r in planned) == sorted(
        key(r) for r in rows if r["merge"] != "TA")
    assert len(results(workdir, "logs-local")) == 6

    # idempotent: nothing is submitted again
    assert launcher(workdir, "logs-local", "--launcher", "local", "--dry-run") == 0
    assert "6 runs: 6 already in" in capsys.readouterr().out

    # a lost run is the only one resubmitted; a failing job is reported with its log, and the exit code is 1
    path = workdir / "logs-local" / "demo-micro" / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if '"merge": "TA", "svc": false' not in line) + "\n")
    assert launcher(workdir, "logs-local", "--launcher", "local", "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "6 runs: 5 already in" in dry and dry.count("python main.py") == 1 and "--merge TA --logs" in dry
    failing = workdir / "failing_main.py"
    failing.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    real = sweep.MAIN
    sweep.MAIN = failing
    try:
        assert launcher(workdir, "logs-local", "--launcher", "local") == 1
    finally:
        sweep.MAIN = real
    captured = capsys.readouterr()
    assert "FAILED (1 jobs)" in captured.err and "exit 3" in captured.err
    log = captured.err.split("log: ")[1].split()[0]
    assert "boom" in open(log).read()
    assert launcher(workdir, "logs-local", "--launcher", "local") == 0
    assert len(results(workdir, "logs-local")) == 6


def test_bad_runs_stop_before_anything_is_submitted(workdir, tmp_path):
    with pytest.raises(SystemExit, match="Fisher.*unknown merge method"):
        sweep.main(["--model", "demo-micro", "--methods", "Fisher", "--launcher", "local", "--logs", str(tmp_path),
                    "--", "--base_dir", str(workdir)])
    with pytest.raises(SystemExit, match="checkpoint"):
        sweep.main(["--model", "ViT-B-32", "--launcher", "local", "--logs", str(tmp_path), "--", "--base_dir",
                    str(tmp_path)])
    assert not (tmp_path / "demo-micro").exists() and not (tmp_path / "ViT-B-32").exists()


SLURM = ["--partition", "gpu", "--account", "lab", "--qos", "high", "--constraint", "a100", "--mem", "32G",
         "--cpus-per-task", "8", "--gpus-per-node", "1", "--time", "90", "--workers", "3",
         "--slurm-param", "mail-type=END", "--setup", "module load cuda"]
SBATCH = ["--partition=gpu", "--account=lab", "--qos=high", "--constraint=a100", "--mem=32G", "--cpus-per-task=8",
          "--gpus-per-node=1", "--time=90", "--mail-type=END"]


def test_slurm_executor_gets_the_right_sbatch_flags(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that srun exists
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    args = sweep.build_parser().parse_args(["--model", "ViT-B-32", *SLURM])
    executor = sweep.slurm_executor(tmp_path / "jobs", sweep.slurm_parameters(args, "ViT-B-32"))
    script = executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for flag in SBATCH:
        assert f"#SBATCH {flag}\n" in script
    assert "module load cuda" in script and executor.parameters["array_parallelism"] == 3
    # the job function and its arguments pickle by reference (what submitit ships to the node)
    fn, argvs = pickle.loads(pickle.dumps((sweep.run_job, [["--model", "demo", "--merge", "TA"]])))
    assert fn is sweep.run_job and argvs == [["--model", "demo", "--merge", "TA"]]


def test_slurm_dry_run_shows_the_array_script(workdir, tmp_path, capsys):
    pytest.importorskip("submitit")
    assert launcher(workdir, "logs-dry", "--launcher", "slurm", "--dry-run", *SLURM) == 0
    out = capsys.readouterr().out
    assert out.count("python main.py") == 6 and "#SBATCH --array=0-5%3" in out
    for flag in SBATCH:
        assert f"#SBATCH {flag}\n" in out


def test_slurm_launch_submits_one_array_and_reports_failed_jobs(workdir, monkeypatch, capsys):
    """The executor replaced by a recorder: one batch, one job per group of runs, failures named with logs."""
    submitted = []

    class Job:
        def __init__(self, i, argvs):
            self.job_id, self.argvs = f"77_{i}", argvs
            self.paths = SimpleNamespace(stdout=f"/jobs/77_{i}_0_log.out", stderr=f"/jobs/77_{i}_0_log.err")

        def result(self):
            if any("TIES" in argv for argv in self.argvs):
                raise RuntimeError("Job (task=0) failed during processing with trace:\n  File x, line 80, in run_job\n"
                                   "RuntimeError: 1 of 2 runs failed: --merge TIES (exit 1)\n----\n"
                                   "You can check full logs with 'job.stderr(0)'")
            return len(self.argvs)

    class Executor:
        batches = 0

        def batch(self):
            Executor.batches += 1
            return contextlib.nullcontext()

        def submit(self, fn, argvs, cwd):
            assert fn is sweep.run_job and cwd == os.getcwd()
            submitted.append(argvs)
            return Job(len(submitted) - 1, argvs)

    order = []  # the executor (submitit, srun, sbatch parameters) is checked before any work
    monkeypatch.setattr(sweep, "slurm_executor", lambda folder, params: order.append("executor") or Executor())
    build_zoo = sweep.ensure_demo_zoo
    monkeypatch.setattr(sweep, "ensure_demo_zoo", lambda *a: order.append("zoo") or build_zoo(*a))
    assert launcher(workdir, "logs-slurm", "--launcher", "slurm", "--runs-per-job", "2", "--no-table") == 1
    assert order == ["executor", "zoo"]
    assert Executor.batches == 1 and [len(g) for g in submitted] == [2, 2, 2]
    err = capsys.readouterr().err
    assert "FAILED (1 jobs)" in err and "TIES,TIES+SVC" in err and "/jobs/77_2_0_log.err" in err
    assert "TIES,TIES+SVC: RuntimeError: 1 of 2 runs failed: --merge TIES (exit 1)" in err

    # runs of a job still pending or running (e.g. after --no-wait) are not submitted twice
    pytest.importorskip("submitit")
    monkeypatch.setattr(sweep, "job_state", lambda folder, job_id: "RUNNING" if job_id == "77_0" else "FAILED")
    assert launcher(workdir, "logs-slurm", "--launcher", "slurm", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "zeroshot is in Slurm job 77_0" in out and "finetuned is in Slurm job 77_0" in out
    assert out.count("python main.py") == 4 and "--merge zeroshot" not in out


def test_without_submitit_slurm_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(SystemExit, match="pip install submitit"):
        sweep.slurm_executor(tmp_path, {})


def test_an_argument_with_a_line_break_is_refused_before_the_run_list(tmp_path, capsys):
    """run.sh reads --print-runs line by line: an argument holding a newline would split one run in two."""
    with pytest.raises(SystemExit, match=r"error: the argument '--note=a\\nb' holds a line break"):
        sweep.main(["--model", "demo-micro", "--methods", "TA", "--print-runs", "--", "--note=a\nb"])
    assert capsys.readouterr().out == ""  # no run printed
    out = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "demo-micro", "--note=a\nb"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 1 and "holds a line break" in out.stderr and "===" not in out.stdout
