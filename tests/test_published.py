"""Published numbers beside ours (src/published.py, src/published.json, python -m src.results --reference):
which publication a results line is compared with, "no published number", the tolerance, every format,
old lines, and bad input."""
import json

import pytest

import utils
from src import published, results
from src.published import PublishedDataError, load, match, setup_check

T8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
T14 = T8 + ["STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013"]
FAMILY = {"hf": {"layout": "hf", "convention": "fusionbench", "source": "hf"},
          "task_vectors": {"layout": "task_vectors", "convention": "task_vectors"},
          "tsv": {"layout": "tsv", "convention": "tsv"}}
TSV_GRID = [i / 30 for i in range(1, 31)]  # the TSV / iso-merging grid for TA (tuning.coefficient_grid(..., "tsv"))


def line(merge, layout="hf", tasks=T8, acc=50.0, **fields):
    """A results line as main.py logs it (accuracies are arbitrary inputs, not results)."""
    accuracy = {t: acc for t in tasks} if isinstance(acc, float) else acc
    row = {"model": "ViT-B-32", "merge": merge, "tasks": list(tasks), **FAMILY.get(layout, {}), "accuracy": accuracy}
    if merge not in ("zeroshot", "finetuned"):
        row.update(svc=False, alpha=None, scaling_coef=fields.get("scaling_coef", 0.3),
                   options={"scaling_coef": fields.get("scaling_coef", 0.3)})
    row.update(fields)
    return row


def svc(alpha, row_space=False):
    return {"svc": True, "alpha": alpha, "svc_keys": "official", "svc_target": None, "svc_row_space": row_space}


def write(folder, rows):
    for row in rows:
        utils.append_jsonl(folder / "results.jsonl", row)
    return folder


def picked(row):
    m = match(row)
    return m.entry.source.key if m.entry else None


# ----------------------------------------------------------------------------- which publication
def test_the_checkpoint_family_decides_the_publication():
    assert picked(line("zeroshot", "hf")) == "FB-TA8"  # FusionBench's hub fine-tunes
    assert picked(line("zeroshot", "task_vectors")) == "ADA"  # the release the official SVC code uses
    tsv = match(line("zeroshot", "tsv"))
    assert tsv.entry.source.key == "ISO-T1" and tsv.acc() == {} and tsv.avg().value == 48.3  # an average only
    assert picked(line("zeroshot", None, source="hf")) == "FB-TA8"  # no layout field, but fetched from the hub
    assert match(line("zeroshot", "hf", model="ViT-L-14")).avg().value == 64.6


def test_task_count_picks_the_table_of_that_task_set():
    """FusionBench's 8- and 20-task tables differ (ViT-B/32 zero-shot EuroSAT 46.0 vs 45.00): an 8-task run is
    compared with the 8-task table; a 14-task run gets the 20-task table's per-task values and no average."""
    eight = match(line("zeroshot", "hf"))
    assert eight.exact and eight.acc()["EuroSAT"].value == 46.0 and str(eight.avg()) == "48.2"
    assert [o.source.key for o in eight.others] == ["FB-TALL20"]
    fourteen = match(line("zeroshot", "hf", tasks=T14))
    assert fourteen.entry.source.key == "FB-TALL20" and not fourteen.exact and fourteen.avg() is None
    assert str(fourteen.acc()["EuroSAT"]) == "45.00" and set(fourteen.acc()) == set(T14)
    assert "per task" in fourteen.label()


def test_method_names_go_through_merge_func():
    row = line("tsvm", "hf", scaling_coef=1.0, options={"scaling_coef": 1.0, "tsvm_fraction": None,
                                                         "tsvm_keys": "all2d"})
    m = match(row)
    assert m.entry.source.key == "FB-TSVM" and m.entry.method == "TSV-M" and str(m.avg()) == "83.06"
    assert "not one merge_func knows" in match(line("NoSuchMerge", "hf")).reason


def test_merge_settings_must_all_agree():
    fb_ties = {"scaling_coef": 0.3, "ties_k": 20.0, "ties_merge": "sum", "ties_scope": "global"}
    assert picked(line("TIES", "hf", options=fb_ties)) == "FB-TA8"
    official = match(line("TIES", "hf", scaling_coef=1.0, options={**fb_ties, "ties_merge": "mean",
                                                                   "ties_scope": "layer", "scaling_coef": 1.0}))
    assert official.entry is None and "FB-TA8 has: coef 0.3" in official.reason
    assert "ties_merge=sum" in match(line("TIES", "hf", options={**fb_ties, "ties_merge": "mean"})).reason
    # a fixed coefficient is not a tuned one, and a tuned one must be tuned over the publication's grid
    tuned = line("TA", "tsv", scaling_coef=0.3, scaling_coef_grid_name="tsv", scaling_coef_grid=TSV_GRID)
    assert picked(tuned) == "ISO-T1" and str(match(tuned).norm()) == "76.5"
    assert picked(line("TA", "tsv")) is None
    other_grid = line("TA", "tsv", scaling_coef=0.3, scaling_coef_grid=[0.05 * i for i in range(1, 21)])
    assert "tsv grid" in match(other_grid).reason
    assert picked({k: v for k, v in tuned.items() if k != "scaling_coef_grid"}) == "ISO-T1"  # grid from its name


def test_svc_alpha_row_space_and_disagreeing_sources():
    base = line("TA", "task_vectors")
    assert picked(base) == "ADA"  # per-task values win over the SVC paper's average-only row...
    assert [o.source.key for o in match(base).others] == ["SVC-PN"]  # ...which is listed beside it
    assert str(match(line("TA", "task_vectors", **svc(0.125))).avg()) == "81.9"  # alpha 1/K, K = 8
    assert "SVC alpha 1/K = 0.125" in match(line("TA", "task_vectors", **svc(1.0))).reason
    row_space = match(line("TIES", "task_vectors", scaling_coef=1.0, **svc(0.125, row_space=True),
                           options={"scaling_coef": 1.0, "ties_k": 20.0, "ties_merge": "mean", "ties_scope": "layer"}))
    assert row_space.entry.source.key == "SVC-PN-ABL" and str(row_space.avg()) == "65.7"
    tsvm = line("TSV-M", "task_vectors", scaling_coef=1.0, **svc(1.0),
                options={"scaling_coef": 1.0, "tsvm_fraction": None, "tsvm_keys": "official"})
    assert str(match(tsvm).avg()) == "84.8"  # alpha 1 after TSV-M, as the official sweep sets it
    assert "svc_target" in match({**tsvm, "svc_target": 2}).reason
    assert picked({**tsvm, "alpha": "auto", "alpha_grid": [0.125, 1.0]}) is None


@pytest.mark.parametrize("row, reason", [
    (line("zeroshot", "hf", model="demo-micro"), "no publication reports demo-micro"),
    (line("TA", "hf", tasks=T14), "standard 8-task set(s); this run merged 14 tasks"),
    (line("zeroshot", "hf", convention="tsv"), "evaluated under the tsv convention"),
    (line("zeroshot", "hf", tasks=["MNISTVal"]), "cover other datasets"),
    (line("STAR", "hf", scaling_coef=1.0), "no publication reports STAR"),
])
def test_no_published_number_says_why(row, reason):
    m = match(row)
    assert m.entry is None and reason in m.reason
    assert setup_check(row) == [f"published check ({m.run.what()}): no published number: {m.reason}"]


# ----------------------------------------------------------------------------- the setup check
def test_setup_check_names_the_tasks_beyond_the_tolerance():
    acc = {"SUN397": 63.0, "Cars": 55.0, "RESISC45": 61.5, "EuroSAT": 46.0, "SVHN": 31.6, "GTSRB": 32.5,
           "MNIST": 48.2, "DTD": 43.9}
    lines = setup_check(line("zeroshot", "hf", acc=acc))
    assert lines[0].startswith("published check (zero-shot, ViT-B-32, 8 tasks, fusionbench checkpoints): compared "
                               "with FB-TA8") and "docs/modelpool/clip_vit.md" in lines[0]
    assert "1 of 8 tasks differ" in lines[1] and "data" in lines[1] and "heads" in lines[1]
    assert lines[2] == "  Cars: 55.00 vs published 59.8 (-4.80)"
    assert not any("RESISC45" in x for x in lines)  # 0.8 points: within the default 1 point
    strict = setup_check(line("zeroshot", "hf", acc=acc), 0.5)
    assert "  RESISC45: 61.50 vs published 60.7 (+0.80)" in strict and "2 of 8 tasks differ" in strict[1]
    assert "all 8 tasks within 5 point(s)" in setup_check(line("zeroshot", "hf", acc=acc), 5)[1]
    avg = sum(acc.values()) / 8
    assert f"Avg {avg:.2f} vs published 48.2 ({avg - 48.2:+.2f})" in setup_check(line("zeroshot", "hf", acc=acc))[3]
    with pytest.raises(ValueError, match="tolerance"):
        setup_check(line("zeroshot", "hf"), -1)


def test_merged_runs_are_compared_but_never_flagged():
    lines = setup_check(line("TA", "hf", acc={t: 60.0 for t in T8}))
    assert "per task, ours - published: SUN397 +2.90, Cars +4.30" in lines[1]
    assert not any("differ from the published value" in x for x in lines)


# ----------------------------------------------------------------------------- the table
ACC_ZS = {"SUN397": 63.5, "Cars": 55.6, "RESISC45": 61.2, "EuroSAT": 45.4, "SVHN": 31.8, "GTSRB": 32.1,
          "MNIST": 48.3, "DTD": 44.7}


@pytest.fixture
def logdir(tmp_path):
    return write(tmp_path / "ViT-B-32", [
        line("zeroshot", "hf", acc=ACC_ZS),
        line("TA", "hf", acc=60.0),
        line("TA", "hf", acc=70.0, **svc(0.125)),
        {"model": "ViT-B-32", "merge": "zeroshot", "accuracy": ACC_ZS},  # an old line: no layout, tasks, convention
    ])


def test_markdown_table_with_reference(logdir, capsys):
    results.main([str(logdir), "--reference"])
    out = capsys.readouterr().out
    head, *rows = [r for r in out.splitlines() if r.startswith("|")]
    assert head.endswith("| Avg | Avg (norm.) | Δ Avg | Published |")
    ours = next(r for r in rows if r.startswith("| Zero-shot (hf checkpoints"))
    assert "| 55.60! |" in ours and "| 61.20 |" in ours  # Cars 4.2 points off is marked, RESISC45 0.5 is not
    pub = rows[rows.index(ours) + 1].split(" | ")
    avg = sum(ACC_ZS.values()) / 8
    assert pub[0] == "| ↳ published" and pub[1:3] == ["63.2", "59.8"] and pub[-2] == f"{avg - 48.2:+.2f}"
    assert pub[-1] == "FB-TA8 |"
    assert next(r for r in rows if r.startswith("| TA +SVC")).endswith("| no published number |")
    assert next(r for r in rows if "layout not logged" in r).endswith("| no published number |")
    assert "- FB-TA8: FusionBench 8-task table. tanganke/fusion_bench docs/modelpool/clip_vit.md" in out
    assert "TA +SVC: no published number: TA on ViT-B-32, 8 tasks, fusionbench checkpoints is published only as" in out
    assert "the checkpoint family is not recorded" in out and "also published for this configuration: FB-TALL20" in out


def test_tolerance_flag_marks_more_or_fewer_cells(logdir, capsys):
    results.main([str(logdir), "--tolerance", "0.4"])  # implies --reference
    out = capsys.readouterr().out
    assert "| 63.50 | 55.60! | 61.20! | 45.40! | 31.80 |" in out and "more than 0.4 point(s)" in out
    results.main([str(logdir), "--tolerance", "5"])
    assert "!" not in "".join(r for r in capsys.readouterr().out.splitlines() if r.startswith("| Zero-shot"))
    with pytest.raises(SystemExit):
        results.main([str(logdir), "--tolerance", "-1"])
    assert "--tolerance -1.0: give a number of accuracy points >= 0" in capsys.readouterr().err


def test_csv_and_latex_with_reference(logdir):
    table = results.summarize(results.load_results(logdir))
    csv = results.render(table, "csv", 2, reference=True).splitlines()
    assert csv[0].endswith(",Avg,Avg (norm.),Δ Avg,Published")
    assert csv[2].startswith('"Zero-shot (hf checkpoints, fusionbench convention) [published]",63.2,59.8,')
    assert csv[2].endswith(",FB-TA8") and "55.60!" in csv[1]
    assert any(r.startswith("# FB-TA8: FusionBench 8-task table.") for r in csv)
    tex = results.render(table, "latex", 2, reference=True)
    assert r"$\Delta$ Avg & Published \\" in tex and r"\quad published & 63.2 & 59.8" in tex
    assert r"\par\footnotesize" in tex and "tanganke/fusion\\_bench" in tex and "Δ" not in tex
    assert tex.splitlines()[0] == r"\begin{tabular}{l" + "r" * 11 + "l}"
    plain = results.render(table, "markdown", 2)  # without --reference: the table as before
    assert "Published" not in plain and "!" not in plain
    with pytest.raises(ValueError, match="unknown format"):
        results.render(table, "html", 2, reference=True)


def test_unknown_format_on_the_command_line_is_one_error(logdir, capsys):
    with pytest.raises(SystemExit):
        results.main([str(logdir), "--reference", "--format", "html"])
    assert "invalid choice: 'html'" in capsys.readouterr().err


def test_old_lines_without_the_newer_fields(tmp_path, capsys):
    """Lines from before layout, convention, options or grids were logged still give a table; a field that
    decides the publication and is missing gives "no published number", never a guess."""
    folder = write(tmp_path / "ViT-B-32", [
        {"model": "ViT-B-32", "merge": "finetuned", "layout": "task_vectors", "accuracy": {t: 90.0 for t in T8}},
        {"model": "ViT-B-32", "merge": "TA", "layout": "task_vectors", "scaling_coef": 0.3, "svc": False,
         "accuracy": {t: 70.0 for t in T8}},  # TA has no options: the coefficient suffices
        {"model": "ViT-B-32", "merge": "TIES", "layout": "task_vectors", "scaling_coef": 1.0, "svc": False,
         "accuracy": {t: 72.0 for t in T8}},
        {"model": "ViT-B-32", "merge": "Iso-C", "layout": "task_vectors", "scaling_coef": 1.4, "svc": False,
         "scaling_coef_grid": [0.1, 1.4], "accuracy": {t: 84.0 for t in T8}},
    ])
    results.main([str(folder), "--reference"])
    out = capsys.readouterr().out
    assert "| Fine-tuned | 90.00! | 90.00! |" in out  # compared with the task_vectors release's fine-tunes
    assert [r.split(" | ")[-1] for r in out.splitlines() if r.startswith("| ↳ published")] == ["ADA |", "ADA |"]
    assert "TIES: no published number" in out and "recorded method options (this line has none)" in out
    assert "Iso-C: no published number" in out and "tuned over the tsv grid" in out


def test_runs_tuned_over_other_grids_are_other_rows(tmp_path, capsys):
    """The Iso/TSV numbers were tuned over the TSV grid: a run tuned over ours is its own row, without them."""
    default_grid = [round(0.05 * i, 2) for i in range(1, 21)]
    folder = write(tmp_path / "ViT-B-32", [
        line("TA", "tsv", scaling_coef=0.3, scaling_coef_grid_name="tsv", scaling_coef_grid=TSV_GRID),
        line("TA", "tsv", scaling_coef=0.35, scaling_coef_grid_name="default", scaling_coef_grid=default_grid),
    ])
    results.main([str(folder), "--reference"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert rows[1].startswith("| TA (coef=auto (tsv grid)) |") and rows[2].endswith("| ISO-T1 |")
    assert rows[3].startswith("| TA (coef=auto (default grid)) |") and rows[3].endswith("| no published number |")


# ----------------------------------------------------------------------------- the data file
def _data(tmp_path, mutate):
    raw = json.loads(published.DATA_FILE.read_text())
    mutate(raw)
    path = tmp_path / "published.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["entries"][0].update(method="NotAMerge"), "entry 1 (FB-TA8/ViT-B-32/NotAMerge): unknown merge method"),
    (lambda d: d["entries"][0].update(source="nowhere"), "source 'nowhere' is not one of the 'sources'"),
    (lambda d: d["entries"][0]["acc"].update(Cars=598), "acc[Cars] = 598 is outside 0..100"),
    (lambda d: d["entries"][0]["acc"].update(Cars="high"), "acc[Cars] is 'high', not a number"),
    (lambda d: d["entries"][0]["acc"].update(KMNIST=9.95), "not among the 8-task set"),
    (lambda d: d["entries"][0].update(coef=0.3), "only apply to merged models"),
    (lambda d: d["entries"][3].update(coef="tuned:mine"), "tuned:<grid>"),
    (lambda d: d["entries"][3].update(options={"dare_p": 0.5}), "TA has the options none"),
    (lambda d: d["entries"][0].update(colour="red"), "unknown field(s) colour"),
    (lambda d: d["sources"]["FB-TA8"].pop("cite"), "source 'FB-TA8' needs a 'label' and a 'cite'"),
    (lambda d: d["entries"].append({**d["entries"][0], "acc": {"SUN397": 1.0}}), "give SUN397 as 63.2 and 1.0"),
])
def test_a_damaged_data_file_is_one_actionable_line(tmp_path, mutate, message):
    with pytest.raises(PublishedDataError) as err:
        load(_data(tmp_path, mutate))
    assert message in str(err.value) and "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_damaged_or_missing_data_file_on_the_command_line(tmp_path, logdir, monkeypatch, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"sources": {}, "entries": [\n  {"source": ]}')
    monkeypatch.setattr(published, "DATA_FILE", bad)
    with pytest.raises(SystemExit) as err:
        results.main([str(logdir), "--reference"])
    assert str(err.value) == f"error: {bad}:2:14: not valid JSON (Expecting value); fix that line"
    monkeypatch.setattr(published, "DATA_FILE", tmp_path / "gone.json")
    with pytest.raises(SystemExit, match="no such file; restore it"):
        results.main([str(logdir), "--reference"])
    assert published.log_lines(line("zeroshot", "hf")) == [
        f"published check: skipped: {tmp_path / 'gone.json'}: no such file; restore it (git checkout -- "
        "src/published.json) or pass an existing data file"]  # a run is never stopped by the data file
    results.main([str(logdir)])  # the plain table never reads the data file
    assert "| Zero-shot" in capsys.readouterr().out


def test_every_entry_of_the_shipped_file_loads_and_names_a_full_source():
    data = load()
    assert len(data.entries) > 100 and {e.family for e in data.entries} == set(published.FAMILIES)
    for source in data.sources.values():
        assert len(source.cite) > 60 and source.key in {e.source.key for e in data.entries}


# ----------------------------------------------------------------------------- the documented example
def test_example_writes_a_results_file_the_table_reads(tmp_path, capsys):
    path = published.write_example(tmp_path)
    rows = utils.read_jsonl(path)
    assert all("synthetic example" in r["note"] for r in rows)
    results.main([str(path.parent), "--reference"])
    out = capsys.readouterr().out
    assert "55.60!" in out and out.count("↳ published") == 3 and out.count("| no published number |") == 2
    with pytest.raises(FileExistsError, match="never overwrites"):
        published.write_example(tmp_path)


def _block(doc: str, name: str) -> str:
    start = doc.index(f"<!-- {name}:")
    return doc[doc.index("\n", start) + 1:doc.index(f"<!-- end {name} -->")]


def test_docs_show_the_current_listing_and_example(tmp_path, capsys):
    doc = (published.DATA_FILE.parent.parent / "docs" / "published-numbers.md").read_text()
    assert _block(doc, "listing") == published.listing()
    results.main([str(published.write_example(tmp_path).parent), "--reference"])
    assert _block(doc, "example") == capsys.readouterr().out
