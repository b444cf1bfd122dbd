"""Shared linear algebra for the merge methods and SVC: robust SVD, polar factor,
and the key filters that decide which parameters a method treats as matrices."""
from __future__ import annotations

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
