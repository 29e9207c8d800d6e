"""Dictionary-quality figures: Hungarian-matched cosine (identifiability) and seed stability."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _unit_rows(d) -> np.ndarray:
    a = d.detach().cpu().double().numpy() if isinstance(d, torch.Tensor) else np.asarray(d, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a (n_atoms, d) dictionary, got shape {a.shape}")
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def matched_cosine(learned, true) -> tuple[float, np.ndarray]:
    """Mean and per-atom cosine between each true atom and its learned match.

    Rows are atoms. The matching is one-to-one and maximises the total *signed* cosine
    (``linear_sum_assignment`` on the cosine matrix): SAE codes are non-negative, so an atom that
    points the opposite way is not a recovery. With more learned than true atoms the extra learned
    atoms stay unmatched; the per-atom array has one entry per true atom (or per learned atom, if
    there are fewer learned atoms), in the order of ``true``'s rows where all are matched.
    """
    a, b = _unit_rows(learned), _unit_rows(true)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dictionaries have different widths: {a.shape[1]} and {b.shape[1]}")
    cos = b @ a.T                                    # (n_true, n_learned)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    per_atom = cos[rows, cols]
    return float(per_atom.mean()), per_atom


def pairwise_stability(dicts: Sequence) -> tuple[float, np.ndarray]:
    """Mean matched cosine over all pairs of dictionaries, and the symmetric (m, m) matrix of it
    (diagonal 1). For pair (i, j), dictionary i's atoms are matched to dictionary j's."""
    m = len(dicts)
    if m < 2:
        raise ValueError("pairwise_stability needs at least two dictionaries")
    mat = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            mat[i, j] = mat[j, i] = matched_cosine(dicts[i], dicts[j])[0]
    return float(mat[np.triu_indices(m, 1)].mean()), mat


def recovery_report(model, x: torch.Tensor, true_dictionary, *, threshold: float = 0.9) -> dict[str, float]:
    """Identifiability figures of a trained SAE on synthetic rows x with a known dictionary:
    matched cosine (mean, min, fraction of true atoms matched above ``threshold``) and the model's
    standard ``metrics(x)`` (mse, fvu, l0, dead_frac, dense_frac)."""
    with torch.no_grad():
        learned = model.dictionary().detach()
    mean, per_atom = matched_cosine(learned, true_dictionary)
    return {"matched_cosine": mean, "min_matched_cosine": float(per_atom.min()),
            "recovered_frac": float((per_atom > threshold).mean()), **model.metrics(x)}
