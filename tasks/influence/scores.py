"""Attribution scores for training examples, and how well they find known-responsible examples.

Every method returns the same table, one row per training example: ``id`` (int64), ``score``
(float64; higher = more responsible for the behaviour), ``method`` (string). Methods:

- ``influence``: classical influence. Query gradients are of the query's log-likelihood (the default
  ``Task.measurement``); score_i = -mean_q grad m(q)^T P^-1 grad L(z_i), the first-order increase of
  the mean measurement when z_i is up-weighted (positive = z_i makes the query more likely).
- ``concept_influence``: the same with m = f_v, the concept measurement (``ConceptTask``): positive =
  training on z_i pushes the query's activations along v (arXiv 2602.14869).
- ``probe``: no parameter gradients: score_i = mean over z_i's tokens of <h_l(x_i), v>, the paper's
  first-order proxy of Concept Influence (an example that already expresses the concept is what
  training on it reinforces). Variants: ``normalize="cosine"`` (mean cosine: ignores activation norm,
  which otherwise favours long/high-norm examples), ``normalize="none"`` (raw v), and ``reference``
  activations for a *projection difference* (the projection of the training response minus that of
  a reference response to the same prompt, e.g. the model's own answer): what the example adds
  beyond what the model already does.
- ``random``: seeded Gaussian scores (the floor).
- ``embedding_cosine``: cosine between each example's mean-pooled activation and the mean of the
  query set's mean-pooled activations (similarity without gradients or a concept).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import rankdata

from .grads import PerExampleGrads
from .precondition import Preconditioner
from .projection import RandomProjection

SCHEMA = pa.schema([("id", pa.int64()), ("score", pa.float64()), ("method", pa.string())])


def score_table(ids, scores, method: str) -> pa.Table:
    """The common (id, score, method) table."""
    ids = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64).reshape(-1)
    values = np.asarray(torch.as_tensor(scores).detach().double().cpu()).reshape(-1)
    if ids.shape != values.shape:
        raise ValueError(f"{method}: {ids.shape[0]} ids but {values.shape[0]} scores")
    return pa.table({"id": ids, "score": values, "method": np.full(ids.shape[0], method, dtype=object)},
                    schema=SCHEMA)


# ------------------------------------------------------------------------ gradient-based methods

ROWS_PER_STEP = 4096   # training rows turned to float64 at a time (bounds the copy, not the result)


def _as_parts(train: PerExampleGrads | Iterable[PerExampleGrads]) -> Iterable[PerExampleGrads]:
    return [train] if isinstance(train, PerExampleGrads) else train


def _prepared_queries(query_grads: torch.Tensor, preconditioner: Preconditioner | None,
                      projection: RandomProjection | None, method: str, mean: bool) -> torch.Tensor:
    if query_grads.ndim != 2 or query_grads.shape[0] == 0:
        raise ValueError(f"{method}: query gradients must be a non-empty (m, p) matrix, got {tuple(query_grads.shape)}; "
                         "the query set is empty")
    q = query_grads.double()
    if mean:
        q = q.mean(dim=0, keepdim=True)
    if preconditioner is not None:
        q = preconditioner.apply(q)
    if projection is not None:
        q = projection.project_flat(q).double()
    return q


def _check_width(q: torch.Tensor, g: torch.Tensor, method: str) -> None:
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"{method}: query gradients have width {q.shape[1]} but training gradients {g.shape[1]}; "
                         "compute both with the same parameter selection (and gradients.method), and pass "
                         "projection= when only the training gradients were projected")


def _row_scores(g: torch.Tensor, q: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, -(g[rows] @ q.T)) a block of rows at a time: never a float64 copy of all of ``g``."""
    q = q.to(g.device)
    for start in range(0, g.shape[0], ROWS_PER_STEP):
        rows = slice(start, min(start + ROWS_PER_STEP, g.shape[0]))
        yield rows, -(g[rows].double() @ q.T)


def influence(query_grads: torch.Tensor, train: PerExampleGrads | Iterable[PerExampleGrads],
              preconditioner: Preconditioner | None = None, *, projection: RandomProjection | None = None,
              method: str = "influence") -> pa.Table:
    """score_i = -mean_q grad m(q)^T P^-1 g_i for query gradients (m, p) and training gradients.

    The preconditioner acts on the query side only (P is symmetric), after averaging the queries
    (it is linear). With ``projection``, query gradients are unprojected (m, p): they are
    preconditioned in parameter space, then projected to meet projected training gradients.
    ``train`` may be one ``PerExampleGrads`` or an iterable of them (shards, batches from a
    generator): each is scored as it comes, a block of rows at a time, so a notebook need not
    ``concat`` the training set, and nothing larger than a block is copied to float64.
    """
    q = _prepared_queries(query_grads, preconditioner, projection, method, mean=True)
    ids, scores = [], []
    for part in _as_parts(train):
        _check_width(q, part.grads, method)
        ids.append(part.ids.reshape(-1).cpu())
        scores.append(torch.cat([s[:, 0].cpu() for _, s in _row_scores(part.grads, q)])
                      if part.grads.shape[0] else torch.zeros(0, dtype=torch.float64))
    if not ids:
        raise ValueError(f"{method}: no training gradients to score")
    return score_table(torch.cat(ids), torch.cat(scores), method)


EXTREMES_SCHEMA = pa.schema([("method", pa.string()), ("query", pa.int64()), ("side", pa.string()),
                             ("rank", pa.int64()), ("id", pa.int64()), ("score", pa.float64())])


class StreamingScores:
    """Scores training gradients against a batch of queries shard by shard, keeping per query only the
    ``k`` highest and ``k`` lowest scoring training examples and, per training example, the mean score
    over the queries (= ``influence`` of the mean query): memory is O(m k + n), never the n x m matrix.

        acc = StreamingScores(query_grads, k=10, preconditioner=pre, method="influence[ekfac]")
        for shard in shards:            # PerExampleGrads, in any order
            acc.add(shard)
        acc.table()                     # (id, score, method), ids ascending
        acc.extremes()                  # (method, query, side, rank, id, score)
    """

    def __init__(self, query_grads: torch.Tensor, k: int = 10, preconditioner: Preconditioner | None = None, *,
                 projection: RandomProjection | None = None, method: str = "influence",
                 query_ids: torch.Tensor | None = None):
        if k < 1:
            raise ValueError(f"{method}: top_k={k} must be at least 1")
        self.q = _prepared_queries(query_grads, preconditioner, projection, method, mean=False)
        self.k, self.method = k, method
        m = self.q.shape[0]
        self.query_ids = torch.arange(m) if query_ids is None else torch.as_tensor(query_ids).reshape(-1)
        self.top = (torch.full((m, 0), float("-inf"), dtype=torch.float64), torch.zeros((m, 0), dtype=torch.int64))
        self.bottom = (torch.full((m, 0), float("inf"), dtype=torch.float64), torch.zeros((m, 0), dtype=torch.int64))
        self._ids: list[torch.Tensor] = []
        self._mean: list[torch.Tensor] = []

    @staticmethod
    def _merge(kept, values, ids, k, largest):
        vals = torch.cat([kept[0], values], dim=1)
        idx = torch.cat([kept[1], ids.expand(values.shape[0], -1)], dim=1)
        best = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=largest, sorted=True)
        return best.values, torch.gather(idx, 1, best.indices)

    def add(self, part: PerExampleGrads) -> None:
        _check_width(self.q, part.grads, self.method)
        ids = part.ids.reshape(-1).cpu()
        for rows, s in _row_scores(part.grads, self.q):
            s = s.cpu()                                    # (rows, m)
            self._ids.append(ids[rows])
            self._mean.append(s.mean(dim=1))
            self.top = self._merge(self.top, s.T, ids[rows][None], self.k, True)
            self.bottom = self._merge(self.bottom, s.T, ids[rows][None], self.k, False)

    def table(self) -> pa.Table:
        """Per training example, the mean score over the queries, ids ascending."""
        if not self._ids:
            raise ValueError(f"{self.method}: no training gradients were added")
        ids, mean = torch.cat(self._ids), torch.cat(self._mean)
        order = torch.argsort(ids)
        return score_table(ids[order], mean[order], self.method)

    def extremes(self) -> pa.Table:
        """Per query, its top-k (``side=top``, highest first) and bottom-k (``side=bottom``, lowest first)."""
        rows = {name: [] for name in EXTREMES_SCHEMA.names}
        for side, (values, ids) in (("top", self.top), ("bottom", self.bottom)):
            m, k = values.shape
            rows["method"] += [self.method] * (m * k)
            rows["query"] += self.query_ids.repeat_interleave(k).tolist()
            rows["side"] += [side] * (m * k)
            rows["rank"] += list(range(k)) * m
            rows["id"] += ids.reshape(-1).tolist()
            rows["score"] += values.reshape(-1).tolist()
        return pa.table(rows, schema=EXTREMES_SCHEMA)


def classical_influence(query_grads: torch.Tensor, train: PerExampleGrads,
                        preconditioner: Preconditioner | None = None, *,
                        projection: RandomProjection | None = None) -> pa.Table:
    """Influence on the query's log-likelihood (query gradients of ``CausalLMTask.measurement``)."""
    return influence(query_grads, train, preconditioner, projection=projection, method="influence")


def concept_influence(concept_grads: torch.Tensor, train: PerExampleGrads,
                      preconditioner: Preconditioner | None = None, *,
                      projection: RandomProjection | None = None) -> pa.Table:
    """Influence on the concept measurement f_v (query gradients of ``ConceptTask.measurement``)."""
    return influence(concept_grads, train, preconditioner, projection=projection, method="concept_influence")


# ------------------------------------------------------------------------ activation-based methods

def _check_acts(acts: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    if acts.ndim != 3:
        raise ValueError(f"{what}: activations must be (n, tokens, d), got shape {tuple(acts.shape)}")
    if mask is None:
        return torch.ones(acts.shape[:2], dtype=torch.float64, device=acts.device)
    if tuple(mask.shape) != tuple(acts.shape[:2]):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} does not match activations {tuple(acts.shape[:2])}")
    mask = mask.to(torch.float64)
    empty = torch.nonzero(mask.sum(dim=1) == 0).flatten()
    if empty.numel():
        raise ValueError(f"{what}: example rows {empty[:5].tolist()} have no unmasked token; drop them or fix the mask")
    return mask


def mean_pool(acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n, tokens, d) -> (n, d): mean over the unmasked tokens."""
    m = _check_acts(acts, mask, "mean_pool")
    return (acts.double() * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True)


def token_projection(acts: torch.Tensor, mask: torch.Tensor | None, direction: torch.Tensor,
                     normalize: Literal["unit", "none", "cosine"] = "unit") -> torch.Tensor:
    """(n,): mean over unmasked tokens of <h_t, v> (``unit``: v / ||v||; ``none``: v as given;
    ``cosine``: <h_t, v> / (||h_t|| ||v||))."""
    m = _check_acts(acts, mask, "probe")
    v = torch.as_tensor(direction).to(acts.device, torch.float64).reshape(-1)
    if v.shape[0] != acts.shape[-1]:
        raise ValueError(f"probe: direction has {v.shape[0]} entries but activations have width {acts.shape[-1]}")
    if normalize not in ("unit", "none", "cosine"):
        raise ValueError(f"probe: normalize={normalize!r}; use 'unit', 'none' or 'cosine'")
    h = acts.double()
    if normalize != "none":
        v = v / v.norm().clamp_min(1e-12)
    proj = h @ v
    if normalize == "cosine":
        proj = proj / h.norm(dim=-1).clamp_min(1e-12)
    return (proj * m).sum(dim=1) / m.sum(dim=1)


def probe_scores(acts: torch.Tensor, mask: torch.Tensor | None, direction: torch.Tensor, ids, *,
                 normalize: Literal["unit", "none", "cosine"] = "unit",
                 reference_acts: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                 sign: Literal[1, -1] = 1) -> pa.Table:
    """Probe-based attribution: each training example's mean projection on the concept direction.

    ``acts``: the training examples' activations at the concept's site (n, tokens, d), ``mask`` the
    tokens to average (e.g. response tokens). With ``reference_acts`` (n, tokens', d) the score is the
    projection difference (method ``probe_difference``). ``sign=-1`` ranks by the opposite concept.
    """
    if sign not in (1, -1):
        raise ValueError(f"probe: sign={sign!r}; use 1 or -1")
    score = token_projection(acts, mask, direction, normalize)
    method = "probe" if normalize == "unit" else f"probe_{normalize}"
    if reference_acts is not None:
        if reference_acts.shape[0] != acts.shape[0]:
            raise ValueError(f"probe: reference_acts has {reference_acts.shape[0]} examples, acts {acts.shape[0]}; "
                             "pass one reference response per training example")
        score = score - token_projection(reference_acts, reference_mask, direction, normalize)
        method = "probe_difference" if normalize == "unit" else f"probe_difference_{normalize}"
    return score_table(ids, sign * score, method)


def random_scores(ids, seed: int = 0) -> pa.Table:
    """Seeded Gaussian scores: the floor every method must beat."""
    ids = torch.as_tensor(ids).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    return score_table(ids, torch.randn(ids.shape[0], generator=gen, dtype=torch.float64), "random")


def embedding_similarity(train_acts: torch.Tensor, train_mask: torch.Tensor | None, query_acts: torch.Tensor,
                         query_mask: torch.Tensor | None, ids) -> pa.Table:
    """Cosine of each training example's mean-pooled activation to the query set's mean embedding."""
    train = mean_pool(train_acts, train_mask)
    query = mean_pool(query_acts, query_mask).mean(dim=0)
    if train.shape[1] != query.shape[0]:
        raise ValueError(f"embedding_cosine: train width {train.shape[1]} != query width {query.shape[0]}; "
                         "use the same site for both")
    score = (train @ query) / (train.norm(dim=1).clamp_min(1e-12) * query.norm().clamp_min(1e-12))
    return score_table(ids, score, "embedding_cosine")


# ------------------------------------------------------------------------------------- evaluation

def _labels(scores: pa.Table, positive_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = scores.column("id").to_numpy()
    positives = {int(i) for i in positive_ids}
    labels = np.fromiter((int(i) in positives for i in ids), dtype=bool, count=len(ids))
    if not labels.any() or labels.all():
        raise ValueError(f"need at least one positive and one negative id among the {len(ids)} scored examples "
                         f"({int(labels.sum())} of the positive ids are scored)")
    return scores.column("score").to_numpy().astype(np.float64), labels


def auc(scores: pa.Table, positive_ids: Iterable[int]) -> float:
    """ROC AUC of ranking the positive ids above the rest (ties count one half; Mann-Whitney U)."""
    values, labels = _labels(scores, positive_ids)
    ranks = rankdata(values)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: pa.Table, positive_ids: Iterable[int], k: int) -> float:
    """Fraction of positives among the k highest scores (ties broken by id, for determinism)."""
    values, labels = _labels(scores, positive_ids)
    if not 1 <= k <= len(values):
        raise ValueError(f"precision_at_k: k={k} must be between 1 and the number of scored examples ({len(values)})")
    ids = scores.column("id").to_numpy()
    order = np.lexsort((ids, -values))
    return float(labels[order[:k]].mean())
