"""Results tables from a hand-written results.jsonl."""
import json
import math

import pytest

from src.results import AVG, NORM, load_results, main, render, summarize


def _row(merge, acc, **kw):
    row = {"time": "2026-01-01", "model": "ViT-B-32", "merge": merge, "svc": False, "alpha": 0.125,
           "scaling_coef": 1.0, "tasks": list(acc), "accuracy": acc, "seed": 0, "options": {}}
    row.update(kw)
    return json.dumps(row)


LINES = [
    _row("TA", {"MNIST": 60.0, "DTD": 80.0}, scaling_coef=0.3),
    _row("TA", {"MNIST": 70.0, "DTD": 86.0}, svc=True, scaling_coef=0.3, seed=0),
    "{not json",
    _row("TA", {"MNIST": 72.0, "DTD": 84.0}, svc=True, scaling_coef=0.3, seed=1),
    _row("TA", {"MNIST": 74.0, "DTD": 85.0}, svc=True, scaling_coef=0.3, seed=2),
    _row("TA", {"MNIST": 65.0, "DTD": 90.0}, svc=True, alpha=1.0, scaling_coef=0.3),
    _row("TIES", {"MNIST": 66.0, "DTD": 81.0}, options={"k": 20}, normalized=77.5),
    _row("TIES", {"MNIST": 67.0, "DTD": 79.0}, options={"k": 10}, normalized={"MNIST": 70.0, "DTD": 80.0}),
    _row("TA", {"MNIST": 61.0, "DTD": 79.0}, scaling_coef=0.35, scaling_coef_selected=0.35,
         scaling_coef_grid=[0.3, 0.35]),
    json.dumps({"merge": "TA", "accuracy": {"MNIST": "high"}}),
    _row("zeroshot", {"MNIST": 40.0, "DTD": 50.0}),
    _row("finetuned", {"MNIST": 99.0, "DTD": 80.0}),
]


@pytest.fixture
def logdir(tmp_path):
    d = tmp_path / "ViT-B-32"
    d.mkdir()
    (d / "results.jsonl").write_text("\n".join(LINES) + "\n")
    return d


def test_malformed_lines_are_skipped_with_line_numbers(logdir):
    with pytest.warns(UserWarning) as rec:
        rows = load_results(logdir)
    assert len(rows) == len(LINES) - 2
    messages = " ".join(str(w.message) for w in rec)
    assert "results.jsonl:3:" in messages and "results.jsonl:10:" in messages
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        load_results(logdir / "missing")


def _table(logdir):
    with pytest.warns(UserWarning):
        return summarize(load_results(logdir))


def test_rows_labels_and_order(logdir):
    t = _table(logdir)
    assert list(t.mean.index) == [
        "Zero-shot", "Fine-tuned", "TA (coef=0.3)", "TA (coef=auto)", "TA +SVC (alpha=0.125)",
        "TA +SVC (alpha=1)", "TIES (k=20)", "TIES (k=10)",
    ]  # references first, then methods by first appearance, without SVC before with
    assert list(t.mean.columns) == ["MNIST", "DTD", AVG, NORM]
    assert t.reference == ["Zero-shot", "Fine-tuned"]


def test_repeated_runs_mean_std_count(logdir):
    t = _table(logdir)
    lab = "TA +SVC (alpha=0.125)"
    assert t.n[lab] == 3 and t.n["TA (coef=0.3)"] == 1
    assert t.mean.at[lab, "MNIST"] == pytest.approx(72.0)
    assert t.std.at[lab, "MNIST"] == pytest.approx(2.0)  # sample std of 70, 72, 74
    assert t.mean.at[lab, AVG] == pytest.approx((78 + 78 + 79.5) / 3)
    assert math.isnan(t.std.at["TA (coef=0.3)", "MNIST"])


def test_normalized_column(logdir):
    t = _table(logdir)
    # computed from the fine-tuned row when not logged
    assert t.mean.at["TA (coef=0.3)", NORM] == pytest.approx((60 / 99 + 80 / 80) / 2 * 100)
    assert t.mean.at["Fine-tuned", NORM] == pytest.approx(100.0)
    # logged as a number, or per dataset
    assert t.mean.at["TIES (k=20)", NORM] == pytest.approx(77.5)
    assert t.mean.at["TIES (k=10)", NORM] == pytest.approx(75.0)


def test_best_marking_excludes_references(logdir):
    t = _table(logdir)
    best = t.best(2)
    assert best.loc["TA +SVC (alpha=0.125)", ["MNIST", AVG]].all()
    assert best.at["TA +SVC (alpha=1)", "DTD"] and not best.at["Fine-tuned", "DTD"]
    assert best.sum().tolist() == [1, 1, 1, 1]


def test_formats(logdir):
    t = _table(logdir)
    md = render(t, "markdown", 1)
    assert "| TA +SVC (alpha=0.125) | **72.0 ± 2.0** |" in md and md.count("**") == 8
    assert md.splitlines()[2].startswith("| Zero-shot | 40.0 | 50.0 | 45.0 |")
    assert md.splitlines()[0].endswith("| n |")
    csv = render(t, "csv", 1).splitlines()
    assert csv[0] == "Method,MNIST,DTD,Avg,Avg (norm.),n"
    assert csv[5].startswith("TA +SVC (alpha=0.125),72.0 ± 2.0*,85.0 ± 1.0,")
    tex = render(t, "latex", 1)
    assert r"\textbf{72.0 $\pm$ 2.0}" in tex and tex.count(r"\midrule") == 2
    assert tex.startswith(r"\begin{tabular}{lrrrrr}")


def test_cli_writes_file(logdir, tmp_path, capsys):
    out = tmp_path / "t" / "table.csv"
    main([str(logdir / "results.jsonl"), "--format", "csv", "--out", str(out), "--merge", "ties"])  # any spelling
    lines = out.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["Method", "Zero-shot", "Fine-tuned", "TIES (k=20)", "TIES (k=10)"]
    assert "results.jsonl:3:" in capsys.readouterr().err


def test_labels_name_svc_variants_and_checkpoint_layouts():
    svc = {"svc": True, "alpha": 0.125, "svc_keys": "official", "svc_row_space": False}
    rows = [json.loads(line) for line in (
        _row("TA", {"MNIST": 70.0}, layout="task_vectors", **svc),
        _row("TA", {"MNIST": 71.0}, layout="task_vectors", **{**svc, "svc_row_space": True}),
        _row("TA", {"MNIST": 72.0}, layout="task_vectors", **{**svc, "svc_keys": "all2d"}),
        _row("TA", {"MNIST": 73.0}, layout="tsv", **svc),
        _row("TA", {"MNIST": 60.0}, layout="tsv", options={"scaling_coef": 1.0}),  # duplicate of the top level
    )]
    assert list(summarize(rows).mean.index) == [
        "TA",
        "TA +SVC (task_vectors checkpoints, keys=official, row_space=False)",
        "TA +SVC (task_vectors checkpoints, keys=official, row_space=True)",
        "TA +SVC (task_vectors checkpoints, keys=all2d, row_space=False)",
        "TA +SVC (tsv checkpoints, keys=official, row_space=False)",
    ]


def test_non_utf8_and_damaged_lines_are_named_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_bytes(LINES[0].encode() + b"\n\xff\xfe latin-1 junk \xe9\n" + LINES[-1].encode() + b"\n{cut")
    main([str(path)])
    out, err = capsys.readouterr()
    assert f"{path}:2: skipped damaged line (not UTF-8)" in err and f"{path}:4:" in err
    assert "| TA |" in out and "| Fine-tuned |" in out


def test_conventions_and_data_provenance_are_never_averaged_together():
    test = {"MNIST": {"source": "torchvision", "split": "test", "n": 10000}}
    val = {"MNIST": {"source": "torchvision", "split": "val", "n": 5000}}
    rows = [json.loads(line) for line in (
        _row("TA", {"MNIST": 70.0}, convention="official", data=test),
        _row("TA", {"MNIST": 72.0}, convention="official", data=test),
        _row("TA", {"MNIST": 60.0}, convention="fusionbench", data=test),
        _row("TA", {"MNIST": 50.0}, convention="official", data=val),
        _row("zeroshot", {"MNIST": 40.0}, convention="official", data=test),
        _row("zeroshot", {"MNIST": 30.0}, convention="official", data=val),
    )]
    t = summarize(rows)
    assert list(t.mean.index) == [
        "Zero-shot (data=torchvision/test, n=10000)", "Zero-shot (data=torchvision/val, n=5000)",
        "TA (official convention, data=torchvision/test, n=10000)",
        "TA (fusionbench convention, data=torchvision/test, n=10000)",
        "TA (official convention, data=torchvision/val, n=5000)",
    ]
    assert t.n.tolist() == [1, 1, 2, 1, 1]
    assert t.mean.at["TA (official convention, data=torchvision/test, n=10000)", "MNIST"] == pytest.approx(71.0)


def test_normalisation_fallback_uses_fine_tuned_rows_of_the_same_checkpoints_and_data():
    """A row without a logged `normalized` is normalised by the fine-tuned row of its own checkpoint files
    and data, never by an average over other checkpoints (a rebuilt zoo) or other data."""
    data = {"MNIST": {"source": "/d/MNIST", "split": "test", "n": 10000}}
    rows = [json.loads(line) for line in (
        _row("finetuned", {"MNIST": 50.0}, checkpoints="old", data=data),
        _row("finetuned", {"MNIST": 80.0}, checkpoints="new", data=data),
        _row("finetuned", {"MNIST": 20.0}, checkpoints="new",
             data={"MNIST": {"source": "/other/MNIST", "split": "test", "n": 100}}),
        _row("TA", {"MNIST": 40.0}, checkpoints="new", data=data),
        _row("TA", {"MNIST": 40.0}, checkpoints="gone", data=data),
    )]
    table = summarize(rows)
    merged = [label for label in table.mean.index if label not in table.reference]
    values = table.mean.loc[merged, NORM]
    assert sorted(v for v in values if not math.isnan(v)) == [pytest.approx(50.0)]  # 40/80, not 40/mean(50,80,20)
    assert int(values.isna().sum()) == 1  # no fine-tuned row of its checkpoints: unknown, not borrowed
