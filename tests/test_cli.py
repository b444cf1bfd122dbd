"""main.py refuses bad input up front, in one line, and warns about flags that do nothing.

Early refusals run on a fresh folder: a demo-micro run builds its zoo first, so a refusal that
leaves no checkpoints/ folder behind happened before any work."""
import json
import math
import os

import pytest

import main
import utils
from src.args import default_tasks
from src.datasets.registry import DatasetNotFoundError, resolve_tasks
from src.eval import Evaluator
from tests.conftest import cli
from tests.test_main import results


def fresh(tmp_path, *args):
    """Run main on a folder without a zoo; returns the base folder (to check nothing was built)."""
    main.main(["--model", "demo-micro", "--base_dir", str(tmp_path), "--logs", str(tmp_path / "logs"),
               "--threads", "1", "--no-progress", "--num-workers", "0", *args])


def refused(tmp_path, capsys, match, *args) -> str:
    with pytest.raises(SystemExit) as info:
        fresh(tmp_path, *args)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert match in message, message
    assert not (tmp_path / "checkpoints").exists(), "the demo zoo was built before the refusal"
    assert not (tmp_path / "logs").exists()
    assert "Traceback" not in capsys.readouterr().err
    return message


@pytest.mark.parametrize("flag", ["--scaling_coef", "--alpha", "--ties_k", "--dare_p"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_refused_at_parse_time(tmp_path, capsys, flag, value):
    refused(tmp_path, capsys, f"argument {flag}", "--merge", "TA", "--c", flag, value)


@pytest.mark.parametrize("args, match", [
    (["--threads", "0"], "--threads: expected an integer >= 1"),
    (["--threads", "-2"], "--threads: expected an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--batch-size", "-8"], "--batch-size: expected an integer >= 1"),
    (["--num-workers", "-1"], "--num-workers: expected an integer >= 0"),
    (["--alpha", "0"], "alpha must be finite and > 0"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--device", "meta"], "--device meta: not a device"),
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--eval-datasets", ""], "--eval-datasets is empty"),
    (["--tasks", "Digits,Nope"], "Nope"),
    (["--merge", "fisher"], "unknown merge method 'fisher'"),
    (["--merge", "finetuned", "--eval-datasets", "Digits,Letters"], "no fine-tuned model among --tasks for ['Letters']"),
    (["--c", "--svc-target", "7"], "--svc-target 7 is out of range for 3 tasks"),
    (["--c", "--svc-keys", "al2d"], "argument --svc-keys: invalid choice: 'al2d'"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, args, match):
    refused(tmp_path, capsys, match, *args)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_refused_before_any_work(tmp_path, capsys):
    refused(tmp_path, capsys, "CUDA is not available", "--device", "cuda")


def test_logs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for logs in (blocker, blocker / "logs"):  # the folder itself, or a parent, is a file
        with pytest.raises(SystemExit) as info:
            main.main(["--model", "demo-micro", "--base_dir", str(tmp_path), "--logs", str(logs), "--threads", "1"])
        assert str(info.value.code).startswith(f"error: --logs {logs}: {blocker} is a file"), info.value.code
    (tmp_path / "logs" / "demo-micro" / "results.jsonl").mkdir(parents=True)
    with pytest.raises(SystemExit, match="results.jsonl cannot be written"):
        main.main(["--model", "demo-micro", "--base_dir", str(tmp_path), "--logs", str(tmp_path / "logs")])
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_logs_folder_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    os.chmod(tmp_path / "logs", 0o500)
    try:
        with pytest.raises(SystemExit, match="is not writable"):
            fresh(tmp_path)
    finally:
        os.chmod(tmp_path / "logs", 0o700)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["merged.json", "merged.pt", "folder", "a-file/merged.safetensors"])
def test_save_merged_needs_a_safetensors_path(tmp_path, capsys, name):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    message = refused(tmp_path, capsys, "give a", "--save-merged", str(tmp_path / name))
    assert message.startswith(f"error: --save-merged {tmp_path / name}: ")
    assert ".safetensors" in message or "a-file is a file, not a folder" in message
    assert not (tmp_path / "merged.json").exists() and not (tmp_path / "merged.pt").exists()


def test_save_merged_never_replaces_an_existing_file_without_overwrite(tmp_path, capsys):
    for existing in ("merged.safetensors", "merged.json"):  # the weights, or the sidecar
        (tmp_path / existing).write_text("keep me")
        refused(tmp_path, capsys, "exists; give another path or allow replacing it (--overwrite;",
                "--save-merged", str(tmp_path / "merged.safetensors"))
        assert (tmp_path / existing).read_text() == "keep me"
        (tmp_path / existing).unlink()


def test_save_merged_never_overwrites_an_input_checkpoint(workdir, capsys):
    import clip

    ckpts = clip.find_checkpoints("demo-micro", str(workdir), resolve_tasks(default_tasks("demo-micro")))
    before = {p: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in [ckpts.zeroshot, *ckpts.finetuned.values()]}
    # a .safetensors input (e.g. a Hugging Face or merged checkpoint used as a source), reached via a link
    source = ckpts.zeroshot.with_name("model.safetensors")
    os.symlink(ckpts.zeroshot, source)
    n = len(results(workdir))
    try:
        for target, match in ((ckpts.zeroshot, "give a .safetensors path"),
                              (next(iter(ckpts.finetuned.values())), "give a .safetensors path"),
                              (source, f"{source} is an input checkpoint of this merge")):
            with pytest.raises(SystemExit) as info:
                cli(workdir, "--merge", "TA", "--save-merged", str(target), "--overwrite")
            message = str(info.value.code)
            assert message.startswith("error: ") and match in message, message
        with pytest.raises(ValueError, match="input checkpoint"):  # the library refuses it too
            clip.save_merged(source, {}, {"method": "TA", "options": {}, "alpha": None, "tasks": [],
                                          "sources": [ckpts.zeroshot]}, overwrite=True)
    finally:
        source.unlink()
    assert {p: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in before} == before
    assert len(results(workdir)) == n  # refused before the run


def test_save_merged_replaces_a_file_with_overwrite(workdir, tmp_path):
    import clip

    out = tmp_path / "merged.safetensors"
    out.write_text("old")
    cli(workdir, "--merge", "TA", "--save-merged", str(out), "--overwrite")
    state = clip.load_state_dict(out)
    assert len(state) > 0 and (tmp_path / "merged.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json", "merged.safetensors"]


def test_library_save_merged_refuses_paths_that_lose_data(tmp_path):
    import torch
    from safetensors.torch import load_file

    from clip.save import save_merged

    src = tmp_path / "zeroshot.safetensors"
    src.write_bytes(b"weights")
    meta = {"method": "TA", "options": {}, "alpha": None, "tasks": ["A"], "sources": {"zeroshot": src}}
    sd = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="does not end in .safetensors"):
        save_merged(tmp_path / "merged.json", sd, meta)
    with pytest.raises(ValueError, match="a folder; give a file path ending in .safetensors"):
        save_merged(tmp_path, sd, meta)
    with pytest.raises(ValueError, match="input checkpoint"):
        save_merged(src, sd, meta, overwrite=True)
    assert src.read_bytes() == b"weights"
    save_merged(tmp_path / "merged.safetensors", sd, meta)
    with pytest.raises(ValueError, match="exists"):
        save_merged(tmp_path / "merged.safetensors", sd, meta)
    save_merged(tmp_path / "merged.safetensors", {"w": torch.zeros(2)}, meta, overwrite=True)
    assert load_file(tmp_path / "merged.safetensors")["w"].tolist() == [0.0, 0.0]


def test_flags_without_effect_are_named_in_a_warning(tmp_path, capsys):
    def warnings_for(*args):
        parsed = main.build_parser().parse_args(["--model", "demo-micro", "--logs", str(tmp_path), *args])
        main.validate(parsed)
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if line.startswith("warning: ")]

    assert warnings_for("--merge", "TA", "--c", "--alpha", "0.5") == []
    assert warnings_for("--merge", "TIES", "--ties_k", "10", "--scaling_coef", "0.5") == []
    svc = warnings_for("--merge", "TA", "--alpha", "0.5", "--svc-target", "1", "--svc-row-space",
                       "--svc-keys", "all2d", "--svc-dtype", "float64")
    assert len(svc) == 5 and all("without --c" in w for w in svc)
    assert [f for f in ("--alpha", "--svc-target", "--svc-row-space", "--svc-keys", "--svc-dtype")
            if not any(w.startswith(f"warning: {f} ") for w in svc)] == []
    other = warnings_for("--merge", "TA", "--ties_k", "10", "--dare_p", "0.5")
    assert other == ["warning: --ties_k has no effect with --merge TA (it is an option of TIES)",
                     "warning: --dare_p has no effect with --merge TA (it is an option of DARE)"]
    for reference in ("zeroshot", "finetuned"):
        ref = warnings_for("--merge", reference, "--c", "--scaling_coef", "0.5", "--ties_k", "10")
        assert [w.split()[1] for w in ref] == ["--c", "--scaling_coef", "--ties_k"]
        assert all(f"no effect with --merge {reference}" in w for w in ref)


def test_nan_accuracy_never_reaches_the_logs(workdir, monkeypatch):
    monkeypatch.setattr(Evaluator, "__call__", lambda self, encoder, heads, datasets, provenance=None:
                        {d: math.nan for d in datasets})
    folder = workdir / "logs-nan"
    with pytest.raises(SystemExit) as info:
        main.main(["--model", "demo-micro", "--base_dir", str(workdir), "--logs", str(folder), "--threads", "1",
                   "--merge", "zeroshot"])
    message = str(info.value.code)
    assert message.startswith("error: no finite result to log (accuracy.Digits=nan") and "\n" not in message
    assert not list(folder.rglob("log_*")) and not (folder / "demo-micro" / "results.jsonl").exists()


def test_nan_on_a_validation_split_never_reaches_the_logs(workdir, monkeypatch):
    """A NaN validation score at one grid point (the others chosen from) stays in the logged curve: refused."""
    real, calls = Evaluator.__call__, []

    def val_nan(self, encoder, heads, datasets, provenance=None):
        result = real(self, encoder, heads, datasets, provenance)
        if len(datasets) > 1:  # a merged model on every val split (fine-tuned ones are measured one by one)
            calls.append(datasets)
        return {d: math.nan if d == "ShapesVal" and len(calls) == 1 else acc for d, acc in result.items()}

    monkeypatch.setattr(Evaluator, "__call__", val_nan)
    folder = workdir / "logs-nan-val"
    with pytest.raises(SystemExit, match=r"^error: no finite result to log \(scaling_coef_curve\[0\]\.accuracy"):
        main.main(["--model", "demo-micro", "--base_dir", str(workdir), "--logs", str(folder), "--threads", "1",
                   "--no-progress", "--num-workers", "0", "--merge", "TA", "--scaling_coef", "auto"])
    assert not list(folder.rglob("log_*")) and not (folder / "demo-micro" / "results.jsonl").exists()


@pytest.mark.parametrize("exc, match", [
    (SystemExit("no fine-tuned checkpoint for X"), "^error: no fine-tuned checkpoint for X$"),
    (PermissionError(13, "Permission denied", "logs/x"), r"^error: \[Errno 13\] Permission denied: 'logs/x'$"),
    (DatasetNotFoundError("Digits: no data under data/digits; download it with --download"),
     "^error: Digits: no data under data/digits; download it with --download$"),
])
def test_errors_raised_deep_inside_are_one_line(workdir, monkeypatch, exc, match):
    def deep(*args, **kwargs):
        raise exc

    monkeypatch.setattr(Evaluator, "__call__", deep)
    with pytest.raises(SystemExit, match=match):
        cli(workdir, "--merge", "zeroshot")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _no_leftovers(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".") or p.name.endswith(".tmp")], files
    for path in folder.rglob("results.jsonl"):
        assert path.read_bytes().endswith(b"\n")


def test_ctrl_c_exits_quietly_with_130(workdir, monkeypatch, capsys):
    monkeypatch.setattr(Evaluator, "__call__", _interrupt)
    with pytest.raises(SystemExit) as info:
        cli(workdir, "--merge", "TA")
    assert info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_ctrl_c_while_writing_leaves_no_temporary_or_half_file(workdir, monkeypatch, tmp_path):
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(SystemExit) as info:
        cli(workdir, "--merge", "TA", "--save-merged", str(out))
    assert info.value.code == 130
    assert not out.exists() and not list(out.parent.iterdir())
    monkeypatch.undo()

    logs = tmp_path / "logs"
    real_fsync = os.fsync
    calls = []

    def interrupted_fsync(fd):  # Ctrl-C in the middle of writing the text log
        calls.append(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(SystemExit) as info:
        main.main(["--model", "demo-micro", "--base_dir", str(workdir), "--logs", str(logs), "--threads", "1",
                   "--no-progress", "--num-workers", "0", "--merge", "zeroshot"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert info.value.code == 130 and calls
    _no_leftovers(logs)
    assert not list(logs.rglob("log_*")) and utils.read_jsonl(logs / "demo-micro" / "results.jsonl") == []
