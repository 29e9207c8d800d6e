"""Several hosts on this machine for cluster tests: one network namespace a host, each with its own address on
a bridge in the root namespace (which holds the bridge's own address: the services every host reaches).
Needs root (`ip netns`); every name this creates starts with the given prefix and is removed by name."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def can_make_hosts() -> bool:
    return os.geteuid() == 0 and _ip("netns", "list", check=False).returncode == 0


class Hosts:
    """`Hosts("ift", ["head", "w1", "w2"])`: namespaces ift-head, ... at 10.<net>.0.10, .11, ...; the bridge
    (root namespace) at 10.<net>.0.1. `popen(host, cmd)` starts a process on a host; `kill(host)` loses it."""

    def __init__(self, prefix: str, names: list[str], net: int = 88):
        self.prefix, self.names = prefix, list(names)
        self.gateway = f"10.{net}.0.1"
        self.address = {name: f"10.{net}.0.{10 + i}" for i, name in enumerate(self.names)}
        self.bridge = f"{prefix}-br"
        self.teardown()  # what an earlier, killed test session may have left
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            ns, outside, inside = self.namespace(name), f"{prefix}{i}o", f"{prefix}{i}i"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.address[name]}/24", "dev", inside)
            _ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _ip("netns", "exec", ns, "ip", "route", "add", "default", "via", self.gateway)
            # what a machine's own /etc/hosts says: its name is its address (`ip netns exec` mounts this file
            # over /etc/hosts). Gloo finds the address it listens on from the host name; on the shared
            # /etc/hosts that is loopback, and Ray Train's workers on two hosts could not reach each other.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.address[name]} {socket.getfqdn()} "
                                       f"{socket.gethostname()}\n")

    def namespace(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def popen(self, name: str, command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.namespace(name), *command], stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)

    def pids(self, name: str) -> list[int]:
        done = _ip("netns", "pids", self.namespace(name), check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def kill(self, name: str) -> int:
        """SIGKILL every process of a host until none is left (the host is lost); how many were killed."""
        killed = set()
        for _ in range(50):
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return len(killed)

    def teardown(self) -> None:
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            ns = line.split()[0] if line.strip() else ""
            if ns.startswith(f"{self.prefix}-"):
                self.kill(ns[len(self.prefix) + 1:])
                _ip("netns", "del", ns, check=False)
        for etc in Path("/etc/netns").glob(f"{self.prefix}-*"):
            shutil.rmtree(etc, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)


# ------------------------------------------------------------------ a Ray cluster of these hosts, with its services

# every node of a token-auth cluster says so (a head turns it on by itself; a joining node would not), and
# finds the token in ~/.ray/auth_token, which these hosts share as one machine's disk
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}
RAY_PORT, DASHBOARD_PORT = 6390, 8265  # every host has its own ports: Redis holds 6379 only in the root namespace


def wait_until(check: Callable[[], bool], what: str, timeout: float, logs: list[Path]) -> None:
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


@dataclass
class Cluster:
    url: str                     # the head's dashboard (Jobs API)
    store: str                   # the S3 store every host and the client use
    tracking: str                # the MLflow tracking server
    hosts: Hosts
    workers: list[str]           # the worker hosts' names
    rejoin: Callable[[str], None]  # start a lost worker host again (a replacement node)
    live_workers: Callable[[], int]  # worker hosts the head counts as alive


@contextlib.contextmanager
def lab_cluster(prefix: str, workers: int = 2, worker_cpus: int = 1, net: int = 88) -> Iterator[Cluster]:
    """A head (no CPUs) and `workers` worker hosts (`worker_cpus` each), every one its own `ray start` in its
    own namespace with token auth; moto's S3 server (bucket `lab`) and an MLflow server on PostgreSQL (its
    artifacts in S3) on the bridge, the AWS variables set for this process and every host. For tests
    (`test_multihost.py`) and benchmarks (`benchmarks/cluster.py`, `benchmarks/soak.py`); everything is
    killed and removed after."""
    import boto3
    import pytest

    from interpflow.cluster.submit import jobs_client
    from support import moto_server, tracking_server

    names = ["head"] + [f"w{i + 1}" for i in range(workers)]
    hosts = Hosts(prefix, names, net=net)
    temp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        with moto_server(hosts.gateway) as s3, pytest.MonkeyPatch.context() as patch:
            for name, value in {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing",
                                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                                "AWS_EC2_METADATA_DISABLED": "true"}.items():
                patch.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS",
                         "RAY_API_SERVER_ADDRESS"):
                patch.delenv(name, raising=False)
            boto3.client("s3").create_bucket(Bucket="lab")
            with tracking_server(hosts.gateway, "lab") as tracking:
                head = hosts.address["head"]
                logs = {name: temp / f"{name}.log" for name in names}
                starts = {name: 0 for name in names}

                def ray_start(name: str, *args: str) -> None:
                    starts[name] += 1
                    # a replacement host: a new temp dir, a new node id
                    suffix = "" if starts[name] == 1 else f"-{starts[name]}"
                    logs[name] = temp / f"{name}{suffix}.log"
                    hosts.popen(name, ["ray", "start", "--block", "--disable-usage-stats",
                                       f"--node-ip-address={hosts.address[name]}",
                                       f"--temp-dir={temp}/{name}{suffix}", *args], logs[name], env=TOKEN_AUTH)

                def live_workers() -> int:
                    status = subprocess.run(["ip", "netns", "exec", hosts.namespace("head"), "ray", "status",
                                             f"--address={head}:{RAY_PORT}"], capture_output=True, text=True,
                                            env={**os.environ, **TOKEN_AUTH})
                    cpus = re.search(r"[\d.]+/([\d.]+) CPU", status.stdout)  # "Usage: 1.0/2.0 CPU ..."
                    return int(float(cpus.group(1)) / worker_cpus) if cpus else 0

                ray_start("head", "--head", f"--port={RAY_PORT}", f"--dashboard-host={head}",
                          f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=0")
                url = f"http://{head}:{DASHBOARD_PORT}"
                wait_until(lambda: jobs_client(url).list_jobs() is not None, "the head", 120, [logs["head"]])

                def join(name: str) -> None:
                    ray_start(name, f"--address={head}:{RAY_PORT}", f"--num-cpus={worker_cpus}")

                for name in names[1:]:
                    join(name)
                wait_until(lambda: live_workers() == workers, f"{workers} worker hosts", 120,
                           list(logs.values()))
                yield Cluster(url, "s3://lab/store", tracking, hosts, names[1:], join, live_workers)
    finally:
        for name in names:
            hosts.kill(name)
        hosts.teardown()
        shutil.rmtree(temp, ignore_errors=True)
