"""Shared fixtures. Tests start exactly the Ray cluster they mean (address="local"), never attach to
a head some other process left running, and stop only what they started."""

from __future__ import annotations

import os
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray cluster for one test module; the runner reuses the connection."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def settings(tmp_path):
    from interpflow.workflows.engine import RunSettings

    return RunSettings(store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                       progress=False)
