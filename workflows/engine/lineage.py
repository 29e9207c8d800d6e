"""Lineage in MLflow: one parent run per workflow run, one nested run per node, in MLflow's own terms.

What a run holds (read it back with `mlflow.search_runs` or `MlflowClient`):

- The parent run: params = the flattened config and the `run.*` settings, `config.json` as an artifact,
  MLflow's standard source tags (`mlflow.source.git.commit`, `mlflow.source.type`, `mlflow.source.name`,
  `mlflow.user`; the dirty flag as `interpflow.code_dirty`), and the run's counts as metrics.
- A nested run per node (`mlflow.parentRunId`): params = the node's config, `input.<arg>.digest/uri`,
  version and source hash; tags = key, upstream keys, `interpflow.upstream_runs` (argument -> the MLflow
  run that produced the input), cache hit and the run that produced a cached artifact, output URI, rows,
  bytes, status, error; metrics = the node's figures. Every input the node read is an MLflow dataset
  input (name `node:output`, digest = the upstream commit's digest, source = its store URI, schema for
  tables). Figures and tables marked as reports are artifacts, a failure's traceback too.
- Every `hf` output (a `save_pretrained` folder) is an MLflow logged model whose weights stay in the
  store (an external model: MLflow's own answer for weights kept elsewhere), with the signature
  MLflow's transformers flavour gives its task where the folder's architecture names one; registered in
  the model registry as `<workflow>.<node>` when `run.register` is true. A node that reads it logs it
  as a model input.
- A resume is a new parent run tagged with its origin run (and that run's MLflow parent); a run continued
  under its own id keeps one run per node under its parent (a cache hit keeps the run that computed it).

How it is written: the driver never waits on the tracking store while nodes run. Opening and closing a
node's run are in-memory events; one writer thread flushes them every FLUSH_S seconds, and `end_parent`
flushes and waits. On a SQL tracking store (SQLite, PostgreSQL, MySQL) the driver chooses run ids, as
MLflow does (uuid4 hex), and a flush is one transaction of multi-row inserts into MLflow's own tables
(its SQLAlchemy table definitions, the schema its store created and migrated): MLflow's per-run calls
(create_run, log_batch, log_inputs, set_terminated) cost about 20 ms of driver CPU per node here, and
MLflow's asynchronous logging only covers log_batch, one run at a time. On a tracking server the server
assigns run ids, so a run is created when its node opens and the rest goes through `log_batch(...,
synchronous=False)`. Runs a node's own code writes into (Ray Train metrics, sweep trials) are created
before the node is submitted and closed through MlflowClient. A killed driver loses at most the lineage
of its last FLUSH_S seconds, never store data; the next driver closes what it left RUNNING as KILLED.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("interpflow")

TAG = "interpflow."
# A task marks a table for people to read (a results table, not bulk data) with this schema metadata key
# set to "1"; such tables are logged to the node's MLflow run as CSV beside its figures.
REPORT_TABLE_KEY = b"interpflow.report_table"
FLUSH_S = 0.5  # the writer's period: what a killed driver can lose at most
SQL_SCHEMES = {"sqlite", "postgresql", "postgres", "mysql", "mssql"}
# MLflow's limits (mlflow.utils.validation), applied here because bulk rows bypass its validation
MAX_KEY, MAX_PARAM, MAX_TAG, MAX_DIGEST, MAX_INPUT_TAG = 250, 6000, 8000, 36, 500
DATA_KINDS = ("table", "tensors", "ndarray", "json", "hf", "dataset")  # outputs a reader takes as data


@functools.lru_cache(maxsize=8)
def _client(uri: str):
    """One client per process and URI: opening a SQLAlchemy store checks the schema (slow)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """SQLite allows one writer at a time; concurrent workers back off and retry."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - mlflow wraps sqlite errors in several types
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt)


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (alphanumerics and _-. :/, at most 250 characters): a node's
    figure is never lost to its name."""
    return re.sub(r"[^\w\-. :/]", "_", name)[:MAX_KEY]


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested config dict (`sae.k` -> '64'), values cut to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = config if isinstance(config, str) else json.dumps(config)
    out[prefix.rstrip(".")] = value[:MAX_PARAM]
    return out


def code_version(path: str | Path | None = None) -> dict[str, str]:
    """The git commit and dirty flag of the checkout holding the package (or 'unknown').

    A job on a cluster runs the client's checkout shipped without its `.git`: `interpflow submit` passes
    the client's commit and dirty flag in INTERPFLOW_CODE_COMMIT / INTERPFLOW_CODE_DIRTY, which win."""
    import os

    if os.environ.get("INTERPFLOW_CODE_COMMIT"):
        return {"commit": os.environ["INTERPFLOW_CODE_COMMIT"],
                "dirty": os.environ.get("INTERPFLOW_CODE_DIRTY", "unknown")}
    here = Path(path or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": commit, "dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}


def source_tags(commit: str | None) -> dict[str, str]:
    """MLflow's standard source tags (what `mlflow.start_run` sets from its context providers)."""
    import getpass
    import sys

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "unknown"
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": (sys.argv[0] if sys.argv else "") or "python",
            "mlflow.user": user}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (`mlartifacts/` next to
    `mlflow.db`), never the current directory's `mlruns/` (MLflow's default for a database URI); a
    tracking server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def is_sql_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() in SQL_SCHEMES


@contextmanager
def _sqlite_init_lock(uri: str):
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = uri[len("sqlite:///"):] + ".init-lock"
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_key(key: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", key)[:MAX_KEY]


@dataclass
class _Run:
    """The writer's view of one MLflow run: what is in the tracking store and what is not yet."""

    run_id: str
    name: str
    start: int
    live: bool = False  # others write into it (node code, a resumed parent): closed through MlflowClient
    written: bool = False  # its row is in the tracking store
    status: str = "RUNNING"
    end: int | None = None
    status_dirty: bool = False
    reopened: bool = False  # a node run of a continued run: its earlier error goes
    artifact_uri: str | None = None
    tags: dict = field(default_factory=dict)  # not yet written
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # key -> (value, timestamp ms)
    datasets: list = field(default_factory=list)  # mlflow.entities.Dataset, with the reading argument


@dataclass
class _Summary:
    """What a reader needs of an upstream commit (its manifest, read once)."""

    digest: str | None
    produced_by: str | None
    outputs: dict
    rows: int
    bytes: int
    first_shard: str | None


class Lineage:
    """Driver-side MLflow bookkeeping for one workflow run (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str, *, register: bool = False, flush_s: float = FLUSH_S):
        self.uri, self.experiment, self.register = tracking_uri, experiment, register
        self.bulk = is_sql_uri(tracking_uri)
        self.flush_s = flush_s
        self.parent_id: str | None = None
        self.common_tags: dict[str, str] = {}
        self.workflow = "graph"
        self._open_nodes: dict[str, str] = {}  # node name -> its open run (the driver's side)
        self._earlier: dict[str, tuple[str, str, str]] = {}  # a continued parent's node runs: name -> (id, key, status)
        self._reused: set[str] = set()  # earlier runs a cache hit stands for as they are
        self.client = None
        self.experiment_id: str | None = None
        self._artifact_root: str | None = None
        self._events: list[tuple] = []  # appended by the driver, taken by the writer
        self._lock = threading.Lock()  # guards _events
        self._write_lock = threading.RLock()  # one writer at a time: the thread, or a synchronous flush
        self._runs: dict[str, _Run] = {}  # the writer's state (under _write_lock)
        self._dirty: dict[str, _Run] = {}
        self._jobs: list[tuple] = []  # post-commit work in event order: artifacts, models
        self._summaries: dict[str, _Summary] = {}  # commit directory -> summary (read once)
        self._datasets: dict[str, dict[str, Any]] = {}  # directory -> output -> the mlflow Dataset entity
        self._models: dict[tuple, str] = {}  # (node, key, output) -> logged model id
        self._failures = 0
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name="interpflow-lineage", daemon=True)
        self._thread.start()

    # --- set-up (on the writer thread: importing MLflow and opening its store overlap the run's start) -----
    def _main(self) -> None:
        try:
            with _sqlite_init_lock(self.uri):  # two drivers must not migrate a new database at once
                self.client = _client(self.uri)
                self.experiment_id = self._experiment(self.experiment)
            self._artifact_root = self.client.get_experiment(self.experiment_id).artifact_location
        except BaseException as exc:  # noqa: BLE001 - surfaced to the driver by _wait_ready
            self._init_error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if not self._stop.is_set():
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - the writer keeps going; close() flushes again
                    self._fail(f"{type(exc).__name__}: {exc}")

    def _wait_ready(self) -> None:
        self._ready.wait()
        if self._init_error is not None:
            raise RuntimeError(f"MLflow tracking store {self.uri} cannot be opened: "
                               f"{type(self._init_error).__name__}: {self._init_error}") from self._init_error

    def _experiment(self, name: str) -> str:
        """Get or create the experiment; another process may create it at the same moment."""
        exp = _retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise RuntimeError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore "
                                   f"--experiment-id {exp.experiment_id}) or set run.experiment to another name")
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri))
        except Exception:  # noqa: BLE001 - lost the race: the other process created it
            time.sleep(0.2)
            return _retry(self.client.get_experiment_by_name, name).experiment_id

    def _terminate(self, run_id: str, status: str, end: int | None = None) -> None:
        """A run's end: one store call (MlflowClient.set_terminated also reads the run back to print its URL
        on a tracking server)."""
        from mlflow.entities import RunStatus

        _retry(self.client._tracking_client.store.update_run_info, run_id, RunStatus.from_string(status),
               end or _now_ms(), None)

    def _has_run(self, run_id: str) -> bool:
        try:
            _retry(self.client.get_run, run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST) and kin
            return False

    def _emit(self, *event) -> None:
        with self._lock:
            self._events.append(event)

    # --- the driver's calls ------------------------------------------------------------------------
    def start_parent(self, run_id: str, workflow: str, config: dict, settings: dict, tags: dict[str, str],
                     existing: str | None = None) -> str:
        self.workflow = workflow
        own = ("origin", "origin_mlflow_run")  # a resume's: on its parent run only
        self.common_tags = {f"{TAG}{k}": str(v) for k, v in tags.items() if k not in own}
        self.common_tags.update(source_tags(tags.get("code_commit")))
        all_tags = {f"{TAG}run_id": run_id, f"{TAG}workflow": workflow, f"{TAG}kind": "workflow",
                    **self.common_tags, **{f"{TAG}{k}": str(tags[k]) for k in own if tags.get(k)}}
        if existing:
            self._wait_ready()
            if self._has_run(existing):  # the same run goes on: its parent runs again
                self.parent_id = existing
                _retry(self.client.update_run, existing, status="RUNNING")
                self._emit("reopen", existing, all_tags)
                # one run per node under a parent: a new attempt continues its nodes' earlier runs
                for run in _retry(self.client.search_runs, [self.experiment_id],
                                  f"tags.mlflow.parentRunId = '{existing}'", max_results=50000):
                    name = run.data.tags.get(f"{TAG}node")
                    if name and run.data.tags.get(f"{TAG}kind") == "node":
                        self._earlier[name] = (run.info.run_id, run.data.tags.get(f"{TAG}key"), run.info.status)
                return existing
            # the tracking store was replaced or moved: the run starts a new parent, noting the old
            all_tags[f"{TAG}previous_parent_run"] = existing
        params = flatten(config)
        params.update(flatten(settings, "run."))
        self.parent_id = self._create(f"{workflow}-{run_id}", all_tags, live=False)
        self._emit("open", self.parent_id, f"{workflow}-{run_id}", all_tags, params, None, None, False, _now_ms())
        self._emit("text", self.parent_id, json.dumps(config, indent=1), "config.json")
        return self.parent_id

    def _create(self, name: str, tags: dict[str, str], live: bool) -> str:
        """A run id: chosen here on a SQL store (its row comes with the next flush); created now on a
        tracking server, which assigns ids."""
        if self.bulk:
            return uuid.uuid4().hex
        self._wait_ready()
        run = _retry(self.client.create_run, self.experiment_id, run_name=name,
                     tags={k: str(v)[:MAX_TAG] for k, v in tags.items()})
        with self._write_lock:
            self._runs[run.info.run_id] = _Run(run.info.run_id, name, run.info.start_time, live=live,
                                               written=True, artifact_uri=run.info.artifact_uri)
        return run.info.run_id

    def mark_killed(self, run_ids: list[str]) -> None:
        """Close the runs a killed driver left RUNNING as KILLED: those its record names (its parent and
        running nodes) and every RUNNING run nested under them (the record may be a moment older than
        the lineage; a sweep's trials)."""
        self._wait_ready()
        todo, seen = list(run_ids), set()
        while todo:
            run_id = todo.pop()
            if run_id in seen:
                continue
            seen.add(run_id)
            try:
                run = _retry(self.client.get_run, run_id)
            except Exception:  # noqa: BLE001 - never written (lost with the driver) or another store
                continue
            if run.info.status == "RUNNING":
                _retry(self.client.set_tag, run_id, f"{TAG}status", "killed")
                self._terminate(run_id, "KILLED")
            children = _retry(self.client.search_runs, [run.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
            todo += [child.info.run_id for child in children]

    def start_node(self, name: str, key: str, parts: dict, upstream: dict[str, str], cache_hit: bool,
                   produced_by: dict | None = None, inputs: dict[str, dict] | None = None, *,
                   store=None, live: bool = False) -> str:
        """Open a node's run. `inputs`: argument -> {node, key, output, directory, uri, run} of what the
        node reads. A `live` run (node code logs into it) is in the tracking store when this returns."""
        tags = {
            "mlflow.parentRunId": self.parent_id,
            f"{TAG}node": name,
            f"{TAG}key": key,
            f"{TAG}upstream_keys": json.dumps(upstream, sort_keys=True),
            f"{TAG}cache_hit": str(cache_hit).lower(),
            f"{TAG}kind": "node",
            **self.common_tags,
        }
        if produced_by:
            tags[f"{TAG}produced_by_run"] = str(produced_by.get("run_id"))
            tags[f"{TAG}produced_by_mlflow_run"] = str(produced_by.get("mlflow_run_id"))
        params = flatten(parts.get("config", {}))
        params.update(flatten(parts.get("external", {}), "external."))
        params.update({"version": str(parts.get("version")), "source_hash": str(parts.get("source"))[:16]})
        if name in self._open_nodes:  # started again (an input it read was damaged): that run ends here
            self._emit("close", self._open_nodes.pop(name), "KILLED", {}, {f"{TAG}status": "restarted"}, _now_ms())
        earlier = self._earlier.pop(name, None)
        if earlier is not None and earlier[1] == key:  # a new attempt of this run: the node keeps its run
            if earlier[2] == "FINISHED" and cache_hit:  # what it computed (or reused) then stands
                self._reused.add(earlier[0])
                return earlier[0]
            tags = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
            self._open_nodes[name] = earlier[0]
            self._emit("reopen", earlier[0], tags, inputs or {}, store)
            if live:
                self.flush()
            return earlier[0]
        run_id = self._create(name, tags, live)
        self._open_nodes[name] = run_id
        self._emit("open", run_id, name, tags, params, inputs or {}, store, live, _now_ms())
        if live and self.bulk:
            self.flush()
        return run_id

    def end_node(self, run_id: str, status: str, metrics: dict[str, float] | None = None,
                 tags: dict[str, str] | None = None, error: str | None = None, *, store=None,
                 directory: str | None = None, node: str | None = None, key: str | None = None,
                 config: dict | None = None) -> None:
        """Close a node's run; with `directory` (a committed node) its figures, report tables and models
        are logged from the store by the writer."""
        if run_id in self._reused:
            return
        if node is not None and self._open_nodes.get(node) == run_id:
            del self._open_nodes[node]
        all_tags = {f"{TAG}status": status, **{f"{TAG}{k}": str(v) for k, v in (tags or {}).items()}}
        if error:
            all_tags[f"{TAG}error"] = error.strip().splitlines()[-1][:4000] if error.strip() else "error"
        mlflow_status = {"failed": "FAILED", "skipped": "KILLED"}.get(status, "FINISHED")
        self._emit("close", run_id, mlflow_status, dict(metrics or {}), all_tags, _now_ms())
        if error:
            self._emit("text", run_id, error, "traceback.txt")
        if directory is not None and store is not None:
            self._emit("outputs", run_id, store, directory, node, key, status, config or {})

    def end_parent(self, status: str, ray_job_id: str, metrics: dict[str, float]) -> None:
        """Close the parent run after every pending write; waits for the writer. Never raises: a
        lineage failure is logged (the run's outputs are committed in the store either way)."""
        if self.parent_id:
            self._emit("close", self.parent_id, "FINISHED" if status == "succeeded" else "FAILED", dict(metrics),
                       {f"{TAG}status": status, f"{TAG}ray_job_id": ray_job_id}, _now_ms())
        self.close()

    def close(self) -> None:
        """Stop the writer after a last flush (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            self._wait_ready()
            self.flush()
        except Exception as exc:  # noqa: BLE001 - lineage never fails a run
            self._fail(f"{type(exc).__name__}: {exc}")
        with self._lock:
            lost = len(self._events)
        if self._dirty or lost:
            self._fail(f"{len(self._dirty)} run(s) and {lost} event(s) could not be written")

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        log.warning("MLflow lineage in %s: %s (the run's outputs are committed in the store)", self.uri, message)

    # --- the writer ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every event emitted so far (on the writer thread, or synchronously by the driver)."""
        self._wait_ready()
        with self._write_lock:
            with self._lock:
                events, self._events = self._events, []
            for event in events:
                try:
                    self._apply(event)
                except Exception as exc:  # noqa: BLE001 - one bad event must not lose the others
                    self._fail(f"{event[0]} of run {event[1]}: {type(exc).__name__}: {exc}")
            if self._dirty:
                try:
                    _retry(self._write_sql if self.bulk else self._write_client, list(self._dirty.values()))
                    self._dirty.clear()
                    self._failures = 0
                except Exception as exc:  # noqa: BLE001 - kept for the next flush, given up after three
                    self._failures += 1
                    if self._failures >= 3:
                        self._fail(f"dropped the lineage of {len(self._dirty)} run(s): {type(exc).__name__}: {exc}")
                        self._dirty.clear()
                        self._jobs.clear()
                        self._failures = 0
                    return
            jobs, self._jobs = self._jobs, []
            for job in jobs:
                try:
                    getattr(self, f"_job_{job[0]}")(*job[1:])
                except Exception as exc:  # noqa: BLE001 - one artifact or model must not stop the others
                    self._fail(f"{job[0]} of run {job[1]}: {type(exc).__name__}: {exc}")

    def _apply(self, event: tuple) -> None:
        kind, run_id = event[0], event[1]
        if kind == "open":
            _, _, name, tags, params, inputs, store, live, start = event
            run = self._runs.get(run_id) or _Run(run_id, name, start, live=live)
            self._runs[run_id] = run
            if not run.written:
                run.tags.update(tags)
            run.params.update(params)
            if inputs is not None:  # a node's (the parent has none)
                self._resolve_inputs(run, inputs, store)
            self._dirty[run_id] = run
        elif kind == "reopen":  # a continued run's parent, or one of its node runs: closed through MlflowClient
            run = self._runs.get(run_id) or _Run(run_id, "", _now_ms(), live=True, written=True)
            self._runs[run_id] = run
            run.tags.update(event[2])
            if len(event) > 3:  # a node run runs again
                run.status, run.end, run.status_dirty, run.reopened = "RUNNING", None, True, True
                self._resolve_inputs(run, event[3], event[4])
                run.datasets = []  # inputs of the same key: logged by its earlier attempt
            self._dirty[run_id] = run
        elif kind == "close":
            _, _, status, metrics, tags, end = event
            run = self._runs.get(run_id)
            if run is None:
                return
            run.status, run.end, run.status_dirty = status, end, True
            run.tags.update(tags)
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v == v:  # NaN is left out, as before
                    run.metrics[metric_key(k)] = (float(v), end)
            self._dirty[run_id] = run
        else:  # text, outputs: after the run's row is written
            if kind == "outputs":  # a (re)commit: read its manifest afresh
                self._summaries.pop(event[3], None)
                self._datasets.pop(event[3], None)
            self._jobs.append(event)

    # inputs: params, upstream runs and dataset inputs of what a node read
    def _summary(self, store, directory: str) -> _Summary | None:
        summary = self._summaries.get(directory)
        if summary is None:
            manifest = store.read_manifest(directory)
            if manifest is None:
                return None
            shards = manifest.get("shards") or []
            summary = _Summary(manifest.get("digest"), (manifest.get("produced_by") or {}).get("mlflow_run_id"),
                               manifest.get("outputs", {}), manifest.get("rows", 0), manifest.get("bytes", 0),
                               shards[0]["dir"] if shards else None)
            if len(self._summaries) > 4096:
                self._summaries.clear()
                self._datasets.clear()
            self._summaries[directory] = summary
        return summary

    def _resolve_inputs(self, run: _Run, inputs: dict[str, dict], store) -> None:
        upstream_runs, models = {}, []
        for arg, ref in inputs.items():
            summary = self._summary(store, ref["directory"]) if store is not None else None
            digest = summary.digest if summary else None
            run.params[f"input.{arg}.digest"] = str(digest)
            run.params[f"input.{arg}.uri"] = str(ref["uri"])[:MAX_PARAM]
            upstream_runs[arg] = (summary.produced_by if summary else None) or ref.get("run")
            if summary is None:
                continue
            names = [ref["output"]] if ref.get("output") else \
                [n for n, o in summary.outputs.items() if o["kind"] in DATA_KINDS and n != "metrics"]
            for output in names:
                out = summary.outputs.get(output)
                if out is None:
                    continue
                if out["kind"] == "hf":
                    models.append((ref["node"], ref["key"], output))
                cache = self._datasets.setdefault(ref["directory"], {})
                if output not in cache:
                    try:
                        cache[output] = self._dataset(store, ref, output, out, summary)
                    except Exception as exc:  # noqa: BLE001 - e.g. a URI scheme MLflow has no dataset source for
                        log.debug("no MLflow dataset for %s:%s: %s", ref["directory"], output, exc)
                        cache[output] = None
                if cache[output] is not None:
                    run.datasets.append((arg, cache[output]))
        run.tags[f"{TAG}upstream_runs"] = json.dumps(upstream_runs, sort_keys=True)
        if models:
            self._jobs.append(("model_inputs", run.run_id, models))

    def _dataset(self, store, ref: dict, output: str, out: dict, summary: _Summary):
        """An MLflow dataset for one upstream output: MLflow's MetaDataset (source from the store URI,
        digest = the commit's digest, schema for tables) as the entity MLflow stores."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path matches MLflow's local source twice: same class
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(ref["uri"]))
        schema = None
        if out["kind"] == "table":
            base = f"{ref['directory']}/{summary.first_shard}" if summary.first_shard else ref["directory"]
            schema = self._table_schema(store, f"{base}/{out['path']}")
        from mlflow.entities import Dataset

        meta = MetaDataset(source, name=f"{ref['node']}:{output}"[:500], digest=str(summary.digest)[:MAX_DIGEST],
                           schema=schema)._to_mlflow_entity()
        profile = {"num_rows": out.get("rows") if out.get("rows") is not None else summary.rows,
                   "num_bytes": summary.bytes, "kind": out["kind"], "sha256": summary.digest,
                   "produced_by_run": summary.produced_by}
        return Dataset(meta.name, meta.digest, meta.source_type, meta.source, meta.schema, json.dumps(profile))

    @staticmethod
    def _table_schema(store, path: str):
        try:
            import pyarrow.parquet as pq

            with store.fs.open_input_file(path) as f:
                return arrow_schema(pq.read_schema(f))
        except Exception:  # noqa: BLE001 - a schema is a courtesy; the digest names the data
            return None

    # bulk rows on a SQL store
    def _write_sql(self, runs: list[_Run]) -> None:
        import sqlalchemy as sa
        from mlflow.store.tracking.dbmodels import models as m
        from mlflow.utils.uri import append_to_uri_path

        store = self.client._tracking_client.store
        exp_id = int(self.experiment_id)
        new_runs, tags, params, metrics, latest, status = [], [], [], [], [], []
        replaced_tags, replaced_latest, datasets = [], [], []
        for run in runs:
            if run.live and run.written:
                continue  # closed through MlflowClient (_job_client_close)
            if not run.written:
                run.artifact_uri = append_to_uri_path(self._artifact_root, run.run_id, "artifacts")
                new_runs.append({
                    "run_uuid": run.run_id, "name": run.name[:MAX_KEY], "source_type": "LOCAL",
                    "source_name": run.tags.get("mlflow.source.name", "")[:500], "entry_point_name": "",
                    "user_id": run.tags.get("mlflow.user"), "status": run.status, "start_time": run.start,
                    "end_time": run.end, "deleted_time": None,
                    "source_version": run.tags.get("mlflow.source.git.commit", "")[:50],
                    "lifecycle_stage": "active", "artifact_uri": run.artifact_uri, "experiment_id": exp_id})
                run.tags.setdefault("mlflow.runName", run.name[:MAX_KEY])
            else:
                if run.status_dirty:
                    status.append({"rid": run.run_id, "st": run.status, "et": run.end})
                replaced_tags += [(run.run_id, k) for k in run.tags]
            tags += [{"key": _param_key(k), "value": str(v)[:MAX_TAG], "run_uuid": run.run_id}
                     for k, v in run.tags.items()]
            if not run.written:
                params += [{"key": _param_key(k), "value": str(v)[:MAX_PARAM], "run_uuid": run.run_id}
                           for k, v in run.params.items()]
            for k, (value, ts) in run.metrics.items():
                row = {"key": k, "value": value, "timestamp": ts, "step": 0, "is_nan": False, "run_uuid": run.run_id}
                metrics.append(row)
                latest.append(dict(row))
                if run.written:  # a metric logged again (a parent reopened): the latest value is this one
                    replaced_latest.append({"rid": run.run_id, "k": k})
            datasets += [(run.run_id, arg, d) for arg, d in run.datasets]
        with store.ManagedSessionMaker(read_only=False) as session:
            if new_runs:
                session.execute(sa.insert(m.SqlRun.__table__), new_runs)
            if status:
                t = m.SqlRun.__table__
                session.execute(sa.update(t).where(t.c.run_uuid == sa.bindparam("rid"))
                                .values(status=sa.bindparam("st"), end_time=sa.bindparam("et")), status)
            if replaced_tags:
                t = m.SqlTag.__table__
                session.execute(sa.delete(t).where(t.c.run_uuid == sa.bindparam("rid"))
                                .where(t.c.key == sa.bindparam("k")),
                                [{"rid": r, "k": _param_key(k)} for r, k in replaced_tags])
            if replaced_latest:
                t = m.SqlLatestMetric.__table__
                session.execute(sa.delete(t).where(t.c.run_uuid == sa.bindparam("rid"))
                                .where(t.c.key == sa.bindparam("k")), replaced_latest)
            for table, rows in ((m.SqlTag, tags), (m.SqlParam, params), (m.SqlMetric, metrics),
                                (m.SqlLatestMetric, latest)):
                if rows:
                    session.execute(sa.insert(table.__table__), rows)
            if datasets:
                self._insert_datasets(session, exp_id, datasets)
        for run in runs:
            if run.live and run.written:
                if run.tags or run.metrics or run.status_dirty:
                    self._jobs.insert(0, ("client_close", run.run_id, dict(run.tags), dict(run.metrics),
                                          run.status if run.status_dirty else None, run.end, run.reopened))
                run.reopened = False
            run.written = True
            run.status_dirty = False
            run.tags, run.params, run.metrics, run.datasets = {}, {}, {}, []

    def _insert_datasets(self, session, exp_id: int, datasets: list) -> None:
        import sqlalchemy as sa
        from mlflow.store.tracking.dbmodels import models as m

        t = m.SqlDataset.__table__
        wanted = {(d.name, d.digest) for _, _, d in datasets}
        names = sorted({n for n, _ in wanted})
        found = {}
        for i in range(0, len(names), 500):
            rows = session.execute(sa.select(t.c.name, t.c.digest, t.c.dataset_uuid)
                                   .where(t.c.experiment_id == exp_id).where(t.c.name.in_(names[i:i + 500])))
            found.update({(r.name, r.digest): r.dataset_uuid for r in rows if (r.name, r.digest) in wanted})
        new, inputs, input_tags, seen = [], [], [], set()
        for run_id, arg, d in datasets:
            if (d.name, d.digest) not in found:
                found[(d.name, d.digest)] = uuid.uuid4().hex
                new.append({"dataset_uuid": found[(d.name, d.digest)], "experiment_id": exp_id, "name": d.name,
                            "digest": d.digest, "dataset_source_type": d.source_type, "dataset_source": d.source,
                            "dataset_schema": d.schema, "dataset_profile": d.profile})
            if (found[(d.name, d.digest)], run_id) in seen:
                continue
            seen.add((found[(d.name, d.digest)], run_id))
            input_id = uuid.uuid4().hex
            inputs.append({"input_uuid": input_id, "source_type": "DATASET", "source_id": found[(d.name, d.digest)],
                           "destination_type": "RUN", "destination_id": run_id, "step": 0})
            input_tags.append({"input_uuid": input_id, "name": "mlflow.data.context", "value": arg[:MAX_INPUT_TAG]})
        if new:
            session.execute(sa.insert(t), new)
        session.execute(sa.insert(m.SqlInput.__table__), inputs)
        session.execute(sa.insert(m.SqlInputTag.__table__), input_tags)

    # a tracking server: MlflowClient, log_batch without waiting on each call
    def _write_client(self, runs: list[_Run]) -> None:
        from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

        pending = []
        for run in runs:
            batch = {"params": [Param(_param_key(k), str(v)[:MAX_PARAM]) for k, v in run.params.items()],
                     "tags": [RunTag(_param_key(k), str(v)[:MAX_TAG]) for k, v in run.tags.items()],
                     "metrics": [Metric(k, v, ts, 0) for k, (v, ts) in run.metrics.items()]}
            if any(batch.values()):
                pending.append(self.client.log_batch(run.run_id, synchronous=False, **batch))
        for operation in pending:
            if operation is not None:
                operation.wait()
        for run in runs:
            if run.reopened and f"{TAG}error" not in run.tags:
                self._forget_error(run.run_id)
            run.tags, run.params, run.metrics, run.reopened = {}, {}, {}, False
            if run.datasets:
                self.client.log_inputs(run.run_id, [DatasetInput(d, [InputTag("mlflow.data.context", arg)])
                                                    for arg, d in run.datasets])
                run.datasets = []
            if run.status_dirty:
                if run.status == "RUNNING":  # a node run of a continued run, running again
                    _retry(self.client.update_run, run.run_id, status="RUNNING")
                else:
                    self._terminate(run.run_id, run.status, run.end)
                run.status_dirty = False

    # post-commit jobs
    def _job_client_close(self, run_id: str, tags: dict, metrics: dict, status: str | None, end: int | None,
                          reopened: bool = False) -> None:
        from mlflow.entities import Metric, RunTag

        if reopened and f"{TAG}error" not in tags:
            self._forget_error(run_id)
        _retry(self.client.log_batch, run_id, metrics=[Metric(k, v, ts, 0) for k, (v, ts) in metrics.items()],
               tags=[RunTag(_param_key(k), str(v)[:MAX_TAG]) for k, v in tags.items()])
        if status == "RUNNING":
            _retry(self.client.update_run, run_id, status="RUNNING")
        elif status:
            self._terminate(run_id, status, end)

    def _forget_error(self, run_id: str) -> None:
        try:
            self.client.delete_tag(run_id, f"{TAG}error")
        except Exception:  # noqa: BLE001 - it had none
            pass

    def _log_artifact(self, run_id: str, local: str, artifact_path: str | None = None) -> None:
        run = self._runs.get(run_id)
        if self.bulk and run is not None and run.artifact_uri:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(run.artifact_uri).log_artifact(local, artifact_path)
        else:
            _retry(self.client.log_artifact, run_id, local, artifact_path)

    def _job_text(self, run_id: str, text: str, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self._log_artifact(run_id, str(path))

    def _job_outputs(self, run_id: str, store, directory: str, node: str, key: str, status: str,
                     config: dict) -> None:
        """A committed node's figures, report tables and models, from the store."""
        summary = self._summary(store, directory)
        if summary is None:
            return
        for name, out in summary.outputs.items():
            if out["kind"] == "figure":
                self._log_artifact(run_id, store.local_copy(f"{directory}/{out['path']}"), "figures")
            elif out["kind"] == "html":
                self._log_artifact(run_id, store.local_copy(f"{directory}/{out['path']}"), "pages")
            elif out["kind"] == "table" and summary.first_shard is None \
                    and _is_report_table(store, f"{directory}/{out['path']}"):  # a sharded node's tables are bulk data
                import tempfile

                import pyarrow.csv as pacsv
                import pyarrow.parquet as pq

                with tempfile.TemporaryDirectory() as tmp:
                    csv = f"{tmp}/{name}.csv"
                    pacsv.write_csv(pq.read_table(f"{directory}/{out['path']}", filesystem=store.fs), csv)
                    self._log_artifact(run_id, csv, "tables")
            elif out["kind"] == "hf":
                self._log_model(run_id, store, directory, node, key, name, out, summary, config)

    def _log_model(self, run_id: str, store, directory: str, node: str, key: str, output: str, out: dict,
                   summary: _Summary, config: dict) -> None:
        """An hf output as an external MLflow logged model (its weights stay in the store), linked as the
        run's output; registered when asked. A cache hit links the model its producer logged."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        uri = store.uri_of(f"{directory}/{out['path']}")
        found = _retry(self.client.search_logged_models, [self.experiment_id], max_results=1,
                       filter_string=f"tags.`{TAG}key` = '{key}' AND tags.`{TAG}output` = '{output}'")
        if found:
            model = found[0]
        else:
            info = hf_model_info(store, f"{directory}/{out['path']}")
            model = _retry(self.client.create_logged_model, self.experiment_id,
                           name=re.sub(r"[/:.%\"']", "-", node if output == "output" else f"{node}-{output}"),
                           source_run_id=run_id,
                           model_type=info["model_type"],
                           params={_param_key(k): v for k, v in list(flatten(config).items())[:100]},
                           tags={"mlflow.model.isExternal": "true", f"{TAG}node": node, f"{TAG}key": key,
                                 f"{TAG}output": output, f"{TAG}output_uri": uri, f"{TAG}digest": str(summary.digest),
                                 **({f"{TAG}task": info["task"]} if info["task"] else {})})
            self._save_model_spec(model, info, uri)
            model = _retry(self.client.finalize_logged_model, model.model_id, LoggedModelStatus.READY)
        self._models[(node, key, output)] = model.model_id
        _retry(self.client.log_outputs, run_id, [LoggedModelOutput(model.model_id, 0)])
        tags = {f"{TAG}model_id": model.model_id}
        if self.register:
            tags[f"{TAG}registered_model"] = self._register(model, run_id, node, output)
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _save_model_spec(self, model, info: dict, uri: str) -> None:
        """The MLmodel file of an external model (as `mlflow.create_external_model` writes it), with the
        signature of the model's task where one fits and the store URI of its weights."""
        import tempfile

        from mlflow.models.utils import get_external_mlflow_model_spec

        spec = get_external_mlflow_model_spec(model)
        spec.signature = info["signature"]
        spec.metadata = {**(spec.metadata or {}), "weights_uri": uri, "hf_architectures": info["architectures"],
                         **({"task": info["task"]} if info["task"] else {})}
        with tempfile.TemporaryDirectory() as tmp:
            spec.save(str(Path(tmp) / "MLmodel"))
            _retry(self.client.log_model_artifacts, model.model_id, tmp)

    def _register(self, model, run_id: str, node: str, output: str) -> str:
        """A version of `<workflow>.<node>` in the model registry for this logged model (once per model)."""
        name = f"{self.workflow}.{node}" if output == "output" else f"{self.workflow}.{node}.{output}"
        versions = json.loads(model.tags.get("mlflow.modelVersions") or "[]")
        for v in versions:
            if v.get("name") == name:
                return f"{name}/{v['version']}"
        try:
            _retry(self.client.create_registered_model, name)
        except Exception as exc:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS: another run registered it first
            if "already exists" not in str(exc).lower():
                raise
        version = _retry(self.client.create_model_version, name, f"models:/{model.model_id}", run_id=run_id,
                         model_id=model.model_id, tags={f"{TAG}key": model.tags.get(f"{TAG}key", "")})
        versions.append({"name": name, "version": version.version})
        _retry(self.client.set_logged_model_tags, model.model_id, {"mlflow.modelVersions": json.dumps(versions)})
        return f"{name}/{version.version}"

    def _job_model_inputs(self, run_id: str, refs: list) -> None:
        from mlflow.entities import LoggedModelInput

        models = [self._models[r] for r in refs if r in self._models]
        if models:
            _retry(self.client.log_inputs, run_id, models=[LoggedModelInput(m) for m in models])


def arrow_schema(schema):
    """An MLflow Schema (named columns) for an Arrow schema; None if a column has no MLflow type."""
    import pyarrow as pa
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    def convert(t):
        if pa.types.is_dictionary(t):
            return convert(t.value_type)
        if pa.types.is_boolean(t):
            return DataType.boolean
        if pa.types.is_integer(t):
            return DataType.long if t.bit_width > 32 or pa.types.is_unsigned_integer(t) and t.bit_width >= 32 \
                else DataType.integer
        if pa.types.is_float16(t) or pa.types.is_float32(t):
            return DataType.float
        if pa.types.is_floating(t) or pa.types.is_decimal(t):
            return DataType.double
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return DataType.string
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return DataType.binary
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return DataType.datetime
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            inner = convert(t.value_type)
            return None if inner is None else Array(inner)
        if pa.types.is_struct(t):
            props = [(f.name, convert(f.type)) for f in t]
            if any(p is None for _, p in props):
                return None
            return Object([Property(n, p) for n, p in props])
        return None

    cols = [(f.name, convert(f.type)) for f in schema]
    if not cols or any(t is None for _, t in cols):
        return None
    return Schema([ColSpec(t, name) for name, t in cols])


# The default signatures MLflow's transformers flavour gives a pipeline of each task
# (mlflow.transformers.signature; not imported here: that imports transformers).
_TASKS = (("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"),
          ("ForConditionalGeneration", "text2text-generation"), ("ForMaskedLM", "fill-mask"),
          ("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
          ("ForImageClassification", "image-classification"))


def hf_model_info(store, folder: str) -> dict:
    """What a save_pretrained folder is: architectures, model type, task and the signature MLflow's
    transformers flavour gives that task (text tasks only where the folder holds a tokenizer)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    config = {}
    try:
        with store.fs.open_input_stream(f"{folder}/config.json") as f:
            config = json.loads(f.read().decode())
    except Exception:  # noqa: BLE001 - a folder of our own layout, not a transformers model
        pass
    try:
        import pyarrow.fs as pafs

        files = {i.base_name for i in store.fs.get_file_info(pafs.FileSelector(folder))}
    except Exception:  # noqa: BLE001
        files = set()
    tokenizer = bool(files & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model"})
    architectures = [str(a) for a in config.get("architectures") or []]
    task = None
    for suffix, name in _TASKS:
        if any(a.endswith(suffix) for a in architectures):
            task = name
            break
    if task and task != "image-classification" and not tokenizer:
        task = None
    text = Schema([ColSpec("string")])
    signature = None
    if task == "text-classification" or task == "image-classification":
        signature = ModelSignature(text, Schema([ColSpec("string", name="label"), ColSpec("double", name="score")]))
    elif task:
        signature = ModelSignature(text, text)
    return {"architectures": architectures, "task": task, "signature": signature,
            "model_type": "transformers" if config.get("model_type") or architectures else "save_pretrained"}


def _is_report_table(store, path: str) -> bool:
    """A table a task marked for people to read (schema metadata ``REPORT_TABLE``): also an MLflow CSV."""
    import pyarrow.parquet as pq

    with store.fs.open_input_file(path) as f:
        metadata = pq.read_schema(f).metadata or {}
    return metadata.get(REPORT_TABLE_KEY) == b"1"


def log_step_metrics(tracking_uri: str | None, run_id: str, step: int, metrics: dict[str, float]) -> None:
    """Worker side: a training node's metrics at one step (MLflow draws them as curves)."""
    if not tracking_uri:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    if batch:
        _retry(_client(tracking_uri).log_batch, run_id, metrics=batch)
