"""Engine overhead per node versus bare Ray tasks, and the cached re-run as a fraction of the first.

Both sides run in this process on the same local Ray cluster. The engine side pays for what makes
resume work: key computation, a committed artifact with a checksummed manifest, the run record,
locks and (optionally) one MLflow run per node. Targets: <= 20 ms per node, cached re-run <= 5%.

    python benchmarks/engine_overhead.py [--nodes 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
from pydantic import BaseModel

from interpflow.workflows.api import run_graph
from interpflow.workflows.engine import Graph, RunSettings, node


class Trivial(BaseModel):
    i: int


def trivial(cfg: Trivial) -> dict:
    return {"i": cfg.i, "square": cfg.i * cfg.i}


def bare(i: int) -> dict:
    return {"i": i, "square": i * i}


def graph(n: int) -> Graph:
    return Graph([node(trivial, Trivial(i=i), name=f"n{i:04d}") for i in range(n)])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    args = parser.parse_args()
    n = args.nodes
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    remote = ray.remote(num_cpus=1)(bare)
    ray.get([remote.remote(i) for i in range(20)])  # warm the worker pool
    bare_s = min(timed(lambda: ray.get([remote.remote(i) for i in range(n)])) for _ in range(3))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lineage in (False, True):
            settings = RunSettings(store=str(Path(tmp) / f"store-{lineage}"), lineage=lineage, progress=False,
                                   tracking_uri=f"sqlite:///{tmp}/mlflow-{lineage}.db")
            first = timed(lambda: run_graph(graph(n), settings))
            cached = timed(lambda: run_graph(graph(n), settings))
            rows.append((lineage, first, cached))
        import interpflow

        settings = RunSettings(store=str(Path(tmp) / "demo"), tracking_uri=f"sqlite:///{tmp}/demo.db", progress=False)
        demo_first = timed(lambda: interpflow.run("demo", settings=settings))
        demo_cached = timed(lambda: interpflow.run("demo", settings=settings))
    ray.shutdown()

    print(f"{n} trivial nodes on local Ray (2 CPUs); bare Ray tasks: {bare_s:.3f} s "
          f"({1000 * bare_s / n:.2f} ms/task)")
    print(f"{'MLflow lineage':>15} {'first run s':>12} {'overhead ms/node':>17} {'cached s':>9} {'cached/first':>13}")
    for lineage, first, cached in rows:
        overhead = 1000 * (first - bare_s) / n
        print(f"{'on' if lineage else 'off':>15} {first:12.3f} {overhead:17.2f} {cached:9.3f} {cached / first:13.3f}")
    print(f"demo workflow (5 nodes, 8 shards, lineage on): first {demo_first:.3f} s, cached {demo_cached:.3f} s, "
          f"cached/first {demo_cached / demo_first:.3f}")
    print("targets: overhead <= 20 ms/node; cached/first <= 0.05")


if __name__ == "__main__":
    main()
