"""Is a demo zoo in the regime of real CLIP? The mechanism measurements of issue 14.

- linear probe: accuracy of a logistic regression on the frozen zero-shot image features (train split ->
  test split). Near the fine-tuned accuracy when pretraining already learned features that separate
  the classes and the zero-shot gap is on the text side.
- forgetting: accuracy change of task i under theta_0 + tau_j, j != i (weight disentanglement).
- over-accumulation: per SVC-calibrated matrix, sigma_max(sum_i tau_i) / max_i sigma_max(tau_i);
  about sqrt(K) for unrelated task vectors of equal size, K for identical ones.
- relative norm: ||tau_i|| / ||theta_0|| over the keys of the task vector.
"""
from __future__ import annotations

import statistics
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.svc import svc_keys
from src.task_vectors import TaskVector
from src.tuning import apply_in_place


@torch.no_grad()
def features(encoder: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image embeddings (what the heads see) and labels of a loader."""
    xs, ys = [], []
    for x, y in loader:
        xs.append(F.normalize(encoder(x).float(), dim=-1))
        ys.append(y)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def linear_probe(encoder: torch.nn.Module, train_loader, test_loader) -> float:
    """Test top-1 % of a logistic regression fit on the frozen features of the train split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = features(encoder, train_loader)
    xte, yte = features(encoder, test_loader)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(xtr), ytr)
    return 100.0 * float((clf.predict(scaler.transform(xte)) == yte).mean())


def forgetting(params: dict[str, Tensor], zs: Mapping[str, Tensor], tau: Mapping[str, TaskVector],
               acc: Callable[[str], float]) -> dict:
    """Accuracy change of task i (inner key) under theta_0 + tau_j (outer key), with `params` the
    state dict of the encoder that `acc(task)` evaluates; mean over i != j as `mean`."""
    tasks = list(tau)
    apply_in_place(params, zs, tau[tasks[0]], 0.0)
    base = {t: acc(t) for t in tasks}
    matrix = {}
    for j in tasks:
        apply_in_place(params, zs, tau[j], 1.0)
        matrix[j] = {i: acc(i) - base[i] for i in tasks}
    apply_in_place(params, zs, tau[tasks[0]], 0.0)
    off = [matrix[j][i] for j in tasks for i in tasks if i != j]
    return {"matrix": matrix, "mean": float(np.mean(off)), "zero-shot": base}


def _sigma_max(m: Tensor) -> float:
    return float(torch.linalg.matrix_norm(m.double(), ord=2))


def over_accumulation(tvs: Sequence[TaskVector]) -> dict:
    """sigma_max(sum_i tau_i) / max_i sigma_max(tau_i) for every matrix SVC calibrates, and their median."""
    keys = svc_keys(tvs[0])
    ratios = {}
    for k in keys:
        mats = [tv.vector[k] for tv in tvs]
        ratios[k] = _sigma_max(sum(mats)) / max(_sigma_max(m) for m in mats)
    return {"ratios": ratios, "median": statistics.median(ratios.values()), "sqrt_K": len(tvs) ** 0.5}


def relative_norm(zs: Mapping[str, Tensor], tv: TaskVector) -> float:
    """||tau|| / ||theta_0|| over the parameters fine-tuning changed (the keys where tau is not 0)."""
    keys = [k for k in tv.keys() if tv.vector[k].any()]
    num = sum(float(tv.vector[k].double().pow(2).sum()) for k in keys)
    den = sum(float(zs[k].double().pow(2).sum()) for k in keys)
    return (num / den) ** 0.5
