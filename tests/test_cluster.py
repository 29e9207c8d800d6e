"""Multi-node behaviour: a worker node lost mid-run, and submission to a `ray start` head."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import interpflow
from interpflow.workflows.engine import RunSettings
from support import cli, spec_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def ray_head(tmp_path):
    """A head started with `ray start --block` on loopback; stopped by its own pid, nothing else."""
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    from interpflow.cluster.submit import cluster_auth_headers, jobs_client

    deadline = time.time() + 120
    while True:
        try:
            assert cluster_auth_headers(), "the head should have written a cluster token"
            jobs_client(url).list_jobs()
            break
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.time() > deadline or head.poll() is not None:
                head.terminate()
                raise RuntimeError((tmp_path / "head.log").read_text()[-3000:])
            time.sleep(1)
    yield url
    head.terminate()
    head.wait(60)


def test_submit_runs_the_job_and_resubmitting_attaches(ray_head, tmp_path):
    from interpflow.cluster.submit import jobs_client

    store = tmp_path / "store"
    spec = spec_file(tmp_path / "spec.yaml", store, numbers={"n": 300}, num_shards=3)
    first = cli("submit", str(spec), "--address", ray_head, cwd=tmp_path, timeout=400)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "SUCCEEDED" in first.stdout
    second = cli("submit", str(spec), "--address", ray_head, cwd=tmp_path, timeout=120)
    assert second.returncode == 0 and "attached" in second.stdout, second.stdout + second.stderr
    jobs = [j for j in jobs_client(ray_head).list_jobs() if (j.submission_id or "").startswith("interpflow-")]
    assert len(jobs) == 1 and str(jobs[0].status.value) == "SUCCEEDED"
    records = list(store.glob("runs/*/record.json"))
    assert len(records) == 1 and '"status": "succeeded"' in records[0].read_text()
