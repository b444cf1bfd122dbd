"""Singular Value Calibration (Li et al., "When Shared Knowledge Hurts: Spectral
Over-Accumulation in Model Merging", ICML 2026, arXiv 2602.05536).

Per 2-D parameter, with the merged update ``M = U diag(sigma) V^T`` and the raw task
updates ``D_i``::

    a_m = u_r^T M,  a_i = u_r^T D_i
    s_ri = <a_m, a_i> / max(||a_i||^2, 1e-12)
    eta_r = mean_i max(s_ri, alpha)          # the official rule since commit da4d9c2
    sigma'_r = sigma_r / eta_r               # = gamma_r * sigma_r, gamma_r = K / sum_i max(alpha, s_ri)

``M`` already carries the base method's own coefficient (TA's 0.3) and nothing is
scaled afterwards. Defaults reproduce the official code: left singular vectors, all
tasks, the 49 matrices of ViT-B/32 selected by ``linalg.official_filter``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from src.linalg import check_decomposition, compute_device, gram_svd, select_keys, svd
from src.task_vectors import TaskVector, check_finite, check_same_keys, max_abs, task_label

EPS = 1e-12  # the official denominator clamp


def check_alpha(alpha: float) -> float:
    """alpha floors every s_ri; alpha <= 0 lets eta reach 0 and divide by zero."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"SVC alpha must be a number > 0, got {alpha!r}") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"SVC alpha must be finite and > 0 (the paper's default is 1/K), got {alpha}")
    return alpha


def _decompose(m: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``m``, either by LAPACK/cuSOLVER (``svd``) or through a float64
    eigendecomposition of the smaller Gram matrix (``gram``: several times faster
    on CPU for tall or wide matrices; the singular vectors of the longer side are
    recovered as ``M V / sigma``). Returns factors in ``m.dtype``."""
    if check_decomposition(method) == "svd":
        return svd(m)
    # SVC uses every direction, weighted by its sigma: only exact zeros (rtol 1e-13) need zero vectors
    u, sigma, vh = gram_svd(m, rtol=1e-13, backend="torch")  # torch: results as before
    return u.to(m.dtype), sigma.to(m.dtype), vh.to(m.dtype)


def _stack(task_deltas: Tensor | Sequence[Tensor], like: Tensor) -> Tensor:
    if isinstance(task_deltas, Tensor):
        deltas = task_deltas
    else:
        deltas = torch.stack([d.to(like.device, like.dtype) for d in task_deltas])
    if deltas.dim() != 3 or deltas.shape[1:] != like.shape:
        raise ValueError(f"task_deltas must be K x {tuple(like.shape)} to match the merged matrix, "
                         f"got {tuple(deltas.shape)}")
    if deltas.shape[0] == 0:
        raise ValueError("SVC needs at least one task delta")
    return deltas.to(like.device, like.dtype)


def _common_scale(m: Tensor, d: Tensor, key: str | None, labels: Sequence[str] | None) -> float:
    """Refuse NaN/inf in ``m`` or the task deltas ``d`` (naming the key and task), and return
    the power of two that M and the D_i are divided by before decomposing: 1 for every
    realistic input, larger when the values are so big that squares and inner products
    would overflow ``m.dtype`` (beyond finfo.max ** 0.25, about 1e9 in float32). s_ri is
    invariant to a common scale of M and the D_i, and a power of two is exact, so the
    result is the unscaled computation's. One aminmax pass per tensor does both jobs."""
    where = f" key {key!r}" if key is not None else ""
    bound, bound_d = check_finite(m, f"SVC: the merged matrix{where}"), max_abs(d)
    if not math.isfinite(bound_d):  # name the first bad task
        for i in range(d.shape[0]):
            check_finite(d[i], f"SVC: {labels[i] if labels is not None else f'task delta {i}'}{where}")
    bound = max(bound, bound_d)
    if bound <= torch.finfo(m.dtype).max ** 0.25:
        return 1.0
    return 2.0 ** (math.frexp(bound)[1] - 1)  # bound / scale in [1, 2)


def _calibration(merged: Tensor, task_deltas, alpha: float, target: int | None, row_space: bool,
                 dtype: torch.dtype, device, decomposition: str, key: str | None = None,
                 labels: Sequence[str] | None = None):
    """Core shared by calibrate_matrix and calibration_stats. Works in ``dtype`` on ``device``;
    returns U, sigma, Vh, s (K x k), eta (k) and the power-of-two scale that sigma is in
    units of (1 unless the input is huge, see ``_common_scale``)."""
    alpha = check_alpha(alpha)
    if merged.dim() != 2:
        raise ValueError(f"SVC calibrates 2-D matrices, got shape {tuple(merged.shape)}")
    dev = compute_device(device) if device is not None or merged.device.type == "cpu" else merged.device
    m = merged.to(dev, dtype)
    d = _stack(task_deltas, m)
    scale = _common_scale(m, d, key, labels)
    if scale != 1.0:
        m, d = m / scale, d / scale
    if row_space:  # right singular vectors: calibrate the transpose
        m, d = m.mT, d.mT
    if target is not None and not -d.shape[0] <= target < d.shape[0]:
        raise ValueError(f"target task {target} out of range for K = {d.shape[0]}")
    u, sigma, vh = _decompose(m, decomposition)
    # One batched GEMM for all tasks and ranks: row r of proj[i] is a_i = u_r^T D_i.
    proj = torch.matmul(u.mT, d)                                   # K x k x n
    # Row-wise reductions without K x k x n temporaries:
    inner = sigma * torch.einsum("ikn,kn->ik", proj, vh)          # <a_m, a_i>, a_m = sigma_r v_r^T
    # The official clamp at 1e-12, in the scaled units (floored where it would underflow).
    eps = max(EPS / scale / scale, torch.finfo(dtype).tiny) if scale != 1.0 else EPS
    norm2 = torch.linalg.vector_norm(proj, dim=-1).square().clamp_min(eps)  # ||a_i||^2
    s = inner / norm2                                              # K x k
    if target is None:
        eta = s.clamp_min(alpha).mean(0)
    else:  # single-task variant keeps the official positivity gate
        st = s[target]
        eta = torch.where(st > 0, st.clamp_min(alpha), torch.ones_like(st))
    return u, sigma, vh, s, eta, scale


def _calibrate(merged: Tensor, task_deltas, alpha: float, target: int | None, row_space: bool,
               dtype: torch.dtype, device, decomposition: str, key: str | None = None,
               labels: Sequence[str] | None = None) -> Tensor:
    u, sigma, vh, _, eta, scale = _calibration(merged, task_deltas, alpha, target, row_space, dtype, device,
                                               decomposition, key, labels)
    out = (u * (sigma / eta)) @ vh
    if scale != 1.0:
        out = out * scale
    if row_space:
        out = out.mT
    out = out.to(merged.device, merged.dtype)
    if not math.isfinite(max_abs(out)):
        where = f" of key {key!r}" if key is not None else ""
        raise ValueError(f"SVC: the calibrated matrix{where} exceeds the range of {merged.dtype} (its singular "
                         f"values are amplified by up to 1/eta = {float(1 / eta.min()):.3g}); the input is too "
                         "large for this dtype: rescale the task vectors or use a wider dtype")
    return out


def calibrate_matrix(
    merged: Tensor,
    task_deltas: Tensor | Sequence[Tensor],
    alpha: float,
    *,
    target: int | None = None,
    row_space: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    decomposition: str = "gram",
) -> Tensor:
    """Calibrate one merged update ``merged`` (m x n) against ``task_deltas`` (K x m x n
    or a sequence of K m x n tensors) and return ``U diag(sigma / eta) V^T`` in the
    input's dtype and device.

    ``target=t`` calibrates against task t alone (official gate: eta = max(s, alpha) if
    s > 0 else 1). ``row_space=True`` uses right singular vectors. Computation runs in
    ``dtype`` (float32 as the official code; float64 for reference numbers) on
    ``device`` (default: CUDA when present, else the input's device).
    ``decomposition='svd'`` uses a LAPACK thin SVD instead of the Gram eigendecomposition.
    NaN/inf input is a ValueError naming the task; huge finite input is scaled by a power
    of two before decomposing, so it cannot overflow.
    """
    return _calibrate(merged, task_deltas, alpha, target, row_space, dtype, device, decomposition)


def calibration_stats(
    merged: Tensor,
    task_deltas: Tensor | Sequence[Tensor],
    alpha: float,
    *,
    target: int | None = None,
    row_space: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = "cpu",
    decomposition: str = "svd",
) -> dict[str, Tensor]:
    """The quantities behind SVC, for analysis and plots (CPU tensors): ``sigma`` (k,),
    ``s`` (k, K) the projection coefficients, ``gamma`` (k,) = 1 / eta, and
    ``sigma_calibrated`` (k,)."""
    _, sigma, _, s, eta, scale = _calibration(merged, task_deltas, alpha, target, row_space, dtype, device,
                                              decomposition)
    sigma = sigma * scale
    return {"sigma": sigma.cpu(), "s": s.mT.cpu(), "gamma": (1.0 / eta).cpu(), "sigma_calibrated": (sigma / eta).cpu()}


def svc_keys(shapes, keys: str | Iterable[str] | Callable | None = "official") -> list[str]:
    """Parameters SVC calibrates. ``shapes`` maps keys to shapes (or is a TaskVector /
    state dict); ``keys`` is a filter name (``official``: 2-D without
    ``text_projection``/``embedding``; ``all2d``: FusionBench), a predicate, or a list."""
    if isinstance(shapes, TaskVector):
        shapes = shapes.shapes()
    elif not all(isinstance(v, torch.Size) for v in shapes.values()):
        shapes = {k: v.shape for k, v in shapes.items()}
    return select_keys(shapes, keys)


def svc(
    merged_tv: TaskVector,
    task_vectors: Sequence[TaskVector],
    alpha: float,
    *,
    target: int | None = None,
    row_space: bool = False,
    keys: str | Iterable[str] | Callable | None = "official",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    decomposition: str = "gram",
) -> TaskVector:
    """Apply SVC to every selected matrix of ``merged_tv`` using the raw task vectors
    (not the trimmed/dropped ones); other keys are returned unchanged. Reads one
    parameter of each task vector at a time, so lazy task vectors stay lazy."""
    check_alpha(alpha)
    task_vectors = list(task_vectors)
    if not task_vectors:
        raise ValueError("SVC needs the task vectors the merge was made from")
    for i, tv in enumerate(task_vectors):
        check_same_keys(merged_tv.vector, tv.vector, "the merged task vector", f"task vector {i}")
    chosen = set(svc_keys(merged_tv, keys))
    labels = [task_label(tv, i) for i, tv in enumerate(task_vectors)]
    out = {}
    for key, value in merged_tv.vector.items():
        if key in chosen:  # NaN/inf are refused per key, in the one pass that also sizes the scale
            deltas = torch.stack([tv.vector[key].to(value.device, torch.float32) for tv in task_vectors])
            value = _calibrate(value, deltas, alpha, target, row_space, dtype, device, decomposition, key, labels)
        out[key] = value
    return TaskVector(vector=out)
