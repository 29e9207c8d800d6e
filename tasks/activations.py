"""Activation extraction for one shard of examples, and a streaming reader of the result.

Output rows: (id, position, site, vector), one table per site, the vector a fixed-size list in the
storage dtype (bfloat16 is stored as its uint16 bit pattern; the reader turns it back). Padding
positions never reach the output. Row order is the shard's id order, then token position, so the
same inputs give the same bytes however many actors ran them.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Literal

import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed

if TYPE_CHECKING:  # torch and pyarrow.dataset load when extraction runs, not when a graph is built
    import pyarrow.dataset as pads
    import torch


@functools.cache
def storage() -> dict[str, tuple]:
    """Storage dtype name -> (torch dtype, arrow type)."""
    import torch

    return {"float32": (torch.float32, pa.float32()), "float16": (torch.float16, pa.float16()),
            "bfloat16": (torch.bfloat16, pa.uint16())}


def __getattr__(name: str):
    if name == "STORAGE":
        return storage()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[str] = Field(default_factory=lambda: ["blocks.1.resid_post"], min_length=1,
                             description="site names (blocks.I.resid_post, ...) or raw module paths")
    tokens: Literal["all", "last", "mean"] = Field("all", description="which token positions to keep")
    span: tuple[int, int] | None = Field(None, description="[start, end) positions averaged by tokens=mean")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="storage dtype")
    batch_size: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=1, description="token limit; default the model's maximum")
    truncation: Literal["truncate", "error"] = Field(
        "truncate", description="longer sequences: keep the first max_length tokens (counted), or fail")
    text_column: str = "text"
    id_column: str = "id"

    @model_validator(mode="after")
    def _span_needs_mean(self):
        if self.span is not None and (self.tokens != "mean" or self.span[0] >= self.span[1] or self.span[0] < 0):
            raise ValueError("span=[start, end) needs tokens=mean and 0 <= start < end")
        return self


def example_ids(cfg: ExtractConfig, data, **_) -> list:
    """Stable shard ids: the dataset's id column in dataset order (checked first: runs before any shard)."""
    check_dataset(cfg, data)
    ids = list(data[cfg.id_column])
    if len(set(ids)) != len(ids):
        raise ValueError(f"extract.id_column: '{cfg.id_column}' has duplicate ids; shards need unique, stable ids")
    return ids


def check_dataset(cfg: ExtractConfig, data) -> None:
    """Empty data or missing columns are input errors, raised before any shard runs."""
    columns = set(data.column_names)
    for field, column in (("text_column", cfg.text_column), ("id_column", cfg.id_column)):
        if column not in columns:
            raise ValueError(f"extract.{field}: the dataset has no column '{column}'; "
                             f"its columns are {sorted(columns)}")
    if data.num_rows == 0:
        raise ValueError("the dataset is empty: nothing to extract")


def _to_storage(values: torch.Tensor, dtype: str) -> pa.Array:
    import torch

    torch_dtype, arrow_type = storage()[dtype]
    tensor = values.to(torch_dtype).cpu().contiguous()
    flat = tensor.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else tensor.numpy()
    width = tensor.shape[-1]
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=arrow_type), width)


def _select(cfg: ExtractConfig, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row index in batch, position, vector) of the kept tokens of one site's (B, T, D) tensor."""
    import torch

    lengths = mask.sum(dim=1)
    if cfg.tokens == "all":
        batch_idx, pos = mask.nonzero(as_tuple=True)
        return batch_idx, pos, hidden[batch_idx, pos]
    batch_idx = torch.arange(hidden.shape[0])
    if cfg.tokens == "last":
        pos = lengths - 1
        return batch_idx, pos, hidden[batch_idx, pos]
    start, end = cfg.span or (0, hidden.shape[1])
    window = mask.clone()
    window[:, :start] = 0
    window[:, end:] = 0
    counts = window.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (hidden * window.unsqueeze(-1).to(hidden.dtype)).sum(dim=1) / counts.to(hidden.dtype)
    return batch_idx, torch.full_like(batch_idx, start), mean


def extract_shard(cfg: ExtractConfig, shard, model, data) -> dict:
    """Activations at `cfg.sites` for the examples of one shard; `model` is a tasks.models.LoadedModel."""
    from interpflow.tasks.sites import capture

    started = time.perf_counter()
    sites = model.sites.resolve_all(cfg.sites)
    limit = min(cfg.max_length or model.max_length, model.max_length)
    position = {v: i for i, v in enumerate(data[cfg.id_column])}
    rows = [position[i] for i in shard.ids]
    subset = data.select(rows)
    texts, ids = subset[cfg.text_column], subset[cfg.id_column]
    per_site: dict[str, list[pa.RecordBatch]] = {s.name: [] for s in sites}
    tokens = truncated = 0
    tokenizer = model.tokenizer
    for start in range(0, len(texts), cfg.batch_size):
        batch_texts, batch_ids = texts[start:start + cfg.batch_size], ids[start:start + cfg.batch_size]
        full_lengths = [len(x) for x in tokenizer(batch_texts, add_special_tokens=True)["input_ids"]]
        too_long = [i for i, n in zip(batch_ids, full_lengths) if n > limit]
        if too_long and cfg.truncation == "error":
            raise ValueError(f"{len(too_long)} example(s) exceed max_length={limit} tokens (first id "
                             f"{too_long[0]}); set extract.truncation=truncate to keep the first {limit} tokens")
        truncated += len(too_long)
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        captured = capture(model.model, sites, n_heads=model.sites.n_heads, **enc)
        mask = enc["attention_mask"].cpu()
        id_array = np.asarray(batch_ids)
        for site in sites:
            batch_idx, pos, vectors = _select(cfg, captured[site.name].float().cpu(), mask)
            per_site[site.name].append(pa.RecordBatch.from_arrays(
                [pa.array(id_array[batch_idx.numpy()]), pa.array(pos.numpy().astype(np.int32)),
                 pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(pos), dtype=np.int32)), pa.array([site.name])),
                 _to_storage(vectors, cfg.dtype)],
                names=["id", "position", "site", "vector"]))
        tokens += int(mask.sum().item())
    outputs: dict = {}
    for site in sites:
        table = pa.Table.from_batches(per_site[site.name])
        outputs[site.name] = table.replace_schema_metadata(  # canonical name; the spelling asked for kept beside
            {"dtype": cfg.dtype, "site": site.name, "requested_site": site.alias or site.name})
    outputs["metrics"] = {"tokens": tokens, "examples": len(texts), "truncated": truncated,
                          "rows_per_site": outputs[sites[0].name].num_rows,
                          "compute_s": time.perf_counter() - started}
    return outputs


def vectors_of(batch: pa.RecordBatch | pa.Table, dtype: str | None = None) -> torch.Tensor:
    """The `vector` column as a (rows, dim) float tensor, decoding bfloat16 bit patterns."""
    import torch

    column = batch.column("vector")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    dtype = dtype or (batch.schema.metadata or {}).get(b"dtype", b"float32").decode()
    if dtype == "bfloat16" or flat.dtype == np.uint16:
        return torch.from_numpy(flat.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(flat, copy=True))


def stream(activations: pads.Dataset, batch_size: int, shuffle_seed: int | None = None,
           buffer_batches: int = 16, keep: Callable[[np.ndarray], np.ndarray] | None = None,
           ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """(ids, positions, vectors) batches of `batch_size` rows in bounded memory.

    Without a seed the order is the stored order. With one, shards are visited in a seeded order and
    rows are shuffled within a buffer of `buffer_batches` batches: the same seed, the same order.
    `keep(ids) -> bool mask` drops rows before they are buffered (e.g. held-out examples).
    """
    fragments = list(activations.get_fragments())
    dtype = (activations.schema.metadata or {}).get(b"dtype", b"float32").decode()
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        fragments = [fragments[i] for i in rng.permutation(len(fragments))]
    def drain(tables: list[pa.RecordBatch], final: bool):
        table = pa.Table.from_batches(tables)
        if rng is not None:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        keep = table.num_rows if final else table.num_rows - table.num_rows % batch_size
        for start in range(0, keep, batch_size):
            part = table.slice(start, min(batch_size, keep - start))
            yield (part.column("id").to_numpy(), part.column("position").to_numpy(), vectors_of(part, dtype))
        rest = table.slice(keep)
        return rest.to_batches() if rest.num_rows else []

    pending: list[pa.RecordBatch] = []
    for fragment in fragments:
        for batch in fragment.to_batches(batch_size=batch_size):
            if keep is not None:
                batch = batch.filter(pa.array(keep(batch.column("id").to_numpy(zero_copy_only=False))))
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= batch_size * buffer_batches:
                leftover = yield from drain(pending, final=False)
                pending = list(leftover)
    if pending:
        yield from drain(pending, final=True)


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_column: str | None = Field("concept", description="binary label probed as a ground-truth check")
    max_examples: int = Field(20000, ge=10, description="examples pooled per site for the probe")
    ridge: float = Field(1e-2, gt=0)
    min_accuracy: float = Field(0.9, ge=0, le=1, description="probe accuracy that counts as recovered")
    seed: Seed = 0


def pooled(activations: pads.Dataset, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector per example id (streamed), for the first `max_examples` ids seen."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for ids, _, vectors in stream(activations, batch_size=4096):
        values = vectors.float().numpy()
        for i, v in zip(ids.tolist(), values):
            if i not in sums:
                if len(sums) >= max_examples:
                    continue
                sums[i], counts[i] = np.zeros_like(v, dtype=np.float64), 0
            sums[i] += v
            counts[i] += 1
    order = sorted(sums)
    return np.asarray(order), np.stack([sums[i] / counts[i] for i in order]) if order else np.zeros((0, 0))


def probe_accuracy(x: np.ndarray, y: np.ndarray, ridge: float, seed: int) -> float:
    """Held-out accuracy of a closed-form ridge classifier (75/25 split, standardised features)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = int(0.75 * len(y))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xs = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    target = np.where(y[train] > 0, 1.0, -1.0)
    a = xs[train]
    w = np.linalg.solve(a.T @ a + ridge * len(train) * np.eye(a.shape[1]), a.T @ target)
    return float(((xs[test] @ w > 0) == (y[test] > 0)).mean())


def report(cfg: ReportConfig, activations, data) -> dict:
    """Per site: rows, mean vector norm, and (if the data has labels) a linear probe of the label.

    On the embedded corpus the planted concept must be decodable at some site: `ground_truth_ok`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_site = activations if isinstance(activations, dict) else {
        (activations.schema.metadata or {}).get(b"site", b"activations").decode(): activations}
    labels = None
    if cfg.label_column and cfg.label_column in data.column_names:
        labels = dict(zip(data["id"] if "id" in data.column_names else range(data.num_rows), data[cfg.label_column]))
    metrics: dict[str, float] = {}
    rows = []
    from interpflow.tasks.sites import depth_order

    for site in sorted(by_site, key=depth_order):
        dataset = by_site[site]
        ids, x = pooled(dataset, cfg.max_examples)
        entry = {"site": site, "rows": dataset.count_rows(), "examples": len(ids),
                 "mean_norm": float(np.linalg.norm(x, axis=1).mean()) if len(ids) else 0.0, "probe_accuracy": None}
        if labels is not None and len(ids) >= 8:
            y = np.asarray([labels[i] for i in ids.tolist()])
            entry["probe_accuracy"] = probe_accuracy(x, y, cfg.ridge, cfg.seed)
            metrics[f"probe_accuracy.{site}"] = entry["probe_accuracy"]
        metrics[f"rows.{site}"] = entry["rows"]
        rows.append(entry)
    outputs: dict = {"sites": pa.Table.from_pylist(rows)}
    accuracies = [r["probe_accuracy"] for r in rows if r["probe_accuracy"] is not None]
    if accuracies:
        metrics["best_probe_accuracy"] = max(accuracies)
        metrics["ground_truth_ok"] = float(max(accuracies) >= cfg.min_accuracy)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3))
        bars = ax.bar([r["site"] for r in rows], [r["probe_accuracy"] or 0 for r in rows])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.axhline(cfg.min_accuracy, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(f"probe accuracy ({cfg.label_column})")
        ax.tick_params(axis="x", rotation=45)
        ax.set_title("planted concept, decoded from mean-pooled activations")
        outputs["probe_accuracy"] = fig
    outputs["metrics"] = metrics
    return outputs
