"""A small built-in workflow with fan-out, fan-in, one sharded node and (optionally) a Ray Train node,
to exercise the engine."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import demo
from interpflow.workflows.engine import Graph, node, sharded, trained


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    numbers: demo.NumbersConfig = demo.NumbersConfig()
    transform: demo.TransformConfig = demo.TransformConfig()
    num_shards: int = Field(8, ge=1, le=100_000, description="shards of the transform node")
    summary: demo.SummaryConfig = demo.SummaryConfig()
    histogram: demo.HistogramConfig = demo.HistogramConfig()
    fit: demo.FitConfig | None = Field(None, description="add a Ray Train node fitting y = w x^power")


def demo_graph(cfg: DemoConfig) -> Graph:
    numbers = node(demo.make_numbers, cfg.numbers)
    transformed = sharded(demo.transform_shard, cfg.transform, ids=demo.row_ids, num_shards=cfg.num_shards,
                          data=numbers)
    stats = node(demo.summarise, cfg.summary, data=transformed)
    hist = node(demo.histogram, cfg.histogram, data=transformed)
    checked = node(demo.report, demo.ReportConfig(power=cfg.transform.power),
                   stats=stats, counts=hist["counts"], numbers=numbers)
    if cfg.fit is None:
        return Graph(checked)
    fitted = trained(demo.fit_power, cfg.fit.model_copy(update={"power": cfg.transform.power}), name="fit",
                     data=transformed)
    return Graph(checked, fitted)
