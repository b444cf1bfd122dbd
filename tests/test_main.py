"""main.py end to end on the demo-micro zoo (plumbing, not accuracy); run.sh is tested in test_sweep.py."""
import json
import os

import pytest

import main
import utils
from tests.conftest import cli

REQUIRED = {"time", "model", "merge", "svc", "alpha", "scaling_coef", "tasks", "accuracy", "avg", "seed",
            "merge_seconds", "svc_seconds", "eval_seconds", "options", "checkpoints"}


def results(workdir):
    return utils.read_jsonl(workdir / "logs" / "demo-micro" / "results.jsonl")


def test_merge_with_svc_writes_log_and_result_line(workdir):
    record = cli(workdir, "--merge", "ta", "--c")
    assert REQUIRED <= set(record)
    assert record["merge"] == "TA" and record["svc"] is True
    k = len(record["tasks"])
    assert record["alpha"] == pytest.approx(1 / k) and record["scaling_coef"] == 0.3
    assert set(record["accuracy"]) == set(record["tasks"])
    assert record["avg"] == pytest.approx(sum(record["accuracy"].values()) / k)
    assert results(workdir)[-1] == json.loads(json.dumps(record))
    logs = sorted((workdir / "logs" / "demo-micro").glob("log_*_TA_svc.txt"))
    text = logs[-1].read_text()
    for task, acc in record["accuracy"].items():
        assert f"{task}: {acc:.2f}%" in text
    assert "Avg ACC:" in text and f"SVC alpha: {record['alpha']}" in text and "merge_seconds" in text


def test_tsvm_defaults_to_alpha_one_and_options_are_logged(workdir):
    record = cli(workdir, "--merge", "TSVM", "--c", "--tsvm_fraction", "0.2")
    assert record["merge"] == "TSV-M" and record["alpha"] == 1.0
    assert record["options"]["tsvm_fraction"] == 0.2 and record["options"]["scaling_coef"] == 1.0


def test_reference_rows_and_normalized_accuracy(workdir):
    zs = cli(workdir, "--merge", "zeroshot")
    ft = cli(workdir, "--merge", "finetuned")
    assert zs["merge"] == "zeroshot" and ft["merge"] == "finetuned"
    cached = json.loads((workdir / "logs" / "demo-micro" / "individual_accuracies.json").read_text())
    assert {t: cached[t][ft["checkpoints"]]["acc"] for t in ft["tasks"]} == ft["accuracy"]
    assert ft["normalized"] == pytest.approx(100.0)
    ta = cli(workdir, "--merge", "TA")
    expected = sum(100 * ta["accuracy"][t] / ft["accuracy"][t] for t in ta["tasks"]) / len(ta["tasks"])
    assert ta["normalized"] == pytest.approx(expected)


def test_auto_coefficient_is_chosen_from_the_grid_on_validation_splits(workdir):
    record = cli(workdir, "--merge", "TA", "--scaling_coef", "auto")
    assert record["scaling_coef"] == record["scaling_coef_selected"]
    assert record["scaling_coef_selected"] in record["scaling_coef_grid"]
    curve = record["scaling_coef_curve"]
    assert [p["coef"] for p in curve] == record["scaling_coef_grid"]
    assert all(set(p["accuracy"]) == {f"{t}Val" for t in record["tasks"]} for p in curve)
    best = max(curve, key=lambda p: (p["normalized"], -p["coef"]))
    assert best["coef"] == record["scaling_coef_selected"]


def test_fixed_coefficient_with_auto_alpha_keeps_the_method_coefficient(workdir):
    record = cli(workdir, "--merge", "TA", "--c", "--alpha", "auto")
    assert record["scaling_coef"] == 0.3
    assert record["alpha"] == record["alpha_selected"] and record["alpha"] in record["alpha_grid"]


def test_skip_existing_matches_the_exact_request(workdir):
    cli(workdir, "--merge", "WA")
    n = len(results(workdir))
    assert cli(workdir, "--merge", "WA", "--skip-existing")["skipped"] is True
    assert len(results(workdir)) == n
    assert "skipped" not in cli(workdir, "--merge", "WA", "--scaling_coef", "0.5", "--skip-existing")
    assert len(results(workdir)) == n + 1


def test_skip_existing_reruns_on_changed_checkpoints(workdir):
    """A rebuilt zoo or re-downloaded checkpoints: the logged run is not this run."""
    cli(workdir, "--merge", "WA", "--scaling_coef", "0.25")
    assert cli(workdir, "--merge", "WA", "--scaling_coef", "0.25", "--skip-existing")["skipped"] is True
    ft = next((workdir / "checkpoints" / "demo-micro").glob("*/finetuned.pt"))
    st = os.stat(ft)
    os.utime(ft, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        record = cli(workdir, "--merge", "WA", "--scaling_coef", "0.25", "--skip-existing")
        assert "skipped" not in record
        assert record["checkpoints"] != results(workdir)[-2]["checkpoints"]
    finally:
        os.utime(ft, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bad_input_is_a_clear_error(workdir, tmp_path):
    with pytest.raises(SystemExit, match="unknown merge method 'fisher'.*Iso-CTS"):
        cli(workdir, "--merge", "fisher")
    with pytest.raises(SystemExit, match="alpha must be finite and > 0"):
        cli(workdir, "--merge", "TA", "--c", "--alpha", "0")
    with pytest.raises(SystemExit, match="checkpoint"):
        main.main(["--model", "ViT-B-32", "--base_dir", str(tmp_path), "--logs", str(tmp_path / "logs"),
                   "--merge", "TA"])


def test_append_jsonl_never_leaves_a_half_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"broken": ')  # e.g. written by a crashed foreign tool
    utils.append_jsonl(path, {"b": 2})
    assert utils.read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert not list(tmp_path.glob(".results.jsonl.*"))  # no temporary file left behind
