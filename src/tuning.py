"""Coefficient selection on validation data (never on the test set).

`select_coefficient` evaluates every candidate of a grid with a caller-supplied
score function and keeps the one with the best average normalised validation
accuracy (average absolute accuracy when single-task accuracies are unknown).
`apply_in_place` writes theta_0 + coef * update into an already-built model, so a
20-point grid costs 20 evaluations and no reloading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

# Grid families as in the papers (a method declares its family in merge_func's registry):
# TA-like methods on (0, 1], spectral methods (TSV, Iso) on (0, 3].
_FAMILY_GRIDS = {
    "ta": [round(0.05 * i, 2) for i in range(1, 21)],  # 0.05 ... 1.0
    "spectral": [round(0.1 * i, 1) for i in range(1, 31)],  # 0.1 ... 3.0
}
_TSV_TA_GRID = [i / 30 for i in range(1, 31)]  # np.linspace(0, 1, 31)[1:]: 1/30 ... 1
# Named grids for --coef-grid. "default": the family's grid above. "tsv": the TSV and iso-merging code
# (src/eval/eval.py, n_eval_points 31): linspace(0, 3, 31)[1:] for the spectral family, linspace(0, 1, 31)[1:]
# for every other method. "task_vectors": the task-arithmetic paper's 0.05 steps for every method (not checked
# in code: the task_vectors repository holds no search; lambda = 0, the zero-shot model, is left out).
COEF_GRIDS = ("default", "tsv", "task_vectors")


def coefficient_grid(method: str, name: str = "default") -> list[float]:
    """Merge-coefficient grid `name` (one of COEF_GRIDS) for a registered merge method (any spelling)."""
    import merge_func  # the registry declares each method's grid family

    family = merge_func.method_info(method).grid  # KeyError naming the valid methods
    if name == "default":
        return list(_FAMILY_GRIDS[family])
    if name == "tsv":
        return list(_FAMILY_GRIDS["spectral"] if family == "spectral" else _TSV_TA_GRID)
    if name == "task_vectors":
        return list(_FAMILY_GRIDS["ta"])
    raise ValueError(f"unknown coefficient grid {name!r}; choose one of {', '.join(COEF_GRIDS)}")


def default_grid(method: str) -> list[float]:
    """Default merge-coefficient grid for a merge method name (case-insensitive)."""
    return coefficient_grid(method, "default")


def alpha_grid(num_tasks: int) -> list[float]:
    """SVC floor grid 1/K, 2/K, ..., 1 for K tasks."""
    if num_tasks < 1:
        raise ValueError(f"alpha_grid needs at least one task, got K={num_tasks}")
    return [j / num_tasks for j in range(1, num_tasks + 1)]


def average_accuracy(accuracy: Mapping[str, float]) -> float:
    """Plain mean of per-task top-1 accuracies (%)."""
    if not accuracy:
        raise ValueError("empty accuracy dict: the score function evaluated no task")
    return sum(accuracy.values()) / len(accuracy)


def normalized_accuracy(accuracy: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Mean over tasks of 100 * acc / single-task fine-tuned acc (in %)."""
    missing = [t for t in accuracy if t not in individual]
    if missing:
        raise KeyError(
            f"no single-task (fine-tuned) accuracy for {missing}; known: {sorted(individual)}. "
            "Evaluate the fine-tuned models on these splits or select by absolute accuracy."
        )
    bad = [t for t in accuracy if not individual[t] > 0]
    if bad:
        raise ValueError(f"single-task accuracy must be > 0 to normalise, got {[(t, individual[t]) for t in bad]}")
    return sum(100.0 * accuracy[t] / individual[t] for t in accuracy) / len(accuracy)


@dataclass
class Selection:
    """Outcome of a grid search: the chosen value and the whole validation curve."""

    best: float
    score: float
    criterion: str  # "normalized" or "absolute"
    grid: list[float]
    curve: list[dict] = field(default_factory=list)  # per coef: coef, accuracy, avg, [normalized]

    def as_log(self, name: str) -> dict:
        """Fields for results.jsonl, e.g. name="scaling_coef" -> scaling_coef_selected/_grid/_curve."""
        return {
            f"{name}_selected": self.best,
            f"{name}_grid": list(self.grid),
            f"{name}_criterion": self.criterion,
            f"{name}_curve": self.curve,
        }


def select_coefficient(
    grid: list[float],
    score_fn: Callable[[float], dict[str, float]],
    individual: dict[str, float] | None = None,
) -> Selection:
    """Evaluate `score_fn(c)` (task -> validation top-1 %) for every c in `grid`.

    Picks the c with the highest average normalised accuracy when `individual`
    (task -> single-task accuracy on the same split) is given, else the highest
    average absolute accuracy. Ties go to the smaller coefficient.
    """
    grid = sorted(float(c) for c in grid)
    if not grid:
        raise ValueError("empty coefficient grid")
    if len(set(grid)) != len(grid):
        raise ValueError(f"coefficient grid has duplicates: {grid}")
    criterion = "normalized" if individual is not None else "absolute"
    curve, best, best_score = [], None, -math.inf
    for coef in grid:  # ascending, and only a strictly better score replaces: ties keep the smaller
        accuracy = {t: float(a) for t, a in score_fn(coef).items()}
        point = {"coef": coef, "accuracy": accuracy, "avg": average_accuracy(accuracy)}
        if individual is not None:
            point["normalized"] = normalized_accuracy(accuracy, individual)
        curve.append(point)
        score = point["normalized" if individual is not None else "avg"]
        if math.isnan(score):
            continue
        if score > best_score:
            best, best_score = coef, score
    if best is None:
        raise ValueError("every coefficient of the grid gave a NaN validation score")
    return Selection(best=best, score=best_score, criterion=criterion, grid=grid, curve=curve)


@torch.no_grad()
def apply_in_place(
    model_params: dict[str, Tensor],
    base: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    coef: float,
) -> None:
    """Set model_params[k] = base[k] + coef * update[k] for every key of `update`.

    `model_params` is a loaded model's `state_dict()` (its tensors share storage with
    the parameters), so the model changes without being rebuilt. Keys of the model
    that `update` lacks are left as they are (they already hold theta_0). `update` may be
    a TaskVector. Pass eager mappings (`TaskVector.materialize()`, a dict of `base`) when
    scoring a grid, so lazy checkpoints are not re-read from disk for every coefficient.
    """
    update = getattr(update, "vector", update)  # a TaskVector or a plain mapping
    missing = [k for k in update if k not in model_params or k not in base]
    if missing:
        raise KeyError(
            f"{len(missing)} update keys are not in the model/base state dict, e.g. {missing[:3]}; "
            "the update must use the same key convention as the model (`model.` + open_clip key)"
        )
    for key, delta in update.items():
        target = model_params[key]
        # Same float32 expression, on the model's device, as TaskVector.apply_to, so the
        # validation model is bit-identical to the one rebuilt for the test evaluation.
        value = base[key].to(target.device, torch.float32) + coef * delta.to(target.device, torch.float32)
        if value.shape != target.shape:
            raise ValueError(f"shape mismatch for {key}: model {tuple(target.shape)}, update {tuple(value.shape)}")
        target.copy_(value)


def coefficient_scorer(
    model_params: dict[str, Tensor],
    base: Mapping[str, Tensor],
    update: Mapping[str, Tensor],
    evaluate: Callable[[], dict[str, float]],
) -> Callable[[float], dict[str, float]]:
    """Score function for `select_coefficient`: apply theta_0 + c * update in place, then evaluate."""

    def score(coef: float) -> dict[str, float]:
        apply_in_place(model_params, base, update, coef)
        return evaluate()

    return score


def choose_on_validation(merged, score: Callable, individual: dict[str, float] | None, *,
                         coef_grid: list[float] | None = None, alpha_grid: list[float] | None = None,
                         calibrate: Callable | None = None, alpha: float | None = None) -> tuple[float, float | None, dict]:
    """main.py's --scaling_coef auto and --alpha auto: the coefficient from `coef_grid` (None: keep 1), then
    SVC's alpha from `alpha_grid` (None: keep `alpha`), each by `select_coefficient` on validation data.

    merged: the merge at coefficient 1 (every method's update is linear in its coefficient);
    score(update) -> validation accuracies of the model with that update; calibrate(update, alpha) -> the
    SVC-calibrated update, or None without SVC (the coefficient search then calibrates with `alpha`).
    Returns (coefficient, alpha, the fields results.jsonl logs about the choice)."""
    coef, log = 1.0, {}
    if coef_grid is not None:
        update = (lambda c: calibrate(c * merged, alpha)) if calibrate else (lambda c: c * merged)
        chosen = select_coefficient(coef_grid, lambda c: score(update(c)), individual)
        coef = chosen.best
        log.update(chosen.as_log("scaling_coef"))
        print(f"scaling_coef chosen on validation: {coef} ({chosen.criterion} {chosen.score:.2f})", flush=True)
    if alpha_grid is not None:
        chosen = select_coefficient(alpha_grid, lambda a: score(calibrate(coef * merged, a)), individual)
        alpha = chosen.best
        log.update(chosen.as_log("alpha"))
        print(f"alpha chosen on validation: {alpha} ({chosen.criterion} {chosen.score:.2f})", flush=True)
    return coef, alpha, log
