"""A multi-host Ray cluster on one machine (issue #31, point 3): a head and two worker hosts, each in its own
network namespace with its own address and its own `ray start`; the S3 store (moto) and the MLflow tracking
server (PostgreSQL, artifacts in S3) listen on the bridge, the one address every host reaches. `interpflow
submit` sends `extract` (8 shards over 2 model actors, one a host) to the head's dashboard: the outputs land
in S3, the lineage in the tracking server, and the client reads both back; a worker host is lost mid-shards
(point 4); `sae` trains with one Ray Train worker on each worker host."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from hosts import Cluster, can_make_hosts, lab_cluster
from support import cli, shard_digests

pytestmark = pytest.mark.skipif(not can_make_hosts(), reason="needs root for ip netns (CI runs as root)")

@pytest.fixture(scope="module")
def cluster():
    """Three hosts, moto S3 and an MLflow server on the bridge, a head with no CPUs and two workers with one
    each (`hosts.lab_cluster`). Everything is killed and removed after."""
    with lab_cluster("ifm", workers=2) as lab:
        yield lab


SPEC = {"workflow": "extract", "num_shards": 8, "actors": 2, "actor_cpus": 1, "corpus": {"n_examples": 128},
        "lm": {"steps": 20}}


def _spec(path: Path, cluster: Cluster, store: str) -> Path:
    path.write_text(yaml.safe_dump({**SPEC, "run": {"store": store, "tracking_uri": cluster.tracking,
                                                    "experiment": "multihost"}}))
    return path


def _files(store, under: str, name: str = "") -> list:
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(under), recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(name)]


def _run_id(store) -> str:
    (record,) = _files(store, "runs", "record.json")
    return store.read_json(record.path)["run_id"]


def test_submitted_extract_runs_on_two_hosts_into_s3_and_the_tracking_server(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    import interpflow
    from interpflow.workflows.engine.store import Store

    done = cli("submit", str(_spec(tmp_path / "extract.yaml", cluster, cluster.store)), "--address", cluster.url,
               "--wait", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    store = Store(cluster.store)
    run_id = _run_id(store)
    status = cli("status", run_id, "--store", cluster.store, cwd=tmp_path, timeout=120)
    assert status.returncode == 0 and "activations" in status.stdout, status.stdout + status.stderr

    handle = interpflow.open_run(run_id, store=cluster.store)  # the notebook API, on the client
    shards = handle.nodes()["activations"]["shards"]
    assert (shards["ran"], shards["total"]) == (8, 8)
    rows = handle.table("activations")
    assert set(rows.column("id").to_pylist()) == set(range(128))
    manifests = [store.read_json(i.path) for i in _files(store, "activations", "_manifest.json") if "/shard-" in i.path]
    assert len(manifests) == 8
    workers = {cluster.hosts.address["w1"], cluster.hosts.address["w2"]}
    assert {m["produced_by"]["node_ip"] for m in manifests} == workers

    client = MlflowClient(cluster.tracking)
    parent = client.get_run(handle.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["interpflow.run_id"] == run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["interpflow.node"] for r in children} >= {"corpus", "tiny_lm", "activations", "report"}


def test_a_lost_worker_host_mid_shards_changes_no_byte_of_the_outputs(cluster, tmp_path):
    """Issue #31, point 4: every process of worker host w2 is killed while the shards run, and a replacement
    joins; the run finishes, each (id, position) is there once, and every committed shard file is
    byte-identical to the undisturbed run's (the previous test's, same keys, another store)."""
    import interpflow
    from interpflow.workflows.engine.store import Store

    undisturbed = shard_digests(Store(cluster.store), "activations")
    assert len(undisturbed) >= 8, "runs after the undisturbed run of the test above"
    store_uri = cluster.store + "-lost-host"
    store = Store(store_uri)
    spec = _spec(tmp_path / "extract.yaml", cluster, store_uri)
    result = {}
    submit = threading.Thread(target=lambda: result.update(done=cli(
        "submit", str(spec), "--address", cluster.url, "--wait", cwd=tmp_path, timeout=600)))
    submit.start()
    deadline = time.time() + 400
    while not [i for i in _files(store, "activations", "_manifest.json") if "/shard-" in i.path]:
        assert time.time() < deadline and submit.is_alive(), result
        time.sleep(0.1)
    killed = cluster.hosts.kill("w2")
    node_done = bool([i for i in _files(store, "activations", "_manifest.json") if "/shard-" not in i.path])
    assert killed and not node_done, "the host should be lost while shards still run"
    time.sleep(5)
    cluster.rejoin("w2")
    submit.join(600)
    done = result["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    handle = interpflow.open_run(_run_id(store), store=store_uri)
    rows = handle.table("activations")
    keys = list(zip(rows.column("id").to_pylist(), rows.column("position").to_pylist()))
    assert len(keys) == len(set(keys)) and set(rows.column("id").to_pylist()) == set(range(128))
    assert shard_digests(store, "activations") == undisturbed


def test_sae_trains_with_one_ray_train_worker_on_each_host(cluster, tmp_path):
    """Issue #31 point 3, its second half: `sae` with `fit.num_workers=2` on two worker hosts of one CPU each
    (the head has none): the two Ray Train workers are one per host, their checkpoints and the SAE go to
    S3 and the step metrics to the tracking server."""
    from mlflow.tracking import MlflowClient

    import interpflow
    from interpflow.workflows.engine.store import Store

    steps, batch = 30, 64
    spec = tmp_path / "sae.yaml"
    spec.write_text(yaml.safe_dump({
        "workflow": "sae", "corpus": SPEC["corpus"], "lm": SPEC["lm"], "num_shards": 2, "actors": 2,
        "actor_cpus": 1, "eval_shards": 2, "eval": {"max_examples": 32}, "sweep": {"variants": ["topk"], "k": [4]},
        "fit": {"num_workers": 2, "checkpoint_every": 10,
                "train": {"steps": steps, "batch_size": batch, "init_rows": 512, "log_every": 10,
                          "warmup_steps": 5}},
        # the first test's store: its corpus and tiny LM are cache hits (the lost-host test, above, has already
        # taken that store's activation digests)
        "run": {"store": cluster.store, "tracking_uri": cluster.tracking, "experiment": "multihost"}}))
    done = cli("submit", str(spec), "--address", cluster.url, "--wait", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    store = Store(cluster.store)
    sid = done.stdout.split("submitted job ")[1].split()[0]
    handle = interpflow.open_run(sid, store=cluster.store)
    assert handle.nodes()["tiny_lm"]["status"] == "cached"
    metrics = handle.metrics("sae.topk-k4")
    assert metrics["train_rows"] == steps * batch * 2 and metrics["steps_run"] == steps, metrics  # two ranks
    checkpoints = [i for i in _files(store, ".train") if i.base_name == "state.safetensors"]
    assert checkpoints, "Ray Train's checkpoints should be in the S3 store"
    client = MlflowClient(cluster.tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("multihost").experiment_id],
                                f"tags.`interpflow.node` = 'sae.topk-k4' and tags.mlflow.parentRunId = "
                                f"'{handle.mlflow_run_id}'")
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2  # rank 0's step metrics, over HTTP
