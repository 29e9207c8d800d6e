"""Issue #28, the store and the run records under hostile and unlucky use: damaged files, stale locks,
damaged records, killed drivers, path tricks, a moved store, a deleted MLflow database, a read-only store.

One finished demo run is made once per module; each test damages its own copy of that store (copied with
mtimes, as `cp -a` would), on the module's local Ray cluster and MLflow database (no mocks).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import interpflow
from interpflow.workflows.cli import app
from interpflow.workflows.engine import RunSettings
from interpflow.workflows.engine.graph import node
from interpflow.workflows.engine.store import MANIFEST, Store, StoreError

pytestmark = pytest.mark.usefixtures("ray_local")

SPEC = {"workflow": "demo", "numbers": {"n": 400}, "num_shards": 4}


def demo(settings: RunSettings, run_id: str | None = None):
    return interpflow.run(SPEC, settings=settings, run_id=run_id, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local):
    """A finished demo run: (its store, MLflow URI, run id)."""
    root = tmp_path_factory.mktemp("finished")
    settings = RunSettings(store=str(root / "store"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False)
    handle = demo(settings)
    assert handle.ok
    return root / "store", settings.tracking_uri, handle.run_id


def copy_of(finished, tmp_path: Path) -> tuple[RunSettings, str]:
    store, uri, run_id = finished
    shutil.copytree(store, tmp_path / "store")  # copy2: mtimes kept, as `cp -a` or `rsync -a` keep them
    return RunSettings(store=str(tmp_path / "store"), tracking_uri=uri, progress=False), run_id


def cli(*args: str):
    # COLUMNS (exported by pytest-xdist's workers, some shells) would set the width that piped output otherwise escapes
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": None})
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def committed_data_files(store: Path) -> list[tuple[str, str | None, Path]]:
    """(node, shard dir or None, file) for every file a manifest of the store lists."""
    out = []
    for manifest_path in sorted(store.glob("*/*/" + MANIFEST)) + sorted(store.glob("*/*/shard-*/" + MANIFEST)):
        manifest = json.loads(manifest_path.read_text())
        shard = manifest_path.parent.name if manifest_path.parent.name.startswith("shard-") else None
        for rel in manifest.get("files", {}):
            out.append((manifest["node"], shard, manifest_path.parent / rel))
    return out


def damage(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "flip":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "append":
        path.write_bytes(data + b"\0")
    else:
        path.unlink()


# --- damaged outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_damaging_a_random_committed_file_recomputes_exactly_that_shard_or_node(finished, tmp_path, seed):
    settings, run_id = copy_of(finished, tmp_path)
    store = Path(settings.store)
    rng = random.Random(seed)
    owner, shard, target = rng.choice(committed_data_files(store))
    mode = ["flip", "truncate", "append", "delete"][seed % 4]
    digest_before = json.loads((target.parent / MANIFEST).read_text())["digest"]
    damage(target, mode)

    handle = demo(settings)
    nodes = handle.nodes()
    assert handle.ok, (owner, shard, mode)
    for name, state in nodes.items():
        if name != owner:
            assert state["status"] == "cached", (name, owner, shard, mode)
    assert nodes[owner]["status"] == "ran"
    if shard is not None:
        assert nodes[owner]["shards"] == {"total": 4, "ran": 1, "cached": 3, "pending": 0}
    expected = f"{owner}/{nodes[owner]['key']}" + (f"/{shard}" if shard else "")
    assert [q["path"] for q in nodes[owner]["quarantined"]] == [expected]
    assert nodes[owner]["quarantined"][0]["reason"].startswith(target.name)
    assert json.loads((target.parent / MANIFEST).read_text())["digest"] == digest_before  # the same bytes again
    assert handle.metrics("report")["ground_truth_ok"] == 1.0


def test_verify_finds_bit_rot_the_cheap_check_cannot_see_and_the_next_run_recomputes_only_that(finished, tmp_path):
    settings, run_id = copy_of(finished, tmp_path)
    store = Path(settings.store)
    shard_file = next(f for n, s, f in committed_data_files(store) if s == "shard-00002-of-00004")
    stat = shard_file.stat()
    damage(shard_file, "flip")
    os.utime(shard_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: invisible to a cache hit

    code, stdout, _ = cli("verify", run_id, "--store", str(store))
    assert code == 1
    assert "damaged: transform_shard/" in stdout and "/shard-00002-of-00004 (output.parquet: sha256 differs" in stdout
    assert "1 damaged, quarantined" in stdout
    assert any((store / ".quarantine").iterdir())

    handle = demo(settings)
    assert handle.ok
    assert handle.nodes()["transform_shard"]["shards"]["ran"] == 1
    assert handle.nodes()["transform_shard"]["shards"]["cached"] == 3
    assert [s["status"] for n, s in handle.nodes().items() if n != "transform_shard"] == ["cached"] * 4
    code, stdout, _ = cli("verify", "--store", str(store))
    assert code == 0 and "all intact" in stdout


def test_bit_rot_found_by_a_reader_recomputes_only_that_shard_and_counts_it_once(finished, tmp_path):
    settings, run_id = copy_of(finished, tmp_path)
    shard_file = next(f for n, s, f in committed_data_files(Path(settings.store)) if s == "shard-00001-of-00004")
    stat = shard_file.stat()
    damage(shard_file, "flip")
    os.utime(shard_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the cheap check passes; the reader's sha256 fails
    handle = interpflow.run({**SPEC, "summary": {"batch_size": 128}}, settings=settings, progress=False)
    nodes = handle.nodes()
    assert handle.ok and nodes["summarise"]["status"] == "ran"
    assert nodes["transform_shard"]["status"] == "ran" and nodes["transform_shard"]["recomputed_after_corruption"]
    assert {k: nodes["transform_shard"]["shards"][k] for k in ("total", "ran", "cached")} == \
        {"total": 4, "ran": 1, "cached": 3}
    assert [q["path"].rsplit("/", 1)[-1] for q in nodes["transform_shard"]["quarantined"]] == ["shard-00001-of-00004"]
    assert nodes["make_numbers"]["status"] == "cached"
    assert handle.metrics("report")["ground_truth_ok"] == 1.0


def test_two_identical_computations_have_one_digest_whatever_their_timings(tmp_path):
    digests, metric_files = [], []
    for i in range(2):
        store = Store(tmp_path / f"s{i}")
        outputs = {"output": pa.table({"a": [1, 2, 3]}), "metrics": {"rows": 3, "seconds": time.time() + i}}
        manifest = store.commit(store.node_path("n", "k"), outputs, {"node": "n", "key": "k"})
        digests.append(manifest["digest"])
        metric_files.append(manifest["files"]["metrics.json"]["sha256"])
    assert metric_files[0] != metric_files[1]  # the timings differ...
    assert digests[0] == digests[1]  # ...the data does not


# --- locks --------------------------------------------------------------------------------------
# These run on a local store and on S3 (conftest.store_uri: moto's server, which enforces conditional writes).
def _write_lock(store: Store, directory: str, content: bytes) -> str:
    """Put a lock record for `directory` as another driver would have left it; its path."""
    path = store._lock_path(directory)
    store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with store.fs.open_output_stream(path) as f:
        f.write(content)
    return path


def _make_old(store: Store, path: str, seconds: float) -> None:
    """Let the lock at `path` be at least `seconds` old: backdated on a local store; on S3, whose clock is
    the server's (whole seconds), by waiting."""
    if store.is_local:
        old = time.time() - seconds
        os.utime(path, (old, old))
    else:
        time.sleep(seconds + 1.0)


def _acquire_within(store: Store, directory: str, seconds: float, **lock_args) -> bool:
    deadline = time.time() + seconds
    with store.lock(directory, is_done=lambda: time.time() > deadline, **lock_args) as acquired:
        return acquired


@pytest.mark.parametrize("content", [b"", b'{"host": "vm", "pi', b"[1, 2, 3]", b"\xff\xfe\x00"])
def test_an_unreadable_lock_left_by_a_crash_is_broken_not_waited_on_forever(store_uri, content):
    store = Store(store_uri)
    directory = store.node_path("n", "k")
    lock = _write_lock(store, directory, content)
    assert not _acquire_within(store, directory, 0.5)  # fresh: its writer may still be writing it
    _make_old(store, lock, 3)  # the grace is 2 s
    started = time.time()
    assert _acquire_within(store, directory, 10)
    assert time.time() - started < 2


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_keeps_a_fresh_lock_and_loses_one_it_stopped_refreshing(store_uri, live_process):
    import psutil

    store = Store(store_uri)
    directory = store.node_path("n", "k")
    lock = _write_lock(store, directory, json.dumps({
        "host": socket.gethostname(), "pid": live_process.pid,
        "started": psutil.Process(live_process.pid).create_time(), "token": "t"}).encode())
    # a lease of 3 s here (30 s by default), refreshed every 0.5 s by a working holder
    assert not _acquire_within(store, directory, 1.0, stale_after_s=3)  # alive and refreshed: respected
    _make_old(store, lock, 4)
    started = time.time()
    assert _acquire_within(store, directory, 10, stale_after_s=3)
    assert time.time() - started < 2


def test_a_lock_whose_pid_now_names_another_process_is_broken(store_uri, live_process):
    store = Store(store_uri)
    directory = store.node_path("n", "k")
    _write_lock(store, directory, json.dumps(
        {"host": socket.gethostname(), "pid": live_process.pid, "started": 1000.0, "token": "t"}).encode())
    started = time.time()
    assert _acquire_within(store, directory, 10)
    assert time.time() - started < 2


def test_a_lock_held_longer_than_its_lease_is_refreshed_and_not_broken(store_uri):
    """The holder's heartbeat keeps its lock fresh on every store (an object-store lock used to go stale
    after the lease whatever its holder did)."""
    import threading

    store = Store(store_uri)
    directory = store.node_path("n", "k")
    entered, done = threading.Event(), threading.Event()

    def hold():
        with Store(store_uri).lock(directory, stale_after_s=3):
            entered.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(30)
        assert not _acquire_within(store, directory, 6, stale_after_s=3)  # twice the lease: refreshed meanwhile
    finally:
        done.set()
        holder.join(30)
    assert _acquire_within(store, directory, 5, stale_after_s=3)  # released


def _stale_lock(store: Store, directory: str):
    """A lock of `directory` that any driver may break: its holder's process is gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = _write_lock(store, directory, json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": None, "token": "dead"}).encode())
    return path


def test_of_two_drivers_breaking_one_stale_lock_exactly_one_wins(store_uri):
    first, second = Store(store_uri), Store(store_uri)
    directory = first.node_path("n", "k")
    path = _stale_lock(first, directory)
    seen = [first._lock_is_stale(path, 30), second._lock_is_stale(path, 30)]  # both judge it stale...
    assert all(seen)
    winners = []
    for store, stale in zip((first, second), seen):  # ...then break it, one after the other
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "token": str(id(store))}
        held = store._break(path, owner, stale) or store._try_create(path, owner)
        winners.append(held is not None)
    assert winners == [True, False]


@pytest.mark.parametrize("store_uri", ["s3"], indirect=True)
def test_a_holder_whose_s3_lock_was_broken_learns_it_and_publishes_nothing(store_uri):
    store, other = Store(store_uri), Store(store_uri)
    directory = store.node_path("n", "k")
    with store.lock(directory) as acquired:
        assert acquired
        path = store._lock_path(directory)
        taken = other._break(path, {"host": "elsewhere", "pid": 1, "token": "other"}, other._conditional.read(path))
        assert taken is not None  # as a driver would that found it unrefreshed for the lease
        with pytest.raises(StoreError, match="was broken by another driver"), \
                pytest.warns(RuntimeWarning, match="was broken by another driver"):
            store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    assert store.committed(directory) is None
    assert json.loads(store.fs.open_input_stream(path).read())["token"] == "other"  # its release left it alone


@pytest.mark.parametrize("store_uri", ["s3"], indirect=True)
def test_a_server_that_ignores_conditional_writes_is_found_out_and_gets_best_effort_locks(store_uri, monkeypatch):
    from interpflow.workflows.engine import s3

    client = s3._client(store_uri)

    def ignore_conditions(request, **_):  # what a server without conditional writes does with them
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    monkeypatch.setattr(s3, "_SUPPORTED", {})
    client.meta.events.register("before-sign.s3.PutObject", ignore_conditions)
    try:
        store = Store(store_uri)
        assert store._conditional is None  # probed once: a second create of one key was accepted
        directory = store.node_path("n", "k")
        with store.lock(directory, stale_after_s=3) as acquired:
            assert acquired
            assert not _acquire_within(Store(store_uri), directory, 1.0, stale_after_s=3)
        assert _acquire_within(Store(store_uri), directory, 5)  # released
    finally:
        client.meta.events.unregister("before-sign.s3.PutObject", ignore_conditions)


def test_an_s3_store_without_boto3_says_so_in_one_line(monkeypatch):
    from interpflow.workflows.engine import s3

    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    monkeypatch.setattr(s3, "_CLIENTS", {})
    with pytest.raises(StoreError, match=r"^the store 's3://bkt/x' is on S3, whose locks need boto3: pip install"):
        s3._client("s3://bkt/x")


@pytest.mark.parametrize("store_uri", ["s3"], indirect=True)
def test_an_s3_store_needs_a_tracking_uri_only_when_lineage_is_on(store_uri):
    from interpflow.workflows.spec import SpecError, check_settings

    check_settings(RunSettings(store=store_uri, lineage=False, progress=False))  # `run.lineage=false`: no MLflow
    with pytest.raises(SpecError, match="field 'run.tracking_uri'"):
        check_settings(RunSettings(store=store_uri, progress=False))


# --- run records ----------------------------------------------------------------------------------
RECORD_DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "a JSON list": lambda data: b"[1, 2, 3]",
    "another run's": lambda data: json.dumps({**json.loads(data), "run_id": "someone-else"}).encode(),
    "not UTF-8": lambda data: b"\xff\xfe" + data,
    "nodes without keys": lambda data: json.dumps({**json.loads(data), "nodes": {"x": {}}}).encode(),
}


@pytest.mark.parametrize("how", list(RECORD_DAMAGE))
def test_a_damaged_record_is_listed_and_every_command_names_its_file(finished, tmp_path, how):
    settings, run_id = copy_of(finished, tmp_path)
    record = Path(settings.store) / "runs" / run_id / "record.json"
    record.write_bytes(RECORD_DAMAGE[how](record.read_bytes()))
    healthy = demo(settings)  # a second, healthy run in the same store (all cached)

    code, stdout, stderr = cli("ls", "--store", settings.store)
    assert code == 0 and healthy.run_id in stdout and run_id in stdout and "unreadable" in stdout
    assert str(record) in stderr.replace("\n", "")
    for command in (["status", run_id], ["show", run_id, "report"], ["explain", run_id, "report"],
                    ["resume", run_id], ["verify", run_id]):
        code, _, stderr = cli(*command, "--store", settings.store)
        assert code == 2, command
        assert str(record) in one_line_error(stderr), command


def test_a_leftover_temporary_record_is_removed_once_it_is_old(finished, tmp_path):
    settings, run_id = copy_of(finished, tmp_path)
    run_dir = Path(settings.store) / "runs" / run_id
    old, fresh = run_dir / "record.json.0123abcd.tmp", run_dir / "record.json.4567ef01.tmp"
    old.write_text("{")
    fresh.write_text("{")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert cli("ls", "--store", settings.store)[0] == 0
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a writer at work


def test_a_run_whose_driver_died_reads_killed_and_the_next_driver_closes_its_mlflow_runs(finished, tmp_path):
    settings, run_id = copy_of(finished, tmp_path)
    path = Path(settings.store) / "runs" / run_id / "record.json"
    record = json.loads(path.read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    record["status"] = "running"
    record["driver"] = {"host": socket.gethostname(), "pid": dead.pid, "started": None}
    record["nodes"]["report"]["status"] = "running"
    path.write_text(json.dumps(record))
    client = MlflowClient(settings.tracking_uri)
    for mlflow_run in (record["mlflow_run_id"], record["nodes"]["report"]["mlflow_run_id"]):
        client.update_run(mlflow_run, status="RUNNING")

    code, stdout, _ = cli("ls", "--store", settings.store)
    assert code == 0 and "killed" in stdout.split(run_id)[1].splitlines()[0]
    assert cli("status", run_id, "--store", settings.store)[0] == 1

    assert demo(settings).ok  # the next driver finds the orphan
    reaped = json.loads(path.read_text())
    assert reaped["status"] == "killed" and reaped["nodes"]["report"]["status"] == "killed"
    for mlflow_run in (record["mlflow_run_id"], record["nodes"]["report"]["mlflow_run_id"]):
        assert client.get_run(mlflow_run).info.status == "KILLED"


# --- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["run", "demo", "--run-id", "../../../x"],
    ["run", "demo", "--run-id", "a/b"],
    ["run", "demo", "--run-id", ".hidden"],
    ["status", "../../../../outside/x"],
    ["show", "../../x", "report"],
    ["explain", "/etc/x", "report"],
    ["resume", "../../x"],
    ["verify", "a/../../x"],
])
def test_a_run_id_that_could_leave_the_store_is_refused_before_anything_is_written(tmp_path, command):
    (tmp_path / "outside").mkdir()
    store = tmp_path / "a" / "b" / "store"
    code, _, stderr = cli(*command, "--store", str(store))
    assert code == 2
    assert "is not a valid name" in one_line_error(stderr)
    assert not any(p.name in ("x", "record.json") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "..", ".locks", "x" * 129])
def test_a_node_name_that_could_leave_the_store_is_refused_when_the_graph_is_built(name):
    from interpflow.tasks.demo import NumbersConfig, make_numbers

    with pytest.raises(ValueError, match="node name"):
        node(make_numbers, NumbersConfig(), name=name)


@pytest.mark.parametrize("parts", [("..", "x"), ("a", "../../x"), ("a", "..", "..", "x"), ("a/../../x",)])
def test_every_store_path_is_proven_inside_the_root(tmp_path, parts):
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="leads outside the store"):
        store.path(*parts)
    assert store.path("a", "b/c") == str(tmp_path / "store" / "a" / "b" / "c")


def test_a_moved_store_resumes_where_it_is_found_with_mlflow_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first_home, elsewhere = tmp_path / "A", tmp_path / "elsewhere"
    first_home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(first_home)
    handle = demo(RunSettings(store=".interpflow/store", progress=False))
    assert handle.ok and (first_home / ".interpflow" / "mlflow.db").exists()
    assert (first_home / ".interpflow" / "mlartifacts").is_dir()  # the histogram figure, beside the database
    assert not (first_home / "mlruns").exists()

    os.rename(first_home, tmp_path / "B")
    monkeypatch.chdir(elsewhere)
    resumed = interpflow.resume(handle.run_id, str(tmp_path / "B" / ".interpflow" / "store"), progress=False)
    assert resumed.ok
    assert {s["status"] for s in resumed.nodes().values()} == {"cached"}
    assert resumed.record.data["tracking_uri"] == f"sqlite:///{tmp_path / 'B' / '.interpflow' / 'mlflow.db'}"
    assert list(elsewhere.iterdir()) == []  # no store, no mlflow.db, no mlruns/ where the command ran


def test_resume_after_the_mlflow_database_was_deleted_starts_a_new_parent_run(tmp_path):
    import yaml
    from support import cli as cli_process
    from support import resumed_record

    settings = RunSettings(store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                           progress=False)
    handle = demo(settings)
    old_parent = handle.mlflow_run_id
    (tmp_path / "mlflow.db").unlink()
    # a new process, as a user's would be: this one's MLflow keeps the deleted file open
    done = cli_process("resume", handle.run_id, "--store", settings.store, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert resumed_record(Path(settings.store), done, handle.run_id)[1]["mlflow_run_id"] != old_parent
    # A resume is a new run with a parent of its own; the same spec under the same run id continues that
    # run, whose recorded parent is gone with the database: it starts a new parent that notes the old one.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "run": {"store": settings.store, "tracking_uri": settings.tracking_uri}}))
    done = cli_process("run", str(spec), "--run-id", handle.run_id, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resumed = interpflow.open_run(handle.run_id, settings.store)
    assert resumed.mlflow_run_id != old_parent
    import sqlite3  # read the new database afresh (this process's MLflow still holds the deleted one)

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (resumed.mlflow_run_id,)))
    assert tags["interpflow.previous_parent_run"] == old_parent


@pytest.fixture
def read_only_copy(finished, tmp_path):
    """The finished store under a read-only bind mount (root ignores file modes, not a read-only mount)."""
    settings, run_id = copy_of(finished, tmp_path / "src")
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
        yield mount / "store", run_id
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_resume_in_a_read_only_store_is_one_line_naming_the_store(read_only_copy):
    store, run_id = read_only_copy
    code, _, stderr = cli("resume", run_id, "--store", str(store))
    assert code == 2
    line = one_line_error(stderr)
    assert "run.store" in line and "not writable" in line and str(store) in line


def test_show_status_explain_of_an_unknown_run_or_node_are_one_line(finished, tmp_path):
    settings, run_id = copy_of(finished, tmp_path)
    for command in (["show", "no-such-run", "report"], ["status", "no-such-run"], ["explain", "no-such-run", "x"],
                    ["resume", "no-such-run"], ["show", run_id, "no-such-node"], ["explain", run_id, "no-such-node"]):
        code, _, stderr = cli(*command, "--store", settings.store)
        assert code == 2, command
        assert "no-such" in one_line_error(stderr)
