"""Results tables from logs/<model>/results.jsonl.

    python -m src.results logs/ViT-B-32 --format markdown
    python -m src.results logs/ViT-B-32/results.jsonl --format latex --out table.tex
    python -m src.results logs/ViT-B-32 --reference      # published numbers beside ours (src/published.py)

One row per configuration (merge method, with/without SVC, and whatever else differs:
alpha, merge coefficient, method options, model, task set, checkpoints, convention, evaluation
data), one column per dataset, then the average absolute and the average normalised accuracy. Repeated runs of one
configuration (e.g. several seeds) are shown as mean ± sample std, with their count n.
The best value per column among the merged models is marked (bold; '*' in csv).
Zero-shot and fine-tuned reference rows come first and are never marked.
With --reference, each row with a published counterpart is followed by the published values, the difference of
the averages and a source label (footnotes cite each source in full); zero-shot and fine-tuned cells further than
--tolerance points from the published value are marked '!'. See docs/published-numbers.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import utils
from merge_func import same_method  # the registry's one rule for method names
from src.records import AVG, NORM, row_problem  # noqa: F401 - row_problem: the readers' one shape check

RESULTS_FILE = "results.jsonl"
REFERENCE_LABELS = {"zeroshot": "Zero-shot", "finetuned": "Fine-tuned"}
SVC_FIELDS = ("svc_keys", "svc_target", "svc_row_space", "svc_dtype")  # logged by main.py with svc=True


# ----------------------------------------------------------------------------- loading
def results_files(path: str | Path) -> list[Path]:
    """results.jsonl files for a file, a logs/<model> folder, or a logs folder holding model folders."""
    path = Path(path)
    # anything but a folder is the file itself: a FIFO or a device is refused by the reader, not taken for a folder
    if path.exists() and not path.is_dir():
        return [path]
    if (path / RESULTS_FILE).exists():
        return [path / RESULTS_FILE]
    found = sorted(path.glob(f"*/{RESULTS_FILE}")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no {RESULTS_FILE} at {path} (nor in its sub-folders); pass logs/<model> or the file itself, "
            "after running main.py at least once"
        )
    return found


def load_results(path: str | Path) -> list[dict]:
    """All usable rows; a damaged line (not UTF-8, not JSON, no accuracies) is skipped with a
    warning naming file and line (utils.iter_jsonl, the reader main.py uses too)."""
    rows = []
    for file in results_files(path):
        for lineno, row in utils.iter_jsonl(file):
            problem = row_problem(row)
            if problem:
                warnings.warn(f"{file}:{lineno}: skipped line ({problem})")
                continue
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- configurations
def _auto_or(row: dict, name: str):
    """Logged value of a coefficient, or 'auto' when it was selected on validation data."""
    value = row.get(name)
    if f"{name}_grid" in row or value == "auto":
        return "auto"
    return value


def _coef_of(row: dict):
    """The merge coefficient of a configuration: coefficients tuned over different grids (--coef-grid) are
    different configurations, e.g. 'auto (tsv grid)'."""
    value, grid = _auto_or(row, "scaling_coef"), row.get("scaling_coef_grid_name")
    return f"auto ({grid} grid)" if value == "auto" and isinstance(grid, str) else value


def _own_options(row: dict) -> dict:
    """The method's options without those already logged as top-level coefficient fields."""
    options = dict(row.get("options") or {})
    for name in ("scaling_coef", "alpha"):
        if name in options and (options[name] == row.get(name) or _auto_or(row, name) == "auto"):
            del options[name]
    return options


def config_of(row: dict) -> dict:
    """What makes two runs the same configuration (seed and timings excluded)."""
    merge = row["merge"]
    tasks = row.get("tasks") or list(row["accuracy"])
    config = {"model": row.get("model"), "layout": row.get("layout"), "tasks": tuple(sorted(tasks)), "merge": merge,
              # runs on different checkpoint files (e.g. a rebuilt demo zoo) are never averaged together,
              # unless the rows were pooled on purpose (see --pool-checkpoints)
              "checkpoints": row.get("checkpoints"),
              # nor runs of different conventions, or evaluated on other data (source, split, size per task)
              "convention": row.get("convention"), "data": row.get("data")}
    if merge in REFERENCE_LABELS:  # references have no coefficients or options
        return config
    svc = bool(row.get("svc", False))
    config.update(
        svc=svc,
        alpha=_auto_or(row, "alpha") if svc else None,
        scaling_coef=_coef_of(row),
        options=json.dumps(_own_options(row), sort_keys=True),
    )
    if svc:  # SVC variants (key filter, single target task, row space, compute dtype)
        config.update({k: row.get(k) for k in SVC_FIELDS})
    return config


def base_label(config: dict) -> str:
    if config["merge"] in REFERENCE_LABELS:
        return REFERENCE_LABELS[config["merge"]]
    return config["merge"] + (" +SVC" if config["svc"] else "")


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _data_label(data) -> str:
    """Short description of a run's data provenance ({task: {source, split, n}}): its sources and
    splits, and the number of evaluated examples."""
    if not isinstance(data, dict) or not data:
        return "data not logged"
    entries = [v if isinstance(v, dict) else {} for v in data.values()]
    sources = "+".join(sorted({str(e.get("source", "?")) for e in entries}))
    splits = "+".join(sorted({str(e.get("split", "?")) for e in entries}))
    counts = [e.get("n") for e in entries]
    size = f", n={sum(counts)}" if all(isinstance(c, int) for c in counts) else ""
    return f"data={sources}/{splits}{size}"


def _label_parts(config: dict, differing: set[str]) -> list[str]:
    parts = []
    if "model" in differing:
        parts.append(str(config["model"]))
    if "layout" in differing:
        parts.append(f"{config['layout']} checkpoints" if config["layout"] else "checkpoint layout not logged")
    if "tasks" in differing:
        parts.append(f"{len(config['tasks'])} tasks")
    if "convention" in differing:
        parts.append(f"{config['convention']} convention" if config["convention"] else "convention not logged")
    if "data" in differing:
        parts.append(_data_label(config["data"]))
    if "scaling_coef" in differing:
        parts.append(f"coef={_fmt(config['scaling_coef'])}")
    if "alpha" in differing:
        parts.append(f"alpha={_fmt(config['alpha'])}")
    parts += [f"{k.removeprefix('svc_')}={_fmt(config.get(k))}" for k in SVC_FIELDS if k in differing]
    option_keys = sorted(k for k in differing if k.startswith("options."))
    options = json.loads(config["options"]) if option_keys else {}  # parsed once: a line may have many options
    for key in option_keys:
        parts.append(f"{key[len('options.'):]}={_fmt(options.get(key[len('options.'):], '-'))}")
    return parts


def label_configs(configs: list[dict]) -> list[str]:
    """Readable, unique labels: the base name plus only the fields that differ between
    configurations sharing that base name (e.g. 'TA +SVC (alpha=0.125)')."""
    by_base: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_base.setdefault(base_label(c), []).append(i)
    labels = [""] * len(configs)
    for base, idx in by_base.items():
        flat = []
        for i in idx:
            c = dict(configs[i])
            for k, v in json.loads(c.pop("options", "{}")).items():
                c[f"options.{k}"] = json.dumps(v, sort_keys=True)
            flat.append(c)
        # one pass over every field of every configuration (linear): a field differs when it takes two values,
        # a missing field counting as null
        values: dict[str, set[str]] = {}
        for f in flat:
            for k, v in f.items():
                values.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
        counts: dict[str, int] = {}
        for f in flat:
            for k in f:
                counts[k] = counts.get(k, 0) + 1
        differing = {k for k, seen in values.items() if len(seen | ({"null"} if counts[k] < len(flat) else set())) > 1}
        for i in idx:
            parts = _label_parts(configs[i], differing)
            labels[i] = f"{base} ({', '.join(parts)})" if parts else base
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # last resort; should not happen
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


# ----------------------------------------------------------------------------- table
@dataclass
class Table:
    """Per configuration (index = label) and column (datasets, Avg, Avg (norm.)):
    mean and sample std over runs, the run count n, the configs, and the reference labels."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.Series
    configs: dict[str, dict]
    reference: list[str]
    rows: dict[str, dict] = field(default_factory=dict)  # the first results line of each row (src/published.py)

    def best(self, decimals: int = 2) -> pd.DataFrame:
        """Boolean mask: best mean per column among non-reference rows (ties at display precision all marked)."""
        mask = pd.DataFrame(False, index=self.mean.index, columns=self.mean.columns)
        reference = set(self.reference)
        candidates = [r for r in self.mean.index if r not in reference]
        if candidates:  # whole-frame operations: a per-column loop costs seconds per 10^4 datasets
            values = self.mean.loc[candidates].round(decimals)
            mask.loc[candidates] = (values.eq(values.max(axis=0)) & values.notna()).to_numpy()
        return mask


def _logged_normalized(row: dict) -> float | None:
    """The normalised accuracy a run logged (a number, or per dataset), or None."""
    logged = row.get("normalized")
    if isinstance(logged, dict) and logged:
        return sum(logged.values()) / len(logged)
    if isinstance(logged, (int, float)) and not isinstance(logged, bool):
        return float(logged)
    return None


def _normalized(row: dict, finetuned: dict[str, float]) -> float:
    """Average normalised accuracy (%) of one run: logged value, else acc / fine-tuned acc (NaN when a
    dataset has no fine-tuned accuracy, or one of 0: a line of its own never divides by zero)."""
    logged = _logged_normalized(row)
    if logged is not None:
        return logged
    acc = row["accuracy"]
    if all(finetuned.get(t, 0) > 0 for t in acc):
        return sum(100.0 * a / finetuned[t] for t, a in acc.items()) / len(acc)
    return math.nan


def _same_data(row: dict) -> dict[str, tuple]:
    """Per dataset of a run: what a fine-tuned run must share to normalise it (model, checkpoint files, the
    dataset and its data provenance); the provenance is serialised once per dataset that has one."""
    model, checkpoints, data = row.get("model"), row.get("checkpoints"), row.get("data") or {}
    return {t: (model, checkpoints, t, json.dumps(data[t], sort_keys=True) if t in data else "null")
            for t in row["accuracy"]}


def row_scores(rows: list[dict]) -> list[dict[str, float]]:
    """Per run: {Avg: mean accuracy, Avg (norm.): normalised accuracy}. Runs that did not
    log `normalized` are normalised by the mean fine-tuned accuracy of the same model, checkpoint
    files and data (source, split, convention) found in `rows` (NaN when a dataset has none)."""
    ft: dict[tuple, list[float]] = {}
    for r in rows:  # fine-tuned rows of other checkpoints or data never normalise a run
        if r["merge"] == "finetuned":
            for t, same in _same_data(r).items():
                ft.setdefault(same, []).append(float(r["accuracy"][t]))
    ft_mean = {k: sum(v) / len(v) for k, v in ft.items()}
    scores = []
    for r in rows:
        acc = r["accuracy"]
        avg = sum(acc.values()) / len(acc)
        logged = r.get("avg")
        if isinstance(logged, (int, float)) and abs(logged - avg) > 5e-3:
            warnings.warn(f"{r['merge']} run of {r.get('time', '?')}: logged avg {logged} != mean of its "
                          f"accuracies {avg:.4f}; using the latter")
        finetuned = {}
        if ft_mean and _logged_normalized(r) is None:  # only looked up when needed
            finetuned = {t: ft_mean[same] for t, same in _same_data(r).items() if same in ft_mean}
        norm = _normalized(r, finetuned)
        if 0 < norm <= 1.5 and avg > 1.5:
            warnings.warn(f"{r['merge']} run of {r.get('time', '?')}: normalized accuracy {norm:.4f} looks like a "
                          "fraction, but results.jsonl stores percentages (100 = fine-tuned accuracy)")
        scores.append({AVG: avg, NORM: norm})
    return scores


def summarize(rows: list[dict]) -> Table:
    """Group runs by configuration and aggregate them (see module docstring)."""
    if not rows:
        raise ValueError("no usable results rows")
    configs = [config_of(r) for r in rows]
    keys = [json.dumps(c, sort_keys=True, default=str) for c in configs]
    first: dict[str, int] = {}  # configuration -> its first row (dicts and sets throughout: linear in the logs)
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    unique = list(first)
    labels = dict(zip(unique, label_configs([configs[first[k]] for k in unique])))

    datasets: dict[str, None] = {}  # ordered set
    for r in rows:
        acc = r["accuracy"]
        for t in r.get("tasks") or []:
            if t in acc:
                datasets.setdefault(t)
        for t in acc:
            datasets.setdefault(t)
    columns = list(datasets) + [AVG, NORM]
    # one float matrix (rows x columns) filled in one vectorised assignment, grouped by configuration code:
    # no per-column pandas work, which costs seconds per 10^4 datasets
    position = {c: j for j, c in enumerate(columns)}
    code = {k: c for c, k in enumerate(unique)}
    at_row, at_col, value = [], [], []
    for i, (r, score) in enumerate(zip(rows, row_scores(rows))):
        for t, a in r["accuracy"].items():
            at_row.append(i)
            at_col.append(position[t])
            value.append(a)
        at_row += [i, i]
        at_col += [position[AVG], position[NORM]]
        value += [score[AVG], score[NORM]]
    matrix = np.full((len(rows), len(columns)), np.nan)
    matrix[np.asarray(at_row, dtype=np.int64), np.asarray(at_col, dtype=np.int64)] = np.asarray(value, dtype=float)
    grouped = pd.DataFrame(matrix, columns=columns).groupby(np.fromiter((code[k] for k in keys), np.int64, len(keys)))
    refs = list(REFERENCE_LABELS)
    merge_of = {k: configs[first[k]]["merge"] for k in unique}
    ref_keys = sorted((k for k in unique if merge_of[k] in refs), key=lambda k: refs.index(merge_of[k]))
    # methods in order of first appearance; each one's runs without SVC before those with it
    merge_rank = {m: i for i, m in enumerate(dict.fromkeys(merge_of.values()))}
    is_ref = set(ref_keys)
    rest = sorted((k for k in unique if k not in is_ref),
                  key=lambda k: (merge_rank[merge_of[k]], bool(configs[first[k]].get("svc"))))
    order = [labels[k] for k in ref_keys] + [labels[k] for k in rest]
    codes = [code[k] for k in ref_keys + rest]
    index = pd.Index(order, name="label")
    mean = grouped.mean().reindex(codes).set_axis(index)
    std = grouped.std(ddof=1).reindex(codes).set_axis(index)
    n = grouped.size().reindex(codes).set_axis(index)
    config_by_label = {lab: json.loads(key) for key, lab in labels.items()}
    first_row = {labels[k]: rows[i] for k, i in first.items()}
    return Table(mean=mean, std=std, n=n, configs=config_by_label, reference=order[: len(ref_keys)], rows=first_row)


# ----------------------------------------------------------------------------- rendering
def _cell(mean: float, std: float, n: int, decimals: int, pm: str) -> str:
    if math.isnan(mean):
        return ""
    text = f"{mean:.{decimals}f}"
    if n > 1 and not math.isnan(std):
        text += f"{pm}{std:.{decimals}f}"
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


DELTA, PUBLISHED = "Δ Avg", "Published"
_SUBROW = {"markdown": "↳ published", "latex": r"\quad published"}  # csv: '<label> [published]'


def _published_matches(table: Table) -> dict:
    """Per row: the publication its results line matches, or why none does (src/published.py)."""
    from src import published

    data = published.load()
    return {label: published.match(table.rows[label], data) for label in table.mean.index if label in table.rows}


def _published_row(label: str, m, table: Table, fmt: str, decimals: int, show_n: bool) -> list[str]:
    """The published values under row ``label``: per dataset where published, averages, difference, source."""
    empty = "" if fmt == "csv" else "-"
    acc, avg, norm = m.acc(), m.avg(), m.norm()
    cells = [str(acc[c]) if c in acc else empty for c in table.mean.columns if c not in (AVG, NORM)]
    cells += [str(avg) if avg is not None else empty, str(norm) if norm is not None else empty]
    ours = table.mean.at[label, AVG]
    delta = f"{ours - avg.value:+.{decimals}f}" if avg is not None and not math.isnan(ours) else empty
    name = _SUBROW.get(fmt, f"{label} [published]")
    return [name] + cells + ([""] if show_n else []) + [delta, m.label()]


def _published_notes(table: Table, matches: dict, tolerance: float) -> list[str]:
    """Footnotes: what the columns mean, each source in full, and per row why there is no published number,
    which other publications give this configuration, and notes on the published values."""
    notes = [f"{PUBLISHED}: the source of the 'published' row above it (src/published.json); {DELTA} = our Avg minus "
             f"the published Avg, given only for the same task set. '!' marks a zero-shot or fine-tuned accuracy more "
             f"than {tolerance:g} point(s) from the published value (--tolerance): look at that task's data, head "
             "and preprocessing before trusting any merge."]
    used = {}
    for m in matches.values():
        for e in ([m.entry] if m.entry else []) + m.others:
            used.setdefault(e.source.key, e.source)
    notes += [f"{key}: {src.label}. {src.cite}" for key, src in used.items()]
    unmatched: dict[str, list[str]] = {}  # reason -> rows: a demo sweep gives one line, not one per row
    for label, m in matches.items():
        if m.entry is None:
            unmatched.setdefault(m.reason, []).append(label)
    notes += [f"{'; '.join(labels)}: no published number: {reason}." for reason, labels in unmatched.items()]
    for label, m in matches.items():
        if m.entry is None:
            continue
        if m.entry.note:
            notes.append(f"{label}: {m.entry.source.key}: {m.entry.note}.")
        if m.others:
            notes.append(f"{label}: also published for this configuration: {m.others_text()} "
                         f"(the row shows {m.entry.source.key}).")
    return notes


def render(table: Table, fmt: str = "markdown", decimals: int = 2, reference: bool = False,
           tolerance: float = 1.0) -> str:
    """The table as markdown, csv or latex text. With ``reference``, each row that has a published counterpart
    is followed by the published values, the difference of the averages and the source; cells of zero-shot and
    fine-tuned rows more than ``tolerance`` points from the published value are marked '!'; footnotes cite the
    sources and say why a row has no published number."""
    if fmt not in ("markdown", "csv", "latex"):
        raise ValueError(f"unknown format {fmt!r}: use markdown, csv or latex")
    if reference:
        from src.published import check_tolerance

        tolerance = check_tolerance(tolerance)
    matches = _published_matches(table) if reference else {}
    best = table.best(decimals)
    show_n = bool((table.n > 1).any())
    pm = {"markdown": " ± ", "csv": " ± ", "latex": r" $\pm$ "}[fmt]
    header = ["Method"] + list(table.mean.columns) + (["n"] if show_n else [])
    header += [DELTA, PUBLISHED] if reference else []
    body = []
    end_of_references = -1  # index of the last body line of the reference block
    columns = list(table.mean.columns)
    # plain arrays: a pandas lookup per cell costs seconds per 10^4 datasets
    means, stds, marks = table.mean.to_numpy(float), table.std.to_numpy(float), best.to_numpy(bool)
    bold = {"markdown": "**{}**", "csv": "{}*", "latex": r"\textbf{{{}}}"}[fmt]
    for i, label in enumerate(table.mean.index):
        m = matches.get(label)
        ours = {c: v for c, v in zip(columns, means[i].tolist()) if c not in (AVG, NORM) and not math.isnan(v)}
        off = m.deviations(ours, tolerance) if m is not None else {}
        count = int(table.n[label])
        cells = []
        for col, mean, std, mark in zip(columns, means[i].tolist(), stds[i].tolist(), marks[i].tolist()):
            text = _cell(mean, std, count, decimals, pm)
            if text and mark:
                text = bold.format(text)
            if text and col in off:
                text += "!"
            cells.append(text or ("" if fmt == "csv" else "-"))
        row = [label] + cells + ([str(count)] if show_n else [])
        if reference:
            row += ["", "" if m is not None and m.entry is not None else "no published number"]
        body.append(row)
        if m is not None and m.entry is not None:
            body.append(_published_row(label, m, table, fmt, decimals, show_n))
        if label in table.reference:
            end_of_references = len(body) - 1
    notes = _published_notes(table, matches, tolerance) if reference else []

    if fmt == "csv":
        out = io.StringIO()  # the csv module, as pandas' to_csv uses it, without pandas' per-column cost
        csv.writer(out, lineterminator="\n").writerows([header, *body])
        return out.getvalue() + "".join(f"# {n}\n" for n in notes)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n" + ("\n" + "".join(f"- {n}\n" for n in notes) if notes else "")
    escaped = [_latex_escape(h) for h in header]
    if reference:
        escaped[-2] = r"$\Delta$ Avg"
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1 - reference) + ("l" if reference else "") + "}",
             r"\toprule", " & ".join(escaped) + r" \\", r"\midrule"]
    for i, r in enumerate(body):
        cells = [r[0] if r[0] == _SUBROW["latex"] else _latex_escape(r[0])] + r[1:]
        if reference:
            cells[-1] = _latex_escape(cells[-1])
        lines.append(" & ".join(cells) + r" \\")
        if i == end_of_references and i < len(body) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines += [r"\par\footnotesize"] + [_latex_escape(n).replace("Δ", r"$\Delta$") + r"\par" for n in notes]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    """A refused argument is one line on stderr, ``python -m src.results: error: ...`` (exit code 2), without
    the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _decimals(text: str) -> int:
    """argparse type of --decimals: 0 to 15 (a negative count was a traceback, a huge one an error deep inside)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of digits from 0 to 15, got {text!r}") from None
    if not 0 <= value <= 15:
        raise argparse.ArgumentTypeError(f"expected a whole number of digits from 0 to 15, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m src.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="logs", help="logs/<model>, a results.jsonl, or logs/ (all models)")
    parser.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    parser.add_argument("--decimals", type=_decimals, default=2, help="digits after the point, 0 to 15 (default 2)")
    parser.add_argument("--merge", nargs="+", help="only these merge methods (zero-shot/fine-tuned rows are kept)")
    parser.add_argument("--out", help="write the table to this file instead of stdout")
    parser.add_argument("--pool-checkpoints", action="store_true",
                        help="average runs made on different checkpoints (e.g. several zoo seeds) into one row")
    parser.add_argument("--reference", action="store_true",
                        help="published numbers beside each row that has a published counterpart (src/published.json)")
    parser.add_argument("--tolerance", type=float, default=None, metavar="POINTS",
                        help="mark zero-shot / fine-tuned accuracies further than this from the published value "
                             "(default 1; implies --reference)")
    args = parser.parse_args(argv)
    reference = args.reference or args.tolerance is not None
    tolerance = 1.0 if args.tolerance is None else args.tolerance
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        parser.error(f"--tolerance {args.tolerance}: give a number of accuracy points >= 0")
    with warnings.catch_warnings(record=True) as caught:  # print warnings as plain lines
        warnings.simplefilter("always")
        try:
            rows = load_results(args.path)
        except FileNotFoundError as err:
            parser.error(str(err))
        except utils.NotRegularFileError as err:  # a FIFO or /dev/zero: refused before reading, in one line
            raise SystemExit(f"error: {err}") from None
        if args.merge:
            rows = [r for r in rows if r["merge"] in REFERENCE_LABELS or any(same_method(r["merge"], m) for m in args.merge)]
        if not rows:
            parser.error(f"no usable rows in {args.path}")
        if args.pool_checkpoints:
            rows = [{**r, "checkpoints": None} for r in rows]
        damaged: tuple = ()
        if reference:  # a damaged src/published.json: one line naming the file, the entry and the fix
            from src.published import PublishedDataError

            damaged = (PublishedDataError,)
        try:
            text = render(summarize(rows), args.format, args.decimals, reference=reference, tolerance=tolerance)
        except damaged as err:
            raise SystemExit(f"error: {err}") from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
