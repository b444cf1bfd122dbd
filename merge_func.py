"""Merge methods: each turns K task vectors into one merged task vector.

A method is one function registered with ``@merge_method``. Its signature is the official
SVC code's ``fn(task_vector_avg, task_vectors, config) -> TaskVector`` once registered;
the function itself takes its options as keyword-only parameters with their defaults,
which reproduce the official SVC runs. Everything the rest of the code needs to know about
a method (accepted spellings, paper, coefficient grid, SVC's default alpha, whether it
merges key by key) is declared in the decorator, with defaults that fit a TA-like method,
so ``@merge_method("MyMerge")`` is enough (docs/adding-a-method.md).

``config`` is any object with attributes (``types.SimpleNamespace(scaling_coef=0.5)``); a
missing or ``None`` attribute takes the declared default. A keyword-only parameter named
``device`` is not an option: it receives the run's compute device (``config.device``).
The returned update already carries the method's own coefficient (``scaling_coef``), so it
is applied with coefficient 1.

Task vectors holding NaN or inf are refused with an error naming the task and the key:
in-memory ones before any work, lazy ones as each tensor is read. Methods walk the
parameters one key at a time and read only that key of each task vector, so lazy task
vectors never load K full models.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from src.linalg import (KEY_FILTERS, check_decomposition, compute_device, gram_polar, gram_svd, polar, projected_svd,
                        svd)
from src.task_vectors import TaskVector, check_same_keys, require_finite

RUNTIME_PARAMETERS = ("device",)  # supplied by the run, not options: never logged, never flags
GRIDS = ("ta", "spectral")  # coefficient-grid families of src.tuning


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about a method; ``@merge_method`` fills it in."""

    name: str
    fn: Callable  # the registered function, official signature
    options: dict[str, object]  # keyword-only parameters -> defaults (None: computed from K, see the docstring)
    aliases: tuple[str, ...] = ()
    paper: str = ""
    url: str = ""
    grid: str = "ta"  # coefficient grid of --scaling_coef auto: "ta" (0.05..1) or "spectral" (0.1..3)
    svc_alpha: float | None = None  # SVC's default floor; None: 1/K, the paper's
    per_key: bool | Callable[[dict], bool] = False  # merged key depends on that key alone (given the options)
    doc: str = field(default="", repr=False)

    def default_alpha(self, num_tasks: int) -> float:
        return 1.0 / num_tasks if self.svc_alpha is None else float(self.svc_alpha)

    def merges_key_by_key(self, options: dict | None = None) -> bool:
        """Whether merging a subset of the keys gives those keys' values of a full merge."""
        if callable(self.per_key):
            return bool(self.per_key({**self.options, **(options or {})}))
        return self.per_key


METHODS: dict[str, MethodInfo] = {}
MERGE_METHODS: dict[str, Callable] = {}  # name -> fn(task_vector_avg, task_vectors, config), what main.py calls
METHOD_OPTIONS: dict[str, dict[str, object]] = {}  # name -> {option: default}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def canonical_name(name: str, strict: bool = True) -> str:
    """The registry name of any accepted spelling: case, spaces, '-' and '_' do not matter and
    declared aliases count (``iso_c`` -> ``Iso-C``, ``TSVM`` -> ``TSV-M``, ``average`` -> ``WA``).
    An unknown name raises KeyError listing the valid ones, or comes back unchanged with
    ``strict=False`` (results tables hold reference rows such as ``zeroshot``)."""
    wanted = _normalise(name)
    for info in METHODS.values():
        if wanted == _normalise(info.name) or wanted in map(_normalise, info.aliases):
            return info.name
    if not strict:
        return name
    raise KeyError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}")


def same_method(a: str, b: str) -> bool:
    """Whether two logged or typed names are the same method (``ISO-C`` = ``Iso-C`` = ``iso_c``;
    names the registry does not know, such as ``zeroshot``, compare by the same spelling rules)."""
    return _normalise(canonical_name(a, strict=False)) == _normalise(canonical_name(b, strict=False))


def method_info(name: str) -> MethodInfo:
    """The registry entry of any accepted spelling (KeyError for an unknown one)."""
    return METHODS[canonical_name(name)]


def get_merge_method(name: str) -> Callable:
    """The registered function of any accepted spelling, e.g. ``get_merge_method("iso_c")``."""
    return method_info(name).fn


def _options(defaults: dict[str, object], config) -> dict[str, object]:
    return {k: (default if getattr(config, k, None) is None else getattr(config, k)) for k, default in defaults.items()}


def resolve_options(name: str, config=None) -> dict[str, object]:
    """The method's options: the config's value where set, else the declared default."""
    return _options(method_info(name).options, config)


def merge_method(name: str, *, aliases: Sequence[str] = (), paper: str = "", url: str = "", grid: str = "ta",
                 svc_alpha: float | None = None, per_key: bool | Callable[[dict], bool] = False):
    """Register ``impl(task_vector_avg, task_vectors, *, options...)`` under ``name``.

    Its keyword-only parameters are the method's options and defaults (each becomes a main.py
    flag). The rest is declared here: ``aliases`` (other accepted names), ``paper``/``url``,
    ``grid`` (the --scaling_coef auto family: "ta" 0.05..1 or "spectral" 0.1..3), ``svc_alpha``
    (SVC's default floor; None = 1/K) and ``per_key`` (True when the merged value of a key
    depends on that key alone, so a plot may merge only the layers it shows; a function of
    the options when that depends on them; False, always safe, by default).
    """
    if grid not in GRIDS:
        raise ValueError(f"merge method {name!r}: grid must be one of {GRIDS}, got {grid!r}")

    def register(impl: Callable) -> Callable:
        params = [p for p in inspect.signature(impl).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        defaults = {p.name: p.default for p in params if p.name not in RUNTIME_PARAMETERS}
        missing = [p.name for p in params if p.default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"merge method {name!r}: options {missing} need a default value")
        runtime = [p.name for p in params if p.name in RUNTIME_PARAMETERS]
        taken = [n for n in [name, *aliases] if canonical_name(n, strict=False) in METHODS]
        if taken:
            raise ValueError(f"merge method {name!r}: the name {taken[0]!r} is already registered")

        @functools.wraps(impl)
        def method(task_vector_avg, task_vectors: Sequence[TaskVector], config=None) -> TaskVector:
            task_vectors = list(task_vectors)
            if not task_vectors:
                raise ValueError(f"{name}: no task vectors to merge")
            for i, tv in enumerate(task_vectors[1:], 1):
                check_same_keys(task_vectors[0].vector, tv.vector, "task vector 0", f"task vector {i}")
            task_vectors = require_finite(task_vectors)  # NaN/inf: an error naming the task and key
            extra = {p: getattr(config, p, None) for p in runtime}
            return impl(task_vector_avg, task_vectors, **_options(defaults, config), **extra)

        method.merge_name = name
        METHODS[name] = MethodInfo(name, method, defaults, tuple(aliases), paper, url, grid, svc_alpha, per_key,
                                   inspect.getdoc(impl) or "")
        MERGE_METHODS[name] = method
        METHOD_OPTIONS[name] = defaults
        return method

    return register


# --- shared helpers ---------------------------------------------------------------

def _stacked(task_vectors: Sequence[TaskVector], key: str) -> Tensor:
    """K x ... float32 stack of one parameter across tasks (the only per-key memory cost),
    filled task by task so that no second copy of the K tensors is ever held."""
    first = task_vectors[0].vector[key]
    out = torch.empty((len(task_vectors), *first.shape), dtype=torch.float32)
    out[0] = first
    for i, tv in enumerate(task_vectors[1:], 1):
        out[i] = tv.vector[key]
    return out


def _summed(task_vectors: Sequence[TaskVector], scale: float) -> TaskVector:
    """``scale`` x the sum of the task vectors, accumulated one task at a time: linear
    methods need one copy of a parameter, not K (a 49408 x 512 token embedding at K = 20
    is 2 GiB)."""
    merged = {}
    for key in task_vectors[0].vector:
        total = task_vectors[0].vector[key].float().clone()
        for tv in task_vectors[1:]:
            total += tv.vector[key]
        merged[key] = total.mul_(scale)
    return TaskVector(vector=merged)


def _per_key(task_vectors: Sequence[TaskVector], fn: Callable[[str, Tensor], Tensor]) -> TaskVector:
    """Merged TaskVector with ``fn(key, stacked deltas)`` for every key."""
    return TaskVector(vector={key: fn(key, _stacked(task_vectors, key)) for key in task_vectors[0].vector})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _key_filter(name: str) -> Callable:
    _check(name in KEY_FILTERS, f"unknown key filter {name!r}; choose one of {sorted(KEY_FILTERS)}")
    return KEY_FILTERS[name]


# --- methods ----------------------------------------------------------------------

@merge_method("WA", aliases=("average", "avg", "weight average"), per_key=True,
              paper="Model soups (Wortsman et al., ICML 2022)", url="https://arxiv.org/abs/2203.05482")
def weight_average(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0) -> TaskVector:
    """Weight averaging (Wortsman et al., "Model soups", ICML 2022): ``scaling_coef`` x the
    mean of the task vectors, on every key. Default coefficient 1."""
    return _summed(task_vectors, scaling_coef / len(task_vectors))


@merge_method("TA", aliases=("task arithmetic", "sum"), per_key=True,
              paper="Task Arithmetic (Ilharco et al., ICLR 2023)", url="https://arxiv.org/abs/2212.04089")
def task_arithmetic(task_vector_avg, task_vectors, *, scaling_coef: float = 0.3) -> TaskVector:
    """Task Arithmetic (Ilharco et al., ICLR 2023): ``scaling_coef`` x the sum of the task
    vectors, on every key. Default 0.3, as the official SVC code and FusionBench."""
    return _summed(task_vectors, scaling_coef)


def _ties_elect_and_merge(trimmed: Tensor, majority: Tensor | None, merge: str) -> Tensor:
    """TIES sign election and disjoint merge over dim 0 of ``trimmed`` (K x d).
    Zero elected signs take ``majority`` (default: the sign of the sum of this tensor's signs)."""
    sign = torch.sign(trimmed.sum(0))
    if majority is None:
        majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)  # sign still 0 selects negatives, as the original
    selected = trimmed * agree
    total = selected.sum(0)
    if merge == "sum":
        return total
    return total / (selected != 0).sum(0).clamp_min(1)


def _ties_threshold(flat: Tensor, ties_k: float) -> Tensor:
    """Per-row magnitude threshold keeping the top ``ties_k`` percent (original TIES
    off-by-one: the (d - int(d k))-th smallest |x| and everything above it)."""
    d = flat.shape[-1]
    kth = d - int(d * ties_k / 100.0)
    return flat.abs().kthvalue(max(kth, 1), dim=-1, keepdim=True).values


@merge_method("TIES", aliases=("ties merging",), per_key=lambda options: options["ties_scope"] == "layer",
              paper="TIES-Merging (Yadav et al., NeurIPS 2023)", url="https://arxiv.org/abs/2306.01708")
def ties_merging(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, ties_k: float = 20.0,
                 ties_merge: str = "mean", ties_scope: str = "layer") -> TaskVector:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim each task vector to its top
    ``ties_k`` % magnitudes, elect a sign per entry, average (``mean``) or add (``sum``)
    the entries that agree with it, times ``scaling_coef``.

    Defaults = official SVC run: per-layer trimming (``ties_scope='layer'``), top 20 %,
    disjoint mean, coefficient 1. FusionBench: ``ties_scope='global'``,
    ``ties_merge='sum'``, ``scaling_coef=0.3``.
    """
    _check(0 < ties_k <= 100, f"ties_k is a percentage in (0, 100], got {ties_k}")
    _check(ties_merge in ("mean", "sum"), f"ties_merge must be 'mean' or 'sum', got {ties_merge!r}")
    _check(ties_scope in ("layer", "global"), f"ties_scope must be 'layer' or 'global', got {ties_scope!r}")
    keys = list(task_vectors[0].vector)
    if ties_scope == "layer":
        def merge_key(key, d):
            flat = d.reshape(d.shape[0], -1)
            trimmed = flat * (flat.abs() >= _ties_threshold(flat, ties_k))
            return scaling_coef * _ties_elect_and_merge(trimmed, None, ties_merge).reshape(d.shape[1:])
        return _per_key(task_vectors, merge_key)

    # Global scope: thresholds and the majority sign are statistics of the whole model,
    # so walk the parameters three times rather than holding K models at once.
    thresholds = []
    for tv in task_vectors:  # pass 1: one task's whole vector at a time
        flat = torch.cat([tv.vector[k].float().reshape(-1) for k in keys])
        thresholds.append(_ties_threshold(flat, ties_k).item())
        del flat
    thr = torch.tensor(thresholds)[:, None]

    def trimmed(key):
        flat = _stacked(task_vectors, key).reshape(len(task_vectors), -1)
        return flat * (flat.abs() >= thr)

    sign_total = sum(torch.sign(trimmed(k).sum(0)).sum() for k in keys)  # pass 2
    majority = torch.sign(torch.as_tensor(sign_total))
    merged = {}
    for key in keys:  # pass 3
        shape = task_vectors[0].vector[key].shape
        merged[key] = scaling_coef * _ties_elect_and_merge(trimmed(key), majority, ties_merge).reshape(shape)
    return TaskVector(vector=merged)


@merge_method("DARE", paper="DARE (Yu et al., ICML 2024)", url="https://arxiv.org/abs/2311.03099")
def dare(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, dare_p: float = 0.8,
         dare_seed: int = 42, dare_merge: str = "mean", dare_rescale: bool = True) -> TaskVector:
    """DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry
    with probability ``dare_p``, rescale survivors by 1/(1 - p), then mean (or sum)
    over tasks, times ``scaling_coef``.

    Defaults = official SVC run: p 0.8, rescale, mean, coefficient 1, masks from a
    generator seeded 42 drawn once per key on the stacked K x ... tensor in key order
    (so results depend on task and key order). FusionBench: p 0.5, ``dare_merge='sum'``,
    ``scaling_coef=0.3`` (its random draws differ).
    """
    _check(0 <= dare_p < 1, f"dare_p must be in [0, 1), got {dare_p}")
    _check(dare_merge in ("mean", "sum"), f"dare_merge must be 'mean' or 'sum', got {dare_merge!r}")
    generator = torch.Generator().manual_seed(int(dare_seed))
    scale = 1.0 / (1.0 - dare_p) if dare_rescale else 1.0

    def merge_key(key, d):
        drop = torch.bernoulli(torch.full_like(d, dare_p), generator=generator)
        kept = d * (1 - drop) * scale
        return scaling_coef * (kept.mean(0) if dare_merge == "mean" else kept.sum(0))

    return _per_key(task_vectors, merge_key)


def _orthogonal_merge(u_blocks: Tensor, s_blocks: Tensor, vh_blocks: Tensor, isotropic: bool,
                      decomposition: str = "svd") -> Tensor:
    """Orthogonalise concatenated singular vectors by their polar factors and rebuild
    ``U_o diag(s) V_o``; ``isotropic`` replaces every s by the mean (Iso-CTS).
    ``gram``: float64 polar factors from k x k Gram matrices (zero or duplicate columns are
    left out instead of being completed by arbitrary vectors); the float32 result."""
    if decomposition == "svd":
        u_o, vh_o = polar(u_blocks), polar(vh_blocks)
        if isotropic:
            s_blocks = torch.full_like(s_blocks, s_blocks.mean().item())
        return (u_o * s_blocks) @ vh_o
    # polar factors have orthonormal columns / rows: float32 suffices once they are formed
    vh_o = gram_polar(vh_blocks, dtype=torch.float32)[0]
    u_o = gram_polar(u_blocks, dtype=torch.float32)[0]
    return u_o.mul_((s_blocks.mean() if isotropic else s_blocks).float()) @ vh_o


def _fill_blocks(d: Tensor, decompose: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], rank: int,
                 u_cat: Tensor, s_cat: Tensor, vh_cat: Tensor, batched: bool | None = None) -> None:
    """Write ``decompose`` (a Gram-route function of a batch of matrices) of each task i of ``d``
    (K x m x n) into slots ``[i * rank, (i + 1) * rank)`` of the concatenated blocks: all K
    in one batched call (default on CUDA), else one task at a time (memory). An all-zero matrix takes
    the plain SVD's leading triplets instead: LAPACK returns identity columns there, and TSV-M
    and Iso-CTS feed those vectors into their polar factors."""
    def put(i: int, u: Tensor, s: Tensor, vh: Tensor) -> None:
        sl = slice(i * rank, (i + 1) * rank)
        u_cat[:, sl], s_cat[sl], vh_cat[sl] = u[:, :rank], s[:rank], vh[:rank]

    zero = [not bool(x.any()) for x in d]
    todo = [i for i, z in enumerate(zero) if not z]
    batched = d.device.type == "cuda" if batched is None else batched
    if batched and todo:
        u, s, vh = decompose(d[todo])
        for j, i in enumerate(todo):
            put(i, u[j], s[j], vh[j])
    for i in [] if batched else todo:
        u, s, vh = decompose(d[i:i + 1])  # a view: no copy of the task's matrix
        put(i, u[0], s[0], vh[0])
    for i in (i for i, z in enumerate(zero) if z):
        put(i, *svd(d[i]))


def tsvm_rank(k: int, fraction: float) -> int:
    """Singular triplets TSV-M keeps per task: ``int(k * fraction)`` (fraction 1/K by
    default), as the original; the K * r slots it fills leave ``k - K * r`` zero (ViT
    768-wide matrices: 756 of 768 used at K = 14, 760 at K = 20)."""
    return int(k * fraction)


@merge_method("TSV-M", aliases=("tsv merge",), grid="spectral", svc_alpha=1.0, per_key=True,
              paper="Task Singular Vectors (Gargiulo et al., CVPR 2025)", url="https://arxiv.org/abs/2412.00081")
def tsv_merge(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, tsvm_fraction: float | None = None,
              tsvm_keys: str = "official", device: str | None = None, decomposition: str = "gram") -> TaskVector:
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors", CVPR 2025): per matrix, keep
    each task's top ``int(k * fraction)`` singular triplets, concatenate them,
    orthogonalise the U and V blocks by their polar factors, rebuild; other keys take
    the mean. Times ``scaling_coef``.

    Defaults = official SVC run: fraction 1/K, matrices chosen by the official filter
    (2-D without ``text_projection``/``embedding``; ``tsvm_keys='tsv'`` is the TSV
    repository's, ``'all2d'`` FusionBench's), coefficient 1 (the TSV paper tunes it on
    validation data in 0.1..3.0). Invariant to task order.

    ``decomposition='gram'`` computes only each task's ``r`` leading triplets (float64 Gram
    matrix, LAPACK subset eigensolver on CPU) and the polar factors from k x k Gram matrices;
    ``'svd'`` is the original's full float32 SVD per task (docs/performance.md).
    """
    check_decomposition(decomposition)
    n_tasks = len(task_vectors)
    fraction = 1.0 / n_tasks if tsvm_fraction is None else float(tsvm_fraction)
    _check(0 < fraction <= 1.0 / n_tasks + 1e-12,
           f"tsvm_fraction must be in (0, 1/K] = (0, {1 / n_tasks:.4f}] so the K blocks fit, got {fraction}")
    is_matrix = _key_filter(tsvm_keys)
    for key, shape in task_vectors[0].shapes().items():  # before any work: r = 0 would merge to zeros
        if is_matrix(key, shape):
            k = min(shape)
            _check(tsvm_rank(k, fraction) > 0,
                   f"TSV-M: {key!r} is {shape[0]} x {shape[1]}, so each of the K = {n_tasks} tasks keeps "
                   f"int(k * {fraction:.4g}) = 0 of its k = {k} singular vectors and the key would merge to "
                   f"zeros. Leave it to the plain mean with a --tsvm_keys filter that excludes it "
                   f"('official' skips embeddings), or "
                   + ("raise --tsvm_fraction." if tsvm_rank(k, 1.0 / n_tasks) else f"merge fewer tasks (at most {k})."))
    dev = compute_device(device)

    def merge_key(key, d):
        if not is_matrix(key, d.shape[1:]):
            return scaling_coef * d.mean(0)
        d = d.to(dev)
        m, n = d.shape[1:]
        k = min(m, n)
        r = tsvm_rank(k, fraction)
        if decomposition == "gram":
            u_cat, s_cat = d.new_zeros(m, k, dtype=torch.float64), d.new_zeros(k, dtype=torch.float64)
            vh_cat = d.new_zeros(k, n, dtype=torch.float64)
            _fill_blocks(d, lambda x: gram_svd(x, r), r, u_cat, s_cat, vh_cat)
            return (scaling_coef * _orthogonal_merge(u_cat, s_cat, vh_cat, False, "gram")).cpu()
        u_cat, s_cat, vh_cat = d.new_zeros(m, k), d.new_zeros(k), d.new_zeros(k, n)
        for i in range(n_tasks):  # unfilled slots stay zero, as in the original
            u, s, vh = svd(d[i])
            u_cat[:, i * r:(i + 1) * r], s_cat[i * r:(i + 1) * r], vh_cat[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
        return (scaling_coef * _orthogonal_merge(u_cat, s_cat, vh_cat, isotropic=False)).cpu()

    return _per_key(task_vectors, merge_key)


@merge_method("Iso-C", grid="spectral", per_key=True,
              paper="Isotropic merging (Marczak et al., ICML 2025)", url="https://arxiv.org/abs/2502.04959")
def iso_c(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, device: str | None = None,
          decomposition: str = "svd") -> TaskVector:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging", ICML 2025):
    per matrix (2-D, not ``text_projection``; embeddings included), the sum of the task
    matrices with every singular value replaced by their mean; other keys take the mean.
    Times ``scaling_coef``: 1 in the official SVC run, 1.5 in FusionBench's SVC config,
    tuned on validation data in the Iso paper.

    ``decomposition='svd'`` (default): a float32 SVD, as the original; ``'gram'`` (faster): mean(sigma) x the
    polar factor U V^T, computed as ``M (M^T M)^(-1/2)`` from the float64 Gram matrix. The default stays the
    SVD because SVC after Iso-C sees a flat spectrum, whose singular basis is arbitrary: the Gram route's
    1e-5 differences moved SVC's result on the demo zoo by 0.2-0.4 points."""
    check_decomposition(decomposition)
    dev = compute_device(device)

    def merge_key(key, d):
        if not KEY_FILTERS["iso"](key, d.shape[1:]):
            return scaling_coef * d.mean(0)
        total = d.sum(0)
        if not total.any():  # e.g. the untouched token embedding: skip a 49408 x 512 SVD
            return total
        if decomposition == "gram":
            q, sigma = gram_polar(total.to(dev), dtype=total.dtype)
            return q.mul_(float(scaling_coef * sigma.mean())).cpu()
        u, s, vh = svd(total.to(dev))
        return (scaling_coef * s.mean() * (u @ vh)).cpu()

    return _per_key(task_vectors, merge_key)


def iso_cts_dims(k: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Common and per-task subspace sizes of Iso-CTS, with the original's int() and
    Python's half-to-even round(): returns (common, per_task)."""
    common = int(k * common_fraction)
    task_total = round((k - common) / n_tasks) * n_tasks
    common = k - task_total
    return common, int((k - common) / n_tasks)


@merge_method("Iso-CTS", grid="spectral", per_key=True,
              paper="Isotropic merging (Marczak et al., ICML 2025)", url="https://arxiv.org/abs/2502.04959")
def iso_cts(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, iso_common_fraction: float = 0.8,
            device: str | None = None, decomposition: str = "svd") -> TaskVector:
    """Iso-CTS (Marczak et al., ICML 2025): per matrix (2-D, not ``text_projection``),
    the top ``common_fraction`` of the summed matrix's singular subspace plus each
    task's top directions outside it, orthogonalised by polar factors, with a flat
    (mean) spectrum; other keys take the mean. Times ``scaling_coef``.

    Defaults = official SVC run: common fraction 0.8, coefficient 1 (FusionBench's SVC
    config uses 1.5; the Iso paper tunes it). Invariant to task order.

    Sizes follow ``iso_cts_dims``. A matrix too narrow for one direction per task
    (e.g. the 50 x 768 positional embedding at K = 20) gets per_task = 0 and keeps the
    whole common subspace, as in the original: that key is then exactly Iso-C.

    ``decomposition='gram'``: the summed matrix's leading ``common`` triplets and each task's
    ``per_task`` leading triplets outside them from float64 Gram matrices (the residual's
    Gram matrix without forming the residual; LAPACK subset eigensolver on CPU), polar
    factors as TSV-M's (faster); ``'svd'`` (default, for the reason given under Iso-C): the original's full
    float32 SVDs.
    """
    check_decomposition(decomposition)
    _check(0 <= iso_common_fraction <= 1, f"iso_common_fraction must be in [0, 1], got {iso_common_fraction}")
    n_tasks = len(task_vectors)
    for key, shape in task_vectors[0].shapes().items():  # before any work
        if KEY_FILTERS["iso"](key, shape):
            common, _ = iso_cts_dims(min(shape), n_tasks, iso_common_fraction)
            _check(common >= 0,
                   f"Iso-CTS: {key!r} ({shape[0]} x {shape[1]}, k = {min(shape)}) with K = {n_tasks} tasks and "
                   f"iso_common_fraction {iso_common_fraction} rounds the task subspaces up past k (common "
                   f"size {common}); use a larger --iso_common_fraction (0.8, the default, never does this).")
    dev = compute_device(device)

    def merge_key(key, d):
        if not KEY_FILTERS["iso"](key, d.shape[1:]):
            return scaling_coef * d.mean(0)
        if not d.any():
            return d.sum(0)
        d = d.to(dev)
        m, n = d.shape[1:]
        k = min(m, n)
        common, per_task = iso_cts_dims(k, n_tasks, iso_common_fraction)
        if decomposition == "gram":
            u_cat, s_cat = d.new_zeros(m, k, dtype=torch.float64), d.new_zeros(k, dtype=torch.float64)
            vh_cat = d.new_zeros(k, n, dtype=torch.float64)
            base = n_tasks * per_task
            u_cat[:, base:base + common], s_cat[base:base + common], vh_cat[base:base + common] = \
                gram_svd(d.sum(0), common)
            if per_task:  # the residual of an all-zero task is all zero: the plain SVD's vectors
                u_c = u_cat[:, base:base + common]
                _fill_blocks(d, lambda x: projected_svd(x, u_c, per_task), per_task, u_cat, s_cat, vh_cat)
            return (scaling_coef * _orthogonal_merge(u_cat, s_cat, vh_cat, True, "gram")).cpu()
        u, s, vh = svd(d.sum(0))
        u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
        u_cat, s_cat, vh_cat = d.new_zeros(m, k), d.new_zeros(k), d.new_zeros(k, n)
        for i in range(n_tasks if per_task else 0):  # per_task = 0: only the common subspace (see above)
            specific = d[i] - u_c @ (u_c.mT @ d[i])  # remove the common subspace
            ui, si, vhi = svd(specific)
            sl = slice(i * per_task, (i + 1) * per_task)
            u_cat[:, sl], s_cat[sl], vh_cat[sl] = ui[:, :per_task], si[:per_task], vhi[:per_task]
        base = n_tasks * per_task
        u_cat[:, base:base + common], s_cat[base:base + common], vh_cat[base:base + common] = u_c, s_c, vh_c
        return (scaling_coef * _orthogonal_merge(u_cat, s_cat, vh_cat, isotropic=True)).cpu()

    return _per_key(task_vectors, merge_key)


@merge_method("STAR", per_key=True,
              paper="STAR (Lee et al., NAACL 2025)", url="https://arxiv.org/abs/2502.10339")
def star(task_vector_avg, task_vectors, *, scaling_coef: float = 1.0, star_eta: float = 40.0,
         device: str | None = None, decomposition: str = "gram") -> TaskVector:
    """STAR (Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL
    2025): per task and matrix (conv weights reshaped to out x rest), keep the fewest top
    singular values holding ``star_eta`` % of the nuclear norm, rescale them so the
    nuclear norm is preserved, rebuild; then the mean over tasks, times ``scaling_coef``.
    1-D/0-D keys take the plain mean. Defaults = official SVC run: eta 40, coefficient 1.

    ``decomposition='gram'``: every singular value but only the kept vectors, from the
    float64 Gram matrix on ``device`` (default CUDA when present), and the K truncations
    summed by one GEMM; ``'svd'``: the original's full float32 SVD per task, on the CPU."""
    check_decomposition(decomposition)
    _check(0 < star_eta <= 100, f"star_eta is a percentage in (0, 100], got {star_eta}")
    dev = compute_device(device)

    def cut(sigma: Tensor) -> int:
        """Fewest leading singular values holding star_eta % of the nuclear norm (0: a null matrix)."""
        total = sigma.sum()
        if total <= 1e-12:
            return 0
        hit = (sigma.cumsum(0) / total >= star_eta / 100.0).nonzero()
        return int(hit[0]) + 1 if len(hit) else sigma.numel()  # rounding can leave cumsum[-1] < total

    def merge_gram(d: Tensor) -> Tensor:
        """mean_i U_i,r diag(kept_i) V_i,r^T as one GEMM over the concatenated kept triplets."""
        us, vhs = [], []
        for t in d.to(dev):
            u, s, vh = gram_svd(t.reshape(t.shape[0], -1), cut)
            r = u.shape[-1]
            if r:
                total = s.sum()
                us.append((u * (s[:r] * (total / s[:r].sum()))).to(d.dtype))
                vhs.append(vh.to(d.dtype))
        if not us:
            return d.new_zeros(d.shape[1:])
        return (torch.cat(us, 1) @ torch.cat(vhs, 0)).div_(d.shape[0]).reshape(d.shape[1:]).cpu()

    def truncate(t: Tensor) -> Tensor:
        mat = t.reshape(t.shape[0], -1)
        u, s, vh = svd(mat)
        total = s.sum()
        if total <= 1e-12:
            return torch.zeros_like(t)
        r = int((s.cumsum(0) / total >= star_eta / 100.0).nonzero()[0]) + 1
        kept = s[:r] * (total / s[:r].sum())
        return ((u[:, :r] * kept) @ vh[:r]).reshape(t.shape)

    def merge_key(key, d):
        if d.dim() < 3:  # 0-D / 1-D parameters
            return scaling_coef * d.mean(0)
        if not d.any():
            return d.mean(0)
        if decomposition == "gram":
            return scaling_coef * merge_gram(d)
        return scaling_coef * torch.stack([truncate(t) for t in d]).mean(0)

    return _per_key(task_vectors, merge_key)
