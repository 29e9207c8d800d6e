"""Several hosts on this machine for cluster tests: one network namespace a host, each with its own address on
a bridge in the root namespace (which holds the bridge's own address: the services every host reaches).
Needs root (`ip netns`); every name this creates starts with the given prefix and is removed by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


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
