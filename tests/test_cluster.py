"""Multi-node behaviour: a worker node lost mid-run. (Submission to a `ray start` head: test_cluster_jobs.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import interpflow
from interpflow.workflows.engine import RunSettings


def test_worker_node_removed_mid_run_loses_and_duplicates_no_row(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        # the driver attaches before the workers exist: all nodes share one IP, and a driver that attached
        # to the doomed node's raylet died with it (SystemExit in ray.wait), a flake of the test, not the runner
        ray.init(address=cluster.address, logging_level="WARNING")
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
        doomed = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        settings = RunSettings(store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                               progress=False, max_retries=3)
        result = {}
        spec = {"workflow": "demo", "numbers": {"n": 1200}, "num_shards": 12, "transform": {"work_s": 0.6}}
        runner = threading.Thread(target=lambda: result.update(h=interpflow.run(spec, settings=settings, progress=False)))
        runner.start()
        shards = Path(settings.store) / "transform_shard"
        deadline = time.time() + 180
        while len(list(shards.glob("*/shard-*/_manifest.json"))) < 3 and time.time() < deadline:
            time.sleep(0.1)
        cluster.remove_node(doomed)
        runner.join(300)
        handle = result["h"]
        assert handle.ok, {n: s["error"] for n, s in handle.nodes().items()}
        table = handle.table("transform_shard")
        ids = table.column("id").to_pylist()
        assert len(ids) == 1200 and sorted(ids) == list(range(1200))
        assert handle.metrics("report")["ground_truth_ok"] == 1.0
        assert len(ray.nodes()) == 3 and sum(n["Alive"] for n in ray.nodes()) == 2  # the node really went
    finally:
        ray.shutdown()
        cluster.shutdown()
