"""Coefficient selection on validation data: grids, the choice rule, in-place application."""
import pytest
import torch

from src.tuning import (
    COEF_GRIDS,
    alpha_grid,
    apply_in_place,
    coefficient_grid,
    coefficient_scorer,
    default_grid,
    select_coefficient,
)


def test_default_grids():
    ta = default_grid("TA")
    assert len(ta) == 20 and ta[0] == 0.05 and ta[-1] == 1.0 and ta[2] == 0.15
    for m in ("WA", "TIES", "DARE", "STAR"):
        assert default_grid(m) == ta
    iso = default_grid("Iso-C")
    assert len(iso) == 30 and iso[0] == 0.1 and iso[-1] == 3.0 and iso[12] == 1.3
    assert default_grid("TSV-M") == iso == default_grid("ISO-CTS")
    with pytest.raises(KeyError, match="unknown merge method 'nonsense'; valid: WA, TA"):
        default_grid("nonsense")


def test_named_grids_follow_the_reference_code():
    import numpy as np

    assert COEF_GRIDS == ("default", "tsv", "task_vectors")
    for m in ("TA", "WA", "TIES", "DARE", "STAR", "TSV-M", "Iso-C", "Iso-CTS"):
        assert coefficient_grid(m) == default_grid(m)
        # task_vectors: 0.05 steps on (0, 1] for every method
        assert coefficient_grid(m, "task_vectors") == [round(0.05 * i, 2) for i in range(1, 21)]
    # TSV / iso-merging code: linspace(0, 1, 31)[1:] for TA-like methods, linspace(0, 3, 31)[1:] for TSVM / Iso
    for m, stop in (("TA", 1.0), ("TIES", 1.0), ("tsvm", 3.0), ("iso_c", 3.0), ("ISO-CTS", 3.0)):
        grid = coefficient_grid(m, "tsv")
        assert grid == pytest.approx(np.linspace(0.0, stop, 31)[1:].tolist(), abs=1e-12) and len(grid) == 30
    assert coefficient_grid("TA", "tsv")[8] == 0.3 and coefficient_grid("TA", "tsv")[-1] == 1.0
    with pytest.raises(ValueError, match="unknown coefficient grid 'fine'.*default, tsv, task_vectors"):
        coefficient_grid("TA", "fine")


def test_alpha_grid():
    assert alpha_grid(8) == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert alpha_grid(1) == [1.0]
    with pytest.raises(ValueError):
        alpha_grid(0)


def test_known_peak_and_tie_rule():
    calls = []

    def score(c):
        calls.append(c)
        return {"A": 90 - 100 * (c - 0.35) ** 2, "B": 80 - 100 * (c - 0.35) ** 2}

    sel = select_coefficient(default_grid("TA"), score)
    assert sel.best == 0.35 and sel.criterion == "absolute"
    assert sel.score == pytest.approx(85.0)
    assert len(sel.curve) == 20 == len(calls)
    assert [p["coef"] for p in sel.curve] == default_grid("TA")
    # flat plateau: the smaller coefficient wins
    sel = select_coefficient([0.5, 0.2, 0.3], lambda c: {"A": 50.0 if c >= 0.3 else 10.0})
    assert sel.best == 0.3


def test_normalized_criterion_changes_the_choice():
    # Task A is easy (high accuracies), task B hard; absolute avg prefers A's peak,
    # normalised avg prefers B's peak because B's fine-tuned accuracy is low.
    table = {0.1: {"A": 95.0, "B": 10.0}, 0.2: {"A": 80.0, "B": 20.0}}
    individual = {"A": 100.0, "B": 25.0}
    assert select_coefficient([0.1, 0.2], table.__getitem__).best == 0.1
    sel = select_coefficient([0.1, 0.2], table.__getitem__, individual)
    assert sel.best == 0.2 and sel.criterion == "normalized"
    assert sel.curve[1]["normalized"] == pytest.approx((80.0 + 80.0) / 2)
    log = sel.as_log("scaling_coef")
    assert log["scaling_coef_selected"] == 0.2 and log["scaling_coef_grid"] == [0.1, 0.2]
    with pytest.raises(KeyError, match="single-task"):
        select_coefficient([0.1], table.__getitem__, {"A": 100.0})


def test_bad_grids():
    with pytest.raises(ValueError, match="empty"):
        select_coefficient([], lambda c: {"A": 1.0})
    with pytest.raises(ValueError, match="duplicates"):
        select_coefficient([0.1, 0.1], lambda c: {"A": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        select_coefficient([0.1], lambda c: {"A": float("nan")})


def _threshold_task(lo, hi, cut):
    """1-D validation set: points strictly between grid values, label = x > cut."""
    x = torch.arange(lo, hi, 0.05) + 0.025
    return x.unsqueeze(1), (x > cut).long()


def test_linear_model_known_best_coefficient():
    # Model: logits = [0, x - b] with a 2-class nn.Linear; theta_0 puts the threshold at b = 0,
    # tau moves it: b = c. Validation labels are x > 0.45 for both tasks, so only c = 0.45
    # classifies every point right (grid points fall between data points).
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 2)
    base = {"weight": torch.tensor([[0.0], [1.0]]), "bias": torch.tensor([0.0, 0.0])}
    tau = {"bias": torch.tensor([0.0, -1.0])}
    params = model.state_dict(keep_vars=True)
    ids = {k: id(v) for k, v in params.items()}
    tasks = {"A": _threshold_task(0.0, 1.0, 0.45), "B": _threshold_task(0.2, 0.8, 0.45)}
    apply_in_place(params, base, {"weight": torch.zeros(2, 1)}, 1.0)  # weight := base weight

    def evaluate():
        with torch.no_grad():
            return {t: 100.0 * (model(x).argmax(1) == y).float().mean().item() for t, (x, y) in tasks.items()}

    sel = select_coefficient(default_grid("TA"), coefficient_scorer(params, base, tau, evaluate), {"A": 100.0, "B": 100.0})
    assert sel.best == 0.45
    assert sel.score == pytest.approx(100.0)
    assert all(p["normalized"] < 100.0 for p in sel.curve if p["coef"] != 0.45)
    # the same parameter objects were updated in place (no reload), holding the last grid value
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == ids
    assert model.bias[1].item() == pytest.approx(-1.0)
    apply_in_place(params, base, tau, sel.best)
    assert torch.equal(model.bias, base["bias"] + 0.45 * tau["bias"])


def test_apply_in_place_errors():
    params = {"w": torch.zeros(2)}
    with pytest.raises(KeyError, match="key convention"):
        apply_in_place(params, {"w": torch.zeros(2)}, {"v": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        apply_in_place(params, {"w": torch.zeros(3)}, {"w": torch.zeros(3)}, 1.0)


def test_apply_in_place_matches_task_vector_apply_to():
    from src.task_vectors import TaskVector

    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)}
    tau = TaskVector(vector={"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)})
    model = {k: torch.zeros_like(v) for k, v in base.items()}
    for coef in (0.35, 1.3):
        apply_in_place(model, base, tau, coef)
        expected = tau.apply_to(base, scaling_coef=coef)
        assert all(torch.equal(model[k], expected[k]) for k in base)
