"""SVC against a slow per-rank reference of the official formula, plus the invariants
that follow from the maths (reference-spec sections 1 and 7)."""
import math

import pytest
import torch

from src.linalg import select_keys
from src.svc import calibrate_matrix, calibration_stats, svc, svc_keys
from src.task_vectors import TaskVector


def reference_svc(merged, deltas, alpha, target=None, row_space=False):
    """The official rule written plainly, one rank at a time, in float64."""
    m = merged.double()
    d = [x.double() for x in deltas]
    if row_space:
        m, d = m.T, [x.T for x in d]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    new_s = s.clone()
    for r in range(s.numel()):
        a_m = u[:, r] @ m
        coefs = []
        for di in d:
            a_i = u[:, r] @ di
            coefs.append(float(a_m @ a_i) / max(float(a_i @ a_i), 1e-12))
        if target is None:
            eta = sum(max(c, alpha) for c in coefs) / len(coefs)
        else:
            c = coefs[target]
            eta = max(c, alpha) if c > 0 else 1.0
        new_s[r] = s[r] / eta
    out = u @ torch.diag(new_s) @ vh
    return out.T if row_space else out


def structured(k_tasks, m, n, seed=0):
    """Shared low-rank part + task-specific low-rank part + small dense noise."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    return torch.stack([
        shared + torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + 0.05 * torch.randn(m, n, generator=g)
        for _ in range(k_tasks)
    ])


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
@pytest.mark.parametrize("k_tasks", [1, 2, 8, 20])
@pytest.mark.parametrize("decomposition", ["gram", "svd"])
def test_matches_reference(shape, k_tasks, decomposition):
    deltas = structured(k_tasks, *shape, seed=k_tasks)
    merged = 0.3 * deltas.sum(0)
    for alpha in (1.0 / k_tasks, 1.0):
        expected = reference_svc(merged, deltas, alpha)
        got = calibrate_matrix(merged, deltas, alpha, decomposition=decomposition)
        assert got.dtype == merged.dtype and got.shape == merged.shape
        assert rel(got, expected) < 2e-4
        got64 = calibrate_matrix(merged.double(), list(deltas), alpha, dtype=torch.float64, decomposition=decomposition)
        assert rel(got64, expected) < (1e-9 if decomposition == "svd" else 1e-7)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_row_space_and_target_match_reference(shape):
    deltas = structured(5, *shape, seed=3)
    merged = deltas.mean(0)
    merged, deltas = merged.double(), deltas.double()
    expected = reference_svc(merged, deltas, 0.2, row_space=True)
    assert rel(calibrate_matrix(merged, deltas, 0.2, row_space=True, dtype=torch.float64), expected) < 1e-9
    for t in (0, 4):
        expected = reference_svc(merged, deltas, 0.2, target=t)
        assert rel(calibrate_matrix(merged, deltas, 0.2, target=t, dtype=torch.float64), expected) < 1e-9


def test_identical_tasks_under_ta_return_the_task_vector():
    base = structured(1, 48, 32, seed=7)[0].double()
    for k_tasks in (2, 8):
        deltas = base.expand(k_tasks, -1, -1).clone()
        merged = 0.3 * deltas.sum(0)  # s = 0.3 K for every rank
        for decomposition in ("svd", "gram"):
            out = calibrate_matrix(merged, deltas, 1.0 / k_tasks, dtype=torch.float64, decomposition=decomposition)
            assert rel(out, base) < 1e-9


def test_single_task_with_alpha_at_most_one_is_identity():
    d = structured(1, 36, 20, seed=1).double()
    for alpha in (0.1, 0.5, 1.0):
        assert rel(calibrate_matrix(d[0], d, alpha, dtype=torch.float64), d[0]) < 1e-9


def test_disjoint_tasks_are_amplified_as_the_formula_says():
    # Task i owns diagonal block i: s = lambda for its directions and 0 for the others,
    # so every direction gets eta = (max(lambda, alpha) + (K - 1) alpha) / K.
    k_tasks, lam, alpha = 4, 0.3, 0.25
    deltas = torch.zeros(k_tasks, 8, 8, dtype=torch.float64)
    for i in range(k_tasks):
        block = torch.randn(2, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        deltas[i, 2 * i:2 * i + 2, 2 * i:2 * i + 2] = block
    merged = lam * deltas.sum(0)
    eta = (max(lam, alpha) + (k_tasks - 1) * alpha) / k_tasks
    out = calibrate_matrix(merged, deltas, alpha, dtype=torch.float64)
    assert rel(out, merged / eta) < 1e-9


def test_gram_and_svd_paths_agree_on_realistic_matrices():
    deltas = structured(8, 300, 120, seed=11) * 0.01
    merged = 0.3 * deltas.sum(0)
    ref = calibrate_matrix(merged, deltas, 0.125, dtype=torch.float64, decomposition="svd")
    assert rel(calibrate_matrix(merged, deltas, 0.125, decomposition="gram"), ref) < 1e-4
    assert rel(calibrate_matrix(merged, deltas, 0.125, decomposition="svd"), ref) < 1e-4


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan"), float("inf"), "x"])
def test_invalid_alpha_is_a_clear_error(alpha):
    d = structured(2, 6, 4)
    with pytest.raises(ValueError, match="alpha"):
        calibrate_matrix(d.sum(0), d, alpha)


@pytest.mark.parametrize("decomposition", ["gram", "svd"])
def test_degenerate_inputs_stay_finite(decomposition):
    zeros = torch.zeros(3, 10, 6)
    out = calibrate_matrix(zeros.sum(0), zeros, 1 / 3, decomposition=decomposition)
    assert torch.isfinite(out).all() and not out.any()
    low_rank = structured(3, 10, 6)[:, :, :1].expand(-1, -1, 6).clone()  # rank-1 merge
    out = calibrate_matrix(low_rank.sum(0), low_rank, 1 / 3, decomposition=decomposition)
    assert torch.isfinite(out).all()
    with_zero_task = structured(3, 10, 6)
    with_zero_task[1] = 0  # a task with zero response everywhere counts as alpha
    out = calibrate_matrix(with_zero_task.sum(0), with_zero_task, 1 / 3, decomposition=decomposition)
    assert torch.isfinite(out).all()
    assert rel(out, reference_svc(with_zero_task.sum(0), with_zero_task, 1 / 3)) < 2e-4


def test_shape_and_target_errors():
    d = structured(2, 6, 4)
    with pytest.raises(ValueError, match="K x"):
        calibrate_matrix(d.sum(0), d[:, :5], 0.5)
    with pytest.raises(ValueError, match="target"):
        calibrate_matrix(d.sum(0), d, 0.5, target=2)
    with pytest.raises(ValueError, match="2-D"):
        calibrate_matrix(d.sum(0).reshape(-1), d, 0.5)


def test_half_precision_input_keeps_dtype():
    d = structured(2, 12, 8).half()
    out = calibrate_matrix(d.float().sum(0).half(), d, 0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_stats_are_consistent_with_calibration():
    d = structured(4, 20, 12, seed=5)
    merged = 0.3 * d.sum(0)
    stats = calibration_stats(merged, d, 0.25)
    assert stats["s"].shape == (12, 4) and stats["gamma"].shape == (12,)
    expected_gamma = 4 / stats["s"].clamp_min(0.25).sum(1)  # FusionBench's form of the same rule
    assert torch.allclose(stats["gamma"], expected_gamma)
    svals = torch.linalg.svdvals(calibrate_matrix(merged, d, 0.25, dtype=torch.float64)).double()
    assert torch.allclose(svals.sort().values, stats["sigma_calibrated"].sort().values, rtol=1e-6)


def vit_b32_shapes():
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return {"model." + k: v.shape for k, v in model.state_dict().items() if not k.startswith("transformer.")}


def test_official_filter_selects_the_49_vit_b32_matrices():
    shapes = vit_b32_shapes()
    assert len(shapes) == 158
    keys = svc_keys(shapes)
    assert len(keys) == 49
    assert "model.visual.proj" in keys
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in keys
    for excluded in ("model.visual.positional_embedding", "model.token_embedding.weight",
                     "model.text_projection", "model.positional_embedding", "model.visual.conv1.weight"):
        assert excluded not in keys
    assert len(select_keys(shapes, "all2d")) == 53  # FusionBench calibrates every 2-D tensor
    assert len(select_keys(shapes, "iso")) == 52    # Iso: embeddings in, text_projection out


def tiny_task_vectors(k_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.visual.proj": (12, 8), "model.visual.transformer.resblocks.0.mlp.c_fc.weight": (16, 12),
              "model.visual.positional_embedding": (5, 12), "model.visual.conv1.weight": (4, 3, 2, 2),
              "model.visual.ln_pre.bias": (12,), "model.text_projection": (8, 8), "model.logit_scale": ()}
    return [TaskVector(vector={k: torch.randn(s, generator=g) for k, s in shapes.items()}) for _ in range(k_tasks)]


def test_svc_touches_exactly_the_selected_keys_and_leaves_inputs_alone():
    tvs = tiny_task_vectors()
    merged = 0.3 * sum(tvs)
    before = {k: v.clone() for k, v in merged.vector.items()}
    out = svc(merged, tvs, 1 / 3)
    changed = {k for k in out.vector if not torch.equal(out.vector[k], before[k])}
    assert changed == {"model.visual.proj", "model.visual.transformer.resblocks.0.mlp.c_fc.weight"}
    assert all(torch.equal(merged.vector[k], before[k]) for k in before)  # input not mutated
    key = "model.visual.proj"
    expected = reference_svc(merged.vector[key], [tv.vector[key] for tv in tvs], 1 / 3)
    assert rel(out.vector[key], expected) < 2e-4
    all2d = svc(merged, tvs, 1 / 3, keys="all2d")
    assert not torch.equal(all2d.vector["model.text_projection"], before["model.text_projection"])
    only = svc(merged, tvs, 1 / 3, keys=[key])
    assert torch.equal(only.vector["model.visual.transformer.resblocks.0.mlp.c_fc.weight"],
                       before["model.visual.transformer.resblocks.0.mlp.c_fc.weight"])


def test_svc_rejects_mismatched_inputs():
    tvs = tiny_task_vectors()
    merged = sum(tvs)
    with pytest.raises(ValueError, match="only 2-D"):
        svc(merged, tvs, 0.5, keys=["model.visual.ln_pre.bias"])
    bad = TaskVector(vector={k: v for k, v in tvs[0].vector.items() if k != "model.visual.proj"})
    with pytest.raises(ValueError, match="model.visual.proj"):
        svc(merged, [bad] + tvs[1:], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        svc(merged, tvs, math.nan)


# --- bad and extreme input through the Python API (issue 11) ---------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_naming_the_task(bad):
    d = structured(3, 10, 6)
    merged = 0.3 * d.sum(0)
    word = "NaN" if bad != bad else "inf"
    broken = d.clone()
    broken[2, 4, 1] = bad
    with pytest.raises(ValueError, match=rf"task delta 2 has .*{word}"):
        calibrate_matrix(merged, broken, 0.5)
    with pytest.raises(ValueError, match=rf"task delta 2 has .*{word}"):
        calibration_stats(merged, broken, 0.5)
    broken_merged = merged.clone()
    broken_merged[0, 0] = bad
    with pytest.raises(ValueError, match=rf"merged matrix has .*{word}"):
        calibrate_matrix(broken_merged, d, 0.5, decomposition="svd")


def test_svc_names_the_task_and_key_of_non_finite_input():
    tvs = tiny_task_vectors()
    merged = 0.3 * sum(tvs)
    key = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    tvs[1].vector[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"task vector 1 key '{key}' has 1 NaN"):
        svc(merged, tvs, 1 / 3)
    tvs = tiny_task_vectors()
    merged.vector["model.visual.proj"][2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"merged matrix key 'model.visual.proj' has 0 NaN and 1 inf"):
        svc(merged, tvs, 1 / 3)


@pytest.mark.parametrize("decomposition", ["gram", "svd"])
@pytest.mark.parametrize("peak", [1e25, 1e30, 1e36, 3e38])
def test_huge_finite_float32_input_stays_finite_and_exact(decomposition, peak):
    # Identical tasks under TA: s = 0.3 K for every rank, so SVC returns the task itself.
    k_tasks = 4
    base = structured(1, 24, 16, seed=2)[0]
    task = base * (peak / (0.3 * k_tasks) / base.abs().max())  # merged entries up to `peak`
    deltas = task.expand(k_tasks, -1, -1).clone()
    merged = (0.3 * k_tasks) * task  # = 0.3 x the sum, which would overflow on the way at 3e38
    assert torch.isfinite(merged).all() and merged.dtype == torch.float32
    out = calibrate_matrix(merged, deltas, 1 / k_tasks, decomposition=decomposition)
    assert torch.isfinite(out).all()
    assert rel(out, task) < 1e-4
    # General tasks (one of them with zero response) at the same scale: the unscaled result, rescaled.
    small = structured(3, 24, 16, seed=4)
    small[1] = 0
    factor = peak / max(small.abs().max(), (0.3 * small.sum(0)).abs().max())
    big = (small.double() * float(factor)).float()
    expected = reference_svc(0.3 * big.double().sum(0), big.double(), 1 / 3)
    got = calibrate_matrix((0.3 * big.double().sum(0)).float(), big, 1 / 3, decomposition=decomposition)
    assert torch.isfinite(got).all() and rel(got, expected) < 2e-4


@pytest.mark.parametrize("decomposition", ["gram", "svd"])
def test_scaling_matches_the_unscaled_computation(decomposition):
    d = structured(5, 30, 20, seed=9)
    merged = 0.3 * d.sum(0)
    plain = calibrate_matrix(merged, d, 0.2, decomposition=decomposition)
    for factor in (2.0 ** 40, 2.0 ** 90):  # exact in float32, large enough to be scaled internally
        scaled = calibrate_matrix(merged * factor, d * factor, 0.2, decomposition=decomposition)
        assert rel(scaled / factor, plain) < 1e-6
    moderate = 1e12  # not a power of two; the float64 reference has no overflow at this size
    expected = reference_svc(merged.double() * moderate, d.double() * moderate, 0.2)
    assert rel(calibrate_matrix(merged * moderate, d * moderate, 0.2, decomposition=decomposition), expected) < 2e-4
    stats, big_stats = calibration_stats(merged, d, 0.2), calibration_stats(merged * 2.0 ** 90, d * 2.0 ** 90, 0.2)
    assert torch.allclose(big_stats["sigma"] / 2.0 ** 90, stats["sigma"], rtol=1e-9)
    assert torch.allclose(big_stats["gamma"], stats["gamma"], rtol=1e-9)


def test_result_beyond_the_dtype_range_is_a_clear_error():
    # Disjoint tasks are amplified by 1/eta > 1: near the float32 maximum that cannot be stored.
    k_tasks = 4
    deltas = torch.zeros(k_tasks, 8, 8)
    for i in range(k_tasks):
        deltas[i, 2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.randn(2, 2, generator=torch.Generator().manual_seed(i))
    deltas = (deltas.double() * (2e38 / deltas.abs().max().item())).float()
    merged = deltas.sum(0)  # lambda = 1: eta = (1 + 3 / 8) / 4, so x 2.9 on entries up to 2e38
    with pytest.raises(ValueError, match="exceeds the range of torch.float32"):
        calibrate_matrix(merged, deltas, 0.125)
