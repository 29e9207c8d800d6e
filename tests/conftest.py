"""Shared fixtures. Tests start exactly the Ray cluster they mean (address="local"), never attach to
a head some other process left running, and stop only what they started."""

from __future__ import annotations

import os
import uuid

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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server for the session: moto's standalone server as a process on 127.0.0.1 (it enforces
    If-None-Match / If-Match); its endpoint URL. Stopped, by its pid, at the end."""
    from support import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def aws_env(s3_server, tmp_path_factory):
    """The standard AWS variables pointing at the session's S3 server with dummy keys, for one test module and
    the processes it starts (a module's Ray workers too, if the cluster starts after this); restored after."""
    config = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(config / "config"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(config / "credentials")}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield s3_server


@pytest.fixture
def s3_bucket(aws_env):
    """A fresh bucket on the session's S3 server (names need at least 3 characters)."""
    import boto3

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """The root of an empty store, once on a local directory and once under a fresh bucket of the session's
    S3 server: the store suite runs against both."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/store"
