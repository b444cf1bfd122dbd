"""A merge method registered with nothing but its name works everywhere, with no other edit: main.py
(--c, --scaling_coef auto, --alpha auto), src.sweep's local launcher, src.results and src.plots. The
example of docs/adding-a-method.md runs as written."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge_func
from src.task_vectors import TaskVector
from tests.conftest import MAIN_FLAGS, cli

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "adding-a-method.md"
# nothing but a name: no aliases, grid, alpha or key-by-key declaration
BARE_METHOD = '''

@merge_method("MyMerge")
def my_merge(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, my_option: float = 0.5):
    """Test method: my_option x the mean plus (1 - my_option) x the first task, times scaling_coef."""
    return _per_key(task_vectors, lambda key, d: scaling_coef * (my_option * d.mean(0) + (1 - my_option) * d[0]))
'''


def doc_example() -> str:
    """The python code block of docs/adding-a-method.md that registers a method with options."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if "@merge_method(" in b and "def merge_key" in b)


@contextlib.contextmanager
def registered(code: str):
    """Run `code` as if it stood at the end of merge_func.py; unregister what it added afterwards."""
    before = set(merge_func.METHODS)
    try:
        exec(compile(code, "merge_func.py (appended)", "exec"), vars(merge_func))
        yield [name for name in merge_func.METHODS if name not in before]
    finally:
        for name in set(merge_func.METHODS) - before:
            for table in (merge_func.METHODS, merge_func.MERGE_METHODS, merge_func.METHOD_OPTIONS):
                table.pop(name, None)


def test_a_bare_declaration_gets_every_default():
    with registered(BARE_METHOD) as added:
        assert added == ["MyMerge"]
        info = merge_func.METHODS["MyMerge"]
        assert info.options == {"scaling_coef": 1.0, "my_option": 0.5}
        assert info.default_alpha(8) == 1 / 8 and info.grid == "ta" and not info.merges_key_by_key()
        assert merge_func.canonical_name("my_merge") == merge_func.canonical_name("MY-MERGE") == "MyMerge"
        from src import tuning
        from src.args import build_parser

        assert tuning.coefficient_grid("mymerge") == tuning.coefficient_grid("TA")
        assert build_parser().parse_args(["--merge", "MyMerge", "--my_option", "0.25"]).my_option == 0.25
    assert "MyMerge" not in merge_func.METHODS  # the test leaves the registry as it found it


def test_an_option_named_like_a_flag_is_refused_with_the_method_named():
    from src.args import build_parser

    with registered(BARE_METHOD.replace("my_option", "tasks")):
        with pytest.raises(ValueError, match="merge method MyMerge: its option 'tasks' collides with main.py's --tasks"):
            build_parser()


def test_the_documented_example_merges_as_described():
    g = torch.Generator().manual_seed(0)
    tvs = [TaskVector(vector={"w": torch.randn(20, 10, generator=g), "b": torch.randn(10, generator=g)})
           for _ in range(3)]
    with registered(doc_example()) as added:
        assert added == ["Breadcrumbs"] and merge_func.canonical_name("model breadcrumbs") == "Breadcrumbs"
        fn = merge_func.get_merge_method("breadcrumbs")
        info = merge_func.METHODS["Breadcrumbs"]
        assert info.options == {"scaling_coef": 0.3, "bc_top": 1.0, "bc_bottom": 85.0} and info.merges_key_by_key()
        plain = fn(None, tvs, None)
        for key in ("w", "b"):
            d = torch.stack([tv.vector[key] for tv in tvs]).reshape(3, -1)
            n = d.shape[1]
            expected = torch.zeros(n)
            for row in d:  # keep an entry exactly when it lies between the two thresholds
                s = row.abs().sort().values
                low, high = s[max(1, int(n * 0.85)) - 1], s[max(1, n - int(n * 0.01)) - 1]
                expected += torch.where((row.abs() > low) & (row.abs() <= high), row, torch.zeros(()))
            assert torch.allclose(plain.vector[key].reshape(-1), 0.3 * expected)
        everything = fn(None, tvs, type("C", (), {"bc_top": 0.0, "bc_bottom": 0.0})())
        ta = merge_func.get_merge_method("TA")(None, tvs, None)
        assert all(torch.allclose(everything.vector[k], ta.vector[k]) for k in ta.vector)  # both 0: TA


def test_the_documented_example_runs_through_main(workdir):
    with registered(doc_example()):
        record = cli(workdir, "--merge", "breadcrumbs", "--bc_bottom", "90", "--c")
    assert record["merge"] == "Breadcrumbs" and record["svc"] and record["alpha"] == pytest.approx(1 / 3)
    assert record["options"] == {"scaling_coef": 0.3, "bc_top": 1.0, "bc_bottom": 90.0}


def _copy_of_the_repository(dest: Path) -> Path:
    """The tracked files (and those git does not ignore) of this checkout, without logs or checkpoints."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.process
def test_a_bare_method_runs_everywhere_with_no_other_edit(tmp_path, workdir):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to copy")
    repo = _copy_of_the_repository(tmp_path / "repo")
    with open(repo / "merge_func.py", "a", encoding="utf-8") as f:  # the only edit
        f.write(BARE_METHOD)
    shutil.copytree(workdir / "checkpoints", repo / "checkpoints", dirs_exist_ok=True)  # the zoo, already built
    logs = repo / "logs"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    flags = ["--logs", str(logs), "--base_dir", str(repo), *MAIN_FLAGS]

    # the sweep runs zeroshot, finetuned, MyMerge and MyMerge + SVC, coefficient and alpha chosen on validation
    sweep = subprocess.run([sys.executable, "-m", "src.sweep", "--model", "demo-micro", "--methods", "MyMerge",
                            "--tuned", "--launcher", "local", "--", *flags], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    lines = [json.loads(line) for line in (logs / "demo-micro" / "results.jsonl").read_text().splitlines()]
    runs = {(r["merge"], r["svc"]): r for r in lines}
    assert set(runs) == {("zeroshot", False), ("finetuned", False), ("MyMerge", False), ("MyMerge", True)}
    tuned = runs[("MyMerge", True)]
    assert tuned["scaling_coef_grid"] == [round(0.05 * i, 2) for i in range(1, 21)]  # the TA-like default grid
    assert tuned["alpha_grid"] == pytest.approx([1 / 3, 2 / 3, 1.0]) and tuned["alpha"] in tuned["alpha_grid"]
    assert tuned["options"] == {"scaling_coef": tuned["scaling_coef"], "my_option": 0.5}

    # the table and the figures, in this process with the same method registered as the copy has it
    from src import plots, results

    with registered(BARE_METHOD), contextlib.redirect_stdout(io.StringIO()) as table:
        results.main([str(logs / "demo-micro")])
        out = tmp_path / "figures"
        plots.main(["spectrum", "--model", "demo-micro", "--base_dir", str(repo), "--merge", "MyMerge",
                    "--out", str(out / "spectrum")])
        plots.main(["scaling", str(logs / "demo-micro"), "--merge", "MyMerge", "--out", str(out / "scaling")])
    assert "MyMerge +SVC" in table.getvalue()
    assert sorted(p.name for p in out.iterdir()) == ["scaling.pdf", "scaling.png", "spectrum.pdf", "spectrum.png"]
