"""The engine at scale: a sharded node of many shards and a graph of many nodes, planned, run, resumed
and re-run fully cached, against bare Ray tasks doing the same work in the same process.

Reports planning time, wall time, per-shard and per-node overhead over bare Ray tasks, the driver's peak
memory (RSS growth over the phase), the run record's size, and the cached re-run; at two sizes, so that
growth can be read as a ratio. Targets (issue #29): per-shard overhead <= 1 ms; planning and a cached
re-run of N nodes <= 0.5 s + 1 ms a node; memory and record size at most linear.

    python benchmarks/engine_scale.py                                  # 10k and 100k shards; 1k and 10k nodes
    python benchmarks/engine_scale.py --shards 1000 10000 --nodes 100 1000 --ids-per-shard 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import ray
from pydantic import BaseModel

from interpflow.workflows.api import run_graph
from interpflow.workflows.engine import Graph, RunSettings, node, sharded
from interpflow.workflows.engine.runner import plan_keys


class Ids(BaseModel):
    n: int


class Trivial(BaseModel):
    i: int = 0


def id_range(cfg: Ids) -> range:
    return range(cfg.n)


def square_shard(cfg: Ids, shard) -> pa.Table:
    ids = list(shard.ids)
    return pa.table({"id": ids, "square": [i * i for i in ids]})


def trivial(cfg: Trivial) -> dict:
    return {"i": cfg.i, "square": cfg.i * cfg.i}


def bare_shard(ids: list[int]) -> pa.Table:
    return pa.table({"id": ids, "square": [i * i for i in ids]})


class PeakRss:
    """The driver's peak RSS above its level at entry, sampled every 20 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.grew_mb = (self.peak - self.base) / 2**20


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def record_bytes(settings: RunSettings, run_id: str) -> int:
    return os.path.getsize(Path(settings.store) / "runs" / run_id / "record.json")


def sharded_case(tmp: Path, shards: int, ids_per_shard: int, bare_remote) -> dict:
    n_ids = shards * ids_per_shard
    settings = RunSettings(store=str(tmp / f"store-s{shards}"), lineage=False, progress=False)
    graph = Graph(sharded(square_shard, Ids(n=n_ids), ids=id_range, num_shards=shards, name="squares"))
    plan_s, _ = timed(lambda: plan_keys(graph))
    chunks = [list(range(i * ids_per_shard, (i + 1) * ids_per_shard)) for i in range(shards)]
    bare_s, _ = timed(lambda: ray.get([bare_remote.remote(c) for c in chunks]))
    with PeakRss() as mem:
        run_s, handle = timed(lambda: run_graph(graph, settings, progress=False))
    assert handle.ok and handle.nodes()["squares"]["shards"]["ran"] == shards
    size = record_bytes(settings, handle.run_id)
    # resume: a tenth of the shards lost (and the node's seal), the rest committed
    node_dir = Path(settings.store) / "squares" / handle.nodes()["squares"]["key"]
    lost = sorted(p for p in node_dir.iterdir() if p.name.startswith("shard-"))[::10]
    for p in lost:
        shutil.rmtree(p)
    (node_dir / "_manifest.json").unlink()
    resume_s, resumed = timed(lambda: run_graph(graph, settings, progress=False))
    assert resumed.nodes()["squares"]["shards"]["ran"] == len(lost)
    cached_s, cached = timed(lambda: run_graph(graph, settings, progress=False))
    assert cached.nodes()["squares"]["status"] == "cached"
    return {"shards": shards, "ids": n_ids, "plan_s": plan_s, "bare_s": bare_s, "run_s": run_s,
            "per_shard_ms": 1000 * (run_s - bare_s) / shards, "mem_mb": mem.grew_mb, "record_kb": size / 1024,
            "resume_s": resume_s, "resumed": len(lost), "cached_s": cached_s}


def graph_case(tmp: Path, nodes: int, bare_remote) -> dict:
    settings = RunSettings(store=str(tmp / f"store-n{nodes}"), lineage=False, progress=False)
    graph = Graph([node(trivial, Trivial(i=i), name=f"n{i:05d}") for i in range(nodes)])
    plan_s, _ = timed(lambda: plan_keys(graph))
    bare_s, _ = timed(lambda: ray.get([bare_remote.remote(i) for i in range(nodes)]))
    with PeakRss() as mem:
        run_s, handle = timed(lambda: run_graph(graph, settings, progress=False))
    assert handle.ok
    size = record_bytes(settings, handle.run_id)
    cached_s, cached = timed(lambda: run_graph(graph, settings, progress=False))
    assert {s["status"] for s in cached.nodes().values()} == {"cached"}
    return {"nodes": nodes, "plan_s": plan_s, "bare_s": bare_s, "run_s": run_s,
            "per_node_ms": 1000 * (run_s - bare_s) / nodes, "mem_mb": mem.grew_mb, "record_kb": size / 1024,
            "cached_s": cached_s, "cached_goal_s": 0.5 + nodes / 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ids-per-shard", type=int, default=10)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000])
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    bare_shard_remote = ray.remote(num_cpus=1)(bare_shard)
    bare_node_remote = ray.remote(num_cpus=1)(lambda i: {"i": i, "square": i * i})
    ray.get([bare_node_remote.remote(i) for i in range(50)])  # warm the worker pool
    with tempfile.TemporaryDirectory() as tmp:
        rows = [sharded_case(Path(tmp), s, args.ids_per_shard, bare_shard_remote) for s in args.shards]
        print(f"{'shards':>8s} {'ids':>9s} {'plan s':>7s} {'bare s':>7s} {'run s':>7s} {'ms/shard':>9s} "
              f"{'RSS +MB':>8s} {'record KB':>10s} {'resume s':>9s} {'(ran)':>6s} {'cached s':>9s}")
        for r in rows:
            print(f"{r['shards']:8d} {r['ids']:9d} {r['plan_s']:7.2f} {r['bare_s']:7.2f} {r['run_s']:7.2f} "
                  f"{r['per_shard_ms']:9.3f} {r['mem_mb']:8.1f} {r['record_kb']:10.1f} {r['resume_s']:9.2f} "
                  f"{r['resumed']:6d} {r['cached_s']:9.2f}")
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            scale = b["shards"] / a["shards"]
            print(f"x{scale:.0f} shards: run x{b['run_s'] / a['run_s']:.1f}, RSS x{b['mem_mb'] / max(a['mem_mb'], 1):.1f}, "
                  f"record x{b['record_kb'] / a['record_kb']:.1f}, cached x{b['cached_s'] / a['cached_s']:.1f}")
        rows = [graph_case(Path(tmp), n, bare_node_remote) for n in args.nodes]
        print(f"\n{'nodes':>8s} {'plan s':>7s} {'bare s':>7s} {'run s':>7s} {'ms/node':>8s} {'RSS +MB':>8s} "
              f"{'record KB':>10s} {'cached s':>9s} {'goal s':>7s}")
        for r in rows:
            print(f"{r['nodes']:8d} {r['plan_s']:7.2f} {r['bare_s']:7.2f} {r['run_s']:7.2f} {r['per_node_ms']:8.2f} "
                  f"{r['mem_mb']:8.1f} {r['record_kb']:10.1f} {r['cached_s']:9.2f} {r['cached_goal_s']:7.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
