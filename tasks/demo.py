"""A tiny numeric study that exercises the engine: generate, transform per shard, summarise, plot.

Its ground truth is exact: the summary recomputes the transformed total from the raw values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.types import Seed


class NumbersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(2000, ge=1, le=10_000_000, description="rows to generate")
    seed: Seed = 0


class TransformConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power: int = Field(2, ge=1, le=8)
    work_s: float = Field(0.0, ge=0, description="simulated seconds of work per shard")


class SummaryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, ge=1)
    fail_marker: str | None = Field(None, description="if this file exists the node raises (fault drills)")


class HistogramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bins: int = Field(20, ge=2)


def make_numbers(cfg: NumbersConfig) -> pa.Table:
    rng = np.random.default_rng(cfg.seed)
    return pa.table({"id": np.arange(cfg.n, dtype=np.int64), "x": rng.normal(size=cfg.n)})


def row_ids(cfg, data: pa.Table) -> list[int]:
    return data.column("id").to_pylist()


def transform_shard(cfg: TransformConfig, shard, data: pa.Table) -> pa.Table:
    """y = x ** power for the rows of one shard (selected by id, never by position)."""
    if cfg.work_s:
        time.sleep(cfg.work_s)
    rows = data.filter(pc.is_in(data.column("id"), value_set=pa.array(shard.ids, pa.int64())))
    x = rows.column("x").to_numpy()
    return pa.table({"id": rows.column("id"), "x": x, "y": x ** cfg.power})


def summarise(cfg: SummaryConfig, data: pads.Dataset) -> dict:
    if cfg.fail_marker and Path(cfg.fail_marker).exists():
        raise RuntimeError(f"fault drill: marker file {cfg.fail_marker} exists")
    n, total, total_x, ids = 0, 0.0, 0.0, set()
    for batch in data.to_batches(batch_size=cfg.batch_size):
        n += batch.num_rows
        total += float(pc.sum(batch.column("y")).as_py() or 0.0)
        total_x += float(pc.sum(batch.column("x")).as_py() or 0.0)
        ids.update(batch.column("id").to_pylist())
    return {"metrics": {"rows": n, "sum_y": total, "mean_x": total_x / max(n, 1), "unique_ids": len(ids)}}


def histogram(cfg: HistogramConfig, data: pads.Dataset) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = data.to_table(columns=["y"]).column("y").to_numpy()
    counts, edges = np.histogram(y, bins=cfg.bins)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.stairs(counts, edges)
    ax.set_xlabel("y")
    ax.set_ylabel("count")
    ax.set_title("transformed values")
    return {"counts": pa.table({"left": edges[:-1], "right": edges[1:], "count": counts}),
            "histogram": fig, "metrics": {"bins": cfg.bins}}


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power: int = 2


def report(cfg: ReportConfig, stats: dict, counts: pa.Table, numbers: pa.Table) -> dict:
    """Check the pipeline against ground truth recomputed from the raw numbers."""
    expected = float(np.sum(numbers.column("x").to_numpy() ** cfg.power))
    got = stats["sum_y"]
    ok = (abs(got - expected) <= 1e-9 * max(1.0, abs(expected))
          and stats["unique_ids"] == numbers.num_rows == stats["rows"]
          and int(pc.sum(counts.column("count")).as_py()) == numbers.num_rows)
    return {"metrics": {"ground_truth_ok": float(ok), "sum_y": got, "expected_sum_y": expected}}


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power: int = Field(2, ge=1, le=8, description="set by the workflow from transform.power")
    steps: int = Field(200, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(20, ge=1)
    work_s: float = Field(0.0, ge=0, description="simulated seconds of work per step (fault drills)")
    seed: Seed = 0


def fit_power(cfg: FitConfig, train, data: pads.Dataset) -> dict:
    """Fit y = w * x**power by SGD (ground truth: w = 1), checkpointing through `train`.

    Batches are drawn from a generator seeded by the step, so a run resumed from a checkpoint
    follows the same path as one that was never interrupted.
    """
    import torch

    table = data.to_table(columns=["x", "y"])
    features = torch.tensor(table.column("x").to_numpy() ** cfg.power, dtype=torch.float64)
    targets = torch.tensor(table.column("y").to_numpy(), dtype=torch.float64)
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=cfg.lr)
    state = train.restore()
    start = int(state["step"]) if state else 0
    if state:
        with torch.no_grad():
            w.copy_(state["w"])
    loss = torch.tensor(float("nan"))
    for step in range(start, cfg.steps):
        idx = torch.from_numpy(np.random.default_rng(cfg.seed + step).integers(0, len(targets), cfg.batch_size))
        loss = ((w * features[idx] - targets[idx]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cfg.work_s:
            time.sleep(cfg.work_s)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            train.report(step + 1, {"loss": float(loss)}, {"w": w.detach()})
    return {"weights": {"w": w.detach()},
            "metrics": {"w": float(w), "final_loss": float(loss), "start_step": start, "steps_run": cfg.steps - start}}
