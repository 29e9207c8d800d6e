"""A multi-host Ray cluster on one machine (issue #31, point 3): a head and two worker hosts, each in its own
network namespace with its own address and its own `ray start`; the S3 store (moto) and the MLflow tracking
server (PostgreSQL, artifacts in S3) listen on the bridge, the one address every host reaches. `interpflow
submit` sends `extract` (4 shards over 2 model actors, one a host) to the head's dashboard: the outputs land
in S3, the lineage in the tracking server, and the client reads both back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from hosts import Hosts, can_make_hosts
from support import cli, tracking_server

pytestmark = pytest.mark.skipif(not can_make_hosts(), reason="needs root for ip netns (CI runs as root)")

# every node of a token-auth cluster says so (a head turns it on by itself; a joining node would not), and
# finds the token in ~/.ray/auth_token, which these hosts share as one machine's disk
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}
RAY_PORT, DASHBOARD_PORT = 6390, 8265  # every host has its own ports: Redis holds 6379 only in the root namespace


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait(check, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.time() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs if p.exists())
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tails}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """(dashboard URL, store URI, tracking URI, hosts): three hosts, moto S3 and an MLflow server on the
    bridge, a head with no CPUs and two workers with one each. Everything is killed and removed after."""
    import boto3

    from interpflow.cluster.submit import jobs_client

    hosts = Hosts("ifm", ["head", "w1", "w2"])
    temp = Path(tempfile.mkdtemp(prefix="ifm-", dir="/tmp"))  # short: Ray's socket paths live under it
    s3_port = _free_port(hosts.gateway)
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", hosts.gateway, "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    aws = {"AWS_ENDPOINT_URL": f"http://{hosts.gateway}:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS",
                     "RAY_API_SERVER_ADDRESS"):
            patch.delenv(name, raising=False)
        try:
            _wait(lambda: socket.create_connection((hosts.gateway, s3_port), timeout=1).close() or True,
                  "moto", 60, [])
            boto3.client("s3").create_bucket(Bucket="lab")
            with tracking_server(hosts.gateway, "lab") as tracking:
                head = hosts.address["head"]
                logs = {name: temp / f"{name}.log" for name in hosts.names}

                def ray_start(name: str, *args: str) -> None:
                    hosts.popen(name, ["ray", "start", "--block", "--disable-usage-stats",
                                       f"--node-ip-address={hosts.address[name]}", f"--temp-dir={temp}/{name}",
                                       *args], logs[name], env=TOKEN_AUTH)

                ray_start("head", "--head", f"--port={RAY_PORT}", f"--dashboard-host={head}",
                          f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=0")
                url = f"http://{head}:{DASHBOARD_PORT}"
                _wait(lambda: jobs_client(url).list_jobs() is not None, "the head", 120, [logs["head"]])
                for name in ("w1", "w2"):
                    ray_start(name, f"--address={head}:{RAY_PORT}", "--num-cpus=1")

                def two_workers() -> bool:
                    status = subprocess.run(["ip", "netns", "exec", hosts.namespace("head"), "ray", "status",
                                             f"--address={head}:{RAY_PORT}"], capture_output=True, text=True,
                                            env={**os.environ, **TOKEN_AUTH})
                    return "/2.0 CPU" in status.stdout

                _wait(two_workers, "two worker hosts", 120, list(logs.values()))
                yield url, "s3://lab/store", tracking, hosts
        finally:
            for name in hosts.names:
                hosts.kill(name)
            hosts.teardown()
            moto.kill()
            shutil.rmtree(temp, ignore_errors=True)


def test_submitted_extract_runs_on_two_hosts_into_s3_and_the_tracking_server(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    import interpflow
    from interpflow.workflows.engine.store import Store

    url, store_uri, tracking, hosts = cluster
    spec = tmp_path / "extract.yaml"
    spec.write_text(yaml.safe_dump({"workflow": "extract", "num_shards": 4, "actors": 2, "actor_cpus": 1,
                                    "corpus": {"n_examples": 64}, "lm": {"steps": 20},
                                    "run": {"store": store_uri, "tracking_uri": tracking,
                                            "experiment": "multihost"}}))
    done = cli("submit", str(spec), "--address", url, "--wait", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    store = Store(store_uri)
    (record_path,) = [p for p in store.fs.get_file_info(pafs.FileSelector(
        store.path("runs"), recursive=True)) if p.base_name == "record.json"]
    run_id = store.read_json(record_path.path)["run_id"]
    status = cli("status", run_id, "--store", store_uri, cwd=tmp_path, timeout=120)
    assert status.returncode == 0 and "activations" in status.stdout, status.stdout + status.stderr

    handle = interpflow.open_run(run_id, store=store_uri)  # the notebook API, on the client
    shards = handle.nodes()["activations"]["shards"]
    assert (shards["ran"], shards["total"]) == (4, 4)
    rows = handle.table("activations")
    assert rows.num_rows > 0 and len(set(rows.column("id").to_pylist())) == 64
    manifests = [store.read_json(f"{info.path}/_manifest.json")
                 for info in store.fs.get_file_info(pafs.FileSelector(
                     store.path("activations"), recursive=True))
                 if info.base_name.startswith("shard-") and info.type.name == "Directory"]
    assert len(manifests) == 4
    assert {m["produced_by"]["node_ip"] for m in manifests} == {hosts.address["w1"], hosts.address["w2"]}

    client = MlflowClient(tracking)
    parent = client.get_run(handle.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["interpflow.run_id"] == run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["interpflow.node"] for r in children} >= {"corpus", "tiny_lm", "activations", "report"}
