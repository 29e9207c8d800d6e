"""Lineage through an MLflow tracking server (issue #31, point 2): `mlflow server` on PostgreSQL with its
artifacts in S3, started here as processes; a run logged through it reads the same as one written to
SQLite, and the training worker logs its step metrics to it over HTTP (no file path shared)."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

import support

SPEC = {"workflow": "demo", "numbers": {"n": 200}, "num_shards": 2, "fit": {"steps": 20, "checkpoint_every": 2}}
@pytest.fixture(scope="module")
def tracking_server(aws_env):
    """`mlflow server` on a fresh PostgreSQL database, its artifacts proxied to a fresh bucket of the session's
    S3 server: (URL, bucket)."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    with support.tracking_server("127.0.0.1", bucket) as url:
        yield url, bucket


def _lineage(uri: str, parent_id: str, store: str) -> tuple[dict, dict[str, dict]]:
    """What a reader of the tracking store sees of a run: the parent and one view per node run, with the
    run's own store path, tracking URI and run ids (which differ between any two runs) as placeholders."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    ids = {parent_id: "<parent>", **{r.info.run_id: f"<{r.data.tags['interpflow.node']}>" for r in children}}

    def plain(value: str) -> str:
        value = value.replace(store, "<store>").replace(uri, "<tracking>")
        for run_id, name in ids.items():
            value = value.replace(run_id, name)
        return value

    def view(run) -> dict:
        run_id = run.info.run_id
        return {"status": run.info.status,
                "params": {k: plain(v) for k, v in run.data.params.items()},
                "metrics": sorted(run.data.metrics),
                "tags": sorted(k for k in run.data.tags if not k.startswith("mlflow.log-model")),
                "links": {k: plain(v) for k, v in run.data.tags.items() if k.startswith("interpflow.upstream")},
                "figures": sorted(a.path for a in client.list_artifacts(run_id, "figures")),
                "inputs": sorted((d.dataset.name, d.dataset.source_type) for d in run.inputs.dataset_inputs)}

    return view(parent), {r.data.tags["interpflow.node"]: view(r) for r in children}


def _differences(got: dict, want: dict) -> dict:
    """Per field, the entries that differ (both sides), so that a failure says what."""
    out = {}
    for field in set(got) | set(want):
        a, b = got.get(field), want.get(field)
        if a != b:
            out[field] = ({k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
                          if isinstance(a, dict) and isinstance(b, dict) else (a, b))
    return out


@pytest.mark.usefixtures("ray_local")
def test_a_run_through_the_tracking_server_reads_as_on_sqlite(tracking_server, tmp_path):
    import boto3

    from interpflow.workflows.api import run
    from interpflow.workflows.engine import RunSettings

    url, bucket = tracking_server
    logged = {}
    for label, uri in {"sqlite": f"sqlite:///{tmp_path / 'mlflow.db'}", "server": url}.items():
        store = str(tmp_path / label / "store")
        settings = RunSettings(store=store, tracking_uri=uri, experiment="tracking-server", progress=False)
        handle = run(dict(SPEC), settings=settings)
        assert handle.ok and handle.metrics("report")["ground_truth_ok"] == 1.0, handle.nodes()
        logged[label] = (handle, _lineage(uri, handle.mlflow_run_id, store))

    (sqlite_parent, sqlite_nodes), (server_parent, server_nodes) = logged["sqlite"][1], logged["server"][1]
    assert set(server_nodes) == set(sqlite_nodes) == {"make_numbers", "transform_shard", "summarise", "histogram",
                                                       "report", "fit"}
    assert _differences(server_parent, sqlite_parent) == {}
    for name in sqlite_nodes:
        assert _differences(server_nodes[name], sqlite_nodes[name]) == {}, name
    assert server_nodes["histogram"]["figures"] == ["figures/histogram.png"]

    # the training node's worker logged its loss at every step to the server itself (HTTP: no shared path)
    client = MlflowClient(url)
    fit_run = logged["server"][0].nodes()["fit"]["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(fit_run, "loss")]
    assert steps == list(range(2, 21, 2))
    assert client.get_run(fit_run).info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(key.startswith("mlartifacts/") and key.endswith("figures/histogram.png") for key in stored), stored
