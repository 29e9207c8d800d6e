"""Submit a spec to a Ray cluster through the Ray Jobs SDK; follow, read and stop its jobs.

- Address: `--address` wins; else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (Ray's own order, but Ray lets
  the environment override an explicit address: here the explicit one wins).
- What the job runs is the spec after overrides with its `run.store` and `run.tracking_uri` resolved on
  the client (`resolve_for_cluster`): a relative path is made absolute when the cluster is this machine
  (its address is this machine's and its nodes' host names are this host's: a loopback address may be an
  SSH tunnel) and refused otherwise, since a job would write it inside its own temporary working directory.
- The spec travels as JSON (`spec_text`): JSON is YAML 1.2, the project's spec dialect, so every value
  reads back as what it was (PyYAML's `safe_dump` writes YAML 1.1 and leaves `"1e5"` unquoted: a float
  when read back under 1.2).
- The job's `submission_id` is `interpflow-<workflow>-<digest of the shipped spec>`; it is also the run
  id of the job's run, so `interpflow status <id>` reads it from the client. Submitting the same spec
  again attaches to that job while it is pending, running or succeeded. If its last attempt failed or
  was stopped, a new attempt starts (`<id>-2`, `<id>-3`, ...) as a resume: a new run that names the last
  attempt's run as its origin and reuses every node and shard committed in the store.
- A lost head (`--retries N`): a job's driver runs on the head, so the job ends with it, GCS fault tolerance
  or not. The client following the job sees it LOST (the head stops answering, or comes back without it),
  waits for the head to answer again and submits the next attempt, which runs only what the store does
  not hold committed. A RayJob's `backoffLimit` does the same on Kubernetes.
- The package travels as the contents of its wheel in the job's runtime env (`py_modules`), the spec in
  its `working_dir`, the client's git commit in the job's environment (`cluster/job.py` records it).
- Token auth: the Jobs client sends the cluster token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH /
  ~/.ray/auth_token when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from interpflow.workflows.engine.keys import canonical_json
from interpflow.workflows.spec import Spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOST = "LOST"  # the head went away with the job (or came back without it): only the client can retry
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CODE_ENV = ("INTERPFLOW_CODE_COMMIT", "INTERPFLOW_CODE_DIRTY")
ENTRYPOINT = "python -m interpflow.cluster.job spec.yaml"


class SubmitError(ValueError):
    """Something the user can fix before any job runs (no address, a relative store for a remote
    cluster, an unknown job id, an unreachable Jobs API); the CLI prints it as one line, exit 2."""

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Submission:
    submission_id: str
    status: str
    attached: bool
    attempt: int = 1
    origin: str | None = None  # the run id of the attempt this one resumes
    store: str | None = None


# --------------------------------------------------------------------------------------------- address

def cluster_address(explicit: str | None = None) -> str:
    """The Jobs API address to use: `explicit`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    if explicit:
        return explicit
    for name in ADDRESS_ENV:
        if os.environ.get(name):
            return os.environ[name]
    raise SubmitError("no Ray cluster address. Fix: pass --address http://HEAD:8265 (the head's dashboard), "
                      "or set RAY_API_SERVER_ADDRESS (or RAY_ADDRESS) to it")


def address_host(address: str) -> str:
    """The host part of a Jobs or Ray address (`http://h:8265`, `ray://h:10001`, `h:6379`, `auto`)."""
    if address in ("auto", "local", "localhost"):
        return "127.0.0.1"
    parts = urlsplit(address if "://" in address else f"//{address}")
    return parts.hostname or ""


def _own_addresses() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    found = set(names)
    for name in names:
        with contextlib.suppress(OSError):
            found.update(info[4][0] for info in socket.getaddrinfo(name, None))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent; the kernel picks the outgoing interface
        found.add(s.getsockname()[0])
    return found


def is_local_address(address: str) -> bool:
    """Whether the cluster at `address` is this machine (loopback, this host's name or addresses): then
    its jobs see this machine's files."""
    host = address_host(address)
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return True
    return host in _own_addresses()


# ------------------------------------------------------------------------------------ what the job runs

def _relative_path(value: str) -> bool:
    return "://" not in value and not Path(value).expanduser().is_absolute()


def _sqlite_path(uri: str) -> str | None:
    """The file path of a `sqlite:///path` URI (relative with three slashes, absolute with four)."""
    match = re.fullmatch(r"sqlite:///(.*)", uri)
    return match.group(1) if match and match.group(1) != ":memory:" else None


def resolve_for_cluster(spec: Spec, address: str, local: bool | None = None) -> dict:
    """The spec to ship: `spec.raw` with `run.store` and `run.tracking_uri` as the client resolved them.

    A relative store or SQLite path is made absolute (against the client's working directory) when the
    cluster is this machine (`local`; default: judged from the address alone); for another machine it is
    refused with one line naming both fields and the fix. A remote store with no tracking URI is refused
    too (the job would fail on it)."""
    raw = copy.deepcopy(spec.raw)
    run = dict(raw.get("run") or {})
    local = is_local_address(address) if local is None else local
    store = spec.settings.store
    tracking = spec.settings.tracking_uri
    problems = []
    if _relative_path(store):
        if local:
            store = str(Path(store).expanduser().resolve())
        else:
            problems.append(f"run.store '{store}' is a relative path")
    elif "://" not in store and local:
        store = str(Path(store).expanduser())
    run["store"] = store  # explicit even when it came from INTERPFLOW_STORE on the client
    if tracking:
        db = _sqlite_path(tracking)
        if db is not None and _relative_path(db):
            if local:
                tracking = f"sqlite:///{Path(db).expanduser().resolve()}"
            else:
                problems.append(f"run.tracking_uri '{tracking}' is a relative SQLite path")
        elif "://" not in tracking and _relative_path(tracking):
            if local:
                tracking = str(Path(tracking).expanduser().resolve())
            else:
                problems.append(f"run.tracking_uri '{tracking}' is a relative path")
        run["tracking_uri"] = tracking
    elif "://" in store and spec.settings.lineage:
        problems.append(f"run.tracking_uri is not set for the remote store {store}")
    if problems:
        raise SubmitError(
            f"{'; '.join(problems)}: a job on {address} would keep them in its own temporary working directory, "
            "unshared between jobs and unseen by this client. Fix: set run.store to a URI or mount every node "
            "shares (run.store=s3://bucket/prefix) and run.tracking_uri to an MLflow server "
            "(run.tracking_uri=http://mlflow:5000), in the spec or as overrides")
    raw["run"] = run
    return raw


def _yaml12(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml12(k)}: {_yaml12(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml12(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no spelling for these; YAML 1.2 has
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value, ensure_ascii=False)


def spec_text(raw: dict) -> str:
    """`raw` as spec file text that `workflows.spec.parse_yaml` (YAML 1.2) reads back equal: JSON, which is
    YAML 1.2, plus `.inf`/`-.inf`/`.nan` for the floats JSON cannot spell."""
    return "# written by interpflow submit: JSON, read as YAML 1.2\n" + _yaml12(raw) + "\n"


def submission_id_for(spec: Spec | dict) -> str:
    """Stable job id: the workflow name and a digest of the whole spec as shipped (after overrides)."""
    raw = spec.raw if isinstance(spec, Spec) else spec
    digest = hashlib.sha256(canonical_json(raw).encode()).hexdigest()[:16]
    return f"interpflow-{raw.get('workflow')}-{digest}"


def attempt_id(base: str, attempt: int) -> str:
    return base if attempt == 1 else f"{base}-{attempt}"


def build_package(dest: Path) -> Path:
    """This checkout's package as the `interpflow/` folder of its wheel.

    A `.whl` in `py_modules` is pip-installed with all its dependencies on every node (minutes, and
    it may pull another torch); the unpacked folder ships the same files and leaves the cluster
    image's dependencies alone.
    """
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dest), str(PROJECT_ROOT)], check=True, capture_output=True, text=True)
    wheel = next(dest.glob("interpflow-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dest / "unpacked")
    return dest / "unpacked" / "interpflow"


def client_code_version() -> dict[str, str]:
    """The git commit and dirty flag of the checkout the shipped package is built from."""
    from interpflow.workflows.engine.lineage import code_version

    return code_version(PROJECT_ROOT)


# ---------------------------------------------------------------------------------------- Jobs client

def cluster_auth_headers() -> dict[str, str]:
    """The bearer header for a token-auth cluster, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (where `ray start` writes it). Empty if no token is at hand.

    Passed explicitly because Ray's own client only adds it when RAY_AUTH_MODE=token was set before
    `import ray`, which a notebook or test process cannot promise.
    """
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _address_env_aside() -> Iterator[None]:
    """Ray's JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    given; set them aside while it resolves ours."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def jobs_client(address: str | None = None):
    """A JobSubmissionClient for `address` (or the environment's, see `cluster_address`), with the token."""
    address = cluster_address(address)  # one line before Ray is imported when there is none
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_env_aside():
            return JobSubmissionClient(address, headers=cluster_auth_headers())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({str(exc).splitlines()[0][:200]}). "
                          "Fix: start the head, or point --address / RAY_API_SERVER_ADDRESS at its dashboard "
                          "(http://HEAD:8265)") from None


def cluster_hostnames(client) -> list[str] | None:
    """Host names of the cluster's live nodes, from the dashboard (None if it does not say)."""
    try:
        response = client._do_request("GET", "/nodes?view=hostNameList")
        hosts = list(response.json()["data"]["hostNameList"]) if response.status_code == 200 else []
        return hosts or None  # none yet: the dashboard learns of the nodes a moment after it starts
    except Exception:  # noqa: BLE001 - a dashboard without the node module: judge by the address alone
        return None


def hosts_are_this_machine(hosts: list[str] | None) -> bool:
    """Whether nodes of these host names see this machine's files: all of them are this host (a loopback
    address can be an SSH tunnel to another machine's dashboard; network namespaces share the host name
    and the files). Unknown (None) counts as this machine: the address already looked local."""
    if hosts is None:
        return True
    own = {socket.gethostname(), socket.getfqdn()}
    return all(h in own for h in hosts)


def job_status(client, job: str) -> str:
    try:
        return str(client.get_job_status(job).value)
    except RuntimeError as exc:  # the Jobs API answers 404 for an unknown id
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job '{job}' on {client.get_address()}. Fix: give a submission id that "
                              "`interpflow submit` printed (or `ray job list` shows)") from None
        raise


def attempts_of(client, base: str) -> dict[int, Any]:
    """Jobs of this spec by attempt number (1 is `base` itself, n is `base-n`)."""
    found = {}
    pattern = re.compile(re.escape(base) + r"(?:-(\d+))?")
    for job in client.list_jobs():
        match = pattern.fullmatch(job.submission_id or "")
        if match:
            found[int(match.group(1) or 1)] = job
    return found


def _submit_when_ready(client, timeout_s: float, **job) -> None:
    """Submit, waiting out a head whose job agent is still starting (the Jobs API answers 500
    "No available agent" for a few seconds after `ray start`, longer on a loaded machine)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2.0)


def _run_coroutine(make: Callable[[], Any]) -> Any:
    """`asyncio.run(make())`, in a thread of its own when this thread already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def follow_logs(client, job: str, write: Callable[[str], None], timeout_s: float = 1800) -> str:
    """Stream the job's logs to `write` as they come (Ray's `tail_job_logs`) until it ends or `timeout_s`
    passes; then its status. The whole log so far is streamed first."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job):
            write(chunk)

    deadline = time.time() + timeout_s
    try:
        _run_coroutine(lambda: asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        return followed_status(client, job)
    except Exception as exc:  # noqa: BLE001 - the stream broke (a lost head too): say so, follow the status
        write(f"[interpflow] log stream of {job} ended early ({type(exc).__name__}: {exc}); following its "
              "status\n")
    status = followed_status(client, job)
    while status not in TERMINAL + (LOST,) and time.time() < deadline:  # the stream ends before the status
        time.sleep(0.5)
        status = followed_status(client, job)
    return status


def followed_status(client, job: str) -> str:
    """The job's status, or LOST when its head no longer answers or no longer knows it (a head that came back
    without GCS fault tolerance starts with an empty job table)."""
    try:
        return job_status(client, job)
    except Exception:  # noqa: BLE001 - SubmitError (an unknown job), or connection refused or reset
        return LOST


def wait_for_head(address: str, timeout_s: float, poll_s: float = 2.0):
    """A Jobs client once the head at `address` answers again (a restarted head, or its replacement), or a
    SubmitError after `timeout_s`."""
    deadline = time.time() + timeout_s
    while True:
        try:
            client = jobs_client(address)
            client.list_jobs()
            return client
        except Exception as exc:  # noqa: BLE001 - still down, or its dashboard still starting
            if time.time() > deadline:
                raise SubmitError(f"the head at {address} did not answer within {timeout_s:.0f} s after its job "
                                  f"was lost ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
                                  ". Fix: restart the head, then submit the spec again: it resumes from the "
                                  "store") from None
            time.sleep(poll_s)


def wait_for(client, job: str, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.time() + timeout_s
    status = job_status(client, job)
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(poll_s)
        status = job_status(client, job)
    return status


def submit_spec(spec: Spec, address: str | None = None, wait: bool = True, timeout_s: float = 1800,
                echo: Callable[[str], None] = print,
                write: Callable[[str], None] | None = None, retries: int = 0,
                head_wait_s: float = 600) -> Submission:
    """Submit `spec` as a Ray job, or attach to the job of this spec already there (see the module
    docstring); with `wait`, stream its logs to `write` until it ends.

    `retries` (with `wait`): when the job fails or is lost with its head, wait up to `head_wait_s` for the
    head to answer again and submit the next attempt, which resumes the run from the store. A stopped job is
    not retried: someone stopped it."""
    address = cluster_address(address)
    looks_local = is_local_address(address)
    if not looks_local:
        resolve_for_cluster(spec, address, local=False)  # a relative path is refused before anything is contacted
    client = jobs_client(address)
    hosts = cluster_hostnames(client) if looks_local else None
    where = address if hosts_are_this_machine(hosts) else f"{address} (a cluster on {', '.join(sorted(hosts))})"
    raw = resolve_for_cluster(spec, where, local=looks_local and hosts_are_this_machine(hosts))
    base = submission_id_for(raw)
    attempts = attempts_of(client, base)
    last = max(attempts, default=0)
    store = raw["run"]["store"]
    if last and str(attempts[last].status.value) not in ("FAILED", "STOPPED"):
        sid, status = attempt_id(base, last), str(attempts[last].status.value)
        echo(f"job {sid} exists ({status}); attaching instead of submitting again")
        result = Submission(sid, status, attached=True, attempt=last, store=store)
    else:
        origin = attempt_id(base, last) if last else None
        result = _submit_attempt(client, raw, base, last + 1, origin, store)
        echo(f"job {origin} ended {attempts[last].status.value}: submitted attempt {result.attempt} as job "
             f"{result.submission_id}, resuming run {origin} from the store" if origin
             else f"submitted job {result.submission_id}")
    if not wait or result.status in TERMINAL:
        return result
    write = write or (lambda s: print(s, end="", flush=True))
    result.status = follow_logs(client, result.submission_id, write, timeout_s)
    for retry in range(1, retries + 1):
        if result.status not in ("FAILED", LOST):
            break
        echo(f"job {result.submission_id} {'was lost with its head' if result.status == LOST else 'failed'}: "
             f"retry {retry} of {retries} once the head at {address} answers")
        client = wait_for_head(address, head_wait_s)
        # a head restarted without GCS fault tolerance has forgotten the earlier attempts: count on from ours
        attempt = max(result.attempt, max(attempts_of(client, base), default=0)) + 1
        previous = result.submission_id
        result = _submit_attempt(client, raw, base, attempt, previous, store)
        echo(f"submitted attempt {attempt} as job {result.submission_id}, resuming run {previous} from the store")
        result.status = follow_logs(client, result.submission_id, write, timeout_s)
    return result


def _submit_attempt(client, raw: dict, base: str, attempt: int, origin: str | None, store: str) -> Submission:
    """Submit one attempt of the resolved spec `raw`: its run id is its submission id; `origin` names the run
    it resumes."""
    sid = attempt_id(base, attempt)
    entrypoint = f"{ENTRYPOINT} --run-id {sid}" + (f" --origin {origin}" if origin else "")
    code = client_code_version()
    staging = Path(tempfile.mkdtemp(prefix="interpflow-submit-"))
    try:
        workdir = staging / "job"
        workdir.mkdir()
        (workdir / "spec.yaml").write_text(spec_text(raw), encoding="utf-8")
        package = build_package(staging / "wheel")
        _submit_when_ready(client, timeout_s=120, entrypoint=entrypoint, submission_id=sid,
                           runtime_env={"working_dir": str(workdir), "py_modules": [str(package)],
                                        "env_vars": {CODE_ENV[0]: code["commit"], CODE_ENV[1]: code["dirty"]}},
                           metadata={"interpflow_workflow": str(raw.get("workflow")), "interpflow_run_id": sid,
                                     "interpflow_attempt": str(attempt), "interpflow_origin": origin or "",
                                     "interpflow_store": store})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Submission(sid, "PENDING", attached=False, attempt=attempt, origin=origin, store=store)


def job_logs(job: str, address: str | None = None, follow: bool = False,
             write: Callable[[str], None] = print) -> str:
    """Write the job's logs (all so far, or followed until it ends); return its status."""
    client = jobs_client(address)
    status = job_status(client, job)
    if follow and status not in TERMINAL:
        return follow_logs(client, job, write)
    write(client.get_job_logs(job))
    return status


def stop_job(job: str, address: str | None = None, timeout_s: float = 60) -> tuple[str, bool]:
    """Stop the job (Ray sends its driver SIGTERM, then SIGKILL) and wait until it has ended. Returns its
    final status and whether this call stopped it (False: it had already ended)."""
    client = jobs_client(address)
    status = job_status(client, job)
    if status in TERMINAL:
        return status, False
    client.stop_job(job)
    return wait_for(client, job, timeout_s, poll_s=0.5), True
