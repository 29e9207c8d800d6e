"""Cluster-grade costs (issue #31), on the three-host cluster of `tests/hosts.py` (network namespaces on a
bridge; needs root): moto's S3 server and an MLflow tracking server on PostgreSQL (artifacts in S3).

1. Per-node overhead over a bare Ray task and the fully cached re-run, for N trivial nodes (the graph of
   `engine_overhead.py`, on a local 2-CPU Ray cluster in this process), with the S3 store and the
   tracking server against a local store and SQLite: the ratio says what the cluster's services cost.
2. Extraction throughput (the `activations` node of `extract`, submitted to the cluster) with its model
   actors on 1 and on 2 worker hosts of one CPU each: rows per second and the 2-host/1-host ratio.

    python benchmarks/cluster.py [--nodes 100] [--examples 1024] [--shards 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine_overhead import bare, graph, timed  # noqa: E402 - benchmarks/ is this script's own directory
from hosts import can_make_hosts, lab_cluster  # noqa: E402
from support import cli  # noqa: E402


def overhead(nodes: int, store: str, tracking: str, experiment: str) -> tuple[float, float]:
    """(first, cached) wall seconds of `nodes` trivial nodes with lineage on."""
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import RunSettings

    settings = RunSettings(store=store, tracking_uri=tracking, experiment=experiment, progress=False)
    first = timed(lambda: run_graph(graph(nodes), settings))[0]
    cached = timed(lambda: run_graph(graph(nodes), settings))[0]
    return first, cached


def extraction(lab, tmp: Path, label: str, actors: int, examples: int, shards: int) -> tuple[float, int]:
    """(seconds, rows) of the activations node of `extract` submitted to the lab cluster."""
    from interpflow.workflows.engine.record import RunRecord
    from interpflow.workflows.engine.store import Store

    store = f"s3://lab/extract-{label}"
    spec = tmp / f"extract-{label}.yaml"
    spec.write_text(yaml.safe_dump({
        "workflow": "extract", "num_shards": shards, "actors": actors, "actor_cpus": 1,
        "corpus": {"n_examples": examples}, "lm": {"steps": 20},
        "run": {"store": store, "tracking_uri": lab.tracking, "experiment": "cluster-bench"}}))
    done = cli("submit", str(spec), "--address", lab.url, "--wait", cwd=tmp, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    sid = done.stdout.split("submitted job ")[1].split()[0]
    node = Store(store).read_json(RunRecord.path_of(Store(store), sid))["nodes"]["activations"]
    return node["seconds"], node["rows"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    if not can_make_hosts():
        sys.exit("benchmarks/cluster.py needs root (ip netns), as CI has")
    import ray

    with tempfile.TemporaryDirectory() as tmp, lab_cluster("ifb", workers=2) as lab:
        tmp = Path(tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        remote = ray.remote(num_cpus=1)(bare)
        ray.get([remote.remote(i) for i in range(20)])
        bare_s = min(timed(lambda: ray.get([remote.remote(i) for i in range(args.nodes)]))[0] for _ in range(3))
        overhead(4, f"{tmp}/warm", f"sqlite:///{tmp}/mlflow.db", "warm")  # imports, worker code, the database
        overhead(4, "s3://lab/warm", lab.tracking, "warm")
        local = overhead(args.nodes, f"{tmp}/store", f"sqlite:///{tmp}/mlflow.db", "local")
        remote_services = overhead(args.nodes, "s3://lab/overhead", lab.tracking, "cluster")
        ray.shutdown()

        two = extraction(lab, tmp, "two-hosts", 2, args.examples, args.shards)
        lab.hosts.kill(lab.workers[1])
        deadline = time.time() + 180
        while lab.live_workers() != 1 and time.time() < deadline:  # the head notices the host is gone
            time.sleep(2)
        one = extraction(lab, tmp, "one-host", 1, args.examples, args.shards)

    n = args.nodes
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; bare Ray task "
          f"{1000 * bare_s / n:.2f} ms")
    print(f"{'services':>34} {'first s':>8} {'overhead ms/node':>17} {'cached s':>9} {'cached ms/node':>15}")
    for label, (first, cached) in (("local store + SQLite", local), ("S3 store + tracking server", remote_services)):
        print(f"{label:>34} {first:8.2f} {1000 * (first - bare_s) / n:17.2f} {cached:9.2f} {1000 * cached / n:15.2f}")
    print(f"ratio (S3 + server) / (local + SQLite): first {remote_services[0] / local[0]:.1f}x, cached "
          f"{remote_services[1] / local[1]:.1f}x")
    print(f"extraction, {args.examples} examples in {args.shards} shards: 1 worker host {one[1] / one[0]:.0f} rows/s "
          f"({one[0]:.1f} s), 2 worker hosts {two[1] / two[0]:.0f} rows/s ({two[0]:.1f} s): "
          f"{(two[1] / two[0]) / (one[1] / one[0]):.2f}x")


if __name__ == "__main__":
    main()
