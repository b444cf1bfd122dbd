"""One sweep, two ways to run it. The sweep is the list of main.py runs behind a results table:
the zero-shot and fine-tuned references, then every method without and with SVC. `bash run.sh`
runs it on one machine, one run after the other; this launcher hands the same runs to Slurm as a
submitit job array, or to local worker processes.

    python -m src.sweep --model ViT-B-32 --launcher slurm --partition gpu --time 120 -- --tasks 14
    python -m src.sweep --model ViT-B-32 --launcher slurm --dry-run       # what would be submitted
    python -m src.sweep --model demo-micro --launcher local --workers 2

Everything after `--` goes to every main.py run. A run already in <logs>/<model>/results.jsonl
(same request, same checkpoint files: src.runs.plan, as --skip-existing decides) is not submitted
again, so running the command again resubmits only what is missing or failed. Jobs append to
results.jsonl under a file lock (utils.append_jsonl), which also holds across machines sharing
the file system. submitit is optional: only --launcher slurm needs it (pip install submitit).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import merge_func
import utils

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
METHODS = tuple(merge_func.METHODS)  # run.sh's default: every registered method
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}  # Slurm states


@dataclass(frozen=True)
class Run:
    label: str  # as run.sh echoes it: zeroshot, finetuned, TA, TA+SVC, ...
    argv: tuple[str, ...]  # main.py's arguments
    key: str = field(default="", compare=False)  # request + checkpoint fingerprint, once planned


def sweep_runs(model: str, methods: list[str] | tuple[str, ...] = METHODS, tuned: bool = False,
               force: bool = False, extra: list[str] | tuple[str, ...] = ()) -> list[Run]:
    """The runs of one sweep, in run.sh's order: the references, then each method without and
    with SVC. `tuned` picks coefficients (and SVC's alpha) on the <Task>Val splits; `force` drops
    --skip-existing; `extra` (main.py flags) comes last, so it overrides."""
    head = ["--model", model] + ([] if force else ["--skip-existing"])
    tune = ["--scaling_coef", "auto"] if tuned else []
    runs = [("zeroshot", ["--merge", "zeroshot"]), ("finetuned", ["--merge", "finetuned"])]
    for method in methods:
        runs.append((method, ["--merge", method, *tune]))
        # without --alpha, main.py's default: 1/K, and 1.0 after TSV-M as the official sweep intends
        runs.append((f"{method}+SVC", ["--merge", method, "--c", *(["--alpha", "auto"] if tuned else []), *tune]))
    return [Run(label, tuple(head + args + list(extra))) for label, args in runs]


# ----------------------------------------------------------------------------- jobs
def run_job(argvs: list[list[str]], cwd: str, log: str | None = None) -> int:
    """One job: main.py runs, each in its own process, one after the other; a failed run does not
    stop the others. Output goes to `log` (appended) or to this process's stdout (Slurm's log).
    Raises RuntimeError naming the failed runs, so the scheduler marks the job failed.
    Plain strings in, an int out: pickles cleanly for submitit."""
    failed = []
    with open(log, "a") if log else contextlib.nullcontext() as out:
        for argv in argvs:
            print(f"=== python main.py {shlex.join(argv)}", file=out, flush=True)
            code = subprocess.run([sys.executable, str(MAIN), *argv], cwd=cwd, stdout=out,
                                  stderr=subprocess.STDOUT if out else None).returncode
            if code:
                failed.append(f"{shlex.join(argv)} (exit {code})")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(argvs)} runs failed: " + "; ".join(failed))
    return len(argvs)


@dataclass
class Outcome:
    name: str  # the labels of the job's runs
    log: str  # where its output is
    error: str | None = None  # None: every run of the job succeeded


def launch_local(groups: list[list[Run]], folder: Path, workers: int) -> list[Outcome]:
    """Each job as local processes, `workers` jobs at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for i, group in enumerate(groups):
            name = ",".join(r.label for r in group)
            log = folder / f"job{i:03d}_{name.replace(',', '_')}.log"
            futures[pool.submit(run_job, [list(r.argv) for r in group], os.getcwd(), str(log))] = Outcome(name, str(log))
        for future in as_completed(futures):
            outcome = futures[future]
            if future.exception():
                outcome.error = str(future.exception())
            print(f"{'FAILED' if outcome.error else 'done'}: {outcome.name} (log {outcome.log})", flush=True)
            outcomes.append(outcome)
    return outcomes


def slurm_parameters(args: argparse.Namespace, model: str) -> dict:
    """submitit.SlurmExecutor parameters (sbatch flags) from the command line."""
    params = {"job_name": f"svc-sweep-{model}", "time": args.time}
    optional = {"partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint, "mem": args.mem, "cpus_per_task": args.cpus_per_task,
                "gpus_per_node": args.gpus_per_node, "array_parallelism": args.workers,
                "setup": args.setup or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = {}
    for item in args.slurm_param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --slurm-param {item!r}: expected KEY=VALUE, e.g. mail-type=END")
        extra[key.lstrip("-")] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def slurm_executor(folder: Path, params: dict):
    """A submitit SlurmExecutor with `params`; a clear message without submitit or Slurm."""
    try:
        import submitit
    except ImportError:
        raise SystemExit("error: --launcher slurm needs submitit: pip install submitit") from None
    try:
        executor = submitit.SlurmExecutor(folder=str(folder / "%j"))
    except RuntimeError as err:  # no srun on PATH
        raise SystemExit(f"error: {err} Run the launcher on a Slurm login node, or use --launcher local.") from None
    executor.update_parameters(**params)  # a wrong parameter name raises ValueError here, before submitting
    return executor


def _reason(err: Exception) -> str:
    """One line out of submitit's error: the job's own exception (the last 'XxxError: ...' line of
    the remote traceback), else the first line (e.g. a timeout or a cancelled job)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return raised[-1] if raised else lines[0]


def launch_slurm(groups: list[list[Run]], executor, folder: Path, wait: bool) -> list[Outcome]:
    """One submitit job array, one job per group; waits for the jobs unless `wait` is False."""
    with executor.batch():
        jobs = [executor.submit(run_job, [list(r.argv) for r in group], os.getcwd()) for group in groups]
    names = [",".join(r.label for r in group) for group in groups]
    for job, name, group in zip(jobs, names, groups):
        print(f"submitted {job.job_id}: {name} (log {job.paths.stdout})", flush=True)
        utils.append_jsonl(folder / SUBMITTED, {"job_id": job.job_id, "runs": [r.key for r in group]})
    if not wait:
        print("not waiting (--no-wait): run the same command again to see the table and resubmit what failed; "
              "runs still pending or running are not submitted twice", flush=True)
        return []
    outcomes = []
    try:
        for job, name in zip(jobs, names):
            outcome = Outcome(name, str(job.paths.stdout))
            try:
                job.result()
            except Exception as err:  # the job's own error (RuntimeError above), a timeout, a cancelled job
                outcome.error = _reason(err)
                outcome.log = f"{job.paths.stdout} and {job.paths.stderr}"
            print(f"{'FAILED' if outcome.error else 'done'}: {name} (log {outcome.log})", flush=True)
            outcomes.append(outcome)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the jobs keep running on the cluster; the same command run again "
                         "submits only what is neither done nor still pending or running") from None
    return outcomes


# ----------------------------------------------------------------------------- planning
SUBMITTED = "submitted.jsonl"  # in the jobs folder: which Slurm job holds which runs


def job_state(folder: Path, job_id: str) -> str:
    """Slurm state of a job submitted from `folder` (PENDING, RUNNING, COMPLETED, ...), via sacct."""
    import submitit

    return submitit.SlurmJob(folder=str(folder / "%j"), job_id=job_id).state


def _record_problem(record: dict) -> str | None:
    """Why a line of submitted.jsonl cannot be used, or None."""
    runs = record.get("runs")
    if not isinstance(runs, list) or not all(isinstance(k, str) for k in runs):
        return "'runs' is not a list of run keys"
    if "job_id" in record:
        job_id = record["job_id"]
        ok = isinstance(job_id, str) and job_id.strip() or isinstance(job_id, int) and not isinstance(job_id, bool)
        return None if ok else "'job_id' is not a Slurm job id"
    if record.get("launcher") == "local":
        pid, host = record.get("pid"), record.get("host")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and isinstance(host, str)):
            return "a local launcher's record without a 'pid' and a 'host'"
        if not isinstance(record.get("start"), (str, type(None))) or not isinstance(record.get("released", False), bool):
            return "a local launcher's record with an ill-typed 'start' or 'released'"
        return None
    return "neither a Slurm 'job_id' nor a local launcher's record"


def submitted_records(folder: Path) -> list[dict]:
    """The usable records of <folder>/submitted.jsonl; a damaged line is skipped with a warning naming file:line
    (it never stops a sweep, not even --dry-run)."""
    path = folder / SUBMITTED
    records = []
    for lineno, record in utils.iter_jsonl(path):
        problem = _record_problem(record)
        if problem:
            warnings.warn(f"{path}:{lineno}: skipped line ({problem})")
        else:
            records.append(record)
    return records


def in_flight(folder: Path, keys: set[str]) -> dict[str, str]:
    """run key -> Slurm job id, for those of `keys` whose job, submitted earlier (e.g. with
    --no-wait), is still pending or running: submitting them again would run them twice."""
    records = [r for r in submitted_records(folder) if "job_id" in r and keys & set(r["runs"])]
    if not records:
        return {}
    try:
        import submitit  # noqa: F401
    except ImportError:
        return {}
    busy = {}
    for record in records:
        job_id = str(record.get("job_id"))
        state = job_state(folder, job_id).upper().split() or ["UNKNOWN"]  # e.g. "CANCELLED by 123"
        if state[0] in ACTIVE:
            busy.update({k: job_id for k in record["runs"]})
    return busy


# ----------------------------------------------------------------------------- local launchers' claims
# A local launcher records the runs it starts in submitted.jsonl, under the file's lock ({"launcher": "local",
# "pid", "host", "start", "runs"}), and a release line when it ends ({..., "released": true}). Another launcher on
# the same logs skips the runs a live one holds. A claim is void once released, or when its process is gone
# (same host: the pid is dead, or was reused by a process started at another time); a claim made on another host
# cannot be checked from here and holds until released.
def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), or None where it cannot be read:
    with the pid, it tells a launcher from a later process that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, after comm
    except (OSError, IndexError):
        return None


def this_launcher() -> dict:
    """The identity this process claims runs under."""
    return {"launcher": "local", "pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def _identity(record: dict) -> tuple:
    return record["host"], record["pid"], record.get("start")


def _alive(record: dict) -> bool:
    """Whether the launcher of a claim may still be running (see above)."""
    if record["host"] != socket.gethostname():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start, now = record.get("start"), _process_start(record["pid"])
    return start is None or now is None or start == now


def held_runs(folder: Path, keys: set[str]) -> dict[str, dict]:
    """run key -> the claim of another live local launcher holding it, for those of ``keys`` held."""
    records = [r for r in submitted_records(folder) if r.get("launcher") == "local"]
    released = {_identity(r) for r in records if r.get("released")}
    me, alive, held = _identity(this_launcher()), {}, {}
    for record in records:
        who = _identity(record)
        if record.get("released") or who in released or who == me or not keys & set(record["runs"]):
            continue
        if who not in alive:
            alive[who] = _alive(record)
        if alive[who]:
            held.update({k: record for k in record["runs"] if k in keys})
    return held


def _done_keys(results: Path) -> set[str]:
    """Keys of the runs results.jsonl holds (as pending() builds them)."""
    return {json.dumps({"request": r.get("request"), "checkpoints": r.get("checkpoints")}, sort_keys=True, default=str)
            for r in utils.read_jsonl(results, warn=False) if isinstance(r.get("request"), dict)}


def claim_runs(folder: Path, runs: list[Run], results: Path | None = None) -> tuple[list[Run], dict[str, dict]]:
    """(runs this launcher now holds, run key -> claim of another live launcher): under the lock of
    submitted.jsonl, the runs another live local launcher holds (and, with ``results``, those that results.jsonl
    gained since they were planned) are dropped and the rest recorded as this process's, in one step, so two
    launchers started together never both run a run."""
    path = folder / SUBMITTED
    with utils.locked(path):
        held = held_runs(folder, {r.key for r in runs})
        done = _done_keys(results) if results is not None else set()
        mine = [r for r in runs if r.key not in held and r.key not in done]
        if mine:
            utils.append_jsonl(path, {**this_launcher(), "runs": [r.key for r in mine],
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, lock_held=True)
    return mine, held


def release_runs(folder: Path) -> None:
    """This launcher's claims end: its runs are done, failed or interrupted."""
    utils.append_jsonl(folder / SUBMITTED, {**this_launcher(), "runs": [], "released": True})


def logs_dir(model: str, extra: list[str]) -> Path:
    """<logs>/<model> as main.py will see it (--logs DIR, --logs=DIR, abbreviations)."""
    from src import args as main_args  # main.py's flags (they import clip and open_clip: only where needed)

    return Path(main_args.build_parser().parse_known_args(["--model", model, *extra])[0].logs) / model


def pending(runs: list[Run], force: bool) -> tuple[list[Run], list[Run]]:
    """(runs to submit, runs already in results.jsonl), each with its key. Each run is planned by
    src.runs.plan without loading weights; a bad flag or missing checkpoints stops here, before
    anything is submitted. Runs that resolve to the same request are submitted once."""
    import clip
    from src import args as main_args
    from src.runs import plan

    todo, done, seen = [], [], set()
    for run in runs:
        try:
            args = main_args.build_parser().parse_args(list(run.argv))
        except SystemExit:  # argparse printed the bad flag
            raise SystemExit(f"error: main.py refuses the flags of run {run.label}: {shlex.join(run.argv)}") from None
        if args.rebuild:
            raise SystemExit("error: --rebuild would rebuild the demo zoo in every job; rebuild it once first: "
                             f"python -m src.demo.zoo --model {args.model}")
        try:
            planned = plan(args)
        except (clip.CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise SystemExit(f"error: {run.label}: {message}") from None
        key = json.dumps({"request": planned.request, "checkpoints": planned.checkpoints}, sort_keys=True,
                         default=str)
        if planned.done and not force:
            done.append(replace(run, key=key))
        elif key not in seen:
            todo.append(replace(run, key=key))
        seen.add(key)
    return todo, done


def unfinished(runs: list[Run]) -> list[Run]:
    """The runs whose request results.jsonl does not hold yet (planned as --skip-existing would), said on stderr.
    A run that cannot be planned here (no checkpoints yet, a bad flag) is kept: main.py then builds or says why."""
    from src import args as main_args
    from src.runs import plan

    kept = []
    for run in runs:
        try:
            planned = plan(main_args.build_parser().parse_args(list(run.argv)))
        except (Exception, SystemExit):  # noqa: BLE001 - main.py reports it when the run starts
            kept.append(run)
            continue
        if planned.done:
            print(f"skipping: {planned.results} already has run {run.label}", file=sys.stderr, flush=True)
        else:
            kept.append(run)
    return kept


def check_files(folder: Path, jobs: Path) -> None:
    """Refuse, before any work, a results, cache or job record file (or its lock) that is a FIFO, a device or a
    folder: reading it would block or never end, and the runs' results would be lost after the work."""
    for file in (folder / "results.jsonl", folder / "individual_accuracies.json", jobs / SUBMITTED):
        try:
            utils.check_regular_file(file)
        except utils.NotRegularFileError as err:
            raise SystemExit(f"error: {err}") from None


def ensure_demo_zoo(model: str, extra: list[str]) -> None:
    """Demo models: build the checkpoint zoo once here, not in every concurrent job."""
    if model.startswith("demo"):
        from src import args as main_args
        from src.demo.zoo import ensure_zoo

        base_dir = main_args.build_parser().parse_known_args(["--model", model, *extra])[0].base_dir
        ensure_zoo(model, os.path.join(base_dir, "checkpoints"))


def print_table(folder: Path) -> bool:
    """The results table of `folder` (as run.sh prints it), published numbers beside ours; False if there is none."""
    from src import results

    try:
        results.main([str(folder), "--reference"])
    except SystemExit as err:
        if isinstance(err.code, str):  # a refusal (e.g. a results file that is a FIFO): say why
            print(err.code, file=sys.stderr)
        return not err.code
    return True


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- go to every main.py run (e.g. -- --tasks 14 --threads 4).")
    p.add_argument("--model", required=True, help="ViT-B-32, ViT-B-16, ViT-L-14, demo, demo-micro")
    p.add_argument("--tasks", help="task set, passed to main.py (8 | 14 | 20 | A,B,C)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    p.add_argument("--tuned", action="store_true", help="coefficients (and SVC's alpha) chosen on <Task>Val")
    p.add_argument("--force", action="store_true", help="run again what results.jsonl already holds")
    p.add_argument("--logs", help="log folder, passed to main.py (default: main.py's, logs)")
    p.add_argument("--launcher", choices=["local", "slurm"], help="local processes or a Slurm job array")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs at a time: local processes (default 1), or the Slurm array's parallelism (default: no limit)")
    p.add_argument("--runs-per-job", type=int, default=1, help="main.py runs per job, one after the other (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--folder", help="job logs (and submitit's files): default <logs>/<model>/sweep")
    p.add_argument("--no-table", action="store_true", help="do not print the results table at the end")
    p.add_argument("--table", action="store_true", help="only print the results table of the sweep's logs")
    p.add_argument("--print-runs", action="store_true",
                   help="only print the runs, one 'LABEL<tab>main.py arguments (shell-quoted)' line each (run.sh)")
    slurm = p.add_argument_group("Slurm (sbatch) options")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--mem", help="memory per node, e.g. 32G")
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--gpus-per-node", type=int, default=1, help="default 1")
    slurm.add_argument("--time", type=int, default=120, help="minutes per job (default 120)")
    slurm.add_argument("--slurm-param", action="append", metavar="KEY=VALUE",
                       help="any other sbatch flag, repeatable (e.g. mail-type=END, exclude=node12)")
    slurm.add_argument("--setup", action="append", metavar="CMD",
                       help="shell line run before the job, repeatable (e.g. 'module load cuda')")
    slurm.add_argument("--no-wait", action="store_true", help="submit and exit, without waiting for the jobs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    extra = [*(["--tasks", args.tasks] if args.tasks else []), *(["--logs", args.logs] if args.logs else []), *extra]
    broken = [arg for arg in [args.model, *args.methods, *extra] if "\n" in arg or "\r" in arg]
    if broken:  # run.sh reads the run list one line per run
        raise SystemExit(f"error: the argument {broken[0]!r} holds a line break; run.sh and the job records take "
                         "one run per line: pass it without one")
    runs = sweep_runs(args.model, args.methods, args.tuned, args.force, extra)
    if args.print_runs:
        if not args.force:  # a run already in results.jsonl is not started only to skip itself
            runs = unfinished(runs)
        for run in runs:
            print(f"{run.label}\t{shlex.join(run.argv)}")
        return 0
    folder = logs_dir(args.model, extra)
    if args.table:
        return 0 if print_table(folder) else 1
    if not args.launcher:
        parser.error("--launcher local or --launcher slurm is required (or --print-runs / --table)")
    if args.runs_per_job < 1 or (args.workers is not None and args.workers < 1):
        parser.error("--runs-per-job and --workers must be at least 1")
    params = slurm_parameters(args, args.model) if args.launcher == "slurm" else {}
    jobs = Path(args.folder) if args.folder else folder / "sweep"
    check_files(folder, jobs)
    # no submitit, no Slurm, a wrong sbatch parameter: said before any work
    executor = slurm_executor(jobs, params) if args.launcher == "slurm" and not args.dry_run else None

    ensure_demo_zoo(args.model, extra)
    claimed = args.launcher == "local" and not args.dry_run
    with warnings.catch_warnings(record=True) as caught:  # a damaged results line: say it once, not per run
        warnings.simplefilter("always")
        todo, done = pending(runs, args.force)
        busy = in_flight(jobs, {run.key for run in todo})
        todo_here = [run for run in todo if run.key not in busy]
        if claimed and todo_here:  # atomically: what another live local launcher holds is skipped, the rest is ours
            mine, held = claim_runs(jobs, todo_here, None if args.force else folder / "results.jsonl")
        else:
            mine, held = todo_here, held_runs(jobs, {run.key for run in todo_here})
            mine = [run for run in mine if run.key not in held]
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr)
    for run in todo:
        if run.key in busy:
            print(f"not submitted: {run.label} is in Slurm job {busy[run.key]}, still pending or running", flush=True)
        elif run.key in held:
            h = held[run.key]
            print(f"not submitted: {run.label} is held by the local launcher pid {h['pid']} on {h['host']} "
                  f"(since {h.get('time', '?')}), still running; if it is not, remove its lines from "
                  f"{jobs / SUBMITTED}", flush=True)
    todo = mine
    print(f"{len(runs)} runs: {len(done)} already in {folder / 'results.jsonl'}, "
          f"{len(runs) - len(done) - len(todo)} in flight or duplicates, {len(todo)} to run", flush=True)
    groups = [todo[i:i + args.runs_per_job] for i in range(0, len(todo), args.runs_per_job)]
    if args.dry_run:
        for i, group in enumerate(groups):
            for run in group:
                print(f"job {i}: python main.py {shlex.join(run.argv)}")
        if args.launcher == "slurm" and groups:
            print(sbatch_preview(jobs, params, len(groups)))
        return 0
    outcomes = []
    if groups:
        start = time.time()
        if args.launcher == "local":
            try:
                outcomes = launch_local(groups, jobs / f"local_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}",
                                        args.workers or 1)
            finally:  # also on Ctrl-C or an error: the runs are no longer held
                release_runs(jobs)
        else:
            outcomes = launch_slurm(groups, executor, jobs, wait=not args.no_wait)
            if args.no_wait:
                return 0
        print(f"{len(groups)} jobs finished in {time.time() - start:.0f} s", flush=True)
    failed = [o for o in outcomes if o.error]
    table_ok = True if args.no_table else print_table(folder)
    if failed:
        print(f"FAILED ({len(failed)} jobs); run the same command again to resubmit only what is missing:",
              file=sys.stderr)
        for o in failed:
            print(f"  {o.name}: {o.error}\n    log: {o.log}", file=sys.stderr)
    return 1 if failed or not table_ok else 0


def sbatch_preview(folder: Path, params: dict, jobs: int) -> str:
    """The sbatch script submitit would write for the array (without submitting anything)."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes; private, hence guarded
    except ImportError:
        return f"sbatch parameters: {params} (pip install submitit to submit them)"
    return _make_sbatch_string(command="python -u -m submitit.core._submit ...", folder=str(folder / "%j"),
                               map_count=jobs, **params)


if __name__ == "__main__":
    # through the importable module: submitit then pickles src.sweep.run_job by reference, not __main__'s by value
    from src import sweep

    sys.exit(sweep.main())
