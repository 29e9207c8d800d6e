"""Shared fixtures. Tests start exactly the Ray cluster they mean (address="local"), never attach to
a head some other process left running, and stop only what they started."""

from __future__ import annotations

import os
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default, and a worker's `report` (each checkpoint)
# waits for that poll: a training node with many checkpoints spent most of its wall time waiting. Polling
# more often changes nothing a test asserts (a missed poll is tolerated for minutes); CLI subprocesses and
# Ray workers inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray cluster for one test module; the runner reuses the connection."""
    import ray

    from interpflow.workflows.engine.ray_cluster import start_local

    if ray.is_initialized():
        ray.shutdown()
    # the dashboard stays on: Ray Train's PlacementGroupCleaner polls the State API it serves (runner.ensure_ray);
    # start_local: hardened like the runner's cluster (token file 0600, every listener on 127.0.0.1)
    start_local(num_cpus=2, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def settings(tmp_path):
    from interpflow.workflows.engine import RunSettings

    return RunSettings(store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                       progress=False)
