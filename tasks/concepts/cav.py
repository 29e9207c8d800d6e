"""Concept activation vectors (CAVs), (I)TCAV scores and their t-test against random CAVs.

A CAV is the unit normal of a logistic regression separating a concept's pooled activations from a
random set. VCC's random sets are random draws from all of the layer's segment images (so a CAV
points at what sets the concept apart from other segments, not at "being a masked crop"); random
CAVs separate one random set from another. Every CAV is fitted ``repeats`` times against different
random sets; an edge's score is computed once per repeat, and the edge is kept when its scores
exceed those of random CAVs by a one-sided Welch t-test (p <= alpha; optionally Holm- or
Bonferroni-corrected over the edges that one node tests).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field


class CavConfig(BaseModel):
    """CAV fitting for one layer."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(0, description="the block (set by the workflow)")
    repeats: int = Field(8, ge=2, description="random sets per concept (and random CAVs per layer); the "
                                              "t-test compares this many scores")
    random_size: int = Field(50, ge=2, description="segments in each random set (capped by the layer's)")
    l2: float = Field(1e-2, ge=0, description="L2 penalty of the logistic regression (standardised features)")
    steps: int = Field(100, ge=1, description="L-BFGS iterations")
    seed: int = 0


def fit_cav(pos: np.ndarray, neg: np.ndarray, l2: float = 1e-2, steps: int = 100) -> tuple[np.ndarray, float]:
    """Logistic regression of ``pos`` vs ``neg``; returns the unit normal in the raw activation space
    (the standardised weights divided by the standard deviations) and the training accuracy."""
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = float(((xt @ w + b > 0).double() == yt).double().mean())
    normal = w.detach().numpy() / sd
    norm = np.linalg.norm(normal)
    return (normal / norm if norm > 0 else normal), accuracy


def fit_layer_cavs(cfg: CavConfig, ids, pooled, concepts) -> dict:
    """CAVs (concepts, repeats, D) of every kept concept of a layer, each against ``repeats`` random
    sets of the layer's segments, and ``repeats`` random CAVs (random set vs random set)."""
    from interpflow.tasks.concepts.vcc_segments import concat

    ids, x = concat(ids), concat(pooled)
    x = x[np.argsort(ids)]
    ids = np.sort(ids)
    table = concepts["assignments"]
    concept_of = dict(zip(table.column("segment").to_pylist(), table.column("concept").to_pylist()))
    labels = np.asarray([concept_of[int(s)] for s in ids])
    names = [r["concept"] for r in concepts["concepts"].to_pylist() if r["kept"]]
    rng = np.random.default_rng(cfg.seed + 1000 * cfg.layer)
    size = min(cfg.random_size, len(x) // 2)
    random_sets = [rng.choice(len(x), size=size, replace=False) for _ in range(2 * cfg.repeats)]
    cavs = np.zeros((len(names), cfg.repeats, x.shape[1]), np.float32)
    rows = []
    for c, name in enumerate(names):
        pos = x[labels == name]
        for r in range(cfg.repeats):
            cavs[c, r], acc = fit_cav(pos, x[random_sets[r]], cfg.l2, cfg.steps)
            rows.append({"concept": name, "repeat": r, "accuracy": acc})
    random_cavs = np.zeros((cfg.repeats, x.shape[1]), np.float32)
    for r in range(cfg.repeats):
        random_cavs[r], acc = fit_cav(x[random_sets[r]], x[random_sets[cfg.repeats + r]], cfg.l2, cfg.steps)
        rows.append({"concept": "random", "repeat": r, "accuracy": acc})
    table = pa.Table.from_pylist(rows, schema=pa.schema([("concept", pa.string()), ("repeat", pa.int64()),
                                                          ("accuracy", pa.float64())]))
    concept_acc = [r["accuracy"] for r in rows if r["concept"] != "random"]
    return {"cavs": cavs, "random_cavs": random_cavs, "names": {"concepts": names}, "fits": table,
            "metrics": {"concepts": float(len(names)),
                        "cav_accuracy": float(np.mean(concept_acc)) if concept_acc else 0.0,
                        "random_cav_accuracy": float(np.mean([r["accuracy"] for r in rows
                                                              if r["concept"] == "random"]))}}


def tcav_scores(grads: np.ndarray, cavs: np.ndarray) -> np.ndarray:
    """The share of examples whose directional derivative along each CAV is positive.

    ``grads`` (n, D); ``cavs`` (..., D) -> scores (...)."""
    if len(grads) == 0:
        return np.full(cavs.shape[:-1], np.nan)
    return (np.einsum("nd,...d->...n", grads, cavs) > 0).mean(-1)


def edge_test(scores: np.ndarray, random_scores: np.ndarray, alpha: float = 0.05) -> dict:
    """One-sided Welch t-test: are the concept's scores (one per repeat) above the random CAVs'?
    Returns mean scores, p value and whether the edge is kept (p <= alpha). Identical constant samples
    (no variance at all) count as a difference only if their means differ."""
    from scipy import stats

    scores, random_scores = np.asarray(scores, float), np.asarray(random_scores, float)
    mean, rmean = float(scores.mean()), float(random_scores.mean())
    if scores.std() == 0 and random_scores.std() == 0:
        p = 0.0 if mean > rmean else 1.0
    else:
        p = float(stats.ttest_ind(scores, random_scores, equal_var=False, alternative="greater").pvalue)
        if np.isnan(p):
            p = 1.0
    return {"score": mean, "score_std": float(scores.std()), "random_score": rmean, "p": p,
            "significant": bool(p <= alpha)}


class EdgeConfig(BaseModel):
    """The significance test of every edge."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.05, gt=0, lt=1, description="an edge is kept when the one-sided t-test of its "
                                                       "scores against random CAVs' gives p <= alpha (after "
                                                       "the correction)")
    correction: Literal["none", "holm", "bonferroni"] = Field("none", description=(
        "multiple-comparison correction over the edges one node tests (one layer pair, or the class edges): "
        "none (the paper's plain p <= alpha: of ~36 edges a pair, about 2 pass by chance alone), holm "
        "(family-wise error <= alpha; on the embedded study it also removes the weak class edges, README) "
        "or bonferroni"))
    lower: int = Field(0, description="the lower block (set by the workflow)")
    upper: int = Field(1, description="the upper block, or -1 for the class (set by the workflow)")
    classes: list[str] = Field(default_factory=list, description="class names, for the class edges (set by "
                                                                 "the workflow from the model's id2label)")


def itcav_edges(cfg: EdgeConfig, grads, concept, cavs, upper) -> dict:
    """Interlayer TCAV edges from every concept of the lower layer to every concept of the upper one:
    the share of u's segment images whose gradient of -||pool(upper) - centroid_u|| with respect to the
    lower layer has a positive dot product with l's CAV, per repeat, t-tested against random CAVs."""
    from interpflow.tasks.concepts.vcc_segments import concat

    grads, target = concat(grads), concat(concept)
    upper_names = [r["concept"] for r in upper["concepts"].to_pylist() if r["kept"]]
    return _edges(cfg, grads, target, upper_names, cavs)


def adjusted_p(p, correction: str) -> np.ndarray:
    """p values adjusted for testing them together: Holm's step-down (each p times the number of
    hypotheses not yet rejected, made monotone), Bonferroni (times their number), or none; capped at 1."""
    p = np.asarray(p, dtype=float)
    n = len(p)
    if correction == "none" or n == 0:
        return p
    if correction == "bonferroni":
        return np.minimum(p * n, 1.0)
    order = np.argsort(p, kind="stable")
    out = np.empty(n)
    out[order] = np.minimum(np.maximum.accumulate(p[order] * (n - np.arange(n))), 1.0)
    return out


def _both_orientations(random_cavs: np.ndarray) -> np.ndarray:
    """The random CAVs and their negatives. Which of the two random sets is the 'positive' one is
    arbitrary, so both orientations belong to the null, whose mean score is then 1/2 by construction;
    with one orientation of 8 random CAVs the null's mean swung from 0.18 to 0.85 between upper
    concepts (scores of consistent gradients are near 0 or 1), and with it which edges passed."""
    return np.concatenate([random_cavs, -random_cavs])


def _edges(cfg: EdgeConfig, grads, target, upper_names, cavs) -> dict:
    lower_names = cavs["names"]["concepts"]
    rows = []
    for u, uname in enumerate(upper_names):
        g = grads[target == u]
        random = tcav_scores(g, _both_orientations(cavs["random_cavs"]))
        for li, lname in enumerate(lower_names):
            test = edge_test(tcav_scores(g, cavs["cavs"][li]), random, cfg.alpha)
            rows.append({"source": lname, "target": uname, "examples": int(len(g)), **test})
    adjusted = adjusted_p([r["p"] for r in rows], cfg.correction)
    for row, p in zip(rows, adjusted):
        row["p_adjusted"], row["significant"] = float(p), bool(p <= cfg.alpha)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("source", pa.string()), ("target", pa.string()), ("examples", pa.int64()), ("score", pa.float64()),
        ("score_std", pa.float64()), ("random_score", pa.float64()), ("p", pa.float64()),
        ("p_adjusted", pa.float64()), ("significant", pa.bool_())]))
    return {"edges": table, "metrics": {"edges": float(len(rows)),
                                        "significant": float(sum(r["significant"] for r in rows))}}


def class_edges(cfg: EdgeConfig, ids, class_grads, images, cavs) -> dict:
    """TCAV edges from the top layer's concepts to each class: gradients of the class logit over the
    images of that class."""
    from interpflow.tasks.concepts.vcc_segments import concat

    ids = concat(ids)
    grads = concat(class_grads)                     # (N, C, D)
    labels = np.asarray(images["labels"])[ids]
    names = list(cfg.classes)
    per_class_grads = np.concatenate([grads[labels == c, c] for c in range(len(names))])
    target = np.concatenate([np.full(int((labels == c).sum()), c) for c in range(len(names))])
    return _edges(cfg, per_class_grads, target, [f"class.{n}" for n in names], cavs)
