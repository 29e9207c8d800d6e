"""Lineage the MLflow way (issue #29, point 5), read back with `mlflow.search_runs` and `MlflowClient` from a
real SQLite tracking store after runs on a real local Ray cluster: dataset inputs, links to the runs that
produced each input, MLflow's standard source tags, logged (and registered) models, and the environment
variables MLflow users set."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from interpflow.workflows.api import run_graph
from interpflow.workflows.engine import Graph, RunSettings, node, sharded

pytestmark = pytest.mark.usefixtures("ray_local")


class Rows(BaseModel):
    n: int = 6


class Scale(BaseModel):
    factor: float = 2.0


def make_table(cfg: Rows) -> pa.Table:
    return pa.table({"id": list(range(cfg.n)), "x": [float(i) for i in range(cfg.n)],
                     "label": [f"r{i}" for i in range(cfg.n)]})


def ids(cfg: Rows, table) -> list[int]:
    return list(range(table.num_rows))


def scale_shard(cfg: Scale, table, shard) -> pa.Table:
    rows = table.to_pydict()
    return pa.table({"id": [rows["id"][i] for i in shard.ids], "y": [cfg.factor * rows["x"][i] for i in shard.ids]})


def total(cfg: Scale, table, scaled) -> dict:
    return {"metrics": {"sum_y": float(sum(scaled.to_table().column("y").to_pylist())), "rows": table.num_rows}}


def graph(factor: float = 2.0) -> Graph:
    data = node(make_table, Rows())
    scaled = sharded(scale_shard, Scale(factor=factor), ids=ids, num_shards=2, table=data)
    return Graph([data, scaled, node(total, Scale(factor=factor), table=data, scaled=scaled)])


@pytest.fixture
def mlflow_uri(settings, monkeypatch):
    """`mlflow.*` calls read this test's tracking store (set_tracking_uri also sets the environment
    variable, which the monkeypatch restores)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    yield settings.tracking_uri
    mlflow.set_tracking_uri(None)


def node_runs(settings: RunSettings, parent_id: str) -> dict:
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["interpflow.node"]: r for r in runs}


def manifest(settings: RunSettings, handle, name: str) -> dict:
    state = handle.nodes()[name]
    return json.loads((Path(settings.store) / name / state["key"] / "_manifest.json").read_text())


def test_inputs_are_mlflow_datasets_and_runs_link_to_the_runs_that_produced_them(settings, mlflow_uri):
    handle = run_graph(graph(), settings, workflow="lineage")
    assert handle.ok
    runs = node_runs(settings, handle.mlflow_run_id)
    ids_of = {name: run.info.run_id for name, run in runs.items()}
    assert {name: s["mlflow_run_id"] for name, s in handle.nodes().items()} == ids_of

    total_run = runs["total"]
    datasets = {d.dataset.name: d for d in total_run.inputs.dataset_inputs}
    assert set(datasets) == {"make_table:output", "scale_shard:output"}
    table_in = datasets["make_table:output"]
    assert table_in.dataset.digest == manifest(settings, handle, "make_table")["digest"][:36]
    assert json.loads(table_in.dataset.source) == {"uri": handle.nodes()["make_table"]["output_uri"]}
    assert table_in.dataset.source_type == "local"
    columns = {c["name"]: c["type"] for c in json.loads(table_in.dataset.schema)["mlflow_colspec"]}
    assert columns == {"id": "long", "x": "double", "label": "string"}
    assert json.loads(table_in.dataset.profile)["num_rows"] == 6
    assert {t.key: t.value for t in table_in.tags} == {"mlflow.data.context": "table"}
    sharded_in = datasets["scale_shard:output"]  # a sharded node's schema comes from its first shard
    assert {c["name"] for c in json.loads(sharded_in.dataset.schema)["mlflow_colspec"]} == {"id", "y"}
    assert sharded_in.dataset.digest == manifest(settings, handle, "scale_shard")["digest"][:36]

    # each input names the MLflow run that produced it, besides its store key
    assert json.loads(total_run.data.tags["interpflow.upstream_runs"]) == \
        {"table": ids_of["make_table"], "scaled": ids_of["scale_shard"]}
    assert json.loads(runs["scale_shard"].data.tags["interpflow.upstream_runs"]) == {"table": ids_of["make_table"]}
    assert json.loads(runs["make_table"].data.tags["interpflow.upstream_runs"]) == {}
    assert total_run.data.params["input.table.digest"] == manifest(settings, handle, "make_table")["digest"]
    assert total_run.data.metrics["sum_y"] == 2.0 * sum(range(6))
    assert total_run.data.tags["interpflow.rows"] == "0" and int(runs["make_table"].data.tags["interpflow.rows"]) == 6

    # MLflow's standard source tags on every run; our dirty flag beside them
    commit = handle.record.data["code"]["commit"]
    parent = MlflowClient(settings.tracking_uri).get_run(handle.mlflow_run_id)
    for run in [parent, *runs.values()]:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
        assert tags["mlflow.user"] and tags["interpflow.code_dirty"] in ("true", "false")
        assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time

    # what an MLflow user types
    found = mlflow.search_runs(experiment_names=[settings.experiment],
                               filter_string="tags.`interpflow.node` = 'total'", output_format="list",
                               search_all_experiments=False)
    assert [r.info.run_id for r in found] == [ids_of["total"]]


def test_a_rerun_links_its_inputs_to_the_runs_that_computed_them_not_to_its_cache_hits(settings):
    first = run_graph(graph(), settings, workflow="lineage")
    second = run_graph(graph(factor=3.0), settings, workflow="lineage")  # make_table is a cache hit
    assert second.nodes()["make_table"]["status"] == "cached" and second.nodes()["total"]["status"] == "ran"
    before, after = node_runs(settings, first.mlflow_run_id), node_runs(settings, second.mlflow_run_id)
    producer = before["make_table"].info.run_id
    assert after["make_table"].data.tags["interpflow.cache_hit"] == "true"
    assert after["make_table"].data.tags["interpflow.produced_by_mlflow_run"] == producer
    upstream = json.loads(after["total"].data.tags["interpflow.upstream_runs"])
    assert upstream == {"table": producer, "scaled": after["scale_shard"].info.run_id}
    # the same data read twice is one MLflow dataset, an input of both runs
    client = MlflowClient(settings.tracking_uri)
    readers = [r for r in (before["total"], after["total"])
               if any(d.dataset.name == "make_table:output"
                      for d in client.get_run(r.info.run_id).inputs.dataset_inputs)]
    assert len(readers) == 2


class TinyLM:
    """A save_pretrained folder as transformers writes one for a causal LM (config, tokenizer, weights)."""

    def save_pretrained(self, path: str) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")


def train(cfg: Rows) -> dict:
    return {"model": TinyLM(), "metrics": {"loss": 0.5}}


def evaluate(cfg: Rows, model) -> dict:
    return {"metrics": {"weights_bytes": float((Path(model) / "model.safetensors").stat().st_size)}}


def model_graph() -> Graph:
    trained_model = node(train, Rows())
    return Graph([trained_model, node(evaluate, Rows(), model=trained_model["model"])])


def test_an_hf_output_is_a_logged_model_with_its_signature_registered_once_when_asked(settings, mlflow_uri):
    settings = settings.model_copy(update={"register": True})
    first = run_graph(model_graph(), settings, workflow="lm")
    assert first.ok
    client = MlflowClient(settings.tracking_uri)
    runs = node_runs(settings, first.mlflow_run_id)
    exp = client.get_experiment_by_name(settings.experiment)
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.name == "train-model" and model.model_type == "transformers"
    assert model.source_run_id == runs["train"].info.run_id and str(model.status) == "READY"
    weights = str(Path(settings.store) / "train" / first.nodes()["train"]["key"] / "model")
    assert model.tags["mlflow.model.isExternal"] == "true" and model.tags["interpflow.output_uri"] == weights
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert info.signature.outputs.to_dict() == [{"type": "string", "required": True}]
    assert info.metadata["weights_uri"] == weights and info.metadata["task"] == "text-generation"
    assert [o.model_id for o in runs["train"].outputs.model_outputs] == [model.model_id]
    evaluate_run = client.get_run(runs["evaluate"].info.run_id)  # search results leave model inputs out
    assert [i.model_id for i in evaluate_run.inputs.model_inputs] == [model.model_id]
    assert "train:model" in {d.dataset.name for d in runs["evaluate"].inputs.dataset_inputs}
    (version,) = client.search_model_versions("name = 'lm.train.model'")
    assert version.source == f"models:/{model.model_id}" and version.run_id == runs["train"].info.run_id
    assert runs["train"].data.tags["interpflow.registered_model"] == "lm.train.model/1"

    again = run_graph(model_graph(), settings, workflow="lm")  # all cached: the same model, no new version
    assert {s["status"] for s in again.nodes().values()} == {"cached"}
    cached = node_runs(settings, again.mlflow_run_id)
    assert [o.model_id for o in cached["train"].outputs.model_outputs] == [model.model_id]
    assert len(client.search_logged_models([exp.experiment_id])) == 1
    assert len(client.search_model_versions("name = 'lm.train.model'")) == 1


def test_without_register_nothing_enters_the_registry(settings):
    assert run_graph(model_graph(), settings, workflow="lm").ok
    client = MlflowClient(settings.tracking_uri)
    assert len(client.search_logged_models([client.get_experiment_by_name(settings.experiment).experiment_id])) == 1
    assert client.search_registered_models() == []


def logs_into_its_run(cfg: Rows, node) -> dict:
    """Node code that writes into its own MLflow run (as Ray Train nodes and sweeps do): a metric at a step
    and a child run."""
    from interpflow.workflows.sweep import _child_run, _end_child_run

    MlflowClient(node.mlflow_uri).log_metric(node.mlflow_run_id, "loss", 0.25, step=3)
    child = _child_run(node, "trial-0", {"lr": 0.1})
    _end_child_run(node, child, {"score": 1.0}, {}, "FINISHED")
    return {"metrics": {"loss": 0.125, "final": 1.0}}


def test_node_code_logs_into_its_own_run_which_exists_before_it_starts(settings):
    handle = run_graph(Graph([node(logs_into_its_run, Rows())]), settings)
    assert handle.ok
    client = MlflowClient(settings.tracking_uri)
    run = node_runs(settings, handle.mlflow_run_id)["logs_into_its_run"]
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.25, "final": 1.0}  # latest: highest step
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(0, 0.125), (3, 0.25)]
    (trial,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert trial.data.tags["interpflow.trial"] == "trial-0" and trial.data.metrics == {"score": 1.0}


def test_a_continued_run_keeps_one_run_per_node_under_its_parent(settings, tmp_path):
    """Given the id of a failed run, a new attempt of it continues the nodes' runs: a cache hit keeps the run
    that computed it, a failed or skipped node's run runs again; no second set of child runs."""
    import interpflow

    marker = tmp_path / "fault"
    marker.write_text("on")
    spec = {"workflow": "demo", "numbers": {"n": 400}, "num_shards": 2, "summary": {"fail_marker": str(marker)}}
    failed = interpflow.run(spec, settings=settings, run_id="attempts", progress=False)
    assert not failed.ok
    before = {name: run.info.run_id for name, run in node_runs(settings, failed.mlflow_run_id).items()}
    assert len(before) == 5
    marker.unlink()
    again = interpflow.run(spec, settings=settings, run_id="attempts", progress=False)
    assert again.ok and again.mlflow_run_id == failed.mlflow_run_id
    after = node_runs(settings, again.mlflow_run_id)
    assert {name: run.info.run_id for name, run in after.items()} == before
    assert {name: run.info.status for name, run in after.items()} == {name: "FINISHED" for name in before}
    assert after["summarise"].data.tags["interpflow.status"] == "ran"
    assert "interpflow.error" not in after["summarise"].data.tags
    assert after["make_numbers"].data.tags["interpflow.cache_hit"] == "false"  # the run that computed it
    assert MlflowClient(settings.tracking_uri).get_run(again.mlflow_run_id).info.status == "FINISHED"


def test_a_resume_is_a_new_parent_run_naming_its_origin_and_the_original_keeps_its_runs(settings, tmp_path):
    import interpflow

    marker = tmp_path / "fault"
    marker.write_text("on")
    spec = {"workflow": "demo", "numbers": {"n": 400}, "num_shards": 2, "summary": {"fail_marker": str(marker)},
            "run": {"store": settings.store, "tracking_uri": settings.tracking_uri}}
    failed = interpflow.run(spec, settings=settings, progress=False)
    def states(parent: str) -> dict:
        return {name: (run.info.run_id, run.info.status) for name, run in node_runs(settings, parent).items()}

    original = states(failed.mlflow_run_id)
    marker.unlink()
    resumed = interpflow.resume(failed.run_id, settings.store, progress=False)
    assert resumed.ok and resumed.run_id != failed.run_id and resumed.mlflow_run_id != failed.mlflow_run_id
    parent = MlflowClient(settings.tracking_uri).get_run(resumed.mlflow_run_id)
    assert parent.data.tags["interpflow.origin"] == failed.run_id
    assert parent.data.tags["interpflow.origin_mlflow_run"] == failed.mlflow_run_id
    after = states(failed.mlflow_run_id)
    assert after == original and original["summarise"][1] == "FAILED"  # the original's history stays
    assert len(node_runs(settings, resumed.mlflow_run_id)) == 5


def test_mlflow_tracking_uri_and_experiment_name_come_from_the_environment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'tracking.db'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    settings = RunSettings(store=str(tmp_path / "store"), progress=False)
    assert settings.tracking_uri == uri and settings.experiment == "from-the-environment"
    handle = run_graph(Graph([node(make_table, Rows(n=3))]), settings)
    assert handle.record.data["tracking_uri"] == uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("from-the-environment")
    assert client.get_run(handle.mlflow_run_id).info.experiment_id == exp.experiment_id
    assert not (tmp_path / "mlflow.db").exists()


def test_a_killed_driver_loses_only_the_lineage_of_nodes_in_flight(tmp_path):
    """SIGKILL the driver while shards sleep: the node that finished more than a flush period before is
    FINISHED in MLflow, its commit is in the store; the next driver closes what was left RUNNING as KILLED
    and takes the committed node as a cache hit."""
    import sqlite3
    import time

    import interpflow
    from interpflow.workflows.engine.lineage import FLUSH_S
    from support import run_then_kill, spec_file

    store = tmp_path / "store"
    spec = spec_file(tmp_path / "demo.yaml", store, numbers={"n": 40}, num_shards=4, transform={"work_s": 20})
    started = {}

    def numbers_committed_a_while_ago() -> bool:
        if not started and list(store.glob("make_numbers/*/_manifest.json")):
            started["at"] = time.time()
        return bool(started) and time.time() - started["at"] > 3 * FLUSH_S

    run_then_kill(spec, tmp_path, numbers_committed_a_while_ago, timeout=240)
    assert started, "make_numbers should have committed before the kill"
    assert not list(store.glob("transform_shard/*/_manifest.json")), "the kill should land while shards sleep"
    (record_path,) = store.glob("runs/*/record.json")
    record = json.loads(record_path.read_text())
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        status = dict(db.execute("SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                 "AND t.key = 'interpflow.node'"))
        parent = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (record["mlflow_run_id"],)).fetchone()
    assert status["make_numbers"] == "FINISHED" and status["transform_shard"] == "RUNNING"
    assert parent == ("RUNNING",)
    committed = json.loads(next(store.glob("make_numbers/*/_manifest.json")).read_text())

    settings = RunSettings(store=str(store), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    again = interpflow.run(spec, ["transform.work_s=0"], settings=settings, progress=False)  # reaps the orphan
    assert again.ok and again.nodes()["make_numbers"]["status"] == "cached"
    assert again.nodes()["make_numbers"]["produced_by"]["mlflow_run_id"] == committed["produced_by"]["mlflow_run_id"]
    client = MlflowClient(settings.tracking_uri)
    assert client.get_run(record["mlflow_run_id"]).info.status == "KILLED"
    killed = node_runs(settings, record["mlflow_run_id"])  # also a node the record had not yet named
    assert killed["transform_shard"].info.status == "KILLED"
    assert killed["transform_shard"].data.tags["interpflow.status"] == "killed"
    assert killed["make_numbers"].info.status == "FINISHED"


def test_code_version_takes_the_clients_commit_when_the_job_has_no_git(monkeypatch, tmp_path):
    """A job on a cluster runs the client's checkout without `.git`: the commit the client passed wins."""
    from interpflow.workflows.engine.lineage import code_version

    assert code_version(tmp_path) == {"commit": "unknown", "dirty": "unknown"}  # no repository here
    monkeypatch.setenv("INTERPFLOW_CODE_COMMIT", "0123abcd")
    monkeypatch.setenv("INTERPFLOW_CODE_DIRTY", "false")
    assert code_version(tmp_path) == {"commit": "0123abcd", "dirty": "false"}
