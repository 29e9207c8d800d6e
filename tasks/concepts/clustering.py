"""Clustering for concept discovery (VTCD, VCC): k-means with an elbow rule, convex NMF, silhouette.

Plain numpy on purpose: the sets clustered here are small (hundreds to a few thousand segments per
layer or head), the results must be identical for a seed on any machine, and each function is short
enough to read next to the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray      # (n,) cluster of each point, 0..k-1
    centroids: np.ndarray   # (k, d)
    inertia: float          # sum of squared distances to the assigned centroid


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0)


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = _sq_dists(x, np.asarray(centres)).min(1)
        total = d.sum()
        centres.append(x[rng.integers(len(x))] if total <= 0 else x[rng.choice(len(x), p=d / total)])
    return np.asarray(centres)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 4, iters: int = 100) -> Clustering:
    """Lloyd's k-means from k-means++ starts; the restart with the lowest inertia wins."""
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means with k={k} needs at least k points; got {len(x)}")
    rng = np.random.default_rng(seed)
    best: Clustering | None = None
    for _ in range(max(restarts, 1)):
        centres = _plus_plus(x, k, rng)
        labels = np.full(len(x), -1)
        for _ in range(iters):
            new = _sq_dists(x, centres).argmin(1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                # an emptied cluster restarts at the point farthest from its centre
                centres[j] = members.mean(0) if len(members) else x[_sq_dists(x, centres).min(1).argmax()]
        inertia = float(_sq_dists(x, centres)[np.arange(len(x)), labels].sum())
        if best is None or inertia < best.inertia:
            best = Clustering(labels.copy(), centres.copy(), inertia)
    return best


def elbow(inertias: list[float]) -> int:
    """Index of the elbow of a decreasing curve: the point farthest below the chord from its first to
    its last point (both axes scaled to [0, 1]); 0 for a curve of fewer than 3 points or a flat one."""
    y = np.asarray(inertias, dtype=np.float64)
    if len(y) < 3 or y[0] - y[-1] <= 1e-12 * max(abs(y[0]), 1):
        return 0
    t = np.linspace(0, 1, len(y))
    s = (y - y[-1]) / (y[0] - y[-1])
    return int(np.argmax((1 - t) - s))


def kmeans_elbow(x: np.ndarray, max_k: int, seed: int = 0, min_k: int = 1) -> tuple[Clustering, list[float]]:
    """k-means for every k in [min_k, max_k] (capped at the number of points); the elbow's k is kept.
    Returns the chosen clustering and the inertia curve (one value per k from min_k)."""
    x = np.asarray(x, dtype=np.float64)
    ks = list(range(max(min_k, 1), min(max_k, len(x)) + 1))
    if not ks:
        raise ValueError(f"cannot cluster {len(x)} points into at least {min_k} concepts")
    fits = [kmeans(x, k, seed) for k in ks]
    curve = [f.inertia for f in fits]
    return fits[elbow(curve)], curve


def convex_nmf(x: np.ndarray, k: int, seed: int = 0, iters: int = 300) -> Clustering:
    """Convex NMF (Ding, Li & Jordan, 2010): X ~ W^T X G^T in row form, centroids are convex
    combinations of the points (so they stay inside the data, like archetypes), assignments the
    argmax of G. Works on mixed-sign features through the positive and negative parts of X X^T.
    Starts from k-means (as the paper does)."""
    x = np.asarray(x, dtype=np.float64)
    start = kmeans(x, k, seed)
    h = np.eye(k)[start.labels]
    g = h + 0.2
    w = g / np.maximum(h.sum(0), 1)[None, :]
    a = x @ x.T
    a_pos, a_neg = (np.abs(a) + a) / 2, (np.abs(a) - a) / 2
    eps = 1e-12
    for _ in range(iters):
        g *= np.sqrt((a_pos @ w + g @ (w.T @ a_neg @ w)) / (a_neg @ w + g @ (w.T @ a_pos @ w) + eps))
        gtg = g.T @ g
        w *= np.sqrt((a_pos @ g + a_neg @ w @ gtg) / (a_neg @ g + a_pos @ w @ gtg + eps))
    centroids = w.T @ x / np.maximum(w.sum(0), eps)[:, None]
    labels = g.argmax(1)
    inertia = float(_sq_dists(x, centroids)[np.arange(len(x)), labels].sum())
    return Clustering(labels, centroids, inertia)


def silhouette_samples(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Silhouette coefficient of every point (Rousseeuw, 1987): (b - a) / max(a, b) with a the mean
    distance to its own cluster and b to the nearest other one; 0 for a point alone in its cluster
    and for everything when there is one cluster (as scikit-learn)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    names = np.unique(labels)
    if len(names) < 2:
        return np.zeros(len(x))
    d = np.sqrt(_sq_dists(x, x))
    member = labels[:, None] == names[None, :]                   # (n, clusters)
    sums, counts = d @ member, member.sum(0)                     # distance sums to each cluster
    own = np.searchsorted(names, labels)
    a = sums[np.arange(len(x)), own] / np.maximum(counts[own] - 1, 1)
    b = np.where(member, np.inf, sums / counts[None, :]).min(1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-300)
    return np.where(counts[own] > 1, s, 0.0)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient over all points."""
    return float(silhouette_samples(x, labels).mean())
