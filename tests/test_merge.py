"""Merge methods: defaults, hand-checked small cases and the invariants of each method."""
import itertools
from types import SimpleNamespace

import pytest
import torch

import merge_func
from merge_func import MERGE_METHODS, canonical_name, get_merge_method, iso_cts_dims, resolve_options
from src.task_vectors import TaskVector

SHAPES = {
    "model.visual.proj": (12, 8),
    "model.visual.transformer.resblocks.0.attn.in_proj_weight": (18, 6),
    "model.visual.transformer.resblocks.0.mlp.c_proj.weight": (6, 16),
    "model.visual.positional_embedding": (5, 6),
    "model.visual.conv1.weight": (6, 3, 2, 2),
    "model.visual.ln_pre.bias": (6,),
    "model.text_projection": (8, 8),
    "model.token_embedding.weight": (10, 8),
    "model.logit_scale": (),
}


def make_tvs(k_tasks=4, seed=0, zero_text=True):
    g = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(k_tasks):
        vec = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        if zero_text:  # as in real checkpoints: the text side gets no gradient
            vec["model.token_embedding.weight"].zero_()
        tvs.append(TaskVector(vector=vec))
    return tvs


def run(name, tvs, **options):
    return get_merge_method(name)(TaskVector.mean(tvs), tvs, SimpleNamespace(**options))


def stacked(tvs, key):
    return torch.stack([tv.vector[key] for tv in tvs])


def test_registry_names_and_lookup():
    assert list(MERGE_METHODS) == ["WA", "TA", "TIES", "DARE", "TSV-M", "Iso-C", "Iso-CTS", "STAR"]
    for typed, expected in [("ISO-C", "Iso-C"), ("iso_c", "Iso-C"), ("TSVM", "TSV-M"), ("tsv-m", "TSV-M"),
                            ("iso-cts", "Iso-CTS"), ("ta", "TA"), ("Ties", "TIES"), ("average", "WA")]:
        assert canonical_name(typed) == expected
    with pytest.raises(KeyError, match="valid: WA, TA, TIES"):
        get_merge_method("fisher")


def test_missing_or_none_options_take_documented_defaults():
    assert resolve_options("TA", SimpleNamespace()) == {"scaling_coef": 0.3}
    assert resolve_options("TA", SimpleNamespace(scaling_coef=None))["scaling_coef"] == 0.3
    assert resolve_options("dare", SimpleNamespace(dare_p=0.5))["dare_p"] == 0.5
    assert resolve_options("TIES", None) == {"scaling_coef": 1.0, "ties_k": 20.0, "ties_merge": "mean",
                                             "ties_scope": "layer"}


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_methods_do_not_mutate_inputs_and_keep_keys(name):
    tvs = make_tvs()
    before = [{k: v.clone() for k, v in tv.vector.items()} for tv in tvs]
    out = run(name, tvs)
    assert list(out.vector) == list(SHAPES)
    for key, shape in SHAPES.items():
        assert out.vector[key].shape == shape and torch.isfinite(out.vector[key]).all()
    for tv, old in zip(tvs, before):
        assert all(torch.equal(tv.vector[k], old[k]) for k in old)
    assert not out.vector["model.token_embedding.weight"].any()  # zero in, zero out


def test_ta_and_wa():
    tvs = make_tvs()
    for key in SHAPES:
        assert torch.allclose(run("TA", tvs).vector[key], 0.3 * stacked(tvs, key).sum(0))
        assert torch.allclose(run("TA", tvs, scaling_coef=1.0).vector[key], stacked(tvs, key).sum(0))
        assert torch.allclose(run("WA", tvs).vector[key], stacked(tvs, key).mean(0))


def test_ties_layer_wise_by_hand():
    # One key, 3 tasks, 5 entries; ties_k = 40 % -> threshold is the (5 - 2) = 3rd smallest |x|.
    rows = torch.tensor([[5.0, -1.0, 0.5, -4.0, 2.0],
                         [-3.0, 2.0, 0.1, -0.2, 3.0],
                         [1.0, 0.3, -6.0, 0.4, -0.1]])
    tvs = [TaskVector(vector={"w": r.clone()}) for r in rows]
    # trimmed: row0 keeps |x| >= 2 -> [5, 0, 0, -4, 2]; row1 >= 2 -> [-3, 2, 0, 0, 3];
    # row2 >= 0.4 -> [1, 0, -6, 0.4, 0]. Sum: [3, 2, -6, -3.6, 5] -> signs [+, +, -, -, +].
    mean = run("TIES", tvs, ties_k=40).vector["w"]
    assert torch.allclose(mean, torch.tensor([3.0, 2.0, -6.0, -4.0, 2.5]))
    total = run("TIES", tvs, ties_k=40, ties_merge="sum", scaling_coef=0.5).vector["w"]
    assert torch.allclose(total, 0.5 * torch.tensor([6.0, 2.0, -6.0, -4.0, 5.0]))


def test_ties_zero_elected_sign_takes_the_layer_majority():
    rows = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, 1.0, 1.0, -2.0]])
    tvs = [TaskVector(vector={"w": r.clone()}) for r in rows]
    # k = 100 keeps everything; entry 0 sums to 0 -> majority sign of [0, +, +, -] is +.
    out = run("TIES", tvs, ties_k=100).vector["w"]
    assert torch.allclose(out, torch.tensor([1.0, 1.5, 2.0, -1.5]))


def test_ties_keeps_zero_d_and_tiny_keys_and_global_scope_matches_flattened_model():
    tvs = make_tvs(3, seed=4)
    out = run("TIES", tvs)
    scale = stacked(tvs, "model.logit_scale")  # d = 1: every value survives trimming
    sign = torch.sign(scale.sum())
    agree = scale[torch.sign(scale) == sign]
    assert torch.allclose(out.vector["model.logit_scale"], agree.mean())
    # Global scope equals layer scope applied to the whole model flattened into one key.
    flat = [TaskVector(vector={"all": torch.cat([tv.vector[k].reshape(-1) for k in SHAPES])}) for tv in tvs]
    expected = run("TIES", flat, ties_merge="sum",
                   scaling_coef=0.3).vector["all"]
    got = run("TIES", tvs, ties_scope="global", ties_merge="sum", scaling_coef=0.3)
    assert torch.allclose(torch.cat([got.vector[k].reshape(-1) for k in SHAPES]), expected)


def test_dare_p0_is_the_mean_and_rescale_keeps_the_expectation():
    tvs = make_tvs(3, seed=1)
    key = "model.visual.proj"
    assert torch.allclose(run("DARE", tvs, dare_p=0.0).vector[key], stacked(tvs, key).mean(0))
    draws = torch.stack([run("DARE", tvs, dare_seed=s).vector[key] for s in range(400)])
    # mean of 400 draws vs the expectation: std of one draw is |x| sqrt(p / (1 - p)) / sqrt(K)
    err = (draws.mean(0) - stacked(tvs, key).mean(0)).abs().max()
    assert err < 0.35, err
    again = run("DARE", tvs).vector[key]
    assert torch.equal(again, run("DARE", tvs).vector[key])  # seeded
    kept = run("DARE", tvs, dare_merge="sum", dare_rescale=False).vector[key]
    assert not torch.equal(kept, again)
    with pytest.raises(ValueError, match="dare_p"):
        run("DARE", tvs, dare_p=1.0)


def low_rank_orthogonal_tvs(k_tasks=3, m=12, n=9, rank=3, seed=0):
    """Tasks of rank int(k / K) whose column spaces and row spaces are mutually orthogonal."""
    g = torch.Generator().manual_seed(seed)
    q_left = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
    q_right = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    tvs = []
    for i in range(k_tasks):
        u = q_left[:, i * rank:(i + 1) * rank]
        v = q_right[:, i * rank:(i + 1) * rank]
        s = torch.rand(rank, generator=g) + 0.5
        tvs.append(TaskVector(vector={"model.visual.proj": (u * s) @ v.T, "model.visual.ln_pre.bias": torch.randn(n)}))
    return tvs


def test_tsvm_recovers_the_sum_of_orthogonal_low_rank_tasks_and_ignores_order():
    tvs = low_rank_orthogonal_tvs()
    out = run("TSV-M", tvs).vector
    assert torch.allclose(out["model.visual.proj"], stacked(tvs, "model.visual.proj").sum(0), atol=1e-5)
    assert torch.allclose(out["model.visual.ln_pre.bias"], stacked(tvs, "model.visual.ln_pre.bias").mean(0))
    tvs = make_tvs(4, seed=2)
    first = run("TSV-M", tvs)
    for perm in [(3, 2, 1, 0), (1, 0, 3, 2)]:
        other = run("TSV-M", [tvs[i] for i in perm])
        for key in SHAPES:
            assert torch.allclose(first.vector[key], other.vector[key], atol=1e-4), key
    # official filter: embeddings and text_projection are averaged, not TSV-merged
    for key in ("model.visual.positional_embedding", "model.text_projection"):
        assert torch.allclose(first.vector[key], stacked(tvs, key).mean(0))
    with pytest.raises(ValueError, match="tsvm_fraction"):
        run("TSV-M", tvs, tsvm_fraction=0.5)


def test_iso_c_has_a_flat_spectrum_of_the_mean_singular_value():
    tvs = make_tvs(3, seed=3)
    out = run("Iso-C", tvs, scaling_coef=1.5).vector
    for key in ("model.visual.proj", "model.visual.positional_embedding", "model.visual.transformer.resblocks.0.mlp.c_proj.weight"):
        total = stacked(tvs, key).sum(0)
        svals = torch.linalg.svdvals(out[key])
        assert torch.allclose(svals, torch.full_like(svals, 1.5 * torch.linalg.svdvals(total).mean()), rtol=1e-4)
    assert torch.allclose(out["model.text_projection"], 1.5 * stacked(tvs, "model.text_projection").mean(0))


def test_iso_cts_dims_match_the_original_rounding():
    expected = {(768, 8): (616, 19), (512, 8): (408, 13), (50, 8): (42, 1), (768, 14): (614, 11),
                (512, 14): (414, 7), (50, 14): (36, 1), (768, 20): (608, 8), (512, 20): (412, 5), (50, 20): (50, 0)}
    for (k, k_tasks), dims in expected.items():
        assert iso_cts_dims(k, k_tasks, 0.8) == dims


def test_iso_cts_is_flat_and_order_invariant():
    tvs = make_tvs(3, seed=5)
    first = run("Iso-CTS", tvs).vector
    svals = torch.linalg.svdvals(first["model.visual.proj"])
    assert torch.allclose(svals, svals.mean().expand_as(svals), rtol=1e-4)
    for perm in itertools.islice(itertools.permutations(range(3)), 1, 4):
        other = run("Iso-CTS", [tvs[i] for i in perm]).vector
        for key in SHAPES:
            assert torch.allclose(first[key], other[key], atol=1e-4), key


def test_star_preserves_each_tasks_nuclear_norm_and_truncates():
    tvs = make_tvs(1, seed=6)
    out = run("STAR", tvs).vector
    for key in ("model.visual.proj", "model.visual.transformer.resblocks.0.attn.in_proj_weight"):
        before, after = torch.linalg.svdvals(tvs[0].vector[key]), torch.linalg.svdvals(out[key])
        assert torch.allclose(before.sum(), after.sum(), rtol=1e-4)
        r = int((before.cumsum(0) / before.sum() >= 0.4).nonzero()[0]) + 1
        assert (after > 1e-4 * after[0]).sum() == r
    conv = out["model.visual.conv1.weight"]
    assert torch.allclose(torch.linalg.svdvals(conv.reshape(6, -1)).sum(),
                          torch.linalg.svdvals(tvs[0].vector["model.visual.conv1.weight"].reshape(6, -1)).sum(), rtol=1e-4)
    assert torch.equal(out["model.visual.ln_pre.bias"], tvs[0].vector["model.visual.ln_pre.bias"])


def test_bad_options_are_clear_errors():
    tvs = make_tvs(2)
    for name, opts, word in [("TIES", {"ties_k": 0}, "ties_k"), ("TIES", {"ties_merge": "max"}, "ties_merge"),
                             ("TIES", {"ties_scope": "block"}, "ties_scope"), ("STAR", {"star_eta": 120}, "star_eta"),
                             ("Iso-CTS", {"iso_common_fraction": 1.5}, "iso_common_fraction"),
                             ("TSV-M", {"tsvm_keys": "nope"}, "key filter")]:
        with pytest.raises(ValueError, match=word):
            run(name, tvs, **opts)
    with pytest.raises(ValueError, match="no task vectors"):
        get_merge_method("TA")(None, [], SimpleNamespace())


def test_methods_touch_the_documented_vit_b32_keys():
    """Which ViT-B/32 keys each method treats as matrices (reference-spec section 8.8)."""
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    shapes = {"model." + k: v.shape for k, v in model.state_dict().items() if not k.startswith("transformer.")}
    filters = merge_func.KEY_FILTERS
    assert sum(filters["official"](k, s) for k, s in shapes.items()) == 49  # TSV-M (and SVC)
    iso = {k for k, s in shapes.items() if filters["iso"](k, s)}
    assert len(iso) == 52 and "model.token_embedding.weight" in iso and "model.text_projection" not in iso


# --- bad input through the Python API (issue 11) -------------------------------------

@pytest.mark.parametrize("name", list(MERGE_METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_task_vectors_are_refused_naming_task_and_key(name, bad):
    tvs = make_tvs(3)
    key = "model.visual.transformer.resblocks.0.mlp.c_proj.weight"
    tvs[2].vector[key][1, 3] = bad
    word = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"task vector 2 key '{key}' has .*{word}"):
        run(name, tvs)
    # lazy task vectors (fine-tuned minus pre-trained, read per key) are checked as they are read
    pre = {k: torch.zeros(s) for k, s in SHAPES.items()}
    lazy = [TaskVector(pre, dict(tv.vector)) for tv in tvs]
    with pytest.raises(ValueError, match=rf"task vector 2 key '{key}'"):
        run(name, lazy)


def test_in_memory_non_finite_input_is_refused_before_any_work(monkeypatch):
    def no_work(*args):
        raise AssertionError("an SVD ran before the input was checked")

    monkeypatch.setattr(merge_func, "svd", no_work)
    tvs = make_tvs(3)
    tvs[1].vector["model.logit_scale"].fill_(float("nan"))  # the last key
    for name in ("TSV-M", "Iso-C", "Iso-CTS", "STAR"):
        with pytest.raises(ValueError, match="task vector 1 key 'model.logit_scale' has 1 NaN"):
            run(name, tvs)


def test_tsvm_with_more_tasks_than_rank_is_a_clear_error():
    # k = min(4, 6) = 4 < K = 6: int(k / K) = 0 triplets per task would merge the key to zeros.
    tvs = [TaskVector(vector={"model.visual.proj": torch.randn(4, 6), "model.visual.ln_pre.bias": torch.randn(6)})
           for _ in range(6)]
    with pytest.raises(ValueError, match=r"'model.visual.proj' is 4 x 6.*K = 6.*k = 4.*--tsvm_keys.*at most 4"):
        run("TSV-M", tvs)
    tvs = make_tvs(2)  # a fraction too small for the 12 x 8 projection: int(8 * 0.1) = 0
    with pytest.raises(ValueError, match=r"'model.visual.proj'.*raise --tsvm_fraction"):
        run("TSV-M", tvs, tsvm_fraction=0.1)


@pytest.mark.parametrize("k_tasks", [14, 20])
def test_tsvm_fills_k_tasks_times_int_k_over_k_slots(k_tasks):
    """Reference-spec section 2: r = int(k * (1/K)); the other k - K r slots stay zero."""
    assert merge_func.tsvm_rank(768, 1 / k_tasks) * k_tasks == {14: 756, 20: 760}[k_tasks]
    assert merge_func.tsvm_rank(512, 1 / k_tasks) * k_tasks == {14: 504, 20: 500}[k_tasks]
    g = torch.Generator().manual_seed(k_tasks)
    tvs = [TaskVector(vector={"model.visual.proj": torch.randn(40, 30, generator=g)}) for _ in range(k_tasks)]
    out = run("TSV-M", tvs).vector["model.visual.proj"]
    svals = torch.linalg.svdvals(out)
    assert int((svals > 1e-4 * svals[0]).sum()) == k_tasks * (30 // k_tasks)  # 28 at K = 14, 20 at K = 20


def test_iso_cts_without_room_for_task_subspaces_is_iso_c():
    # k = 5 at K = 8: common 5, per task 0 (like the 50 x 768 positional embedding at K = 20).
    assert iso_cts_dims(5, 8, 0.8) == (5, 0)
    g = torch.Generator().manual_seed(0)
    tvs = [TaskVector(vector={"model.visual.proj": torch.randn(5, 7, generator=g)}) for _ in range(8)]
    cts, iso = run("Iso-CTS", tvs).vector["model.visual.proj"], run("Iso-C", tvs).vector["model.visual.proj"]
    assert torch.allclose(cts, iso, atol=1e-5)


def test_iso_cts_negative_common_subspace_is_a_clear_error():
    # k = 3, K = 2, fraction 0: round(3 / 2) * 2 = 4 task slots > k = 3.
    assert iso_cts_dims(3, 2, 0.0)[0] < 0
    tvs = [TaskVector(vector={"model.visual.proj": torch.randn(3, 5)}) for _ in range(2)]
    with pytest.raises(ValueError, match=r"'model.visual.proj'.*k = 3.*K = 2.*iso_common_fraction"):
        run("Iso-CTS", tvs, iso_common_fraction=0.0)


def test_dare_masks_follow_the_official_global_seed_and_key_order():
    """Official DARE: torch.manual_seed(42), then one bernoulli(p) draw per key on the stacked
    K x ... tensor, in key order; kept entries / (1 - p), mean over tasks."""
    tvs = make_tvs(3, seed=8)
    torch.manual_seed(42)
    expected = {}
    for key in SHAPES:
        d = stacked(tvs, key)
        drop = torch.bernoulli(torch.full_like(d, 0.8))
        expected[key] = (d * (1 - drop) / (1 - 0.8)).mean(0)
    out = run("DARE", tvs).vector
    for key in SHAPES:
        assert torch.allclose(out[key], expected[key], rtol=1e-6, atol=1e-6), key
    swapped = run("DARE", [tvs[1], tvs[0], tvs[2]]).vector  # masks follow task order
    assert not torch.allclose(swapped["model.visual.proj"], out["model.visual.proj"])
