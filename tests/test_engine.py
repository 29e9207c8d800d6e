"""The engine on a real local Ray cluster with a real MLflow store (no mocks of either)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import interpflow
import interpflow.workflows.api
from interpflow.workflows.cli import app, explain_node

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def ray_local(aws_env, ray_local):
    """The module's cluster, started after the AWS variables are set, so its workers reach the S3 server too."""
    return ray_local


@pytest.fixture
def store_settings(store_uri, tmp_path):
    """Run settings on a local store and on S3 (conftest.store_uri); MLflow in a local SQLite file."""
    from interpflow.workflows.engine import RunSettings

    return RunSettings(store=store_uri, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)


def demo(settings, *overrides, run_id=None):
    return interpflow.run({"workflow": "demo", "numbers": {"n": 400}, "num_shards": 4},
                          list(overrides), settings=settings, run_id=run_id, progress=False)


def nested_runs(settings, parent_id):
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["interpflow.node"]: r for r in runs}


def test_second_run_is_all_cache_hits_and_executes_nothing(store_settings):
    settings = store_settings
    first = demo(settings)
    assert first.ok and first.metrics("report")["ground_truth_ok"] == 1.0
    assert {s["status"] for s in first.nodes().values()} == {"ran"}
    assert "ray_job_id" in first.record.data
    second = demo(settings)
    assert second.ok
    assert {s["status"] for s in second.nodes().values()} == {"cached"}
    assert "ray_job_id" not in second.record.data  # nothing was submitted to Ray at all
    runs = nested_runs(settings, second.mlflow_run_id)
    assert len(runs) == 5 and {r.data.tags["interpflow.cache_hit"] for r in runs.values()} == {"true"}
    assert {r.data.tags["interpflow.produced_by_run"] for r in runs.values()} == {first.run_id}
    assert second.table("transform_shard").equals(first.table("transform_shard"))
    client = MlflowClient(settings.tracking_uri)              # a cache hit's run shows the node's figure too
    assert [a.path for a in client.list_artifacts(runs["histogram"].info.run_id, "figures")] == \
        ["figures/histogram.png"]


def test_config_change_reruns_node_and_descendants_and_explain_names_it(settings):
    demo(settings)
    changed = demo(settings, "histogram.bins=7")
    status = {n: s["status"] for n, s in changed.nodes().items()}
    assert status == {"make_numbers": "cached", "transform_shard": "cached", "summarise": "cached",
                      "histogram": "ran", "report": "ran"}
    lines = explain_node(changed.record, "histogram", settings.store)
    assert "config.bins: 20 -> 7" in "\n".join(lines)
    assert "upstream.counts" in "\n".join(explain_node(changed.record, "report", settings.store))
    assert "cache hit" in explain_node(changed.record, "make_numbers", settings.store)[0]


def test_failed_node_skips_dependents_then_resume_runs_only_the_rest(settings, tmp_path):
    marker = tmp_path / "[" / "gloo]"  # the error names it: "[/gloo]" would be a closing tag to rich's markup
    marker.parent.mkdir()
    marker.write_text("on")
    result = CliRunner().invoke(app, ["run", "demo", "numbers.n=400", "num_shards=4", f"summary.fail_marker={marker}",
                                      f"run.store={settings.store}", f"run.tracking_uri={settings.tracking_uri}",
                                      "--no-progress"])
    assert result.exit_code == 1, result.output  # a failed node fails the command
    assert "summarise failed" in " ".join(result.output.split())
    assert f"marker file {marker} exists" in "".join(result.output.split("\n")), result.output  # printed as it is
    (run_id,) = [p.name for p in (Path(settings.store) / "runs").iterdir()]
    failed = interpflow.workflows.api.RunHandle(interpflow.workflows.api.open_store(settings.store),
                                                interpflow.workflows.api.load_record(run_id, settings.store))
    states = failed.nodes()
    assert not failed.ok
    assert states["summarise"]["status"] == "failed"
    assert "fault drill" in states["summarise"]["traceback"] and "Traceback" in states["summarise"]["traceback"]
    assert states["report"]["status"] == "skipped"
    assert states["histogram"]["status"] == "ran"  # the independent branch finished
    runs = nested_runs(settings, failed.mlflow_run_id)
    assert runs["summarise"].info.status == "FAILED"
    assert "fault drill" in runs["summarise"].data.tags["interpflow.error"]
    client = MlflowClient(settings.tracking_uri)
    assert "traceback.txt" in [a.path for a in client.list_artifacts(runs["summarise"].info.run_id)]

    result = CliRunner().invoke(app, ["status", failed.run_id, "--store", settings.store])
    assert result.exit_code == 1 and "fault drill" in result.output and "Traceback" in result.output

    marker.unlink()  # fix the fault, then resume the run: a new run that names it as its origin
    resumed = interpflow.resume(failed.run_id, settings.store, progress=False)
    status = {n: s["status"] for n, s in resumed.nodes().items()}
    assert resumed.ok and resumed.run_id != failed.run_id and resumed.record.origin == failed.run_id
    assert status == {"make_numbers": "cached", "transform_shard": "cached", "histogram": "cached",
                      "summarise": "ran", "report": "ran"}
    # the original run's history stays as it was: what it computed, what failed
    original = interpflow.workflows.api.load_record(failed.run_id, settings.store)
    assert original.data == failed.record.data
    assert {n: s["status"] for n, s in original.nodes.items()} == {n: s["status"] for n, s in states.items()}


def test_explain_after_a_resume_names_the_run_that_computed_each_node(settings, tmp_path):
    """A failed run, its resume through the CLI (a new run, printed), then a fully cached run: `explain` on
    the last names, for each node, the run that computed it (a resume once rewrote the original's statuses,
    and explain then called a cache hit "key is new")."""
    marker = tmp_path / "fault"
    marker.write_text("on")
    spec = {"workflow": "demo", "numbers": {"n": 400}, "num_shards": 4, "summary": {"fail_marker": str(marker)}}
    failed = interpflow.run(spec, settings=settings, progress=False)
    assert not failed.ok
    marker.unlink()
    result = CliRunner().invoke(app, ["resume", failed.run_id, "--store", settings.store, "--no-progress"])
    assert result.exit_code == 0, result.output
    new_id = result.output.split("new run: ")[1].split()[0]
    resumed = interpflow.open_run(new_id, settings.store)
    assert resumed.ok and resumed.record.origin == failed.run_id and new_id != failed.run_id
    listing = CliRunner().invoke(app, ["ls", "--store", settings.store]).output
    (row,) = [line for line in listing.splitlines() if new_id in line]
    assert row.split("│")[-2].strip() == failed.run_id  # ls shows the origin
    assert interpflow.workflows.api.load_record(failed.run_id, settings.store).nodes["make_numbers"]["status"] == "ran"

    again = interpflow.run(spec, settings=settings, progress=False)
    assert {s["status"] for s in again.nodes().values()} == {"cached"}
    computed_by = {"make_numbers": failed.run_id, "transform_shard": failed.run_id, "histogram": failed.run_id,
                   "summarise": new_id, "report": new_id}
    for node, run_id in computed_by.items():
        (line,) = explain_node(again.record, node, settings.store)
        assert "cache hit" in line and f"computed by run {run_id}" in line, line
    (line,) = explain_node(resumed.record, "make_numbers", settings.store)
    assert f"computed by run {failed.run_id}" in line
    (line,) = explain_node(resumed.record, "summarise", settings.store)
    assert "is new" in line  # the failed run never computed it

    # the same spec under an existing run id continues that run as a new attempt (today's meaning)
    named = demo(settings, run_id="named")  # no fail marker: summarise has a key of its own, computed here
    assert named.nodes()["summarise"]["status"] == "ran"
    again = demo(settings, run_id="named")
    assert again.run_id == "named" and len(again.record.data["attempts"]) == 2
    assert "named itself, in an earlier attempt" in explain_node(again.record, "summarise", settings.store)[0]


def test_corrupt_artifact_is_detected_on_read_and_recomputed(store_settings):
    import os

    import pyarrow.fs as pafs

    from interpflow.workflows.engine.store import Store

    settings = store_settings
    first = demo(settings)
    store = Store(settings.resolved_store())
    parquet = f"{store.node_path('make_numbers', first.nodes()['make_numbers']['key'])}/output.parquet"
    with store.fs.open_input_stream(parquet) as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF  # same size and (below) same mtime: only the checksum on read can tell
    stat = os.stat(parquet) if store.is_local else None
    with store.fs.open_output_stream(parquet) as f:
        f.write(bytes(data))
    if stat is not None:
        os.utime(parquet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = demo(settings, "transform.power=3")  # transform must read make_numbers again
    assert second.ok and second.metrics("report")["ground_truth_ok"] == 1.0
    assert second.nodes()["make_numbers"]["status"] == "ran"
    assert second.nodes()["make_numbers"].get("recomputed_after_corruption")
    assert store.fs.get_file_info(pafs.FileSelector(store.path(".quarantine")))
    from interpflow.tasks.demo import NumbersConfig, make_numbers

    assert second.outputs("make_numbers").equals(make_numbers(NumbersConfig(n=400)))


def test_mlflow_holds_parent_and_one_nested_run_per_node(settings):
    handle = demo(settings)
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(handle.mlflow_run_id)
    assert parent.data.tags["interpflow.run_id"] == handle.run_id
    assert parent.data.tags["interpflow.workflow"] == "demo"
    assert parent.data.params["numbers.n"] == "400" and parent.data.params["run.verify"] == "true"
    assert parent.data.tags["interpflow.ray_job_id"] == handle.record.data["ray_job_id"]
    runs = nested_runs(settings, handle.mlflow_run_id)
    assert set(runs) == set(handle.nodes())
    for name, run in runs.items():
        tags, state = run.data.tags, handle.nodes()[name]
        assert tags["interpflow.key"] == state["key"]
        assert tags["interpflow.cache_hit"] == "false"
        assert tags["interpflow.code_commit"] and tags["interpflow.code_dirty"] in ("true", "false", "unknown")
        assert tags["interpflow.ray_job_id"] == handle.record.data["ray_job_id"]
        assert tags["interpflow.output_uri"].endswith(state["key"])
        assert run.info.status == "FINISHED"
    upstream = __import__("json").loads(runs["summarise"].data.tags["interpflow.upstream_keys"])
    assert upstream == {"data": handle.nodes()["transform_shard"]["key"]}
    assert runs["histogram"].data.params["bins"] == "20"
    assert runs["report"].data.metrics["ground_truth_ok"] == 1.0
    assert runs["transform_shard"].data.metrics["shards_ran"] == 4
    figures = [a.path for a in client.list_artifacts(runs["histogram"].info.run_id, "figures")]
    assert figures == ["figures/histogram.png"]


def _fit(config, train):
    return {}


def test_training_node_tasks_reach_this_clusters_state_api(settings):
    """Ray Train's PlacementGroupCleaner asks the State API, from inside a training node's task tree, whether
    the controller still lives. It must answer there, about this cluster (not a head /tmp/ray remembers):
    a hung query made every TorchTrainer.fit() wait ~12 s at shutdown."""
    import ray

    from interpflow.workflows.engine.graph import Graph, trained
    from interpflow.workflows.engine.record import RunRecord
    from interpflow.workflows.engine.runner import Runner
    from interpflow.workflows.engine.store import Store

    store = Store(settings.resolved_store())
    record = RunRecord.create(store, "state-api", "graph", {}, {}, {})
    from interpflow.workflows.engine.training import Training

    # two workers: a Ray Train node (one worker runs in its own task, without a TorchTrainer)
    runner = Runner(Graph(trained(_fit, training=Training(num_workers=2))), settings, store, record, None)
    (node,) = runner.graph
    node_id = ray.get_runtime_context().get_node_id()

    @ray.remote
    def ask() -> bool:
        from ray.util.state import get_node

        return get_node(node_id, timeout=10) is not None

    assert ray.get(ask.options(**runner._task_options(node)).remote(), timeout=60)


class _Doomed(BaseModel):
    marker: str
    n: int = 12


def _doomed_setup(cfg: _Doomed) -> str:
    return "model"


def _doomed_ids(cfg: _Doomed) -> list[int]:
    return list(range(cfg.n))


def _doomed_shard(cfg: _Doomed, shard, model: str) -> dict:
    marker = Path(cfg.marker)
    if shard.index == 1 and marker.exists():
        marker.unlink()
        os._exit(1)  # the actor's process ends, as it does with a lost host; Ray may not restart it
    import pyarrow as pa

    return pa.table({"id": list(shard.ids)})


def test_a_pool_actor_dead_for_good_is_replaced_and_every_shard_runs(settings, tmp_path):
    """An actor whose restarts are spent (here: none allowed) is replaced by a new one; before, every shard
    queued on it was handed back to the same dead actor until the node failed (seen in the preemption
    soak, after several kills of one host)."""
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import ActorPool, Graph, sharded

    marker = tmp_path / "die-once"
    marker.write_text("on")
    pooled = sharded(_doomed_shard, _Doomed(marker=str(marker)), ids=_doomed_ids, num_shards=6, name="pooled",
                     actors=ActorPool(setup=_doomed_setup, size=1, max_restarts=0))
    handle = run_graph(Graph(pooled), settings, progress=False)
    assert not marker.exists(), "the actor should have died"
    assert handle.ok, handle.nodes()
    assert sorted(handle.table("pooled").column("id").to_pylist()) == list(range(12))
