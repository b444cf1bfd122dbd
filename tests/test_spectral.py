"""The Gram route (decomposition="gram"; the default of TSV-M and STAR) of TSV-M, Iso-C, Iso-CTS and STAR against
the plain-SVD route and independent float64 references (tests/spectral_reference.py), on
synthetic task vectors and the demo-micro zoo, at K = 8, 14 and 20, including degenerate
input; and the shared decompositions of src/linalg.py on both of their branches (scipy
LAPACK on CPU, torch as on CUDA)."""
from types import SimpleNamespace

import pytest
import torch

import merge_func
from merge_func import get_merge_method, iso_cts_dims, tsvm_rank
from src import linalg
from src.linalg import KEY_FILTERS, eigh_desc, gram_polar, gram_svd, projected_svd
from src.task_vectors import TaskVector
from tests import spectral_reference as ref

METHODS = ["TSV-M", "Iso-C", "Iso-CTS", "STAR"]
OPTIONS = {"TSV-M": {"tsvm_keys": "tsv"}}  # the TSV repository's filter: the positional embedding too
TOL = 1e-4  # max |a - b| / max |b| per key

SHAPES = {
    "model.visual.transformer.resblocks.0.mlp.c_fc.weight": (96, 40),
    "model.visual.transformer.resblocks.0.mlp.c_proj.weight": (40, 96),
    "model.visual.transformer.resblocks.0.attn.out_proj.weight": (40, 40),
    "model.visual.positional_embedding": (50, 768),
    "model.visual.conv1.weight": (40, 3, 4, 4),
    "model.visual.ln_pre.bias": (40,),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    diff = float((a.double() - b.double()).abs().max())
    return diff / scale if scale > 0 else diff


def run(name, tvs, decomposition="gram", **options):
    config = SimpleNamespace(decomposition=decomposition, **{**OPTIONS.get(name, {}), **options})
    return get_merge_method(name)(None, tvs, config).vector


def decomposed(name, key, shape) -> bool:
    keys = {"TSV-M": KEY_FILTERS["tsv"], "Iso-C": KEY_FILTERS["iso"], "Iso-CTS": KEY_FILTERS["iso"]}
    return keys[name](key, shape) if name in keys else len(shape) >= 2


def reference(name, tvs, key):
    """float64 reference of one key, or None where the method takes the plain mean."""
    d = torch.stack([tv.vector[key].double() for tv in tvs])
    return ref.merge(name, d) if decomposed(name, key, d.shape[1:]) else None


def synthetic(k_tasks, seed=0, shapes=SHAPES, noise=0.3):
    """Shared rank-4 part + task rank-6 part + dense noise (a decaying spectrum with a near-continuous tail)."""
    g = torch.Generator().manual_seed(seed)

    def low_rank(shape, rank):
        m, n = shape[0], int(torch.tensor(shape[1:]).prod())
        return (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank).reshape(shape)

    shared = {k: low_rank(s, 4) for k, s in shapes.items() if len(s) >= 2}
    return [TaskVector(vector={k: 1e-3 * ((shared[k] + low_rank(s, 6) + noise * torch.randn(s, generator=g))
                                          if len(s) >= 2 else torch.randn(s, generator=g)) for k, s in shapes.items()})
            for _ in range(k_tasks)]


def check_parity(name, tvs, against_plain=True):
    """Every output key within TOL of the float64 reference and no further from it than the
    plain float32 route (or 1e-6); within TOL of the plain route too, unless the plain route is
    the one further from float64 (cuts inside near-ties, ill-conditioned polar factors)."""
    fast, plain = run(name, tvs), run(name, tvs, "svd")
    assert fast.keys() == plain.keys()
    for key, out in fast.items():
        assert out.dtype == plain[key].dtype and out.shape == plain[key].shape, key
        expected = reference(name, tvs, key)
        if expected is None:
            assert torch.equal(out, plain[key]), key
            continue
        err_fast, err_plain = rel(out, expected), rel(plain[key], expected)
        assert err_fast < TOL, (name, key, err_fast)
        assert err_fast <= max(err_plain, 1e-6), (name, key, err_fast, err_plain)
        if against_plain:
            assert rel(out, plain[key]) < TOL or err_fast < err_plain, (name, key, rel(out, plain[key]))


@pytest.mark.parametrize("k_tasks", [8, 14, 20])
@pytest.mark.parametrize("name", METHODS)
def test_gram_route_matches_svd_route_and_float64_reference(name, k_tasks):
    check_parity(name, synthetic(k_tasks, seed=k_tasks))


@pytest.mark.parametrize("name", METHODS)
def test_torch_branch_the_cuda_path_matches_on_cpu(name, monkeypatch):
    monkeypatch.setattr(linalg, "EIGH_BACKEND", "torch")
    check_parity(name, synthetic(8, seed=3))


@pytest.fixture(scope="module")
def demo_tvs(workdir):
    """The demo-micro zoo's three task vectors (ViT-shaped, 32 wide, real fine-tuning)."""
    import clip

    ckpts = clip.find_checkpoints("demo-micro", str(workdir), ["Digits", "Shapes", "Colors"])
    zeroshot = ckpts.load_zeroshot("demo-micro")
    return [TaskVector(zeroshot, ckpts.load_finetuned(t, zeroshot)) for t in ckpts.finetuned]


def rotated(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``t`` with the same singular values in random orthonormal bases (matrices, conv reshaped)."""
    if t.dim() < 2:
        return t.clone()
    m, n = t.shape[0], t[0].numel()
    q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    p = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (q @ t.reshape(m, n).double() @ p.mT).to(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("k_tasks", [3, 8, 14, 20])
@pytest.mark.parametrize("name", METHODS)
def test_demo_micro_zoo(name, k_tasks, demo_tvs):
    """K = 3: the zoo's tasks; K = 8, 14, 20: those and copies with their real spectra in
    independent random bases. (Linear mixtures of the three would put K tasks in a 3-D span:
    TSV-M's concatenated subspaces are then dependent beyond what float64 resolves, the
    identical-task case of docs/performance.md.)"""
    if name == "TSV-M" and k_tasks == 20:
        pytest.skip("TSV-M refuses K = 20 here: visual.proj has k = 16 < K singular vectors")
    g = torch.Generator().manual_seed(k_tasks)
    tvs = [TaskVector(vector={key: v if j < 3 else rotated(v, g) for key, v in demo_tvs[j % 3].vector.items()})
           for j in range(k_tasks)]
    check_parity(name, tvs)


# --- degenerate input --------------------------------------------------------------------

SMALL = {"model.visual.transformer.resblocks.0.mlp.c_fc.weight": (96, 40),
         "model.visual.transformer.resblocks.0.mlp.c_proj.weight": (40, 96),
         "model.visual.positional_embedding": (50, 768)}


@pytest.mark.parametrize("name", METHODS)
def test_a_zero_task_and_an_all_zero_key(name):
    tvs = synthetic(8, seed=1, shapes=SMALL)
    tvs[3] = TaskVector(vector={k: torch.zeros_like(v) for k, v in tvs[3].vector.items()})
    for tv in tvs:  # a key no task changed (as the text side of a real checkpoint)
        tv.vector["model.visual.transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(40, 40)
    check_parity(name, tvs)
    assert not run(name, tvs)["model.visual.transformer.resblocks.1.attn.out_proj.weight"].any()


def exact_rank(shape, rank, seed):
    """A float32 matrix of exactly ``rank`` (small integer factors: the product is exact)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-3, 4, (shape[0], rank), generator=g).float()
    b = torch.randint(-3, 4, (rank, shape[1]), generator=g).float()
    return (a @ b) / 64


@pytest.mark.parametrize("name", METHODS)
def test_tasks_of_lower_rank_than_the_method_keeps(name):
    """Rank-2 tasks, K = 8: TSV-M keeps int(40 / 8) = 5 triplets per task, Iso-C's sum has rank
    16 < 40, Iso-CTS's common subspace (32) exceeds it. The plain route completes the missing
    directions with arbitrary LAPACK vectors, so only the reference's convention is checked."""
    tvs = [TaskVector(vector={k: exact_rank(s, 2, 10 * i + j) for j, (k, s) in enumerate(SMALL.items())})
           for i in range(8)]
    check_parity(name, tvs, against_plain=name == "STAR")


def test_iso_cts_without_a_common_subspace():
    """iso_common_fraction 0: no common subspace where K divides k (40), two directions at k = 50."""
    tvs = synthetic(8, seed=8, shapes=SMALL)
    fast, plain = run("Iso-CTS", tvs, iso_common_fraction=0.0), run("Iso-CTS", tvs, "svd", iso_common_fraction=0.0)
    for key, tv in tvs[0].vector.items():
        dims = iso_cts_dims(min(tv.shape), 8, 0.0)
        assert dims == {40: (0, 5), 50: (2, 6)}[min(tv.shape)]
        d = torch.stack([t.vector[key].double() for t in tvs])
        expected = ref.iso_cts(d, *dims)
        assert rel(fast[key], expected) < TOL and rel(fast[key], expected) <= max(rel(plain[key], expected), 1e-6)


@pytest.mark.parametrize("name", ["Iso-C", "STAR"])
def test_identical_tasks_where_the_methods_are_well_defined(name):
    tvs = synthetic(1, seed=2, shapes=SMALL) * 8
    check_parity(name, tvs)


def test_identical_tasks_tsvm_is_the_rank_r_truncation():
    """K copies of T: the blocks repeat, the polar factor of [U_r ... U_r] on its range is
    [U_r ... U_r] / sqrt(K), so the merge is U_r S_r V_r^T (r = int(k / K)). (The plain route
    completes the repeated blocks with arbitrary null vectors of full weight.)"""
    tvs = synthetic(1, seed=4, shapes=SMALL) * 8
    out = run("TSV-M", tvs)
    for key, t in tvs[0].vector.items():
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        r = tsvm_rank(min(t.shape), 1 / 8)
        assert rel(out[key], (u[:, :r] * s[:r]) @ vh[:r]) < TOL, key
        assert rel(out[key], reference("TSV-M", tvs, key)) < TOL, key


def test_identical_tasks_iso_cts_is_flat_on_the_kept_subspace():
    tvs = synthetic(1, seed=5, shapes=SMALL) * 8
    out = run("Iso-CTS", tvs)
    for key, t in tvs[0].vector.items():
        k = min(t.shape)
        common, per_task = iso_cts_dims(k, 8, 0.8)
        s = torch.linalg.svdvals(t.double())
        level = float(8 * s[:common].sum() + 8 * s[common:common + per_task].sum()) / k  # mean of the k slots
        got = torch.linalg.svdvals(out[key].double())
        kept = common + per_task
        assert torch.allclose(got[:kept], torch.full((kept,), level, dtype=torch.float64), rtol=1e-4), key
        assert float(got[kept:].abs().sum()) < 1e-4 * level, key
        assert rel(out[key], reference("Iso-CTS", tvs, key)) < TOL, key


def test_near_ties_at_the_cut_gram_is_nearer_float64_than_float32_svd():
    """Pure noise: Iso-CTS's cut (64 of 80) and TSV-M's (10 of 80) fall inside runs of nearly
    equal singular values, where float32 itself moves the cut."""
    g = torch.Generator().manual_seed(7)
    key = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    tvs = [TaskVector(vector={key: 1e-3 * torch.randn(200, 80, generator=g)}) for _ in range(8)]
    for name in ("Iso-CTS", "TSV-M"):
        expected = reference(name, tvs, key)
        err_fast, err_plain = rel(run(name, tvs)[key], expected), rel(run(name, tvs, "svd")[key], expected)
        assert err_fast < TOL and err_fast <= err_plain, (name, err_fast, err_plain)


# --- options and the shared decompositions ---------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_decomposition_option(name):
    # Iso-C and Iso-CTS keep the plain SVD by default: their flat spectrum makes SVC afterwards depend on the
    # singular basis, so the Gram route's 1e-5 moved run.sh demo-micro's Iso-C+SVC / Iso-CTS+SVC by 0.2-0.4 points
    default = "svd" if name in ("Iso-C", "Iso-CTS") else "gram"
    assert merge_func.resolve_options(name)["decomposition"] == default
    with pytest.raises(ValueError, match="unknown decomposition 'qr'"):
        run(name, synthetic(2, shapes=SMALL), "qr")


def spectrum_matrix(m, n, seed=0, batch=()):
    """Distinct, decaying singular values 1 .. 1e-3: every triplet is well determined."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    return ((u * torch.logspace(0, -3, k, dtype=torch.float64)) @ v.mT).float()


def truncation(x, r):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :], s


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape,batch", [((70, 30), ()), ((30, 70), ()), ((50, 20), (3,))])
@pytest.mark.parametrize("rank", [1, 5, None])
def test_gram_svd_leading_triplets(shape, batch, rank, backend):
    x = spectrum_matrix(*shape, batch=batch)
    u, s, vh = gram_svd(x, rank, backend=backend)
    k = min(shape)
    r = k if rank is None else rank
    expected, s_ref = truncation(x, r)
    assert u.shape == (*batch, shape[0], r) and vh.shape == (*batch, r, shape[1])
    assert rel(s, s_ref[..., :r]) < 1e-12
    assert rel((u * s.unsqueeze(-2)) @ vh, expected) < 1e-10
    assert rel(u.mT @ u, torch.eye(r, dtype=torch.float64).expand(*batch, r, r)) < 1e-8


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gram_svd_rank_from_the_values_and_zero_vectors_for_missing_directions(backend):
    x = spectrum_matrix(60, 25)
    u, s, vh = gram_svd(x, lambda sigma: int((sigma > 0.1).sum()), backend=backend)
    r = int((s > 0.1).sum())
    assert s.shape == (25,) and u.shape == (60, r) and vh.shape == (r, 25)  # every value, r vectors
    low = exact_rank((60, 25), 3, seed=1)
    u, s, vh = gram_svd(low, 6, backend=backend)
    assert not u[:, 3:].any() and not vh[3:].any()
    assert rel((u * s) @ vh, low) < 1e-10


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
def test_gram_polar_is_the_polar_factor_or_the_partial_isometry(shape, backend):
    x = spectrum_matrix(*shape)
    q, s = gram_polar(x, backend=backend)
    assert rel(q, ref.polar(x.double())) < 1e-9 and rel(s, torch.linalg.svdvals(x.double())) < 1e-12
    low = exact_rank(shape, 4, seed=2)
    q32, _ = gram_polar(low, backend=backend, dtype=torch.float32)
    assert q32.dtype == torch.float32 and rel(q32, ref.polar(low.double())) < 1e-6
    assert torch.linalg.matrix_rank(q32.double(), rtol=1e-4) == 4


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
def test_projected_svd_is_the_svd_of_the_residual(shape, backend):
    x = spectrum_matrix(*shape, seed=1)
    basis = torch.linalg.qr(torch.randn(shape[0], 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    residual = x.double() - basis @ (basis.mT @ x.double())
    u, s, vh = projected_svd(x, basis, 4, backend=backend)
    expected, s_ref = truncation(residual, 4)
    assert rel(s, s_ref[:4]) < 1e-10 and rel((u * s) @ vh, expected) < 1e-9
    assert float((basis.mT @ u).abs().max()) < 1e-10
    inside = (basis[:, :3] @ torch.randn(3, shape[1], dtype=torch.float64)).float()  # no residual: no directions
    u, s, vh = projected_svd(inside, basis, 2, backend=backend)
    assert not u.any() and not vh.any()
    both = torch.stack([x, spectrum_matrix(*shape, seed=2)])  # a batch, as the CUDA path passes the K tasks
    u, s, vh = projected_svd(both, basis, 4, backend=backend)
    for i in range(2):
        ui, si, vhi = projected_svd(both[i], basis, 4, backend=backend)
        assert rel((u[i] * s[i]) @ vh[i], (ui * si) @ vhi) < 1e-10


def test_eigensolver_branches_agree():
    a = spectrum_matrix(40, 40, seed=4).double()
    sym = a @ a.mT
    for top in (1, 7, 40):  # 1: a single eigenvector column (LAPACK returns it with a negative stride)
        w_s, v_s = eigh_desc(sym.clone(), top, backend="auto", overwrite=True)
        w_t, v_t = eigh_desc(sym, top, backend="torch")
        assert rel(w_s, w_t) < 1e-12 and rel((v_s * w_s) @ v_s.mT, (v_t * w_t) @ v_t.mT) < 1e-10
        assert w_s.shape == (top,) and bool((w_s[:-1] >= w_s[1:]).all())


def test_batched_task_loop_the_cuda_path_equals_one_task_at_a_time():
    d = torch.stack([tv.vector["model.visual.transformer.resblocks.0.mlp.c_fc.weight"]
                     for tv in synthetic(5, seed=6, shapes=SMALL)])
    d[2] = 0  # the all-zero task's plain-SVD vectors go to the same slots either way
    outs = []
    for batched in (False, True):
        blocks = d.new_zeros(96, 40, dtype=torch.float64), d.new_zeros(40, dtype=torch.float64), \
            d.new_zeros(40, 40, dtype=torch.float64)
        merge_func._fill_blocks(d, lambda x: gram_svd(x, 8, backend="torch"), 8, *blocks, batched=batched)
        outs.append(blocks)
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("threads,expected", [(1, ["scipy", "scipy"]), (2, ["scipy", "torch"]),
                                              (3, ["torch", "torch"])])
def test_which_eigensolver_runs_at_each_thread_count(threads, expected, monkeypatch):
    """Measured (docs/performance.md): scipy's LAPACK on one BLAS thread for a leading subset at up to 2 torch
    threads and for every eigenpair at 1; torch's solver, which uses the threads, for every eigenpair at 2 and
    for everything beyond 2. Either way the same eigenpairs come out."""
    if linalg._scipy_blas_control() is None:
        pytest.skip("scipy and threadpoolctl are not installed")
    calls, limits = [], []
    real_eigh, control = linalg._scipy_eigh, linalg._scipy_blas_control()
    real_limit = control.limit

    def recording_limit(*args, **kwargs):
        limits.append(kwargs["limits"])
        return real_limit(*args, **kwargs)

    monkeypatch.setattr(linalg, "_scipy_eigh", lambda *a, **k: calls.append("scipy") or real_eigh(*a, **k))
    monkeypatch.setattr(control, "limit", recording_limit)
    a = spectrum_matrix(40, 40, seed=5).double()
    sym = a @ a.mT
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = []
        for top in (4, None):  # a subset (4 of 40 <= SUBSET_SHARE) and every eigenpair
            n = len(calls)
            w, v = eigh_desc(sym, top)
            got.append("scipy" if len(calls) > n else "torch")
            w_t, v_t = eigh_desc(sym, top, backend="torch")
            assert rel(w, w_t) < 1e-12 and rel((v * w) @ v.mT, (v_t * w_t) @ v_t.mT) < 1e-10
    finally:
        torch.set_num_threads(before)
    assert got == expected
    assert set(limits) == ({1} if "scipy" in got else set())  # OpenBLAS on one thread: its spinning workers
    # would slow torch's threads down
