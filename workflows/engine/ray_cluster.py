"""Starting or attaching to Ray, with Ray's defaults hardened for the private local cluster.

What `ray.init(address="local")` does by itself in Ray 2.60 (issue #28):
- it writes `~/.ray/auth_token` with a plain `open(path, "w")`: mode 0644, readable by every user;
- it takes the machine's interface address as the node address, so the GCS, raylet, core workers and
  the dashboard agent's gRPC server listen on every interface, the metrics (Prometheus) export and the
  dashboard's metrics server on 0.0.0.0, the agent's HTTP server and the runtime-env agent on the
  interface address. Passing `_node_ip_address="127.0.0.1"` alone changes nothing: `ray.init` rewrites
  a loopback address to the interface address (`services.resolve_ip_for_localhost`) unless
  `ray_constants.ENABLE_RAY_CLUSTER` is false (the flag Ray sets on macOS and Windows).

A private cluster here is one machine, so `start_local` creates the token file 0600 before Ray looks
for it and starts Ray with a loopback node address: every Ray process then listens on 127.0.0.1 only
(Ray's C++ servers show it as the IPv4-mapped `::ffff:127.0.0.1`). A multi-host cluster needs the
interface address; see cluster/README.md. Ray is imported inside the functions: importing this module
costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("interpflow")

LOOPBACK = "127.0.0.1"
# Ray workers' progress bars would interleave with the driver's.
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


def default_token_path() -> Path | None:
    """Where Ray's C++ token loader reads the token when neither RAY_AUTH_TOKEN nor
    RAY_AUTH_TOKEN_PATH is set: `$HOME/.ray/auth_token` (None without HOME: Ray's Python side would
    then write under the passwd home and its C++ side read `./.ray`, which is nothing to rely on)."""
    home = os.environ.get("HOME")
    return Path(home) / ".ray" / "auth_token" if home else None


def _token_from_environment() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))


def _token_auth_wanted() -> bool:
    # `ray.init` for a new cluster turns token auth on when RAY_AUTH_MODE is unset.
    return os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"


def tighten_token_file(path: Path | None = None) -> bool:
    """Make the default token file 0600 if it is a regular file of ours readable by group or others.
    Returns True if the mode was changed. Someone else's file, or a link, is left alone."""
    path = path or default_token_path()
    if path is None:
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or not st.st_mode & 0o077:
        return False
    os.chmod(path, 0o600)
    log.warning("%s was mode %o (readable beyond its owner); set to 600", path, stat.S_IMODE(st.st_mode))
    return True


def ensure_token_file() -> Path | None:
    """Create Ray's default token file 0600 when a new local cluster would otherwise have Ray write it
    0644, in the format Ray writes (64 hex characters, `secrets.token_hex(32)`, no newline). The file
    is created 0600 (O_EXCL, no link followed), so it is never readable by others, not even briefly.
    An existing token file is kept and only tightened. Returns the path created, or None."""
    path = default_token_path()
    if path is None or not _token_auth_wanted() or _token_from_environment():
        return None
    if path.exists() or path.is_symlink():
        tighten_token_file(path)
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:  # created meanwhile by another process
        tighten_token_file(path)
        return None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return path


def local_init_kwargs() -> dict[str, Any]:
    """The `ray.init` arguments of a loopback-only private cluster. They take effect only inside
    `loopback_node()` (see the module docstring): use `start_local`."""
    return {"address": "local", "_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Let `ray.init` keep a loopback node address. Ray resolves `127.0.0.1` to the interface address
    unless `ray_constants.ENABLE_RAY_CLUSTER` is false; that flag is read at call time and only while
    no node exists, so it is switched off for the start only: afterwards a driver that attaches to a
    real cluster advertises its interface address again."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_local(**kwargs: Any):
    """`ray.init` of a private, hardened local cluster: token file 0600, every listener on 127.0.0.1.
    `kwargs` are further `ray.init` arguments (num_cpus, logging_level, include_dashboard, ...)."""
    import ray

    ensure_token_file()
    with loopback_node():
        ctx = ray.init(**local_init_kwargs(), **kwargs)
    tighten_token_file()  # in case Ray wrote it after all (HOME unset at creation, a race)
    return ctx


def ensure_ray(settings: Any, dashboard: bool = False) -> bool:
    """Connect to Ray if not connected; return True if this call started it. `settings.address` or
    RAY_ADDRESS attaches to that cluster; otherwise a private local cluster starts (`start_local`).
    `dashboard`: a private cluster also starts the dashboard's full module set (about 230 MiB more),
    which serves the State API."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" starts a private cluster even if a `ray start` head is running on this machine.
        start_local(num_cpus=settings.num_cpus, include_dashboard=dashboard,
                    runtime_env={"env_vars": dict(QUIET_ENV)}, **kwargs)
    return True
