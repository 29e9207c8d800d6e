"""The engine with many shards and many nodes: shard tasks in a window, small shards grouped per task,
each still committed and failed on its own; wide graphs scheduled by events, not by scans."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel

from interpflow.workflows.api import run_graph
from interpflow.workflows.engine import Graph, RunSettings, node, sharded

pytestmark = pytest.mark.usefixtures("ray_local")


class Ids(BaseModel):
    n: int
    fail_marker: str | None = None  # a file whose existence makes the shard holding id 77 fail


def id_range(cfg: Ids) -> range:
    return range(cfg.n)


def square_shard(cfg: Ids, shard) -> pa.Table:
    if cfg.fail_marker and 77 in shard.ids and Path(cfg.fail_marker).exists():
        raise ValueError("planted failure in the shard holding id 77")
    return pa.table({"id": list(shard.ids), "square": [i * i for i in shard.ids]})


class Trivial(BaseModel):
    i: int


def trivial(cfg: Trivial) -> dict:
    return {"i": cfg.i, "square": cfg.i * cfg.i}


def total(cfg: None, **parts: dict) -> dict:
    return {"metrics": {"sum": float(sum(p["square"] for p in parts.values()))}}


def settings_in(tmp_path) -> RunSettings:
    return RunSettings(store=str(tmp_path / "store"), lineage=False, progress=False)


def test_many_small_shards_run_grouped_and_commit_each_failing_and_resuming_alone(tmp_path):
    marker = tmp_path / "fail"
    marker.touch()
    cfg = Ids(n=1000, fail_marker=str(marker))
    graph = Graph(sharded(square_shard, cfg, ids=id_range, num_shards=500, name="squares"))
    settings = settings_in(tmp_path)

    first = run_graph(graph, settings, progress=False)
    state = first.nodes()["squares"]
    assert not first.ok and state["status"] == "failed"
    assert state["failed_shards"] == [38]  # ids 76, 77: one shard of a task that ran several
    assert "planted failure" in state["error"] and "ValueError" in state["traceback"]
    node_dir = Path(settings.store) / "squares" / state["key"]
    assert len(list(node_dir.glob("shard-*/_manifest.json"))) == 499  # every other shard committed

    marker.unlink()
    second = run_graph(graph, settings, progress=False)
    assert second.ok
    assert {k: second.nodes()["squares"]["shards"][k] for k in ("total", "ran", "cached")} == \
        {"total": 500, "ran": 1, "cached": 499}
    table = second.table("squares")
    assert table.num_rows == 1000 and sorted(table.column("id").to_pylist()) == list(range(1000))
    assert table.column("square").to_pylist() == [i * i for i in table.column("id").to_pylist()]


def test_a_wide_graph_runs_every_node_once_and_its_join_sees_them_all(tmp_path):
    leaves = [node(trivial, Trivial(i=i), name=f"n{i:04d}") for i in range(300)]
    join = node(total, None, name="total", **{f"p{i}": leaf for i, leaf in enumerate(leaves)})
    handle = run_graph(Graph(join), settings_in(tmp_path), progress=False)
    assert handle.ok and {s["status"] for s in handle.nodes().values()} == {"ran"}
    assert handle.metrics("total")["sum"] == float(sum(i * i for i in range(300)))
    again = run_graph(Graph(join), settings_in(tmp_path), progress=False)
    assert {s["status"] for s in again.nodes().values()} == {"cached"}
