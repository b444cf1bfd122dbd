"""The shape of a results.jsonl line: `row_problem` says why a parsed line cannot be used, for every reader
(src.results, src.plots, src.published), so one damaged or ill-typed line is skipped and named, never a crash."""
from __future__ import annotations

import math

AVG, NORM = "Avg", "Avg (norm.)"  # the table's own columns


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_OPTIONAL = {  # field -> (check of a value other than None, what it should be), for every field the readers use
    **{name: (lambda v: isinstance(v, str), "a string") for name in (
        "model", "layout", "convention", "checkpoints", "source", "svc_keys", "svc_dtype", "scaling_coef_grid_name")},
    **{name: (lambda v: isinstance(v, bool), "true or false") for name in ("svc", "svc_row_space")},
    **{name: (lambda v: isinstance(v, dict), "an object") for name in ("options", "data", "request")},
    **{name: (lambda v: _is_number(v) or v == "auto", "a finite number or 'auto'") for name in ("alpha", "scaling_coef")},
    **{name: (_is_number, "a finite number") for name in ("alpha_selected", "scaling_coef_selected")},
    **{name: (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of finite numbers")
       for name in ("alpha_grid", "scaling_coef_grid")},
    "tasks": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of task names"),
    "svc_target": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a task index"),
    "avg": (_is_number, "a finite number"),
    "normalized": (lambda v: _is_number(v) or (isinstance(v, dict) and all(map(_is_number, v.values()))),
                   "a finite number or an object of finite numbers"),
    **{name: (lambda v: isinstance(v, list) and all(_curve_point(p) for p in v), "a list of {coef, avg, normalized} "
              "points with numbers") for name in ("alpha_curve", "scaling_coef_curve")},
}
_RESERVED = {"label", AVG, NORM}  # the table's own columns: a dataset of that name would overwrite them


def _curve_point(point: object) -> bool:
    """A validation-curve point as src.tuning stores it and src.plots reads it."""
    return (isinstance(point, dict) and _is_number(point.get("coef"))
            and all(point.get(k) is None or isinstance(point[k], (int, float)) and not isinstance(point[k], bool)
                    for k in ("avg", "normalized")))


def row_problem(row: object) -> str | None:
    """Why a parsed results line cannot be used, or None: the one shape check of a results line, covering every
    field that src.results, src.plots and src.published read (a field may be missing or null, never ill-typed)."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("merge"), str) or not row["merge"]:
        return "no 'merge' name"
    acc = row.get("accuracy")
    if not isinstance(acc, dict) or not acc:
        return "no 'accuracy' object"
    for task, value in acc.items():
        if not _is_number(value):
            return f"accuracy of {task!r} is not a finite number: {_short(value)}"
        if task in _RESERVED:
            return f"accuracy of a dataset named {task!r}, a column of the table"
    for name, value in row.items():  # the fields the line has (a short line: a few lookups)
        spec = _OPTIONAL.get(name)
        if spec is not None and value is not None and not spec[0](value):
            return f"{name!r} is not {spec[1]}: {_short(value)}"
    return None


_row_problem = row_problem  # its former name


def _short(value: object) -> str:
    """repr of a value, cut short: a warning stays one line even for a 3 MB field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
