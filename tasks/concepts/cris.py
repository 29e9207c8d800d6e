"""VTCD step 3: concept importance by CRIS, its check curves, and head importance with head pruning.

CRIS (Concept Randomized Importance Sampling, VTCD) pools the concepts of every studied (layer, head)
and draws M random subsets holding ``drop_fraction`` of them. For a draw, a hook zeroes the studied
feature (keys by default) of each dropped concept's (layer, head) at the tokens its tubelets cover,
in every video, and the model's own performance is measured: the mean probability of the target
class over the videos. Draw d's subset comes from ``default_rng([seed, d])`` alone, so shards can run
anywhere, in any order, and a resumed run draws the same subsets.

Estimator (ours, stated): importance(c) = mean performance over draws that keep c minus mean
performance over draws that drop c: the average effect of removing c against the background of the
other removals. Because every draw removes the same number of concepts, for additive effects e the
expectation is e_c C/(C-1) - sum(e)/(C-1): one shift common to all concepts, so the ranking is that of
e, and the estimates sum to zero (a concept with no effect scores slightly below 0).

Draws are batched: ``draws_per_pass`` draws x all videos go through the model in one forward pass,
each row with its own masks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.features import heads_of, zeroed
from interpflow.tasks.concepts.tubelets import model_pixels, rows_of
from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import column


class CrisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    draws: int = Field(256, ge=2, description="M: random concept subsets")
    drop_fraction: float = Field(0.5, gt=0, lt=1, description="share of all concepts dropped in each draw")
    draws_per_pass: int = Field(1, ge=1, description=(
        "draws batched into one forward pass, each with all videos (so one draw is already a batch of as many "
        "masks as videos); more draws per pass were slower on CPU (benchmarks/concept_discovery.py)"))
    seed: Seed = 0
    feature: str = Field("keys", description="set by the workflow: the feature the concepts were found in")
    target_class: int = Field(1, description="set by the workflow")


@dataclass
class ConceptSet:
    """All studied concepts, pooled: ids, their (layer, head), and each one's token mask per video."""

    ids: list[str]
    layer: np.ndarray            # (C,)
    head: np.ndarray             # (C,)
    videos: np.ndarray           # (V,) video ids, sorted
    masks: np.ndarray            # (C, V, N) bool

    @property
    def size(self) -> int:
        return len(self.ids)


def pooled_concepts(members: dict, n_tokens: int) -> ConceptSet:
    """The ConceptSet from the ``members`` tables of every (layer, head) (any order of inputs)."""
    tables = [t.to_table() if hasattr(t, "to_table") else t for _, t in sorted(members.items())]
    table = pa.concat_tables([t for t in tables if t.num_rows])
    rows = table.to_pylist()
    ids = sorted({r["concept_id"] for r in rows}, key=_id_order)
    videos = np.unique([r["video"] for r in rows])
    index, vindex = {c: i for i, c in enumerate(ids)}, {v: i for i, v in enumerate(videos.tolist())}
    masks = np.zeros((len(ids), len(videos), n_tokens), dtype=bool)
    for r in rows:
        masks[index[r["concept_id"]], vindex[r["video"]], r["tokens"]] = True
    parsed = np.asarray([_id_order(c)[:2] for c in ids]).reshape(-1, 2)
    return ConceptSet(ids, parsed[:, 0], parsed[:, 1], videos, masks)


def _id_order(cid: str) -> tuple[int, int, int]:
    layer, rest = cid[1:].split("H")
    head, concept = rest.split("C")
    return int(layer), int(head), int(concept)


def drawn_subset(seed: int, draw: int, n_concepts: int, fraction: float) -> np.ndarray:
    """Indices of the concepts draw ``draw`` removes (sorted)."""
    k = max(1, int(round(fraction * n_concepts)))
    return np.sort(np.random.default_rng([seed, draw]).permutation(n_concepts)[:k])


def keep_masks(concepts: ConceptSet, removed: list[np.ndarray], n_heads: int) -> dict[int, torch.Tensor]:
    """Per layer, (len(removed) * V, N, heads) float masks: 0 where a removed concept covers a token."""
    c, v, n = concepts.masks.shape
    out: dict[int, np.ndarray] = {}
    for r, subset in enumerate(removed):
        for i in subset:
            layer = int(concepts.layer[i])
            mask = out.setdefault(layer, np.ones((len(removed), v, n, n_heads), dtype=np.float32))
            mask[r, :, :, int(concepts.head[i])] *= ~concepts.masks[i]
    return {layer: torch.from_numpy(m.reshape(len(removed) * v, n, n_heads)) for layer, m in out.items()}


def target_probability(model, pixels: torch.Tensor, target: int, feature: str,
                       keep: dict[int, torch.Tensor] | None = None, repeats: int = 1) -> np.ndarray:
    """(repeats,) mean target-class probability over the videos, each repeat with its own masks."""
    net = model.model
    batch = pixels.repeat(repeats, *([1] * (pixels.dim() - 1))) if repeats > 1 else pixels
    with torch.no_grad(), zeroed(net, feature, {k: m.to(model.device) for k, m in (keep or {}).items()}):
        probs = net(pixel_values=batch).logits.float().softmax(-1)[:, target]
    return probs.reshape(repeats, -1).mean(1).cpu().numpy()


def _video_pixels(model, data, concepts: ConceptSet) -> torch.Tensor:
    return model_pixels(model, column(data.select(rows_of(data, concepts.videos)), "frames"))


def performance_of_removals(model, data, concepts: ConceptSet, removals: list[np.ndarray], cfg_feature: str,
                            target: int, per_pass: int) -> np.ndarray:
    """Performance with each removal set (a list of concept-index arrays), ``per_pass`` sets per forward."""
    pixels = _video_pixels(model, data, concepts)
    n_heads = heads_of(model.model, cfg_feature)
    out = []
    for s in range(0, len(removals), per_pass):
        chunk = removals[s:s + per_pass]
        out.append(target_probability(model, pixels, target, cfg_feature, keep_masks(concepts, chunk, n_heads),
                                      repeats=len(chunk)))
    return np.concatenate(out) if out else np.zeros(0)


def draw_ids(cfg: CrisConfig, **_) -> list[int]:
    return list(range(cfg.draws))


def cris_shard(cfg: CrisConfig, shard, model, data, **members) -> dict:
    """Graph shard: the performance of the model under every draw of the shard."""
    started = time.perf_counter()
    n_tokens = _n_tokens(members)
    concepts = pooled_concepts(members, n_tokens)
    subsets = [drawn_subset(cfg.seed, d, concepts.size, cfg.drop_fraction) for d in shard.ids]
    perf = performance_of_removals(model, data, concepts, subsets, cfg.feature, cfg.target_class, cfg.draws_per_pass)
    table = pa.table({"draw": pa.array(list(shard.ids), pa.int64()), "performance": pa.array(perf, pa.float64()),
                      "removed": pa.array([s.astype(np.int32) for s in subsets], pa.list_(pa.int32()))})
    elapsed = time.perf_counter() - started
    return {"draws": table, "metrics": {"draws": len(subsets), "compute_s": elapsed,
                                        "masked_videos_per_s": len(subsets) * len(concepts.videos) / max(elapsed, 1e-9)}}


def _n_tokens(members: dict) -> int:
    for table in members.values():
        meta = (table.schema.metadata or {}) if hasattr(table, "schema") else {}
        if b"n_tokens" in meta:
            return int(meta[b"n_tokens"])
    raise ValueError("members tables carry no n_tokens metadata")


def importance_scores(draws, concepts_tables: dict) -> pa.Table:
    """One row per concept: importance (kept mean - dropped mean), the two means, draws that dropped it,
    its rank (1 = most important), plus the concept's own columns (spread, silhouette, object IoUs)."""
    table = draws.to_table() if hasattr(draws, "to_table") else draws
    table = table.sort_by("draw")
    perf = table.column("performance").to_numpy()
    removed = table.column("removed").to_pylist()
    info = pa.concat_tables([t.to_table() if hasattr(t, "to_table") else t
                             for _, t in sorted(concepts_tables.items()) if t.num_rows],
                            promote_options="default").to_pylist()
    info.sort(key=lambda r: _id_order(r["concept_id"]))
    dropped = np.zeros((len(perf), len(info)), dtype=bool)
    for d, subset in enumerate(removed):
        dropped[d, subset] = True
    rows = []
    for i, concept in enumerate(info):
        out, kept = perf[dropped[:, i]], perf[~dropped[:, i]]
        mean_kept = float(kept.mean()) if len(kept) else float("nan")
        mean_dropped = float(out.mean()) if len(out) else float("nan")
        rows.append({**concept, "importance": mean_kept - mean_dropped, "mean_kept": mean_kept,
                     "mean_dropped": mean_dropped, "times_dropped": int(len(out))})
    order = np.argsort([-r["importance"] for r in rows], kind="stable")
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
    return pa.Table.from_pylist(rows)


# ------------------------------------------------------------------------------------ check curves

class CurveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: int = Field(11, ge=3, description="removal fractions 0, 1/(points-1), ..., 1")
    random_orders: int = Field(3, ge=1, description="random orders averaged for the random curve")
    prune_counts: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="heads pruned (n) for the "
                                                                                      "head-pruning application")
    passes_per_forward: int = Field(4, ge=1)
    seed: Seed = 0
    feature: str = Field("keys", description="set by the workflow")
    target_class: int = Field(1, description="set by the workflow")


def curve_orders(cfg: CurveConfig, **_) -> list[str]:
    return ["most", "least"] + [f"random.{i}" for i in range(cfg.random_orders)]


def concept_order(kind: str, importance: pa.Table, seed: int) -> np.ndarray:
    """Concept indices (in pooled-id order) in removal order for 'most', 'least' or 'random.<i>'."""
    ids = importance.column("concept_id").to_pylist()
    position = {c: i for i, c in enumerate(sorted(ids, key=_id_order))}
    scores = importance.column("importance").to_numpy()
    if kind == "most":
        ranked = np.argsort(-scores, kind="stable")
    elif kind == "least":
        ranked = np.argsort(scores, kind="stable")
    else:
        ranked = np.random.default_rng([seed, int(kind.split(".")[1])]).permutation(len(ids))
    return np.asarray([position[ids[i]] for i in ranked], dtype=np.int64)


def head_importance(importance: pa.Table) -> pa.Table:
    """Head importance (ours, stated): the sum of its concepts' importances; one row per (layer, head)."""
    rows: dict[tuple[int, int], dict] = {}
    for r in importance.to_pylist():
        key = (r["layer"], r["head"])
        row = rows.setdefault(key, {"layer": key[0], "head": key[1], "importance": 0.0, "concepts": 0})
        row["importance"] += r["importance"]
        row["concepts"] += 1
    return pa.Table.from_pylist([rows[k] for k in sorted(rows)])


def check_conditions(cfg: CurveConfig, **_) -> list[str]:
    """Shard ids of the checks: the removal orders, then 'prune:<order>@<n>' for the head-pruning application."""
    return curve_orders(cfg) + [f"prune:{order}@{n}" for n in cfg.prune_counts for order in ("least", "most", "random")]


CURVE_SCHEMA = pa.schema([("order", pa.string()), ("fraction", pa.float64()), ("removed", pa.int64()),
                          ("performance", pa.float64())])
PRUNING_SCHEMA = pa.schema([("condition", pa.string()), ("order", pa.string()), ("pruned", pa.int64()),
                            ("performance", pa.float64()), ("heads", pa.string())])


def check_shard(cfg: CurveConfig, shard, model, data, importance, **members) -> dict:
    """Graph shard: removal curves for the orders of the shard (performance after removing the first k
    concepts of each order) and head pruning for its pruning conditions, through one loaded model."""
    importance = importance.to_table() if hasattr(importance, "to_table") else importance
    concepts = pooled_concepts(members, _n_tokens(members))
    curves = [c for c in shard.ids if not c.startswith("prune:")]
    pruned = [c.removeprefix("prune:") for c in shard.ids if c.startswith("prune:")]
    fractions = np.linspace(0, 1, cfg.points)
    curve_rows = []
    for kind in curves:
        order = concept_order(kind, importance, cfg.seed)
        ks = [int(round(f * len(order))) for f in fractions]
        perf = performance_of_removals(model, data, concepts, [order[:k] for k in ks], cfg.feature,
                                       cfg.target_class, cfg.passes_per_forward)
        curve_rows += [{"order": kind, "fraction": float(f), "removed": k, "performance": float(p)}
                       for f, k, p in zip(fractions, ks, perf)]
    return {"curves": pa.Table.from_pylist(curve_rows, schema=CURVE_SCHEMA),
            "pruning": pa.Table.from_pylist(_pruning_rows(cfg, pruned, model, data, importance, concepts),
                                            schema=PRUNING_SCHEMA)}


def _pruning_rows(cfg: CurveConfig, conditions: list[str], model, data, importance: pa.Table,
                  concepts: ConceptSet) -> list[dict]:
    """Performance with the n least / most important / random heads pruned (their values zeroed at every
    token, so the head adds nothing to the residual stream)."""
    if not conditions:
        return []
    heads = head_importance(importance).to_pylist()
    pixels = _video_pixels(model, data, concepts)
    net = model.model
    n_heads, n_tokens = net.config.num_attention_heads, concepts.masks.shape[2]
    rows = []
    for condition in conditions:
        order, n = condition.split("@")
        n = min(int(n), len(heads))
        if order == "random":
            picked = np.random.default_rng([cfg.seed, n]).permutation(len(heads))[:n]
        else:
            ranked = np.argsort([h["importance"] for h in heads], kind="stable")
            picked = ranked[:n] if order == "least" else ranked[::-1][:n]
        keep: dict[int, torch.Tensor] = {}
        for i in picked:
            mask = keep.setdefault(heads[i]["layer"], torch.ones(len(concepts.videos), n_tokens, n_heads))
            mask[:, :, heads[i]["head"]] = 0
        perf = target_probability(model, pixels, cfg.target_class, "values", keep)[0]
        rows.append({"condition": condition, "order": order, "pruned": n, "performance": float(perf),
                     "heads": ",".join(f"L{heads[i]['layer']}H{heads[i]['head']}" for i in picked)})
    return rows
