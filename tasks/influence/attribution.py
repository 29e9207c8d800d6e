"""The steps of an attribution run over a dataset, as a workflow shards them.

Per-shard steps take a loaded model (``tasks.models.LoadedModel``, held by a model actor) and the
shard's stable example ids; reduce steps take the per-shard results in shard order:

    gradient_shard     per-example training gradients (``gradients.method``: full, dense_projection or
                       logra) + their diagonal Fisher sums (+ with logra, K-FAC's sums in the projected space)
    covariance_shard   K-FAC's A/S sums                  -> kfac_basis (sum, eigendecompose)
    lambda_shard       EK-FAC's eigenvalue sums in that basis (logra: ``logra_lambdas`` from the stored
                       projected gradients, no model pass)
    query_gradients    query gradients of the log-likelihood (classical) and of f_v (concept): each and mean
    gradient_scores    every (measurement, preconditioner) pair -> the common (id, score, method) table,
                       streamed shard by shard, with each query's top-k / bottom-k training examples
    activation_scores  probe projection, its cosine variant, embedding similarity, random

Inputs are tokenised the same way everywhere (``encode_texts``): the tokenizer's special tokens,
right padding, and a stated policy for texts longer than the model accepts (``too_long``).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.finetune import TooLong, encode
from interpflow.tasks.influence.grads import PerExampleGrads, per_example_grads
from interpflow.tasks.influence.kfac import (
    CovarianceStats, KroneckerBasis, LambdaStats, covariance_stats, eigendecompose, kronecker_layers, lambda_stats,
)
from interpflow.tasks.influence.logra import LograConfig, LograProjection
from interpflow.tasks.influence.params import ParamSelection, select_parameters
from interpflow.tasks.influence.precondition import (
    DiagonalStats, KroneckerStats, PreconditionerConfig, Strategy, fit, sum_stats,
)
from interpflow.tasks.influence.projection import ProjectionConfig, RandomProjection
from interpflow.tasks.influence.scores import (
    StreamingScores, embedding_similarity, probe_scores, random_scores,
)
from interpflow.tasks.influence.task import CausalLMTask, ConceptTask, sample_labels
from interpflow.tasks.tiny_lm import pad_batch
from interpflow.tasks.types import Seed


class GradientsConfig(BaseModel):
    """Which parameters are differentiated, how gradients are projected, and how texts are batched."""

    model_config = ConfigDict(extra="forbid")
    params: list[str] = Field(default_factory=lambda: ["transformer.h.*.mlp.c_fc.weight"], min_length=1,
                              description="fnmatch globs (or 're:' regexes) over model.named_parameters()")
    method: Literal["full", "dense_projection", "logra"] = Field(
        "full", description="full: every selected parameter's gradient; dense_projection: the full gradient "
                            "times a seeded (p, dim) matrix (gradients.projection); logra: per linear layer "
                            "P_out G P_in^T built from activations and output gradients, never the full "
                            "gradient (gradients.logra); curvature then lives in the projected space")
    projection: ProjectionConfig | None = Field(None, description="dense random projection of training gradients "
                                                                  "(setting it implies method=dense_projection)")
    logra: LograConfig = Field(LograConfig(), description="ranks and seed of method=logra")
    fisher: Literal["empirical", "true"] = Field(
        "empirical", description="curvature statistics from gradients at the observed tokens (empirical Fisher), "
                                 "or at tokens sampled from the model (true Fisher, kronfluence's default); the "
                                 "scored training gradients always use the observed tokens")
    fisher_seed: Seed = Field(0, description="seeds the true Fisher's label sampling (per example id)")
    batch_size: int = Field(16, ge=1, description="examples per vectorised gradient call")
    chunk_size: int | None = Field(None, ge=1, description="vmap chunk (bounds memory); None = the batch")
    max_length: int | None = Field(None, ge=2, description="token limit; default the model's maximum")
    too_long: TooLong = Field("error", description="texts over max_length: fail before computing (default: a "
                                                   "truncated example's gradient is not that example's), or "
                                                   "truncate them")
    text_column: str = "text"
    id_column: str = "id"

    @model_validator(mode="after")
    def _method(self) -> GradientsConfig:
        if self.projection is not None and self.method == "full":
            if "method" in self.model_fields_set:
                raise ValueError("gradients.method=full but gradients.projection is set; use "
                                 "method=dense_projection, or drop projection")
            self.method = "dense_projection"
        if self.method == "dense_projection" and self.projection is None:
            self.projection = ProjectionConfig()
        if self.method == "logra" and self.projection is not None:
            raise ValueError("gradients.method=logra projects with gradients.logra (rank_in, rank_out); "
                             "drop gradients.projection")
        return self


def _limit(cfg: GradientsConfig, model) -> int:
    from interpflow.tasks.finetune import model_max_length

    return model_max_length(model.model.config, model.tokenizer, cfg.max_length)


def encode_texts(cfg: GradientsConfig, model, texts: list[str], ids: list[int]) -> dict[str, torch.Tensor]:
    """A right-padded batch ``{id, input_ids, attention_mask}`` on the model's device."""
    seqs, _ = encode(model.tokenizer, texts, _limit(cfg, model), cfg.too_long, ids)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batch = pad_batch(seqs, pad)
    return {"id": torch.tensor(ids, dtype=torch.long), "input_ids": batch["input_ids"].to(model.device),
            "attention_mask": batch["attention_mask"].to(model.device)}


def check_texts(cfg: GradientsConfig, data, what: str) -> list[int]:
    """The dataset's ids, after the checks that must fail before compute: columns, emptiness, unique ids."""
    for field, column in (("text_column", cfg.text_column), ("id_column", cfg.id_column)):
        if column not in data.column_names:
            raise ValueError(f"gradients.{field}: the {what} set has no column {column!r} "
                             f"(columns: {data.column_names})")
    if data.num_rows == 0:
        raise ValueError(f"the {what} set is empty: attribution needs at least one {what} example")
    ids = [int(i) for i in data[cfg.id_column]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gradients.id_column: {cfg.id_column!r} of the {what} set has duplicate ids")
    return ids


def train_ids(cfg: GradientsConfig, data, model: str | None = None, **_) -> list[int]:
    """Stable shard ids of the training set (a sharded node's ``ids`` function, run before any shard):
    with ``too_long=error`` every text's length is checked here, so no shard starts on a set that
    would fail halfway."""
    ids = check_texts(cfg, data, "training")
    if model is not None and cfg.too_long == "error":
        import transformers

        from interpflow.tasks.finetune import model_max_length

        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        config = transformers.AutoConfig.from_pretrained(model)
        check_lengths(cfg, tokenizer, model_max_length(config, tokenizer, cfg.max_length), data, "training")
    return ids


def check_lengths(cfg: GradientsConfig, tokenizer, limit: int, data, what: str) -> None:
    """With too_long=error, any text over the limit is an error now, not in the middle of a shard."""
    if cfg.too_long == "error":
        encode(tokenizer, list(data[cfg.text_column]), limit, "error", list(data[cfg.id_column]), what)


def _batches(cfg: GradientsConfig, model, data, ids) -> Iterator[dict[str, torch.Tensor]]:
    position = {int(v): k for k, v in enumerate(data[cfg.id_column])}
    rows = [position[int(i)] for i in ids]
    texts = data.select(rows)[cfg.text_column]
    for start in range(0, len(rows), cfg.batch_size):
        yield encode_texts(cfg, model, list(texts[start:start + cfg.batch_size]),
                           [int(i) for i in ids[start:start + cfg.batch_size]])


def _curvature_batches(cfg: GradientsConfig, model, data, ids) -> Iterator[dict[str, torch.Tensor]]:
    """The batches curvature statistics are taken on: as they are (empirical Fisher), or with labels
    sampled from the model (true Fisher; seeded per example, outside any vmap)."""
    for batch in _batches(cfg, model, data, ids):
        yield sample_labels(model.model, batch, cfg.fisher_seed) if cfg.fisher == "true" else batch


def _selection(cfg: GradientsConfig, model) -> ParamSelection:
    try:
        return select_parameters(model.model, cfg.params)
    except ValueError as exc:
        raise ValueError(f"gradients.{exc}") from None


def logra_projection(cfg: GradientsConfig, model) -> LograProjection | None:
    """The LoGra projection of ``cfg`` on a loaded model (None unless method=logra); its errors name
    gradients.* fields."""
    if cfg.method != "logra":
        return None
    return LograProjection(cfg.logra, model.model, _selection(cfg, model))


def gradient_shard(cfg: GradientsConfig, shard, model, data) -> dict:
    """Per-example training-loss gradients of one shard ({ids, grads}) and their squared sums; with
    method=logra also K-FAC's covariance sums in the projected space, from the same pass."""
    started = time.perf_counter()
    selection = _selection(cfg, model)
    out = {}
    if cfg.method == "logra":
        logra = logra_projection(cfg, model)
        passes = [logra.grads(model.model, CausalLMTask(), batch, covariance=cfg.fisher == "empirical")
                  for batch in _batches(cfg, model, data, shard.ids)]
        grads = PerExampleGrads.concat([g for g, _ in passes])
        if cfg.fisher == "true":          # a second pass on sampled labels gives the true Fisher's statistics
            passes = [logra.grads(model.model, CausalLMTask(), batch, covariance=True)
                      for batch in _curvature_batches(cfg, model, data, shard.ids)]
        fisher = PerExampleGrads.concat([g for g, _ in passes])
        out["covariance"] = sum_stats(c for _, c in passes).to_tensors()
    else:
        projection = RandomProjection(cfg.projection, selection) if cfg.projection else None

        def project(batches):
            return PerExampleGrads.concat([
                per_example_grads(model.model, CausalLMTask(), batch, selection, projection=projection,
                                  chunk_size=cfg.chunk_size) for batch in batches])
        grads = project(_batches(cfg, model, data, shard.ids))
        fisher = grads if cfg.fisher == "empirical" else project(_curvature_batches(cfg, model, data, shard.ids))
    return {"grads": grads.to_tensors(), "diagonal": DiagonalStats.of(fisher.grads).to_tensors(), **out,
            "metrics": {"examples": len(shard.ids), "width": grads.grads.shape[1],
                        "compute_s": time.perf_counter() - started}}


def covariance_shard(cfg: GradientsConfig, shard, model, data) -> dict:
    """K-FAC's covariance sums over one shard."""
    started = time.perf_counter()
    logra = logra_projection(cfg, model)
    if logra is not None:                   # the workflow takes these from gradient_shard; here for direct use
        stats = sum_stats(logra.grads(model.model, CausalLMTask(), batch, covariance=True)[1]
                          for batch in _curvature_batches(cfg, model, data, shard.ids))
    else:
        layers = kronecker_layers(model.model, _selection(cfg, model))
        stats = sum_stats(covariance_stats(model.model, CausalLMTask(), batch, layers)
                          for batch in _curvature_batches(cfg, model, data, shard.ids))
    return {"covariance": stats.to_tensors(),
            "metrics": {"examples": len(shard.ids), "compute_s": time.perf_counter() - started}}


def _load(model: str):
    from interpflow.tasks.models import ModelConfig, load_model

    return load_model(model, ModelConfig())


def kfac_basis(cfg: GradientsConfig, model: str, covariance: list[dict]) -> dict:
    """The summed covariances' eigenbasis: what EK-FAC's second pass rotates by, shipped to its shards."""
    started = time.perf_counter()
    loaded = _load(model)
    layers = _kron_space(cfg, loaded)[1]
    basis = eigendecompose(sum_stats(CovarianceStats.from_tensors(c) for c in covariance), layers)
    return {"basis": basis.to_tensors(), "metrics": {"compute_s": time.perf_counter() - started}}


def _kron_space(cfg: GradientsConfig, loaded):
    """(selection, linear layers) that K-FAC works in: the parameters, or LoGra's projected space."""
    logra = logra_projection(cfg, loaded)
    if logra is not None:
        return logra.space, logra.space_layers
    selection = _selection(cfg, loaded)
    return selection, kronecker_layers(loaded.model, selection)


def logra_lambdas(cfg: GradientsConfig, model: str, grads: list[dict], basis: dict) -> dict:
    """EK-FAC's eigenvalue sums in LoGra's projected space, from the stored projected gradients shard by
    shard (no model pass: the projected gradients are the whole input). Empirical Fisher only: with
    fisher=true the workflow runs ``lambda_shard`` on sampled labels instead."""
    if cfg.fisher != "empirical":
        raise ValueError("logra_lambdas reads the stored (observed-label) gradients: that is the empirical Fisher; "
                         "with gradients.fisher=true use lambda_shard")
    started = time.perf_counter()
    space, layers = _kron_space(cfg, _load(model))
    kbasis = KroneckerBasis.from_tensors(basis, layers)
    lambdas = sum_stats(lambda_stats(kbasis, PerExampleGrads.from_tensors(g).grads, space) for g in grads)
    return {"lambdas": lambdas.to_tensors(),
            "metrics": {"examples": lambdas.count, "compute_s": time.perf_counter() - started}}


def lambda_shard(cfg: GradientsConfig, shard, model, data, basis: dict) -> dict:
    """EK-FAC's eigenvalue sums over one shard, in the given K-FAC basis."""
    started = time.perf_counter()
    selection = _selection(cfg, model)
    space, layers = _kron_space(cfg, model)
    logra = logra_projection(cfg, model)
    kbasis = KroneckerBasis.from_tensors(basis, layers)
    parts = []
    for batch in _curvature_batches(cfg, model, data, shard.ids):
        if logra is not None:
            grads = logra.grads(model.model, CausalLMTask(), batch)[0]
        else:
            grads = per_example_grads(model.model, CausalLMTask(), batch, selection, chunk_size=cfg.chunk_size)
        parts.append(lambda_stats(kbasis, grads.grads, space))
    return {"lambdas": sum_stats(parts).to_tensors(),
            "metrics": {"examples": len(shard.ids), "compute_s": time.perf_counter() - started}}


class QueryConfig(BaseModel):
    """The concept: which site, and the measurement the query gradients are taken of."""

    model_config = ConfigDict(extra="forbid")
    gradients: GradientsConfig = GradientsConfig()
    site: str = Field("blocks.1.resid_post", description="the concept direction's site")


def query_gradients(cfg: QueryConfig, model: str, query, concept_prompts, concept: dict) -> dict:
    """Query gradients of the query texts' log-likelihood (classical influence) and of the concept
    measurement f_v over ``concept_prompts`` (Concept Influence): each query's (``<name>_each``, (m, p))
    and their mean (``<name>``, (1, p)). Unprojected for full and dense_projection (so that K-FAC can
    precondition them in parameter space), in LoGra's projected space for logra."""
    started = time.perf_counter()
    loaded = _load(model)
    direction = concept_direction(concept, loaded, cfg.site)
    selection = _selection(cfg.gradients, loaded)
    logra = logra_projection(cfg.gradients, loaded)
    out = {}
    for name, task, data in (("classical", CausalLMTask(), query),
                             ("concept", ConceptTask(cfg.site, direction), concept_prompts)):
        ids = check_texts(cfg.gradients, data, f"{name} query")
        check_lengths(cfg.gradients, loaded.tokenizer, _limit(cfg.gradients, loaded), data, f"{name} query")
        rows = []
        for batch in _batches(cfg.gradients, loaded, data, ids):
            if logra is not None:
                g = logra.grads(loaded.model, task, batch, kind="measurement")[0]
            else:
                g = per_example_grads(loaded.model, task, batch, selection, kind="measurement",
                                      chunk_size=cfg.gradients.chunk_size)
            rows.append(g.grads.double())
        each = torch.cat(rows)
        out[name], out[f"{name}_each"] = each.mean(dim=0, keepdim=True), each.float()
    return {**out, "metrics": {"queries": query.num_rows, "concept_prompts": concept_prompts.num_rows,
                               "width": out["classical"].shape[1], "compute_s": time.perf_counter() - started}}


def concept_direction(probe: dict, loaded, site: str) -> torch.Tensor:
    """The probe's unit direction, checked against the site's width."""
    direction = torch.as_tensor(probe["direction"]).double()
    if direction.ndim == 2:
        if direction.shape[0] != 1:
            raise ValueError(f"the probe has {direction.shape[0]} directions; Concept Influence takes one "
                             "(a binary logistic or a ridge probe)")
        direction = direction[0]
    width = loaded.sites.width(loaded.sites.resolve_all([site])[0])
    if width is not None and direction.shape[0] != width:
        raise ValueError(f"the probe direction has {direction.shape[0]} entries but site {site!r} has width "
                         f"{width}; fit the probe on this site's activations")
    return direction.float()


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preconditioners: list[Strategy] = Field(default_factory=lambda: ["identity", "diagonal", "ekfac"], min_length=1,
                                            description="each gives one classical and one Concept Influence score")
    damping: float = Field(0.1, ge=0, description="damping as a multiple of the mean eigenvalue")
    top_k: int = Field(10, ge=1, description="per query, keep this many highest and lowest scoring training "
                                             "examples (the `extremes` table)")
    gradients: GradientsConfig = GradientsConfig()


def _preconditioner(strategy: str, cfg: ScoreConfig, loaded, selection: ParamSelection, diagonal, basis, lambdas):
    pre_cfg = PreconditionerConfig(strategy=strategy, damping=cfg.damping)
    if strategy == "identity":
        return fit(pre_cfg)
    if strategy == "diagonal":
        return fit(pre_cfg, sum_stats(DiagonalStats.from_tensors(d) for d in diagonal))
    space, layers = _kron_space(cfg.gradients, loaded)
    stats = KroneckerStats(space, KroneckerBasis.from_tensors(basis, layers))
    if strategy == "ekfac":
        parts = [lambdas] if isinstance(lambdas, dict) else lambdas    # one reduce node (logra) or per shard
        stats.lambdas = sum_stats(LambdaStats.from_tensors(x) for x in parts)
    return fit(pre_cfg, stats)


def gradient_scores(cfg: ScoreConfig, model: str, grads: list[dict], query: dict, diagonal: list[dict] | None = None,
                    basis: dict | None = None, lambdas: list[dict] | None = None) -> dict:
    """Classical influence and Concept Influence under every preconditioner, one table.

    Methods are named ``influence[<strategy>]`` and ``concept_influence[<strategy>]``; a score is the
    mean over the queries. K-FAC/EK-FAC precondition the queries in parameter space, then project them to
    meet dense-projected training gradients; the diagonal lives where its statistics were summed (the
    stored, possibly projected, gradients); with logra everything lives in LoGra's projected space.
    Training shards are streamed (``StreamingScores``): beside each example's score only each query's
    ``top_k`` highest and lowest examples are kept (``extremes``), never the train x query matrix.
    """
    started = time.perf_counter()
    loaded = _load(model)
    selection = _selection(cfg.gradients, loaded)
    projection = RandomProjection(cfg.gradients.projection, selection) if cfg.gradients.projection else None
    shards = [PerExampleGrads.from_tensors(g) for g in grads]
    tables, extremes, seconds = [], [], {}
    for strategy in cfg.preconditioners:
        t0 = time.perf_counter()
        pre = _preconditioner(strategy, cfg, loaded, selection, diagonal, basis, lambdas)
        in_parameter_space = strategy in ("kfac", "ekfac") or projection is None
        for name, measure in (("influence", "classical"), ("concept_influence", "concept")):
            method = f"{name}[{strategy}]"
            each = query.get(f"{measure}_each", query[measure])
            if in_parameter_space:
                acc = StreamingScores(each, cfg.top_k, pre, projection=projection, method=method)
            else:
                acc = StreamingScores(projection.project_flat(each), cfg.top_k, pre, method=method)
            for shard in shards:
                acc.add(shard)
            tables.append(acc.table())
            extremes.append(acc.extremes())
        seconds[strategy] = time.perf_counter() - t0
    return {"scores": pa.concat_tables(tables), "extremes": pa.concat_tables(extremes),
            "metrics": {"compute_s": time.perf_counter() - started,
                        **{f"score_s.{k}": v for k, v in seconds.items()}}}


def padded_by_id(activations: pads.Dataset | pa.Table) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Token rows (id, position, vector) -> (ids, (n, T, d) activations, (n, T) mask), ids ascending."""
    from interpflow.tasks.activations import vectors_of

    table = activations.to_table() if isinstance(activations, pads.Dataset) else activations
    ids = table.column("id").to_numpy()
    positions = table.column("position").to_numpy()
    vectors = vectors_of(table).float()
    unique, row = np.unique(ids, return_inverse=True)
    order = np.lexsort((positions, row))
    rank = np.empty_like(order)
    counts = np.bincount(row, minlength=len(unique))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank[order] = np.arange(len(order)) - starts[row[order]]
    acts = torch.zeros(len(unique), int(counts.max()), vectors.shape[1])
    mask = torch.zeros(len(unique), int(counts.max()))
    acts[row, rank] = vectors
    mask[row, rank] = 1
    return unique, acts, mask


class ActivationScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    random_seed: Seed = Field(0, description="seed of the random baseline")


def activation_scores(cfg: ActivationScoreConfig, activations, query_activations, probe: dict) -> dict:
    """Scores that need no parameter gradients: the probe projection (Concept Influence's first-order
    proxy) and its cosine variant, cosine similarity to the query set, and random."""
    started = time.perf_counter()
    ids, acts, mask = padded_by_id(activations)
    direction = torch.as_tensor(probe["direction"]).double().reshape(-1)
    probe_t0 = time.perf_counter()
    tables = [probe_scores(acts, mask, direction, ids)]
    probe_s = time.perf_counter() - probe_t0
    tables.append(probe_scores(acts, mask, direction, ids, normalize="cosine"))
    _, q_acts, q_mask = padded_by_id(query_activations)
    tables.append(embedding_similarity(acts, mask, q_acts, q_mask, ids))
    tables.append(random_scores(ids, cfg.random_seed))
    return {"scores": pa.concat_tables(tables),
            "metrics": {"compute_s": time.perf_counter() - started, "probe_score_s": probe_s}}
