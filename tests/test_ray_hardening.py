"""The private local Ray cluster is hardened (issue #28): its token file is 0600, created so by us before
Ray looks for it, and every TCP socket its processes listen on is bound to loopback, while tasks and
actors still run.

The cluster starts in a subprocess with a fresh HOME, so `~/.ray/auth_token` is created anew and nothing
of this test leaks into the pytest process. The same probe against Ray's plain defaults, to see what the
hardening removes (it lists interface and wildcard listeners and a 0644 token):

    HOME=$(mktemp -d) python tests/test_ray_hardening.py plain
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from interpflow.workflows.engine import ray_cluster


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # Ray's C++ gRPC servers bind 127.0.0.1 as ::ffff:127.0.0.1
    return addr.is_loopback


def _cluster_processes(ray) -> list:
    """The driver, every process it started (children, recursively), and any process naming the
    session directory on its command line (in case one was reparented)."""
    import psutil

    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    session = ray._private.worker._global_node.get_session_dir_path()
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in procs and session in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
    return list(procs.values())


def _listeners(ray) -> set[tuple[str, int, str]]:
    import psutil

    found = set()
    for p in _cluster_processes(ray):
        try:
            found |= {(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # an idle worker that exited meanwhile
            pass
    return found


def probe(mode: str) -> dict:
    """Start a local cluster (`hardened`: `ray_cluster.ensure_ray`; `plain`: Ray's defaults), run a task
    and an actor, and report the token file and every listening socket of the cluster's processes."""
    import ray
    from ray._private.authentication import authentication_token_setup as setup

    generated = []  # Ray writes the token itself (mode 0644) only through this function
    original = setup.generate_and_save_token
    setup.generate_and_save_token = lambda: (generated.append(True), original())[1]

    from types import SimpleNamespace

    if mode == "hardened":
        assert ray_cluster.ensure_ray(SimpleNamespace(address=None, num_cpus=1))
    else:
        ray.init(address="local", num_cpus=1, logging_level="WARNING")
    try:
        @ray.remote
        def add(x):
            return x + 1

        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0

            def incr(self):
                self.n += 1
                return self.n

        counter = Counter.remote()
        results = [ray.get(add.remote(1)), ray.get([counter.incr.remote() for _ in range(2)])]
        listeners: set = set()
        for _ in range(3):  # agents and workers start lazily: look a few times, keep every listener
            listeners |= _listeners(ray)
            time.sleep(0.5)
        node = ray._private.worker._global_node
        token = ray_cluster.default_token_path()
        return {
            "results": results,
            "node_ip": node.node_ip_address,
            "gcs_port": int(node.gcs_address.rsplit(":", 1)[1]),
            "listeners": sorted(listeners),
            "token_mode": stat.S_IMODE(os.stat(token).st_mode),
            "token": token.read_text(),
            "ray_generated_token": bool(generated),
            "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        }
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, __file__, "hardened"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), home


def test_token_file_is_0600_and_created_by_us(hardened):
    report, home = hardened
    assert report["auth_mode"] == "token"
    assert not report["ray_generated_token"], "Ray wrote the token (0644) before ensure_token_file did"
    assert report["token_mode"] == 0o600
    assert len(report["token"]) == 64 and int(report["token"], 16) >= 0  # Ray's format: token_hex(32)
    assert stat.S_IMODE(os.stat(home / ".ray").st_mode) == 0o700


def test_every_listener_is_loopback(hardened):
    report, _ = hardened
    assert report["node_ip"] == "127.0.0.1"
    names = {name for _, _, name in report["listeners"]}
    assert report["gcs_port"] in {port for _, port, _ in report["listeners"]}, report["listeners"]
    assert {"gcs_server", "raylet"} <= names, report["listeners"]  # the probe saw the cluster's servers
    exposed = [row for row in report["listeners"] if not is_loopback(row[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_tasks_and_actors_run(hardened):
    report, _ = hardened
    assert report["results"] == [2, [1, 2]]


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


# --- the token file without Ray --------------------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_token_created_0600_even_with_a_permissive_umask(home):
    old = os.umask(0)
    try:
        path = ray_cluster.ensure_token_file()
    finally:
        os.umask(old)
    assert path == home / ".ray" / "auth_token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_text()) == 64


def test_existing_token_kept_and_tightened(home):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("a" * 64)
    path.chmod(0o644)
    assert ray_cluster.ensure_token_file() is None
    assert path.read_text() == "a" * 64 and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_symlinked_token_left_alone(home, tmp_path_factory):
    target = tmp_path_factory.mktemp("elsewhere") / "token"
    target.write_text("b" * 64)
    target.chmod(0o644)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").symlink_to(target)
    assert ray_cluster.ensure_token_file() is None
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


@pytest.mark.parametrize("var,value", [("RAY_AUTH_TOKEN", "x" * 64), ("RAY_AUTH_TOKEN_PATH", "/nonexistent"),
                                       ("RAY_AUTH_MODE", "disabled")])
def test_no_token_file_when_ray_would_not_read_one(home, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert ray_cluster.ensure_token_file() is None
    assert not (home / ".ray" / "auth_token").exists()


if __name__ == "__main__":
    os.environ.pop("RAY_ADDRESS", None)
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "hardened")))
