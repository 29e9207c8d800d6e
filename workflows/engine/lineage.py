"""Lineage in MLflow: one parent run per workflow run, one nested run per node.

The driver opens and closes runs; workers log a node's metrics and figures into its run through
`MlflowClient` with the explicit run id. Tags carry the node's key, its upstream keys, whether it was
a cache hit and which run produced the artifact, the code version and the Ray job id.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TAG = "interpflow."
# A task marks a table for people to read (a results table, not bulk data) with this schema metadata key
# set to "1"; such tables are logged to the node's MLflow run as CSV beside its figures.
REPORT_TABLE_KEY = b"interpflow.report_table"


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
    return re.sub(r"[^\w\-. :/]", "_", name)[:250]


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested config dict (`sae.k` -> '64'), values cut to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = config if isinstance(config, str) else json.dumps(config)
    out[prefix.rstrip(".")] = value[:6000]
    return out


def code_version(path: str | Path | None = None) -> dict[str, str]:
    """The git commit and dirty flag of the checkout holding the package (or 'unknown')."""
    here = Path(path or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": commit, "dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (`mlartifacts/` next to
    `mlflow.db`), never the current directory's `mlruns/` (MLflow's default for a database URI); a
    tracking server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


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


class Lineage:
    """Driver-side MLflow bookkeeping for one workflow run."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = tracking_uri
        with _sqlite_init_lock(tracking_uri):  # two drivers must not migrate a new database at once
            self.client = _client(tracking_uri)
            self.experiment_id = self._experiment(experiment)
        self.parent_id: str | None = None
        self.common_tags: dict[str, str] = {}

    def _experiment(self, name: str) -> str:
        """Get or create the experiment; another process may create it at the same moment."""
        exp = _retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri))
        except Exception:  # noqa: BLE001 - lost the race: the other process created it
            time.sleep(0.2)
            return _retry(self.client.get_experiment_by_name, name).experiment_id

    def start_parent(self, run_id: str, workflow: str, config: dict, settings: dict, tags: dict[str, str],
                     existing: str | None = None) -> str:
        self.common_tags = {f"{TAG}{k}": str(v) for k, v in tags.items()}
        all_tags = {f"{TAG}run_id": run_id, f"{TAG}workflow": workflow, f"{TAG}kind": "workflow",
                    **self.common_tags}
        if existing and self._has_run(existing):
            self.parent_id = existing
            _retry(self.client.update_run, existing, status="RUNNING")
            self._batch(existing, tags=all_tags)
            return existing
        if existing:  # the tracking store was replaced or moved: the run starts a new parent, noting the old
            all_tags[f"{TAG}previous_parent_run"] = existing
        run = _retry(self.client.create_run, self.experiment_id, run_name=f"{workflow}-{run_id}", tags=all_tags)
        self.parent_id = run.info.run_id
        params = flatten(config)
        params.update(flatten(settings, "run."))
        self._batch(self.parent_id, params=params)
        _retry(self.client.log_text, self.parent_id, json.dumps(config, indent=1), "config.json")
        return self.parent_id

    def _has_run(self, run_id: str) -> bool:
        try:
            _retry(self.client.get_run, run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST) and kin
            return False

    def mark_killed(self, run_ids: list[str]) -> None:
        """Close the runs a killed driver left RUNNING (its parent and its running nodes) as KILLED."""
        for run_id in run_ids:
            if self._has_run(run_id) and self.client.get_run(run_id).info.status == "RUNNING":
                self._batch(run_id, tags={f"{TAG}status": "killed"})
                _retry(self.client.set_terminated, run_id, status="KILLED")

    def start_node(self, name: str, key: str, parts: dict, upstream: dict[str, str], cache_hit: bool,
                   produced_by: dict | None = None, inputs: dict[str, dict] | None = None) -> str:
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
        run = _retry(self.client.create_run, self.experiment_id, run_name=name, tags=tags)
        params = flatten(parts.get("config", {}))
        params.update(flatten(parts.get("external", {}), "external."))
        for arg, info in (inputs or {}).items():  # the content each input had: weights, data, tables
            params[f"input.{arg}.digest"] = str(info.get("digest"))
            params[f"input.{arg}.uri"] = str(info.get("uri"))[:6000]
        params.update({"version": str(parts.get("version")), "source_hash": str(parts.get("source"))[:16]})
        self._batch(run.info.run_id, params=params)
        return run.info.run_id

    def end_node(self, run_id: str, status: str, metrics: dict[str, float] | None = None,
                 tags: dict[str, str] | None = None, error: str | None = None) -> None:
        all_tags = {f"{TAG}status": status, **{f"{TAG}{k}": str(v) for k, v in (tags or {}).items()}}
        if error:
            all_tags[f"{TAG}error"] = error.strip().splitlines()[-1][:4000] if error.strip() else "error"
            _retry(self.client.log_text, run_id, error, "traceback.txt")
        self._batch(run_id, metrics=metrics or {}, tags=all_tags)
        mlflow_status = {"failed": "FAILED", "skipped": "KILLED"}.get(status, "FINISHED")
        _retry(self.client.set_terminated, run_id, status=mlflow_status)

    def end_parent(self, status: str, ray_job_id: str, metrics: dict[str, float]) -> None:
        if self.parent_id:
            self._batch(self.parent_id, metrics=metrics, tags={f"{TAG}status": status, f"{TAG}ray_job_id": ray_job_id})
            _retry(self.client.set_terminated, self.parent_id, status="FINISHED" if status == "succeeded" else "FAILED")

    def _batch(self, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        p = [self._Param(k[:250], v) for k, v in (params or {}).items()]
        m = [self._Metric(metric_key(k), float(v), now, 0) for k, v in (metrics or {}).items()
             if isinstance(v, (int, float)) and v == v]
        t = [self._RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(m), len(t), 1), 100):  # MLflow caps a batch at 100 params
            _retry(self.client.log_batch, run_id, metrics=m[i:i + 100] if i == 0 else [],
                   params=p[i:i + 100], tags=t if i == 0 else [])


def log_node_outputs(tracking_uri: str | None, run_id: str, store, directory: str, manifest: dict) -> None:
    """Worker side: a node's metrics, figures and output URI into its MLflow run."""
    if not tracking_uri:
        return
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(k), float(v), now, 0) for k, v in manifest.get("metrics", {}).items() if v == v]
    tags = [RunTag(f"{TAG}output_uri", store.uri_of(directory)),
            RunTag(f"{TAG}rows", str(manifest.get("rows", 0))),
            RunTag(f"{TAG}bytes", str(manifest.get("bytes", 0)))]
    _retry(client.log_batch, run_id, metrics=metrics, tags=tags)
    log_figures(tracking_uri, run_id, store, directory, manifest)


def log_figures(tracking_uri: str | None, run_id: str, store, directory: str, manifest: dict) -> None:
    """A node's figures into its MLflow run: by the worker that made them, and again by the driver for
    a cache hit, so every run shows every figure (also when the producing driver was killed first)."""
    if not tracking_uri:
        return
    client = _client(tracking_uri)
    for name, out in manifest.get("outputs", {}).items():
        if out["kind"] == "figure":
            _retry(client.log_artifact, run_id, store.local_copy(f"{directory}/{out['path']}"), "figures")
        elif out["kind"] == "table" and "shards" not in manifest \
                and _is_report_table(store, f"{directory}/{out['path']}"):   # a sharded node's tables are bulk data
            import tempfile

            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq

            with tempfile.TemporaryDirectory() as tmp:
                csv = f"{tmp}/{name}.csv"
                pacsv.write_csv(pq.read_table(f"{directory}/{out['path']}", filesystem=store.fs), csv)
                _retry(client.log_artifact, run_id, csv, "tables")


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
