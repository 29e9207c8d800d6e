"""Helpers shared by tests that drive the real `interpflow` command in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `interpflow` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "interpflow.workflows.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


HEAVY = {"torch", "transformers", "mlflow", "ray", "datasets", "pandas"}
_IMPORT_PROBE = """
import atexit, sys
atexit.register(lambda: print("HEAVY=" + ",".join(sorted({m.split(".")[0] for m in sys.modules} & %r)),
                              file=sys.stderr))
sys.argv = ["interpflow"] + %r
from interpflow.workflows.cli import main
main()
"""


def cli_imports(*args: str, cwd: Path | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The CLI's own `main` in a fresh interpreter, and which of the HEAVY top-level modules it imported."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE % (HEAVY, list(args))], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "COLUMNS": ""})
    lines = [x for x in done.stderr.splitlines() if x.startswith("HEAVY=")]
    return done, set(filter(None, lines[-1][len("HEAVY="):].split(","))) if lines else set(HEAVY)


def resumed_record(store: Path, done: subprocess.CompletedProcess, origin: str) -> tuple[Path, dict]:
    """The record of the new run that `interpflow resume ORIGIN` (`done`) printed: a resume is a new run
    whose record names its origin, and the origin's own record stays as that run left it."""
    new_id = done.stdout.split("new run: ")[-1].split()[0]
    path = store / "runs" / new_id / "record.json"
    record = json.loads(path.read_text())
    assert record["origin"] == origin and new_id != origin, (new_id, origin)
    return path, record


def spec_file(path: Path, store: Path, **sections) -> Path:
    """Write a demo spec with the given sections merged over `run: {store, tracking_uri}`."""
    import yaml

    data = {"workflow": "demo", "run": {"store": str(store), "tracking_uri": f"sqlite:///{store.parent / 'mlflow.db'}"}}
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path


def run_then_kill(spec: Path, cwd: Path, ready: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> None:
    """Start `interpflow run SPEC` and, once `ready()` holds (or it ended, or time ran out), SIGKILL the driver
    and every process it started: the machine is lost. Ray's workers run in process groups of their own but
    in the driver's session, so the whole session goes; a worker that outlived its driver could otherwise
    commit one more shard after the test counted them."""
    driver = subprocess.Popen([sys.executable, "-m", "interpflow.workflows.cli", "run", str(spec), "--no-progress"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and driver.poll() is None:
        time.sleep(poll_s)
    kill_session(driver.pid)
    driver.wait()


def _session_members(sid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after "pid (comm)": state ppid pgrp session
            members.append(int(stat.parent.name))
    return members


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` until none is left (a dying raylet may still fork a worker)."""
    for _ in range(50):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes of session {sid} survived SIGKILL: {_session_members(sid)}")


def settled(count: Callable[[], int], quiet_s: float = 3.0) -> int:
    """`count()` once it has stopped changing for `quiet_s` (a killed driver's workers may still commit)."""
    seen, stable_since = -1, time.time()
    while time.time() - stable_since < quiet_s:
        now = count()
        if now != seen:
            seen, stable_since = now, time.time()
        time.sleep(0.2)
    return seen


def hold_lock(store_uri: str, directory: str, log: str, hold_s: float) -> None:
    """Hold the store lock of `directory` for `hold_s`, logging enter/exit (a spawned child's target: it lives
    here, not in a test module, so the child imports no torch)."""
    from interpflow.workflows.engine.store import Store

    store = Store(store_uri)
    with store.lock(directory):
        with open(log, "a") as f:
            f.write(f"enter {os.getpid()} {time.time()}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"exit {os.getpid()} {time.time()}\n")


POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def postgres(sql: str) -> None:
    """Run one statement on the machine's PostgreSQL (CREATE/DROP DATABASE: outside a transaction)."""
    import psycopg

    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def tracking_server(host: str, bucket: str) -> Iterator[str]:
    """`mlflow server` listening on `host`, on a fresh PostgreSQL database, its artifacts proxied to
    `s3://BUCKET/mlartifacts` (the S3 endpoint and keys from the AWS variables): its URL. The server is
    stopped and the database dropped after."""
    database = f"mlflow_{uuid.uuid4().hex[:12]}"
    postgres(f'CREATE DATABASE "{database}"')
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"{POSTGRES}/{database}",
                               "--artifacts-destination", f"s3://{bucket}/mlartifacts"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start (exit {server.poll()})") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        postgres(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextlib.contextmanager
def moto_server(host: str = "127.0.0.1") -> Iterator[str]:
    """moto's standalone S3 server as a process listening on `host` (it enforces If-None-Match / If-Match):
    its endpoint URL. Stopped, by its pid, after."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {host}:{port} (exit {server.poll()})")
                time.sleep(0.1)
        yield f"http://{host}:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def shard_digests(store, node: str) -> dict[str, str]:
    """sha256 of every output file of a sharded node's shards, by its path below the store. Not compared: the
    manifest (who made it, where, when) and metrics.json (which holds the shard's timings)."""
    import hashlib

    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.path(node), recursive=True, allow_not_found=True))
    digests = {}
    for info in infos:
        if info.type == pafs.FileType.File and "/shard-" in info.path and \
                info.base_name not in ("_manifest.json", "metrics.json"):
            with store.fs.open_input_stream(info.path) as f:
                digests[info.path[len(store.root):]] = hashlib.sha256(f.read()).hexdigest()
    return digests
