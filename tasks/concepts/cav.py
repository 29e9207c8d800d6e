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

from interpflow.tasks.sae.vectors import vector_card
from interpflow.tasks.types import Seed


class CavConfig(BaseModel):
    """CAV fitting for one layer."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(0, description="the block (set by the workflow)")
    repeats: int = Field(8, ge=2, description="random sets per concept (and random CAVs per layer); the "
                                              "t-test compares this many scores")
    random_size: int = Field(50, ge=2, description="segments in each random set (capped by the layer's)")
    l2: float = Field(1e-2, ge=0, description="L2 penalty of the logistic regression (standardised features)")
    steps: int = Field(100, ge=1, description="L-BFGS iterations")
    seed: Seed = 0


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
    # each concept's direction (mean of its repeats' unit CAVs) as an open vectors file and its card
    site = f"blocks.{cfg.layer}.resid_post"
    directions = {name: torch.from_numpy(cavs[c].mean(0)) for c, name in enumerate(names)}
    card = vector_card(directions, kind="cav", name=f"layer {cfg.layer}", sites={n: site for n in names},
                       fitted={"method": "L2-regularised logistic regression on standardised features, concept "
                                         "segments vs random segments; mean of the repeats' unit normals",
                               **cfg.model_dump(mode="json")}) if names else {}
    return {"cavs": cavs, "random_cavs": random_cavs, "names": {"concepts": names}, "fits": table,
            **({"directions": directions, "card": card} if names else {}),
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
    within: bool = Field(True, description=(
        "test an ITCAV edge l -> u only on u's segments that contain a segment of l one block down (the "
        "top-down segmentation's parent links): an edge claims that u is built from l. false: all of u's "
        "segments (the paper's form; there a wheel direction 'reached' roofs, which hold no wheels, README)"))
    min_share: float = Field(0.1, ge=0, le=1, description=(
        "with within: an edge is tested only when l lies inside at least this share of u's segments (and in "
        "at least 3); rarer pairs are reported untested (p = 1)"))
    class_test: Literal["ablation", "tcav", "both"] = Field("ablation", description=(
        "what makes a class edge significant: 'ablation' (default: mean-filling the concept's segments in "
        "the class's images lowers the class logit more than mean-filling the same shape elsewhere, a paired "
        "t-test; TCAV is still computed and reported), 'tcav' (the paper's: the TCAV score beats random "
        "CAVs; it measures sensitivity, not use, README) or 'both'"))
    min_effect: float = Field(0.01, ge=0, description=(
        "ablation class edges also need the mean extra drop to reach this share of the class's mean centred "
        "logit on the intact images: a t-test alone passes any consistent nudge (on the embedded study, "
        "removing textures moved a saturated house logit by 0.0015 of ~6, p = 0.002; removing the house "
        "concept by 0.7-5.3)"))
    lower: int = Field(0, description="the lower block (set by the workflow)")
    upper: int = Field(1, description="the upper block, or -1 for the class (set by the workflow)")
    classes: list[str] = Field(default_factory=list, description="class names, for the class edges (set by "
                                                                 "the workflow from the model's id2label)")


def itcav_edges(cfg: EdgeConfig, grads, concept, cavs, upper, segment=None, lower_segments=None,
                lower_concepts=None) -> dict:
    """Interlayer TCAV edges from every concept of the lower layer to every concept of the upper one:
    the share of u's segment images whose gradient of u's objective with respect to the lower layer has
    a positive dot product with l's CAV, per repeat, t-tested against random CAVs. With ``cfg.within``,
    over the segments of u that contain a segment of l (``segment``: the upper segment of each gradient
    row; ``lower_segments`` / ``lower_concepts``: the lower layer's segments (with their parents) and
    concepts)."""
    from interpflow.tasks.concepts.vcc_segments import concat

    grads, target = concat(grads), concat(concept)
    upper_names = [r["concept"] for r in upper["concepts"].to_pylist() if r["kept"]]
    contains = None
    if cfg.within:
        if segment is None or lower_segments is None or lower_concepts is None:
            raise ValueError("edges.within needs the upper segment of each gradient row and the lower layer's "
                             "segments and concepts")
        contains = _contains(concat(segment), lower_segments, lower_concepts, cavs["names"]["concepts"])
    return _edge_table(cfg, _edges(cfg, grads, target, upper_names, cavs, contains))


def _contains(upper_segments: np.ndarray, lower_segments, lower_concepts, lower_names: list[str]) -> np.ndarray:
    """(rows, lower concepts): does the upper segment of each row contain a segment of each lower concept?"""
    table = lower_concepts["assignments"]
    concept_of = dict(zip(table.column("segment").to_pylist(), table.column("concept").to_pylist()))
    index = {name: i for i, name in enumerate(lower_names)}
    parents = lower_segments["segments"]
    children: dict[int, set[int]] = {}
    for s, parent in zip(parents.column("segment").to_pylist(), parents.column("parent").to_pylist()):
        if concept_of.get(s) in index:
            children.setdefault(int(parent), set()).add(index[concept_of[s]])
    out = np.zeros((len(upper_segments), len(lower_names)), bool)
    for row, s in enumerate(upper_segments):
        out[row, sorted(children.get(int(s), ()))] = True
    return out


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


EDGE_SCHEMA = pa.schema([
    ("source", pa.string()), ("target", pa.string()), ("test", pa.string()), ("examples", pa.int64()),
    ("score", pa.float64()), ("score_std", pa.float64()), ("random_score", pa.float64()), ("tcav_p", pa.float64()),
    ("effect", pa.float64()), ("effect_p", pa.float64()), ("p", pa.float64()), ("p_adjusted", pa.float64()),
    ("significant", pa.bool_())])
"""Every edge table (interlayer and class): ``score``/``random_score``/``tcav_p`` are the (I)TCAV test's,
``effect``/``effect_p`` the ablation test's (class edges), ``p`` the one that decided (``test``; the larger
of both for 'tcav+ablation'), ``p_adjusted`` it after the correction, ``significant`` = p_adjusted <= alpha
(and, for an ablation, effect >= min_effect x the class's mean logit)."""

_MIN_WITHIN = 3


def _edges(cfg: EdgeConfig, grads, target, upper_names, cavs, contains=None, test: str = "itcav") -> list[dict]:
    lower_names = cavs["names"]["concepts"]
    rows = []
    for u, uname in enumerate(upper_names):
        members = target == u
        for li, lname in enumerate(lower_names):
            rows_u = members & contains[:, li] if contains is not None else members
            n = int(rows_u.sum())
            base = {"source": lname, "target": uname, "test": test, "examples": n, "effect": float("nan"),
                    "effect_p": float("nan")}
            if contains is not None and (n < _MIN_WITHIN or n < cfg.min_share * members.sum()):
                rows.append({**base, "score": float("nan"), "score_std": float("nan"), "random_score": float("nan"),
                             "tcav_p": 1.0, "p": 1.0})
                continue
            g = grads[rows_u]
            tested = edge_test(tcav_scores(g, cavs["cavs"][li]), tcav_scores(g, _both_orientations(cavs["random_cavs"])),
                               cfg.alpha)
            rows.append({**base, "score": tested["score"], "score_std": tested["score_std"],
                         "random_score": tested["random_score"], "tcav_p": tested["p"], "p": tested["p"]})
    return rows


def _edge_table(cfg: EdgeConfig, rows: list[dict]) -> dict:
    adjusted = adjusted_p([r["p"] for r in rows], cfg.correction)
    for row, p in zip(rows, adjusted):
        row["p_adjusted"], row["significant"] = float(p), bool(p <= cfg.alpha) and not row.pop("too_small", False)
    table = pa.Table.from_pylist(rows, schema=EDGE_SCHEMA)
    return {"edges": table, "metrics": {"edges": float(len(rows)),
                                        "significant": float(sum(r["significant"] for r in rows))}}


def class_edges(cfg: EdgeConfig, ids, class_grads, images, cavs, ablations=None) -> dict:
    """Edges from the top layer's concepts to each class. TCAV: gradients of the class's centred logit
    over the images of that class. Ablation (``ablations``: the class_ablations node's drops): over the
    class's images holding the concept, is the logit drop from removing it above the shifted-mask null?
    ``cfg.class_test`` says which of the two decides."""
    from interpflow.tasks.concepts.vcc_ablation import ablation_test
    from interpflow.tasks.concepts.vcc_segments import concat

    ids = concat(ids)
    grads = concat(class_grads)                     # (N, C, D)
    labels = np.asarray(images["labels"])[ids]
    names = list(cfg.classes)
    per_class_grads = np.concatenate([grads[labels == c, c] for c in range(len(names))])
    target = np.concatenate([np.full(int((labels == c).sum()), c) for c in range(len(names))])
    rows = _edges(cfg, per_class_grads, target, [f"class.{n}" for n in names], cavs,
                  test={"tcav": "tcav", "ablation": "ablation", "both": "tcav+ablation"}[cfg.class_test])
    if cfg.class_test != "tcav":
        if ablations is None:
            raise ValueError(f"edges.class_test={cfg.class_test!r} needs the class ablations")
        drops = ablations.to_table() if hasattr(ablations, "to_table") else ablations
        drops = {k: np.asarray(v) for k, v in drops.to_pydict().items()}
        # the class's mean centred logit on its intact images: the scale of edges.min_effect
        intact = {c: {int(i): v for i, v, lab in zip(drops["image"], drops["logit"], drops["label"]) if lab == c}
                  for c in range(len(names))}
        scale = {c: abs(float(np.mean(list(v.values())))) if v else 0.0 for c, v in intact.items()}
        for row in rows:
            c = names.index(row["target"][len("class."):])
            pick = (drops["concept"] == row["source"]) & (drops["label"] == c)
            effect, p = ablation_test(drops["drop"][pick], drops["null_drop"][pick])
            row.update(effect=effect, effect_p=p, examples=int(pick.sum()),
                       p=p if cfg.class_test == "ablation" else max(p, row["tcav_p"]),
                       too_small=not effect >= cfg.min_effect * scale[c])
    return _edge_table(cfg, rows)
