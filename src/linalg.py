"""Shared linear algebra for the merge methods and SVC: robust SVD, polar factor, the
float64 Gram-matrix decompositions that compute only the part of a spectrum a method uses,
and the key filters that decide which parameters a method treats as matrices."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh``. LAPACK occasionally fails to converge on
    ill-conditioned input; like the official code we retry once on ``matrix + 1e-8 I``
    (rectangular identity, on the matrix's own device)."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        eye = torch.eye(*matrix.shape, dtype=matrix.dtype, device=matrix.device)
        return torch.linalg.svd(matrix + 1e-8 * eye, full_matrices=False)


def polar(matrix: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``matrix = P D Q^T``: the closest matrix
    with orthonormal columns (rows, if wide), used by TSV-M and Iso-CTS."""
    u, _, vh = svd(matrix)
    return u @ vh


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """Device for heavy linear algebra: the one asked for, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- decompositions through the Gram matrix ----------------------------------------
# A float32 thin SVD of an m x n matrix is mostly memory-bound bidiagonalisation. The
# eigendecomposition of the float64 Gram matrix of the shorter side (k x k, k = min(m, n))
# costs one GEMM and a k x k eigensolver, and LAPACK's subset solver (dsyevr) computes only
# the leading eigenvectors. In float64 the squared condition number stays harmless: the
# result is closer to a float64 SVD than a float32 SVD is (docs/performance.md).

DECOMPOSITIONS = ("gram", "svd")

EIGH_BACKEND = "auto"
"""Backend of the Gram route: ``auto`` = on CPU scipy's LAPACK on one BLAS thread (dsyrk Gram
matrices over float64 chunks; dsyevr for a leading subset of at most ``SUBSET_SHARE`` of the
eigenpairs; dsyevd for all of them at one torch thread, torch.linalg.eigh at two) when scipy
and threadpoolctl are importable and torch uses at most ``SCIPY_MAX_THREADS`` threads, torch
otherwise and on CUDA; ``torch`` = torch matmul and torch.linalg.eigh everywhere: the code
that runs on CUDA, which tests run on CPU."""

# Measured on the Gram matrices of ViT shapes (docs/performance.md): dsyevr stays cheaper than
# a full dsyevd up to ~30 % of the eigenpairs (k = 768 and 1024); at one thread scipy's
# OpenBLAS dsyevd is 1.3-1.6x faster than torch's MKL syevd on this AMD CPU, at two MKL's
# (which uses both) is faster than OpenBLAS's held to one; dsyrk builds a Gram matrix in ~2/3
# of a GEMM's time.
SUBSET_SHARE = 0.25
# the most torch threads at which the one-core scipy branch was measured faster (2, the most
# this project's machine has: docs/performance.md); beyond, the torch branch is used, unmeasured
SCIPY_MAX_THREADS = 2

_BLAS_CONTROL: object = None  # threadpoolctl controller for scipy's BLAS (False: unavailable)


def check_decomposition(decomposition: str) -> str:
    """``decomposition`` if it names a route of the spectral methods, else a ValueError."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; use one of {', '.join(DECOMPOSITIONS)}")
    return decomposition


def _scipy_blas_control():
    """scipy's LAPACK runs on its own BLAS (OpenBLAS in the wheels), which ignores
    ``torch.set_num_threads``; without threadpoolctl to hold it to one thread the scipy
    branch is not used. One thread, whatever torch's count: OpenBLAS's idle workers spin
    and take the cores from torch's threads between the calls (with scipy on 2 threads,
    TSV-M's Gram route on ViT-B/32 took 65.7 s at 2 threads against 54.4 s at 1), and
    scipy's wrappers hold the GIL, so the eigensolvers cannot run side by side either."""
    global _BLAS_CONTROL
    if _BLAS_CONTROL is None:
        try:
            import scipy.linalg  # noqa: F401
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROL = ThreadpoolController()
        except ImportError:
            _BLAS_CONTROL = False
    return _BLAS_CONTROL or None


def _one_blas_thread():
    """Context in which scipy's BLAS runs on one thread (see ``_scipy_blas_control``)."""
    return _scipy_blas_control().limit(limits=1, user_api="blas")


def _use_scipy(t: Tensor, backend: str | None) -> bool:
    """The scipy branch: ``auto`` on CPU at up to ``SCIPY_MAX_THREADS`` torch threads. It runs
    on one core; with more threads torch's routines, which use them all, are the better bet."""
    backend = EIGH_BACKEND if backend is None else backend
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use auto or torch")
    return (backend != "torch" and t.device.type == "cpu" and torch.get_num_threads() <= SCIPY_MAX_THREADS
            and _scipy_blas_control() is not None)


def _is_subset(top: int, k: int) -> bool:
    """Few enough of the k eigenpairs for LAPACK's subset solver (dsyevr) to pay."""
    return top <= SUBSET_SHARE * k


def _scipy_eigh(sym: Tensor, top: int, overwrite: bool, descending: bool) -> tuple[Tensor, Tensor] | None:
    """Leading ``top`` eigenpairs of each k x k matrix in ``sym`` (lower triangle) by LAPACK:
    dsyevr for a small subset, dsyevd for most or all of them (None: no convergence).
    ``overwrite``: LAPACK may use a float64 ``sym`` as its workspace (then a failure is an
    error: nothing is left to retry on); ``descending=False`` leaves LAPACK's ascending order."""
    import numpy as np
    import scipy.linalg

    k = sym.shape[-1]
    flat = sym.detach().reshape(-1, k, k).to(torch.float64).numpy()
    subset = {"subset_by_index": [k - top, k - 1], "driver": "evr"} if _is_subset(top, k) else {"driver": "evd"}
    vals, vecs = [], []
    try:
        with _one_blas_thread():
            for a in flat:
                w, v = scipy.linalg.eigh(a, check_finite=False, overwrite_a=overwrite, **subset)
                if descending or top < k:  # copies: torch takes no negative strides
                    w, v = w[::-1][:top].copy(), v[:, ::-1][:, :top].copy()
                vals.append(torch.from_numpy(w))
                vecs.append(torch.from_numpy(v))
                del w, v
    except np.linalg.LinAlgError as err:  # no convergence (finite input: not seen in practice)
        if overwrite:
            raise RuntimeError(f"LAPACK eigensolver did not converge on a {k} x {k} Gram matrix: {err}") from err
        return None  # torch's solver decides
    if len(vecs) == 1:
        return vals[0].reshape(*sym.shape[:-2], top), vecs[0].reshape(*sym.shape[:-2], k, top)
    batch = sym.shape[:-2]
    return torch.stack(vals).reshape(*batch, top), torch.stack(vecs).reshape(*batch, k, top)


def eigh_desc(sym: Tensor, top: int | None = None, *, backend: str | None = None,
              overwrite: bool = False, descending: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenvalues in descending order and their eigenvectors (columns) of the symmetric
    matrices ``sym`` (... x k x k; only the lower triangle is read): all k, or the leading
    ``top``. ``backend``: see ``EIGH_BACKEND`` (its default); ``overwrite``: ``sym`` may be
    destroyed; ``descending=False`` (all k only): any order, saving a reordering copy."""
    k = sym.shape[-1]
    top = k if top is None else max(0, min(int(top), k))
    # scipy (one thread) for a leading subset, which torch cannot compute, and for every
    # eigenpair at one thread; torch's solver, which uses the threads, for all of them at more
    if top and (_is_subset(top, k) or torch.get_num_threads() == 1) and _use_scipy(sym, backend):
        found = _scipy_eigh(sym, top, overwrite and sym.dtype == torch.float64, descending)
        if found is not None:
            return found
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    if descending or top < k:
        evals, evecs = evals.flip(-1), evecs.flip(-1)
    if top < k:
        evals, evecs = evals[..., :top], evecs[..., :top]
    return evals, evecs


# float64 elements per chunk of the long side: on the scipy branch no float64 copy of a whole
# matrix is made (a 3072 x 768 one is 19 MiB), only of 4 MiB slices of it
_CHUNK_ELEMENTS = 1 << 19


def _chunks(x: Tensor, tall: bool):
    """(slice, float64 copy of that slice) along the long side of ``x`` (rows if ``tall``)."""
    long, short = (x.shape[-2], x.shape[-1]) if tall else (x.shape[-1], x.shape[-2])
    step = max(1, _CHUNK_ELEMENTS // max(short, 1))
    for i in range(0, long, step):
        sl = slice(i, min(i + step, long))
        yield sl, (x[..., sl, :] if tall else x[..., :, sl]).double()


def _gram(x: Tensor, backend: str | None = None, tall: bool | None = None, full: bool = False) -> tuple[Tensor, bool]:
    """float64 Gram matrix of ``x`` (... x m x n): ``x^T x`` if ``tall`` (default: m >= n, the
    shorter side) else ``x x^T``; and ``tall``. On the scipy branch by dsyrk (half a GEMM's
    flops) over float64 chunks, which fills the lower triangle only (all the eigensolvers
    read) unless ``full``; else by one torch matmul in float64."""
    tall = x.shape[-2] >= x.shape[-1] if tall is None else tall
    if not (x.numel() and _use_scipy(x, backend)):
        x = x.double()
        return (x.mT @ x if tall else x @ x.mT), tall
    import numpy as np
    from scipy.linalg.blas import dsyrk

    short = x.shape[-1] if tall else x.shape[-2]
    grams = []
    with _one_blas_thread():
        for item in x.reshape(-1, *x.shape[-2:]):
            acc = np.zeros((short, short), order="F")
            for _, c in _chunks(item, tall):  # c.T is Fortran-ordered: dsyrk reads it in place
                acc = dsyrk(1.0, c.numpy().T, beta=1.0, c=acc, trans=0 if tall else 1, lower=1, overwrite_c=1)
            lower = torch.from_numpy(acc)  # the strict upper triangle is still zero
            if full:
                lower = lower + lower.mT
                lower.diagonal().mul_(0.5)
            grams.append(lower)
            del acc
    if len(grams) == 1:
        return grams[0].reshape(*x.shape[:-2], short, short), tall
    return torch.stack(grams).reshape(*x.shape[:-2], short, short), tall


def _apply(x: Tensor, b: Tensor, tall: bool, backend: str | None = None,
           dtype: torch.dtype = torch.float64) -> Tensor:
    """``x @ b`` (``tall``) or ``b @ x`` in float64, returned in ``dtype``; on the scipy branch
    chunk by chunk along x's long side, so that only the result is held whole."""
    if not (x.numel() and _use_scipy(x, backend)):
        x = x.double()
        return (x @ b if tall else b @ x).to(dtype)
    out = torch.empty(*x.shape[:-2], *((x.shape[-2], b.shape[-1]) if tall else (b.shape[-2], x.shape[-1])),
                      dtype=dtype, device=x.device)
    for sl, c in _chunks(x, tall):
        if tall:
            out[..., sl, :] = c @ b
        else:
            out[..., :, sl] = b @ c
    return out


def default_rtol(k: int) -> float:
    """Relative singular value below which the float64 Gram route cannot resolve a direction:
    eigenvalues are accurate to about k * eps64 * lambda_max."""
    return math.sqrt(max(k, 1) * torch.finfo(torch.float64).eps)


def _inverse(sigma: Tensor, tiny: Tensor) -> Tensor:
    return torch.where(tiny, torch.zeros_like(sigma), 1.0 / sigma.where(~tiny, torch.ones_like(sigma)))


def gram_svd(x: Tensor, rank: int | Callable[[Tensor], int] | None = None, *, all_values: bool = False,
             rtol: float | None = None, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of ``x`` (... x m x n; all k = min(m, n) by default)
    from the float64 eigendecomposition of the Gram matrix of its shorter side; the other
    side's vectors are ``x v / sigma``. Returns float64 ``U`` (... x m x r), ``S`` (... x r,
    or all k values with ``all_values``) and ``Vh`` (... x r x n), descending.

    ``rank`` may be a function of the k singular values (a 1-D tensor; 2-D ``x`` only), e.g.
    STAR's nuclear-norm cut: all values are computed, vectors only for the r it returns.
    Singular values <= ``rtol`` x the largest (default ``default_rtol(k)``) get zero vectors
    on both sides: the Gram matrix cannot resolve them, ``x v / sigma`` would be noise, and
    an exactly rank-deficient matrix has no preferred basis there."""
    k = min(x.shape[-2:])
    rtol = default_rtol(k) if rtol is None else rtol
    if callable(rank) and x.dim() != 2:
        raise ValueError("a rank chosen from the singular values needs one matrix, not a batch")
    all_values = all_values or callable(rank)
    gram, tall = _gram(x, backend)
    evals, evecs = eigh_desc(gram, None if all_values or rank is None else int(rank), backend=backend,
                             overwrite=True)
    del gram
    sigma_all = evals.clamp_min(0).sqrt()
    r = max(0, min(rank(sigma_all) if callable(rank) else k if rank is None else int(rank), k))
    sigma, evecs = sigma_all[..., :r], evecs[..., :r]
    tiny = sigma <= sigma_all[..., :1] * rtol if r else sigma.bool()
    inv = _inverse(sigma, tiny)
    if bool(tiny.any()):
        evecs = evecs * (~tiny).unsqueeze(-2)
    if tall:
        u, vh = _apply(x, evecs, True, backend).mul_(inv.unsqueeze(-2)), evecs.mT
    else:
        u, vh = evecs, _apply(x, evecs.mT, False, backend).mul_(inv.unsqueeze(-1))
    return u, (sigma_all if all_values else sigma), vh


def gram_polar(x: Tensor, rtol: float | None = None, *, backend: str | None = None,
               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Polar factor of ``x`` (m x n), in ``dtype``, and its singular values (descending,
    float64), from the eigendecomposition of the float64 Gram matrix of the shorter side:
    ``x (x^T x)^(-1/2)`` (``(x x^T)^(-1/2) x`` if wide), the product taken in float64.
    Eigenvalues <= ``rtol`` x the largest (default k * eps64) are left out, which for a
    rank-deficient ``x`` gives the partial isometry on its range (an SVD fills that null
    space with arbitrary vectors of full weight)."""
    k = min(x.shape[-2:])
    rtol = max(k, 1) * torch.finfo(torch.float64).eps if rtol is None else rtol
    gram, tall = _gram(x, backend)
    evals, evecs = eigh_desc(gram, backend=backend, overwrite=True, descending=False)
    del gram
    keep = evals > evals.amax(-1, keepdim=True) * rtol
    # (x^T x)^(-1/2) = W W^T with W = V diag(lambda^(-1/4)): scaled in place, one product
    quarter = torch.where(keep, evals.where(keep, torch.ones_like(evals)).pow(-0.25), torch.zeros_like(evals))
    evecs.mul_(quarter.unsqueeze(-2))
    inv_sqrt = evecs @ evecs.mT
    del evecs
    sigma = evals.clamp_min(0).sqrt().sort(-1, descending=True).values
    return _apply(x, inv_sqrt, tall, backend, dtype), sigma


def projected_svd(x: Tensor, basis: Tensor, rank: int, *, backend: str | None = None,
                  rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets (float64) of ``(I - B B^T) x`` for a basis ``B``
    (m x c, orthonormal columns, float64) without forming the residual: its Gram matrix is
    ``x^T x - (B^T x)^T (B^T x)`` (tall x) or ``(I - B B^T) x x^T (I - B B^T)`` (wide).
    Directions with sigma <= ``rtol`` (default ``default_rtol(k)``) x ``||x||_F`` are
    treated as zero: a residual that is only rounding noise has no direction of its own."""
    m, n = x.shape[-2:]
    k = min(m, n)
    rtol = default_rtol(k) if rtol is None else rtol
    tall = m >= n
    if tall:
        p = _apply(x, basis.mT, False, backend)  # B^T x
        gram = _gram(x, backend)[0].sub_(_gram(p, backend, tall=True)[0])
    else:
        gram = _gram(x, backend, full=True)[0]
        c = gram @ basis
        gram = gram - c @ basis.mT
        gram = gram - basis @ (basis.mT @ gram)
    evals, evecs = eigh_desc(gram, max(0, min(int(rank), k)), backend=backend, overwrite=True)
    del gram
    sigma = evals.clamp_min(0).sqrt()
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64).unsqueeze(-1)
    tiny = sigma <= rtol * norm
    inv = _inverse(sigma, tiny)
    evecs = evecs * (~tiny).unsqueeze(-2)
    if tall:
        u = _apply(x, evecs, True, backend).sub_(basis @ (p @ evecs)).mul_(inv.unsqueeze(-2))
        return u, sigma, evecs.mT
    u = evecs - basis @ (basis.mT @ evecs)  # already orthogonal to the basis in exact arithmetic
    return u, sigma, _apply(x, u.mT, False, backend).mul_(inv.unsqueeze(-1))


# --- key filters ------------------------------------------------------------------
# A filter takes (key, shape) and says whether the parameter is treated as a matrix.

def official_filter(key: str, shape: torch.Size) -> bool:
    """Official SVC and TSV-M filter: 2-D and the key names neither
    ``text_projection`` nor ``embedding`` (49 matrices on ViT-B/32)."""
    return len(shape) == 2 and "text_projection" not in key and "embedding" not in key


def iso_filter(key: str, shape: torch.Size) -> bool:
    """Iso-C / Iso-CTS filter (also the TSV repository's): 2-D, not ``text_projection``
    (positional and token embeddings are included)."""
    return len(shape) == 2 and "text_projection" not in key


def all2d_filter(key: str, shape: torch.Size) -> bool:
    """FusionBench's filter: every 2-D parameter."""
    return len(shape) == 2


KEY_FILTERS: dict[str, Callable[[str, torch.Size], bool]] = {
    "official": official_filter,
    "iso": iso_filter,
    "tsv": iso_filter,
    "all2d": all2d_filter,
}


def select_keys(
    shapes: Mapping[str, torch.Size],
    keys: str | Iterable[str] | Callable[[str, torch.Size], bool] | None = "official",
) -> list[str]:
    """Keys chosen by ``keys``: a filter name from ``KEY_FILTERS``, a predicate
    ``(key, shape) -> bool``, or an explicit list (checked against ``shapes``)."""
    if keys is None:
        keys = "official"
    if isinstance(keys, str):
        if keys not in KEY_FILTERS:
            raise ValueError(f"unknown key filter {keys!r}; choose one of {sorted(KEY_FILTERS)}")
        keys = KEY_FILTERS[keys]
    if callable(keys):
        return [k for k, shape in shapes.items() if keys(k, shape)]
    chosen = list(keys)
    missing = [k for k in chosen if k not in shapes]
    if missing:
        raise KeyError(f"keys not in the task vector: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    not_2d = [k for k in chosen if len(shapes[k]) != 2]
    if not_2d:
        raise ValueError(f"only 2-D parameters can be calibrated; not 2-D: {not_2d[:5]}")
    return chosen
