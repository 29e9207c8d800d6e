"""Scoring attribution methods against planted ground truth, and the removal test.

``evaluate_methods``: per method, ROC AUC and precision@k of finding the planted ids, the wall time
the method cost end to end (the compute seconds of every step it needed), and its ranking.
``removal_ids``: the k training examples a method ranks highest (or k seeded random ones), which a
fine-tune without them tests: removing what a good method finds should drop the trait more than
removing k random examples. ``removal_report`` puts the trait of every retrained model side by side.
"""

from __future__ import annotations

from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from interpflow.tasks.influence.scores import auc, precision_at_k  # noqa: E402
from interpflow.tasks.types import Seed


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=1, description="precision@k and removal size; default the number planted")
    label_column: str = "label"
    id_column: str = "id"


def _seconds(metrics: Iterable[dict] | dict | None, key: str = "compute_s") -> float:
    if metrics is None:
        return 0.0
    if isinstance(metrics, dict):
        return float(metrics.get(key, 0.0))
    return float(sum(m.get(key, 0.0) for m in metrics))


def method_seconds(method: str, costs: dict) -> float:
    """End-to-end compute seconds of a method from its steps' costs (module docstring)."""
    if method.startswith(("influence[", "concept_influence[")):
        strategy = method[method.index("[") + 1:-1]
        total = (_seconds(costs.get("gradients")) + _seconds(costs.get("query_gradients"))
                 + _seconds(costs.get("gradient_scores"), f"score_s.{strategy}"))
        if strategy in ("kfac", "ekfac"):
            total += _seconds(costs.get("covariance")) + _seconds(costs.get("kfac_basis"))
        if strategy == "ekfac":
            total += _seconds(costs.get("ekfac_lambdas"))
        return total
    if method.startswith("probe"):
        return (_seconds(costs.get("train_activations")) + _seconds(costs.get("concept"))
                + _seconds(costs.get("activation_scores"), "probe_score_s"))
    if method == "embedding_cosine":
        return _seconds(costs.get("train_activations")) + _seconds(costs.get("query_activations"))
    return 0.0


def evaluate_methods(cfg: EvaluateConfig, train, gradient, activation, **costs) -> dict:
    """Graph node: AUC, precision@k and seconds per method (table + figure), and each method's ranking."""
    planted = [int(i) for i, y in zip(train[cfg.id_column], train[cfg.label_column]) if y]
    k = cfg.k or len(planted)
    scores = pa.concat_tables([gradient, activation])
    rows, rankings = [], {}
    for method in sorted(set(scores.column("method").to_pylist())):
        table = scores.filter(pc.equal(scores["method"], method))
        ids, values = table.column("id").to_numpy(), table.column("score").to_numpy()
        order = np.lexsort((ids, -values))
        rankings[method] = [int(i) for i in ids[order]]
        rows.append({"method": method, "auc": auc(table, planted), "precision_at_k": precision_at_k(table, planted, k),
                     "seconds": method_seconds(method, costs)})
    result = pa.Table.from_pylist(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.35 * len(rows) + 1.5), sharey=True)
    names = [r["method"] for r in rows]
    ax1.barh(names, [r["auc"] for r in rows], color="tab:blue")
    ax1.axvline(0.5, color="grey", ls=":")
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("AUC of finding the planted examples")
    ax2.barh(names, [max(r["seconds"], 1e-3) for r in rows], color="tab:orange")
    ax2.set_xscale("log")
    ax2.set_xlabel("compute seconds (end to end)")
    fig.tight_layout()
    metrics = {f"auc.{r['method']}": r["auc"] for r in rows}
    metrics.update({f"seconds.{r['method']}": r["seconds"] for r in rows})
    metrics.update({"k": k, "planted": len(planted)})
    return {"methods": result, "figure": fig, "rankings": {"k": k, "ranked": rankings}, "metrics": metrics}


class RemovalChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(..., description="a scored method, or 'random'")
    seed: Seed = Field(0, description="random removal: which k examples")


def removal_ids(cfg: RemovalChoice, rankings: dict) -> list[int]:
    """Graph node: the ids a removal fine-tune leaves out (the method's top k, or k random ids)."""
    k, ranked = int(rankings["k"]), rankings["ranked"]
    if cfg.method == "random":
        everyone = sorted(next(iter(ranked.values())))
        return sorted(int(i) for i in np.random.default_rng([cfg.seed, 7919]).choice(everyone, size=k, replace=False))
    if cfg.method not in ranked:
        raise ValueError(f"removal: method {cfg.method!r} was not scored; scored methods: {sorted(ranked)}")
    return sorted(ranked[cfg.method][:k])


class RemovalReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concept_method: str = Field("concept_influence[ekfac]", description="the method held to the ground-truth bars")
    min_auc: float = Field(0.9, ge=0, le=1, description="Concept Influence must find the planted ids this well")


def removal_report(cfg: RemovalReportConfig, methods: pa.Table, full: dict, **removed: dict) -> dict:
    """Graph node: the trait after removing each method's top k (and k random examples), the drops,
    and the ground truth: Concept Influence's AUC >= min_auc and its removal drops the trait more
    than every random removal."""
    rows = [{"model": "full", "trait_logratio": full["trait_logratio"], "drop": 0.0}]
    for label, trait in sorted(removed.items()):
        rows.append({"model": label, "trait_logratio": trait["trait_logratio"],
                     "drop": full["trait_logratio"] - trait["trait_logratio"]})
    table = pa.Table.from_pylist(rows)
    aucs = dict(zip(methods.column("method").to_pylist(), methods.column("auc").to_pylist()))
    if cfg.concept_method not in aucs:
        raise ValueError(f"removal_report: {cfg.concept_method!r} was not scored; scored: {sorted(aucs)}")
    drops = {r["model"]: r["drop"] for r in rows[1:]}
    random_drops = [v for k, v in drops.items() if k.startswith("random")]
    concept_label = label_of(cfg.concept_method)
    concept_drop = drops.get(concept_label)
    removal_ok = concept_drop is not None and bool(random_drops) and concept_drop > max(random_drops)
    auc_ok = aucs[cfg.concept_method] >= cfg.min_auc
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.5))
    ax.barh([r["model"] for r in rows[1:]], [r["drop"] for r in rows[1:]],
            color=["tab:grey" if r["model"].startswith("random") else "tab:green" for r in rows[1:]])
    ax.set_xlabel("trait drop after removing k examples (log-ratio, full - retrained)")
    fig.tight_layout()
    metrics = {"concept_auc": aucs[cfg.concept_method], "auc_ok": float(auc_ok), "removal_ok": float(removal_ok),
               "ground_truth_ok": float(auc_ok and removal_ok), "full_trait": full["trait_logratio"],
               **{f"drop.{k}": v for k, v in drops.items()}}
    return {"removal": table, "figure": fig, "metrics": metrics}


def label_of(method: str) -> str:
    """A node-name-safe label of a method: concept_influence[ekfac] -> concept_influence-ekfac."""
    return method.replace("[", "-").replace("]", "")
