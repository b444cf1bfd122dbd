"""Float64 references for the spectral merges, written independently of merge_func: each
method's definition by plain float64 SVDs of one key's stacked task matrices (K x m x n).

Two conventions decide what the definitions leave open, and match the Gram route:
- directions a matrix does not have (singular values <= RTOL x the largest, far below what
  float32 data can carry but above float64 rounding) get zero vectors, and polar factors are
  partial isometries on the range (an SVD would complete them with arbitrary vectors, which
  TSV-M and Iso-CTS then weight fully);
- an all-zero matrix keeps LAPACK's identity vectors, as the original code feeds them to
  TSV-M's and Iso-CTS's polar factors.
For full-rank input both are the original definitions."""
from __future__ import annotations

import torch
from torch import Tensor

RTOL = 1e-9


def _svd(x: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if x.any():  # an all-zero matrix: LAPACK's identity vectors, as the original
        keep = (s > RTOL * (float(s[0]) if scale is None else scale)).to(x.dtype)
        u, vh = u * keep, vh * keep[:, None]
    return u, s, vh


def polar(x: Tensor) -> Tensor:
    """Partial isometry U V^T on the range of ``x``."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = (s > RTOL * s[0]).to(x.dtype) if x.any() else torch.zeros_like(s)
    return (u * keep) @ vh


def tsv_m(d: Tensor, rank: int) -> Tensor:
    k_tasks, m, n = d.shape
    k = min(m, n)
    u_cat, s_cat, vh_cat = d.new_zeros(m, k), d.new_zeros(k), d.new_zeros(k, n)
    for i in range(k_tasks):
        u, s, vh = _svd(d[i])
        sl = slice(i * rank, (i + 1) * rank)
        u_cat[:, sl], s_cat[sl], vh_cat[sl] = u[:, :rank], s[:rank], vh[:rank]
    return (polar(u_cat) * s_cat) @ polar(vh_cat)


def iso_c(d: Tensor) -> Tensor:
    total = d.sum(0)
    if not total.any():
        return total
    return torch.linalg.svdvals(total).mean() * polar(total)


def iso_cts(d: Tensor, common: int, per_task: int) -> Tensor:
    k_tasks, m, n = d.shape
    k = min(m, n)
    u, s, vh = _svd(d.sum(0))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    u_cat, s_cat, vh_cat = d.new_zeros(m, k), d.new_zeros(k), d.new_zeros(k, n)
    for i in range(k_tasks if per_task else 0):
        residual = d[i] - u_c @ (u_c.mT @ d[i])
        scale = float(torch.linalg.matrix_norm(d[i])) if d[i].any() else None
        ui, si, vhi = _svd(residual, scale)
        sl = slice(i * per_task, (i + 1) * per_task)
        u_cat[:, sl], s_cat[sl], vh_cat[sl] = ui[:, :per_task], si[:per_task], vhi[:per_task]
    base = k_tasks * per_task
    u_cat[:, base:base + common], s_cat[base:base + common], vh_cat[base:base + common] = u_c, s_c, vh_c
    return (polar(u_cat) * s_cat.mean()) @ polar(vh_cat)


def star(d: Tensor, eta: float = 40.0) -> Tensor:
    out = torch.zeros_like(d[0])
    for t in d:
        u, s, vh = torch.linalg.svd(t.reshape(t.shape[0], -1), full_matrices=False)
        total = s.sum()
        if total <= 1e-12:
            continue
        r = int((s.cumsum(0) / total >= eta / 100).nonzero()[0]) + 1
        out += ((u[:, :r] * (s[:r] * total / s[:r].sum())) @ vh[:r]).reshape(t.shape)
    return out / d.shape[0]


def merge(name: str, d: Tensor, **options) -> Tensor:
    """Reference of method ``name`` on one key's stacked float64 task tensors (K x m x ...; a
    conv weight is reshaped to out x rest), with the sizes of merge_func (tested elsewhere)."""
    from merge_func import iso_cts_dims, tsvm_rank

    k_tasks, k = d.shape[0], min(d.shape[1], d[0, 0].numel())
    if name == "TSV-M":
        return tsv_m(d, tsvm_rank(k, options.get("tsvm_fraction") or 1 / k_tasks))
    if name == "Iso-C":
        return iso_c(d)
    if name == "Iso-CTS":
        return iso_cts(d, *iso_cts_dims(k, k_tasks, options.get("iso_common_fraction", 0.8)))
    if name == "STAR":
        return star(d, options.get("star_eta", 40.0))
    raise ValueError(f"no reference for {name!r}")
