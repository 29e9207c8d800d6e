"""Jobs from the CLI like Ray users expect (issue #31, point 7 and its first bullet), on a real `ray start`
head this module starts (loopback, ports of its own) and the real Ray Jobs API:

- `interpflow submit` takes its address from --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS
  (an explicit --address wins over both), and `--wait` streams the job's own log lines;
- a relative run.store / SQLite run.tracking_uri is made absolute on the client for a cluster on this
  machine, and refused (one line naming both fields and the fix) for any other, before it is contacted;
- the job's run records the client's git commit, not "unknown";
- `interpflow logs JOB` and `interpflow stop JOB`; a stopped job's spec submitted again starts attempt 2,
  a new run that resumes the stopped one from the store (its committed shards are cached);
- the spec travels as JSON, which reads back under the project's YAML 1.2 loader as it was.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from interpflow.cluster.submit import (SubmitError, hosts_are_this_machine, is_local_address, resolve_for_cluster,
                                       spec_text, submission_id_for)
from interpflow.workflows.spec import load_spec, parse_yaml
from support import cli, kill_session

runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    """The CLI in this process (Ray's client is imported once per module, not once per command); the first
    submit of the module goes through the real console entry point in a subprocess."""
    from interpflow.workflows.cli import app

    return runner.invoke(app, list(args), env=env, catch_exceptions=False)

REPO = Path(__file__).resolve().parents[1]
NOWHERE = "http://head.invalid:8265"  # .invalid (RFC 2606) never resolves: another machine, never reached
NO_ADDRESS_ENV = {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while they are picked, so none comes twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def head_command(temp_dir: str) -> tuple[list[str], str]:
    """`ray start --head --block` on loopback with every fixed port of its own (other heads on this machine hold
    Ray's defaults: 6379 is Redis, 52365 another head's agent, ...) and its own temp dir. Returns the command
    and the dashboard URL."""
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")
    ports = dict(zip(names, _free_ports(len(names))))
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               *(f"--{name}={port}" for name, port in ports.items())]
    return command, f"http://127.0.0.1:{ports['dashboard-port']}"


def start_head(command: list[str], url: str, log: Path) -> subprocess.Popen:
    """Run `command` (a `ray start --head --block`) in a session of its own, so that the whole head can be
    killed at once, and return once its Jobs API answers."""
    from interpflow.cluster.submit import cluster_auth_headers, jobs_client

    head = subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            assert cluster_auth_headers(), "the head should have written a cluster token"
            jobs_client(url).list_jobs()
            return head
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.time() > deadline or head.poll() is not None:
                kill_session(head.pid)
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head():
    """A head for this module, started by it and stopped by its own pid (never one left running)."""
    temp_dir = tempfile.mkdtemp(prefix="ifjobs-", dir="/tmp")  # short: Ray's socket paths live under it
    command, url = head_command(temp_dir)
    head = start_head(command, url, Path(temp_dir) / "head.log")
    yield url
    head.terminate()
    head.wait(60)
    kill_session(head.pid)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _spec(path: Path, store: str, tracking: str | None, **sections) -> Path:
    run = {"store": store, "tracking_uri": tracking} if tracking else {"store": store, "lineage": False}
    path.write_text(yaml.safe_dump({"workflow": "demo", "run": run, **sections}))
    return path


def _record(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / run_id / "record.json").read_text())


def _git_head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_submit_from_env_address_streams_logs_resolves_relative_store_and_records_commit(ray_head, tmp_path,
                                                                                       monkeypatch):
    from interpflow.cluster.submit import cluster_hostnames, jobs_client

    # the head's nodes say they are this host: a local address that is no tunnel to another machine
    deadline, hosts = time.time() + 60, None
    while hosts is None and time.time() < deadline:
        hosts = cluster_hostnames(jobs_client(ray_head))
        time.sleep(0 if hosts else 1)
    assert hosts == [socket.gethostname()]
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)  # the in-process commands below resolve the relative store here too
    spec = _spec(client_dir / "spec.yaml", "store", "sqlite:///mlflow.db", numbers={"n": 300}, num_shards=3)
    # a string that YAML 1.1 dumps unquoted and YAML 1.2 reads as a float: the job must see the string
    spec.write_text(spec.read_text().replace("run:\n", "run:\n  experiment: '1e5'\n"))
    before = _git_head()  # the commit the shipped package is built from (others may commit meanwhile)
    first = cli("submit", str(spec), cwd=client_dir, timeout=300,
                env={"RAY_API_SERVER_ADDRESS": ray_head, "RAY_ADDRESS": ""})
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    commits = {before, _git_head()}
    sid = out.split("submitted job ")[1].split()[0]
    # the job's own summary (printed by the job's driver on the cluster) was streamed before the verdict
    assert f"run {sid}: succeeded" in out and out.index(f"run {sid}: succeeded") < out.index(f"job {sid}: SUCCEEDED")
    store = client_dir / "store"  # the relative store, resolved against the client's directory
    record = _record(store, sid)
    assert record["status"] == "succeeded" and record["settings"]["store"] == str(store)
    assert record["code"]["commit"] in commits, record["code"]
    commit = record["code"]["commit"]
    assert (client_dir / "mlflow.db").exists() and record["tracking_uri"] == f"sqlite:///{client_dir / 'mlflow.db'}"
    with sqlite3.connect(client_dir / "mlflow.db") as db:  # MLflow's own tables, read without importing mlflow
        tags = db.execute("SELECT DISTINCT t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid JOIN "
                          "experiments e ON e.experiment_id = r.experiment_id WHERE t.key = "
                          "'mlflow.source.git.commit' AND e.name = '1e5'").fetchall()
    assert tags == [(commit,)], tags  # the parent run and every node run, in the experiment named "1e5"

    # the same spec again attaches; an explicit --address wins over a wrong RAY_API_SERVER_ADDRESS/RAY_ADDRESS
    second = invoke("submit", str(spec), "--address", ray_head,
                    env={"RAY_API_SERVER_ADDRESS": NOWHERE, "RAY_ADDRESS": NOWHERE})
    assert second.exit_code == 0 and "(already submitted; attached)" in second.output, second.output
    jobs = [j for j in jobs_client(ray_head).list_jobs() if (j.submission_id or "").startswith(sid)]
    assert [j.submission_id for j in jobs] == [sid]
    # RAY_ADDRESS alone is honoured too; logs of a finished job are the job's output
    logs = invoke("logs", sid, env={"RAY_ADDRESS": ray_head, "RAY_API_SERVER_ADDRESS": ""})
    assert logs.exit_code == 0 and f"run {sid}: succeeded" in logs.output, logs.output


def test_stop_then_resubmit_starts_a_new_attempt_that_resumes_from_the_store(ray_head, tmp_path):
    store = tmp_path / "store"
    spec = _spec(tmp_path / "spec.yaml", str(store), None, numbers={"n": 240}, num_shards=6,
                 transform={"work_s": 2.0})  # no MLflow in this one: the first test covers the tracking URI
    started = invoke("submit", str(spec), "--address", ray_head, "--no-wait")
    assert started.exit_code == 0, started.output
    sid = started.output.split("submitted job ")[1].split()[0]
    shards = store / "transform_shard"
    deadline = time.time() + 120
    while not list(shards.glob("*/shard-*/_manifest.json")) and time.time() < deadline:
        time.sleep(0.2)
    stopped = invoke("stop", sid, "--address", ray_head)
    assert stopped.exit_code == 0 and f"job {sid}: STOPPED" in stopped.output, stopped.output
    committed = len(list(shards.glob("*/shard-*/_manifest.json")))
    assert 1 <= committed < 6, committed
    again = invoke("stop", sid, "--address", ray_head)
    assert again.exit_code == 0 and "had already ended: STOPPED" in again.output, again.output
    logs = invoke("logs", sid, "--address", ray_head)
    assert logs.exit_code == 1, logs.output  # a stopped job's logs: exit 1

    resumed = invoke("submit", str(spec), "--address", ray_head)
    assert resumed.exit_code == 0, resumed.output
    assert f"job {sid} ended STOPPED: submitted attempt 2 as job {sid}-2" in resumed.output, resumed.output
    assert f"job {sid}-2: SUCCEEDED" in resumed.output
    record = _record(store, f"{sid}-2")
    assert record["status"] == "succeeded" and record["origin"] == sid
    shard_counts = record["nodes"]["transform_shard"]["shards"]
    assert shard_counts["cached"] >= committed and shard_counts["ran"] == 6 - shard_counts["cached"], shard_counts
    assert record["nodes"]["make_numbers"]["status"] == "cached"
    assert _record(store, sid)["status"] != "succeeded"  # the stopped attempt's record stays as it ended

    unknown = invoke("logs", "interpflow-demo-nosuchjob", "--address", ray_head)
    assert unknown.exit_code == 2 and "no job 'interpflow-demo-nosuchjob'" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1, unknown.output


def test_a_lost_head_is_retried_by_the_client_and_the_new_attempt_runs_only_what_s3_lacks(tmp_path, s3_bucket):
    """Issue #31 point 5: kill every process of the head mid-run (its job's driver with it), start the head
    again; `submit --retries` sees the job lost, waits for the head, and attempt 2 resumes from the S3 store."""
    import boto3

    from interpflow.workflows.engine.record import RunRecord
    from interpflow.workflows.engine.store import Store

    temp_dir = tempfile.mkdtemp(prefix="ifhead-", dir="/tmp")
    command, url = head_command(temp_dir)  # the restarted head takes the same ports: the client's address holds
    log = Path(temp_dir) / "head.log"
    head = start_head(command, url, log)  # after s3_bucket: the head's processes hold the AWS variables
    store_uri = f"s3://{s3_bucket}/store"
    spec = _spec(tmp_path / "spec.yaml", store_uri, None, numbers={"n": 240}, num_shards=6,
                 transform={"work_s": 2.0})
    s3 = boto3.client("s3")

    def committed() -> int:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="store/transform_shard/").get("Contents", [])
        return sum(o["Key"].endswith("/_manifest.json") and "/shard-" in o["Key"] for o in listed)

    client_log = tmp_path / "submit.log"
    client = subprocess.Popen([sys.executable, "-m", "interpflow.workflows.cli", "submit", str(spec), "--address", url,
                               "--retries", "2", "--head-wait", "300"], cwd=tmp_path, stdout=open(client_log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while committed() < 1 and time.time() < deadline and client.poll() is None:
            time.sleep(0.2)
        kill_session(head.pid)  # the head is lost: GCS, raylet, dashboard, the job's driver and its workers
        lost_with = committed()
        assert 1 <= lost_with < 6, (lost_with, client_log.read_text()[-3000:])
        head = start_head(command, url, log)
        assert client.wait(400) == 0, client_log.read_text()[-5000:]
    finally:
        if client.poll() is None:
            client.kill()
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = client_log.read_text()
    sid = out.split("submitted job ")[1].split()[0]
    assert f"job {sid} was lost with its head: retry 1 of 2" in out, out[-3000:]
    assert f"submitted attempt 2 as job {sid}-2, resuming run {sid} from the store" in out
    assert f"job {sid}-2: SUCCEEDED" in out
    store = Store(store_uri)
    record = store.read_json(RunRecord.path_of(store, f"{sid}-2"))
    counts = record["nodes"]["transform_shard"]["shards"]
    print(f"lost head: {lost_with} of 6 shards committed before the kill; attempt 2 ran {counts['ran']}, "
          f"cached {counts['cached']}")
    assert record["status"] == "succeeded" and record["origin"] == sid
    assert counts["cached"] >= lost_with and counts["ran"] == 6 - counts["cached"], counts
    assert record["nodes"]["make_numbers"]["status"] == "cached"
    assert committed() == 6


# ------------------------------------------------------------------------------ no cluster needed below

@pytest.mark.parametrize("env,args", [({"RAY_API_SERVER_ADDRESS": NOWHERE, "RAY_ADDRESS": ""}, []),
                                      ({"RAY_ADDRESS": NOWHERE, "RAY_API_SERVER_ADDRESS": ""}, []),
                                      (NO_ADDRESS_ENV, ["--address", NOWHERE])])
def test_a_relative_store_is_refused_for_another_machine_before_it_is_contacted(tmp_path, monkeypatch, env, args):
    monkeypatch.chdir(tmp_path)
    started = time.time()
    done = invoke("submit", "demo", *args, env=env)  # the bundled spec: relative store
    lines = done.output.strip().splitlines()
    assert done.exit_code == 2 and len(lines) == 1, done.output
    assert "run.store '.interpflow/store' is a relative path" in lines[0] and "run.tracking_uri" in lines[0]
    assert "Fix: set run.store" in lines[0] and NOWHERE in lines[0]
    assert time.time() - started < 30  # refused on the client: 192.0.2.1 would never answer


def test_no_address_anywhere_is_one_line(tmp_path):
    done = cli("submit", "demo", cwd=tmp_path, timeout=60, env=NO_ADDRESS_ENV)  # the real entry point
    assert done.returncode == 2 and "no Ray cluster address" in done.stderr and "--address" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout


def test_store_resolution_for_local_and_remote_clusters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERPFLOW_STORE", "envstore")
    spec = load_spec({"workflow": "demo", "run": {"tracking_uri": "sqlite:///db/mlflow.db"}}, check_store=False)
    local = resolve_for_cluster(spec, "http://127.0.0.1:8265")["run"]
    assert local == {"store": str(tmp_path / "envstore"), "tracking_uri": f"sqlite:///{tmp_path / 'db/mlflow.db'}"}
    assert is_local_address(f"http://{socket.gethostname()}:8265") and not is_local_address(NOWHERE)
    # a loopback address whose nodes are another host (an SSH tunnel to a cluster's dashboard) is not local
    assert hosts_are_this_machine([socket.gethostname()]) and not hosts_are_this_machine(["ip-10-0-0-5"])
    with pytest.raises(SubmitError, match="run.store 'envstore' is a relative path"):
        resolve_for_cluster(spec, "http://127.0.0.1:8265 (a cluster on ip-10-0-0-5)", local=False)
    with pytest.raises(SubmitError, match=r"run.store 'envstore' is a relative path; run.tracking_uri "
                                          r"'sqlite:///db/mlflow.db' is a relative SQLite path"):
        resolve_for_cluster(spec, NOWHERE)
    remote = load_spec({"workflow": "demo", "run": {"store": "s3://bucket/prefix"}}, check_store=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote.settings.tracking_uri = None
    with pytest.raises(SubmitError, match="run.tracking_uri is not set for the remote store s3://bucket/prefix"):
        resolve_for_cluster(remote, NOWHERE)
    remote.settings.tracking_uri = "http://mlflow:5000"
    assert resolve_for_cluster(remote, NOWHERE)["run"] == {"store": "s3://bucket/prefix",
                                                          "tracking_uri": "http://mlflow:5000"}
    # the job's id covers the spec as shipped: the same spec resolved for another store is another job
    assert submission_id_for({"workflow": "demo", "run": local}) != \
        submission_id_for({"workflow": "demo", "run": {**local, "store": "/elsewhere"}})


ROUND_TRIP = {"workflow": "demo", "as_float": "1e5", "float": 1e5, "small": 1e-05, "yes": "yes", "off": "off",
              "octal": "010", "hex": "0x1f", "none": None, "tilde": "~", "empty": "", "date": "2024-01-01",
              "time": "12:30", "underscore": "-1_000", "inf_text": ".inf", "inf": math.inf, "neg_inf": -math.inf,
              "list": [1, 2.5, "null", True, "true", [None]], "nested": {"text": "é\n\"quoted\"\t: # not a comment"},
              7: "an int key"}


def test_the_shipped_spec_reads_back_as_it_was_under_yaml_1_2():
    assert parse_yaml(spec_text(ROUND_TRIP)) == ROUND_TRIP
    nan = parse_yaml(spec_text({"x": math.nan}))["x"]
    assert isinstance(nan, float) and math.isnan(nan)
    # what the job loads: the same spec, "1e5" still a string where the user quoted it
    spec = {"workflow": "demo", "run": {"store": "/s", "experiment": "1e5"}, "numbers": {"n": 10}}
    assert load_spec(parse_yaml(spec_text(spec)), check_store=False).settings.experiment == "1e5"
    # the YAML 1.1 dump this replaces did not round-trip: "1e5" came back a float
    assert parse_yaml(yaml.safe_dump({"v": "1e5"})) == {"v": 100000.0}


def test_logs_and_stop_need_an_address():
    for command in ("logs", "stop"):
        done = invoke(command, "some-job", env=NO_ADDRESS_ENV)
        assert done.exit_code == 2 and "no Ray cluster address" in done.output, (command, done.output)



def test_log_following_works_from_inside_a_running_event_loop():
    """A notebook runs an event loop: following a job's logs from there must not fail on asyncio.run."""
    import asyncio

    from interpflow.cluster.submit import _run_coroutine

    async def chunk():
        await asyncio.sleep(0)
        return "log line"

    async def notebook_cell():
        return _run_coroutine(chunk)

    assert asyncio.run(notebook_cell()) == "log line" and _run_coroutine(chunk) == "log line"
