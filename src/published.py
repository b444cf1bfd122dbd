"""Published numbers beside ours: which publication a results line can be compared with, and the setup check.

A results line (the record main.py appends to logs/<model>/results.jsonl) is compared with a published number
only when everything it records that shapes that number agrees with the publication:

- the checkpoint family, from ``layout`` (``task_vectors``; ``tsv``; ``hf`` = FusionBench's hub fine-tunes, also
  ``source: hf`` on lines without ``layout``) and the evaluation ``convention`` where it is recorded;
- the model, and the task set (the merged tasks, compared as a set);
- the method (named through ``merge_func.canonical_name``) and its settings: the merge coefficient (a fixed value,
  or tuned on validation data over a given grid), every method option, and for SVC its alpha (1/K where the
  publication says so), key filter, target task and row space.

Zero-shot and fine-tuned accuracies depend on no merge setting, so their per-task values may also come from the
table of a larger task set (an 8-task run beside a 20-task table); averages only ever from the same set.
Anything else gets "no published number" and the reason, never a near configuration's number.

The numbers live in src/published.json, each entry naming its source (docs/published-numbers.md). Command line:

    python -m src.published --list               # the configurations that have published numbers
    python -m src.published --example DIR        # write a small example results file under DIR
    python -m src.published --check FILE         # the setup-check lines of every line of a results.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

DATA_FILE = Path(__file__).with_name("published.json")
DEFAULT_TOLERANCE = 1.0
REFERENCE_METHODS = {"zeroshot": "zero-shot", "finetuned": "fine-tuned"}
# Checkpoint families are named like the evaluation conventions (src/datasets/conventions.py): each release is
# evaluated with the heads and data of the code that fine-tuned it.
FAMILIES = {
    "task_vectors": "task_vectors release (Ilharco et al.), the one the official SVC code uses",
    "tsv": "TSV / TALL-masks release (14 and 20 tasks)",
    "fusionbench": "FusionBench's Hugging Face fine-tunes (tanganke/clip-vit-*)",
}
TASK_COUNTS = (8, 14, 20)
# recorded elsewhere (coefficient), or not a setting of the published method: the device, and the decomposition
# route of the spectral merges (both routes agree within 1e-4; old lines do not record it)
NOT_OPTIONS = ("scaling_coef", "device", "decomposition")
_ENTRY_KEYS = ("source", "family", "model", "tasks", "method", "svc", "coef", "alpha", "row_space", "options", "acc",
               "avg", "norm", "note")
_TOP_KEYS = ("about", "sources", "entries")


class PublishedDataError(ValueError):
    """The data file cannot be used; the message (one line) names the file, the entry and what to fix."""


# ----------------------------------------------------------------------------- the data file
@dataclass(frozen=True)
class Number:
    """A published value and the number of decimals it was published with."""

    value: float
    decimals: int

    def __str__(self) -> str:
        return f"{self.value:.{self.decimals}f}"


@dataclass(frozen=True)
class Source:
    key: str  # short label shown in tables, e.g. FB-TA8
    label: str  # a few words
    cite: str  # paper and table, or repository file (and commit)


@dataclass(frozen=True)
class Entry:
    """One published configuration: where it comes from, what it is, and its numbers."""

    index: int  # position in the file: earlier entries win ties
    source: Source
    family: str
    model: str
    tasks: int
    method: str  # zeroshot, finetuned, or a registry name (merge_func.canonical_name)
    svc: bool = False
    coef: float | str | None = None  # fixed coefficient, or "tuned:<grid>" (tuning.COEF_GRIDS)
    alpha: float | str | None = None  # SVC alpha, or "1/K"
    row_space: bool = False
    options: dict = field(default_factory=dict)
    acc: dict[str, Number] = field(default_factory=dict)
    avg: Number | None = None
    norm: Number | None = None
    note: str = ""

    def settings(self) -> str:
        """The settings in words, e.g. 'coef 0.3, ties_scope=global +SVC alpha 1/K'."""
        if self.method in REFERENCE_METHODS:
            return ""
        parts = [_coef_text(self.coef)] + [f"{k}={_fmt(v)}" for k, v in sorted(self.options.items())]
        text = ", ".join(parts)
        if self.svc:
            text += f" +SVC alpha {_fmt(self.alpha)}" + (" row space" if self.row_space else "")
        return text

    def describe(self) -> str:
        method = REFERENCE_METHODS.get(self.method, self.method)
        settings = f" ({self.settings()})" if self.settings() else ""
        return f"{method}{settings}, {self.model}, {self.tasks} tasks, {self.family} checkpoints"


@dataclass(frozen=True)
class Published:
    path: Path
    sources: dict[str, Source]
    entries: tuple[Entry, ...]


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coef_text(coef) -> str:
    if isinstance(coef, str):
        return f"coef tuned on validation ({coef.split(':', 1)[1]} grid)"
    return f"coef {_fmt(coef)}"


def _number(value, what: str, low: float = 0.0, high: float = 100.0) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise ValueError(f"{what} is {value!r}, not a number")
    if not low <= float(value) <= high:
        raise ValueError(f"{what} = {value} is outside {low:g}..{high:g} (accuracies are percentages)")
    decimals = max(0, -value.as_tuple().exponent) if isinstance(value, Decimal) else 0
    return Number(float(value), decimals)


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or not float(value) > 0:
        raise ValueError(f"{what} is {value!r}; give a number > 0")
    return float(value)


def _task_set(n: int) -> list[str]:
    from src.datasets.registry import TASK_SETS  # torch-heavy import: only when matching

    return TASK_SETS[n]


def _entry(index: int, raw: object, sources: dict[str, Source]) -> Entry:
    """One validated entry (ValueError with the problem otherwise)."""
    import merge_func
    from src import tuning

    if not isinstance(raw, dict):
        raise ValueError("is not a JSON object")
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_ENTRY_KEYS)}")
    if raw.get("source") not in sources:
        raise ValueError(f"source {raw.get('source')!r} is not one of the 'sources' ({', '.join(sources)})")
    if raw.get("family") not in FAMILIES:
        raise ValueError(f"family {raw.get('family')!r} is not one of {', '.join(FAMILIES)}")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise ValueError("needs a 'model' (e.g. ViT-B-32)")
    if raw.get("tasks") not in TASK_COUNTS:
        raise ValueError(f"tasks {raw.get('tasks')!r} is not one of {TASK_COUNTS}")
    method = raw.get("method")
    if not isinstance(method, str):
        raise ValueError("needs a 'method'")
    if method not in REFERENCE_METHODS:
        try:
            method = merge_func.canonical_name(method)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    kw: dict = {}
    if method in REFERENCE_METHODS:
        merge_only = sorted(k for k in ("svc", "coef", "alpha", "row_space", "options") if k in raw)
        if merge_only:
            raise ValueError(f"{', '.join(merge_only)} only apply to merged models, not to {method}")
    else:
        coef = raw.get("coef")
        if isinstance(coef, str):
            if not coef.startswith("tuned:") or coef.split(":", 1)[1] not in tuning.COEF_GRIDS:
                raise ValueError(f"coef {coef!r}: give a number or tuned:<grid> with a grid of "
                                 f"{', '.join(tuning.COEF_GRIDS)}")
            kw["coef"] = coef
        else:
            kw["coef"] = _positive(coef, "coef")
        svc = raw.get("svc", False)
        if not isinstance(svc, bool):
            raise ValueError(f"svc is {svc!r}; give true or false")
        kw["svc"] = svc
        if svc:
            alpha = raw.get("alpha")
            kw["alpha"] = alpha if alpha == "1/K" else _positive(alpha, "alpha (SVC)")
            kw["row_space"] = raw.get("row_space", False)
            if not isinstance(kw["row_space"], bool):
                raise ValueError(f"row_space is {kw['row_space']!r}; give true or false")
        elif "alpha" in raw or "row_space" in raw:
            raise ValueError("alpha and row_space only apply with \"svc\": true")
        options = raw.get("options", {})
        allowed = set(merge_func.METHOD_OPTIONS[method]) - set(NOT_OPTIONS)
        if not isinstance(options, dict) or set(options) - allowed:
            raise ValueError(f"options {options!r}: {method} has the options {', '.join(sorted(allowed)) or 'none'}")
        kw["options"] = {k: float(v) if isinstance(v, Decimal) else v for k, v in options.items()}
    acc = raw.get("acc", {})
    names = _task_set(raw["tasks"])
    if not isinstance(acc, dict) or set(acc) - set(names):
        extra = sorted(set(acc) - set(names)) if isinstance(acc, dict) else acc
        raise ValueError(f"acc has {extra!r}, not among the {raw['tasks']}-task set ({', '.join(names)})")
    kw["acc"] = {name: _number(v, f"acc[{name}]") for name, v in acc.items()}
    if raw.get("avg") is not None:
        kw["avg"] = _number(raw["avg"], "avg")
    if raw.get("norm") is not None:
        kw["norm"] = _number(raw["norm"], "norm", high=200.0)
    if not kw["acc"] and "avg" not in kw:
        raise ValueError("has neither per-task values (acc) nor an average (avg)")
    if not isinstance(raw.get("note", ""), str):
        raise ValueError("note must be text")
    return Entry(index=index, source=sources[raw["source"]], family=raw["family"], model=raw["model"],
                 tasks=raw["tasks"], method=method, note=raw.get("note", ""), **kw)


def _check_consistent(entries: list[Entry], path: Path) -> None:
    """One source must not give two values for the same task of the same configuration (a zero-shot or
    fine-tuned accuracy does not depend on the task set; a merge does)."""
    seen: dict[tuple, tuple[Number, int]] = {}
    for e in entries:
        key = (e.source.key, e.family, e.model, e.method, e.svc, e.coef, e.alpha, e.row_space,
               json.dumps(e.options, sort_keys=True), None if e.method in REFERENCE_METHODS else e.tasks)
        for task, value in e.acc.items():
            first = seen.setdefault(key + (task,), (value, e.index))
            if first[0].value != value.value:
                raise PublishedDataError(
                    f"{path}: entries {first[1] + 1} and {e.index + 1} ({e.source.key}, {e.describe()}) give {task} "
                    f"as {first[0]} and {value}; keep the value the source prints")


_CACHE: dict[tuple, Published] = {}


def load(path: str | Path | None = None) -> Published:
    """The validated data file (cached until it changes). Any problem raises a PublishedDataError naming the
    file, the entry and what to fix."""
    path = Path(path) if path is not None else DATA_FILE
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PublishedDataError(f"{path}: no such file; restore it (git checkout -- src/published.json) or pass "
                                 "an existing data file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PublishedDataError(f"{path}: cannot be read ({err}); restore it from git") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _CACHE:
        return _CACHE[key]
    try:
        raw = json.loads(text, parse_float=Decimal)  # Decimal keeps the published number of decimals
    except json.JSONDecodeError as err:
        raise PublishedDataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); fix that line") \
            from None
    if not (isinstance(raw, dict) and isinstance(raw.get("sources"), dict) and isinstance(raw.get("entries"), list)):
        raise PublishedDataError(f"{path}: expected an object with 'sources' (an object) and 'entries' (a list)")
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise PublishedDataError(f"{path}: unknown top-level field(s) {', '.join(unknown)}; expected "
                                 f"{', '.join(_TOP_KEYS)}")
    sources = {}
    for key_, src in raw["sources"].items():
        if not isinstance(src, dict) or not all(isinstance(src.get(k), str) and src.get(k) for k in ("label", "cite")):
            raise PublishedDataError(f"{path}: source {key_!r} needs a 'label' and a 'cite' (paper and table, or "
                                     "repository file)")
        sources[key_] = Source(key_, src["label"], src["cite"])
    entries = []
    for i, item in enumerate(raw["entries"]):
        try:
            entries.append(_entry(i, item, sources))
        except ValueError as err:
            what = "/".join(str(item.get(k)) for k in ("source", "model", "method")) if isinstance(item, dict) else ""
            raise PublishedDataError(f"{path}: entry {i + 1} ({what}): {err}") from None
    _check_consistent(entries, path)
    data = Published(path, sources, tuple(entries))
    _CACHE[key] = data
    return data


# ----------------------------------------------------------------------------- what a results line records
@dataclass(frozen=True)
class Run:
    """The fields of a results line that decide which publication applies (None: not recorded)."""

    family: str | None
    model: str | None
    method: str | None  # zeroshot, finetuned, a registry name, or None for a name merge_func does not know
    merge: str  # as logged
    tasks: frozenset[str]
    datasets: tuple[str, ...]  # evaluated, as logged
    svc: bool
    coef: tuple | None  # ("fixed", value) | ("tuned", grid list or None) | None
    alpha: tuple | None  # ("fixed", value) | ("tuned",) | None
    options: dict | None
    svc_keys: str | None
    svc_target: object
    row_space: object
    convention: str | None

    def what(self) -> str:
        method = REFERENCE_METHODS.get(self.method or "", self.method or self.merge)
        family = f"{self.family} checkpoints" if self.family else "checkpoint family not recorded"
        return f"{method}{' +SVC' if self.svc else ''}, {self.model}, {len(self.tasks)} tasks, {family}"

    def settings(self) -> str:
        if self.method in REFERENCE_METHODS:
            return ""
        if self.coef is None:
            text = "coef not recorded"
        elif self.coef[0] == "tuned":
            text = "coef tuned on validation" + ("" if self.coef[1] else " (grid not recorded)")
        else:
            text = f"coef {_fmt(self.coef[1])}"
        text += "".join(f", {k}={_fmt(v)}" for k, v in sorted((self.options or {}).items()) if k not in NOT_OPTIONS)
        if self.svc:
            alpha = ("not recorded" if self.alpha is None else "tuned" if self.alpha[0] == "tuned"
                     else _fmt(self.alpha[1]))
            text += f" +SVC alpha {alpha}" + (" row space" if self.row_space else "")
        return text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _family(row: dict) -> str | None:
    from src.datasets.conventions import convention_for_layout

    layout = row.get("layout")
    if layout is None:
        return "fusionbench" if row.get("source") == "hf" else None
    try:
        return convention_for_layout(layout)
    except ValueError:
        return None


def _recorded_grid(row: dict, method: str | None) -> list | None:
    grid = row.get("scaling_coef_grid")
    if isinstance(grid, list) and all(_is_number(g) for g in grid):
        return grid
    name = row.get("scaling_coef_grid_name")
    if isinstance(name, str) and method:
        from src import tuning

        try:
            return tuning.coefficient_grid(method, name)
        except ValueError:
            return None
    return None


def run_of(row: dict) -> Run:
    """What a results line records, read the same way for old and new lines."""
    import merge_func

    merge = str(row.get("merge"))
    method = merge if merge in REFERENCE_METHODS else None
    if method is None:
        try:
            method = merge_func.canonical_name(merge)
        except KeyError:
            method = None
    accuracy = row.get("accuracy") or {}
    tasks = row.get("tasks") or list(accuracy)
    options = row.get("options") if isinstance(row.get("options"), dict) else None
    if row.get("scaling_coef") == "auto" or "scaling_coef_grid" in row or "scaling_coef_grid_name" in row:
        coef = ("tuned", _recorded_grid(row, method))
    else:
        value = row.get("scaling_coef")
        value = value if value is not None else (options or {}).get("scaling_coef")
        coef = ("fixed", float(value)) if _is_number(value) else None
    svc = bool(row.get("svc", False))
    alpha = None
    if svc:
        if row.get("alpha") == "auto" or "alpha_grid" in row:
            alpha = ("tuned",)
        elif _is_number(row.get("alpha")):
            alpha = ("fixed", float(row["alpha"]))
    return Run(family=_family(row), model=row.get("model"), method=method, merge=merge, tasks=frozenset(tasks),
               datasets=tuple(accuracy), svc=svc, coef=coef, alpha=alpha, options=options,
               svc_keys=row.get("svc_keys"), svc_target=row.get("svc_target"),
               row_space=row.get("svc_row_space"), convention=row.get("convention"))


# ----------------------------------------------------------------------------- matching
def _same(a, b) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _mismatch(entry: Entry, run: Run) -> str | None:
    """What ``entry`` has that ``run`` does not record (None when the settings agree)."""
    import merge_func
    from src import tuning

    if entry.svc != run.svc:
        return "SVC" if entry.svc else "no SVC"
    if isinstance(entry.coef, str):
        grid_name = entry.coef.split(":", 1)[1]
        if run.coef is None or run.coef[0] != "tuned":
            return f"coefficient tuned on validation ({grid_name} grid)"
        if run.coef[1] is None:
            return f"coefficient tuned over the {grid_name} grid (this run's grid is not recorded)"
        wanted = tuning.coefficient_grid(entry.method, grid_name)
        if len(run.coef[1]) != len(wanted) or not all(map(_same, run.coef[1], wanted)):
            return f"coefficient tuned over the {grid_name} grid"
    elif run.coef is None or run.coef[0] != "fixed" or not _same(run.coef[1], entry.coef):
        return f"coef {_fmt(entry.coef)}"
    required = {k: v for k, v in merge_func.METHOD_OPTIONS[entry.method].items() if k not in NOT_OPTIONS}
    required.update(entry.options)
    if required and run.options is None:
        return "recorded method options (this line has none)"
    for name, value in sorted(required.items()):
        if name not in run.options:
            return f"{name}={_fmt(value)} (not recorded here)"
        if not _same(run.options[name], value):
            return f"{name}={_fmt(value)}"
    if entry.svc:
        alpha = 1.0 / len(run.tasks) if entry.alpha == "1/K" else entry.alpha
        if run.alpha is None or run.alpha[0] != "fixed" or not _same(run.alpha[1], alpha):
            return f"SVC alpha {_fmt(entry.alpha)}" + (f" = {alpha:g}" if entry.alpha == "1/K" else "")
        if run.svc_keys != "official":
            return "SVC on the official key set (svc_keys=official)"
        if run.svc_target is not None:
            return "SVC against all tasks (no svc_target)"
        if bool(run.row_space) != entry.row_space:
            return "SVC in the row space" if entry.row_space else "SVC in the column space (no --svc-row-space)"
    return None


@dataclass
class Match:
    """The publication that applies to a run (``entry``), or why none does (``reason``)."""

    run: Run
    entry: Entry | None = None
    exact: bool = False  # the entry's task set is the run's evaluated datasets: averages are comparable
    others: list[Entry] = field(default_factory=list)  # other publications of the same configuration
    reason: str = ""

    def acc(self) -> dict[str, Number]:
        """Published values of the run's evaluated datasets."""
        if self.entry is None:
            return {}
        return {d: self.entry.acc[d] for d in self.run.datasets if d in self.entry.acc}

    def avg(self) -> Number | None:
        return self.entry.avg if self.entry is not None and self.exact else None

    def norm(self) -> Number | None:
        return self.entry.norm if self.entry is not None and self.exact else None

    def label(self) -> str:
        """Short source label for a table cell."""
        if self.entry is None:
            return "no published number"
        extra = "" if self.exact else f", per task ({self.entry.tasks}-task table)"
        return f"{self.entry.source.key}{extra}"

    def others_text(self) -> str:
        """The other publications of this configuration, e.g. 'ISO-T4 Avg 90.5; FB-TALL20 per task'."""
        def one(e: Entry) -> str:
            exact = set(self.run.datasets) == set(_task_set(e.tasks))
            return f"{e.source.key} " + (f"Avg {e.avg}" if exact and e.avg is not None else "per task")
        return "; ".join(one(e) for e in self.others)

    def deviations(self, accuracy: dict[str, float], tolerance: float) -> dict[str, float]:
        """ours - published for the zero-shot / fine-tuned tasks further apart than ``tolerance`` points."""
        if self.run.method not in REFERENCE_METHODS:
            return {}
        return {d: accuracy[d] - p.value for d, p in self.acc().items()
                if d in accuracy and abs(accuracy[d] - p.value) > tolerance + 1e-9}


def _none(run: Run, reason: str) -> Match:
    return Match(run=run, reason=reason)


def match(row: dict, data: Published | None = None) -> Match:
    """The published configuration that ``row`` (a results line) reproduces, decided from what it records."""
    data = data if data is not None else load()
    run = run_of(row)
    if run.method is None:
        return _none(run, f"merge method {run.merge!r} is not one merge_func knows")
    if run.family is None:
        layout = row.get("layout")
        return _none(run, "the checkpoint family is not recorded (no 'layout' field; runs of the current main.py "
                          "record it)" if layout is None else f"unknown checkpoint layout {layout!r}")
    if run.convention is not None and run.convention != run.family:
        return _none(run, f"evaluated under the {run.convention} convention; published numbers of {run.family} "
                          f"checkpoints use the {run.family} convention (--convention auto)")
    pool = [e for e in data.entries if e.family == run.family]
    if not pool:
        return _none(run, f"no publication in {data.path.name} uses {run.family} checkpoints")
    pool = [e for e in pool if e.model == run.model]
    if not pool:
        return _none(run, f"no publication reports {run.model} with {run.family} checkpoints")
    method = REFERENCE_METHODS.get(run.method, run.method)
    pool = [e for e in pool if e.method == run.method]
    if not pool:
        return _none(run, f"no publication reports {method} for {run.model} with {run.family} checkpoints")
    datasets = set(run.datasets)
    if run.method in REFERENCE_METHODS:
        def score(e: Entry) -> tuple:
            exact = datasets == set(_task_set(e.tasks))
            covered = sum(d in e.acc for d in run.datasets)
            return (exact and (e.avg is not None or covered > 0), covered, -e.index)
        ranked = sorted((e for e in pool if score(e)[0] or score(e)[1]), key=score, reverse=True)
        if not ranked:
            return _none(run, f"published {method} values cover other datasets than {', '.join(run.datasets)}")
    else:
        counts = sorted({e.tasks for e in pool})
        pool = [e for e in pool if set(_task_set(e.tasks)) == run.tasks]
        if not pool:
            return _none(run, f"published {method} runs merge the standard {', '.join(map(str, counts))}-task "
                              f"set(s); this run merged {len(run.tasks)} tasks ({', '.join(sorted(run.tasks))})")
        fits = [e for e in pool if _mismatch(e, run) is None]
        if not fits:
            nearer = [e for e in pool if e.svc == run.svc] or pool  # the variants with(out) SVC, like this run
            published = "; ".join(dict.fromkeys(f"{e.settings()} [{e.source.key} has: {_mismatch(e, run)}]"
                                                for e in nearer))
            return _none(run, f"{method} on {run.model}, {len(run.tasks)} tasks, {run.family} checkpoints is "
                              f"published only as: {published}; this run: {run.settings()}")
        ranked = sorted(fits, key=lambda e: (sum(d in e.acc for d in run.datasets), -e.index), reverse=True)
    best = ranked[0]
    others = {}  # one per other source: the same source's other tables repeat its values
    for e in ranked[1:]:
        if e.source.key != best.source.key:
            others.setdefault(e.source.key, e)
    return Match(run=run, entry=best, exact=datasets == set(_task_set(best.tasks)), others=list(others.values()))


# ----------------------------------------------------------------------------- the setup check
def check_tolerance(tolerance: float) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0 \
            or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a number of accuracy points >= 0, got {tolerance!r}")
    return float(tolerance)


def setup_check(record: dict, tolerance: float = DEFAULT_TOLERANCE, data: Published | None = None) -> list[str]:
    """Lines for a run's text log: the publication this run matches (or why there is none), and for zero-shot
    and fine-tuned runs the tasks whose accuracy is more than ``tolerance`` points from the published value,
    to be looked at (data, heads, preprocessing) before merging. ``record`` is the dict main.py logs."""
    tolerance = check_tolerance(tolerance)
    m = match(record, data)
    if m.entry is None:
        return [f"published check ({m.run.what()}): no published number: {m.reason}"]
    e = m.entry
    lines = [f"published check ({m.run.what()}): compared with {e.source.key} ({e.source.label}; {e.describe()}): "
             f"{e.source.cite}"]
    head = "published check"
    accuracy = record.get("accuracy") or {}
    published = m.acc()
    if m.run.method in REFERENCE_METHODS and published:
        off = m.deviations(accuracy, tolerance)
        if off:
            lines.append(f"{head}: {len(off)} of {len(published)} tasks differ from the published value by more than "
                         f"{tolerance:g} point(s); before merging, look at their data (split, class order), heads "
                         "(class names, templates) and preprocessing:")
            lines += [f"  {d}: {accuracy[d]:.2f} vs published {published[d]} ({diff:+.2f})" for d, diff in off.items()]
        else:
            lines.append(f"{head}: all {len(published)} tasks within {tolerance:g} point(s) of the published values")
    elif published:
        lines.append(f"{head}: per task, ours - published: " + ", ".join(
            f"{d} {accuracy[d] - p.value:+.2f}" for d, p in published.items() if d in accuracy))
    avg = m.avg()
    if avg is not None and accuracy:
        ours = sum(accuracy.values()) / len(accuracy)
        lines.append(f"{head}: Avg {ours:.2f} vs published {avg} ({ours - avg.value:+.2f})")
    if e.note:
        lines.append(f"{head}: note on {e.source.key}: {e.note}")
    if m.others:
        lines.append(f"{head}: also published for this configuration: {m.others_text()}")
    return lines


def log_lines(record: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """``setup_check`` for a run's text log that never stops the run: a damaged data file gives one line
    saying so instead of an exception (main.py calls this after the accuracies are known)."""
    try:
        return setup_check(record, tolerance)
    except PublishedDataError as err:
        return [f"published check: skipped: {err}"]


# ----------------------------------------------------------------------------- command line
def listing(data: Published | None = None) -> str:
    """Markdown list of the configurations that have published numbers: per source, per checkpoint family, model
    and task count, the methods with their settings and what is published (per task values, averages)."""
    data = data if data is not None else load()
    lines = []
    for key, source in data.sources.items():
        lines.append(f"- **{key}** ({source.label}): {source.cite}")
        groups: dict[tuple, list[str]] = {}
        for e in (e for e in data.entries if e.source.key == key):
            what = "+".join(x for x, has in (("per task", e.acc), ("Avg", e.avg), ("normalised Avg", e.norm)) if has)
            method = REFERENCE_METHODS.get(e.method, e.method)
            groups.setdefault((e.family, e.model, e.tasks), []).append(
                f"{method}{f' ({e.settings()})' if e.settings() else ''} [{what}]")
        merged: dict[tuple, list[int]] = {}  # task counts with the same methods share a line
        for (family, model, tasks), methods in groups.items():
            merged.setdefault((family, model, "; ".join(methods)), []).append(tasks)
        for (family, model, methods), counts in merged.items():
            lines.append(f"  - {family} checkpoints, {model}, {'/'.join(map(str, counts))} tasks: {methods}")
    return "\n".join(lines) + "\n"


# A few runs' accuracies for the example table: the published FusionBench values moved by these offsets. They
# are synthetic inputs that show what the table does (one zero-shot task far off, one configuration without a
# published number, one old line), never measurements.
_EXAMPLE_OFFSETS = {"SUN397": 0.3, "Cars": -4.2, "RESISC45": 0.5, "EuroSAT": -0.6, "SVHN": 0.2, "GTSRB": -0.4,
                    "MNIST": 0.1, "DTD": 0.8}


def write_example(folder: str | Path, data: Published | None = None) -> Path:
    """Write <folder>/ViT-B-32/results.jsonl with synthetic lines (marked as such) and return its path."""
    import utils

    data = data if data is not None else load()
    path = Path(folder) / "ViT-B-32" / "results.jsonl"
    if path.exists():
        raise FileExistsError(f"{path} exists; give an empty folder (the example never overwrites results)")

    def fb(method: str, **settings) -> dict[str, float]:
        entry = next(e for e in data.entries if e.source.key == "FB-TA8" and e.model == "ViT-B-32"
                     and e.method == method and all(getattr(e, k) == v for k, v in settings.items()))
        return {t: round(min(100.0, n.value + _EXAMPLE_OFFSETS[t]), 2) for t, n in entry.acc.items()}

    tasks = list(_EXAMPLE_OFFSETS)
    base = {"model": "ViT-B-32", "tasks": tasks, "layout": "hf", "convention": "fusionbench", "source": "hf",
            "seed": 42, "note": "synthetic example written by python -m src.published --example; not a measurement"}
    ta = {"merge": "TA", "svc": False, "alpha": None, "scaling_coef": 0.3, "options": {"scaling_coef": 0.3}}
    zs = fb("zeroshot")
    lines = [
        {**base, "merge": "zeroshot", "accuracy": zs},
        {**base, "merge": "finetuned", "accuracy": fb("finetuned")},
        {**base, **ta, "accuracy": fb("TA", coef=0.3)},
        {**base, **ta, "svc": True, "alpha": 0.125, "svc_keys": "official", "svc_target": None,
         "svc_row_space": False, "accuracy": {t: round(min(100.0, v + 8.0), 2) for t, v in fb("TA", coef=0.3).items()}},
        # a line written before the checkpoint layout was recorded
        {"model": "ViT-B-32", "merge": "zeroshot", "tasks": tasks, "accuracy": zs, "note": base["note"]},
    ]
    for line in lines:
        utils.append_jsonl(path, line)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.published", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list the configurations that have published numbers")
    group.add_argument("--example", metavar="DIR", help="write a small synthetic results file under DIR/ViT-B-32")
    group.add_argument("--check", metavar="FILE", help="print the setup-check lines of each line of a results.jsonl")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"points of accuracy (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--data", default=None, help=f"data file (default {DATA_FILE})")
    args = parser.parse_args(argv)
    try:
        check_tolerance(args.tolerance)
        data = load(args.data)
        if args.list:
            sys.stdout.write(listing(data))
        elif args.example:
            path = write_example(args.example, data)
            print(f"wrote {path}; now run: python -m src.results {path.parent} --reference")
        else:
            import utils
            from src.records import row_problem  # the one shape check of a results line

            for lineno, row in utils.iter_jsonl(args.check):
                problem = row_problem(row)
                if problem:
                    print(f"warning: {args.check}:{lineno}: skipped line ({problem})", file=sys.stderr)
                    continue
                print(f"{args.check}:{lineno}: {row.get('merge')}")
                for line in setup_check(row, args.tolerance, data):
                    print(f"  {line}")
    except (PublishedDataError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
