"""The notebook API: run a spec (or a config, or a graph), resume a run, open node outputs by name.

    import interpflow
    handle = interpflow.run("demo", ["transform.power=3"])
    handle.table("transform_shard").to_pandas()

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from interpflow.workflows.engine.lineage import Lineage, code_version
from interpflow.workflows.engine.record import RecordError, RunRecord, check_run_id, new_run_id, reap_orphans
from interpflow.workflows.engine.settings import RunSettings
from interpflow.workflows.engine.store import Store
from interpflow.workflows.spec import Spec, check_settings, load_spec, spec_digest, workflow_of_config

if TYPE_CHECKING:  # the runner, graph and pyarrow load when a run starts or a table opens, not on import
    import pyarrow as pa

    from interpflow.workflows.engine.graph import Graph

__all__ = ["RunHandle", "VerifyReport", "load_spec", "resume", "run", "run_graph", "verify"]


class RunHandle:
    """A finished (or failed) run: its record, and its node outputs opened from the store."""

    def __init__(self, store: Store, record: RunRecord, graph: Graph | None = None):
        self.store, self.record, self.graph = store, record, graph

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def ok(self) -> bool:
        return self.record.data["status"] == "succeeded"

    @property
    def mlflow_run_id(self) -> str | None:
        return self.record.data.get("mlflow_run_id")

    def nodes(self) -> dict[str, dict]:
        return self.record.nodes

    def _directory(self, node: str) -> tuple[str, dict]:
        if node not in self.record.nodes:
            raise KeyError(f"no node '{node}' in run {self.run_id}; nodes: {', '.join(self.record.nodes)}")
        directory = self.store.node_path(node, self.record.node(node)["key"])
        manifest = self.store.committed(directory)
        if manifest is None:
            raise FileNotFoundError(f"node '{node}' has no committed output (status: "
                                    f"{self.record.node(node)['status']})")
        return directory, manifest

    def outputs(self, node: str, output: str | None = None) -> Any:
        """A node's outputs: Arrow tables/datasets, tensors, JSON, or local paths for models/figures."""
        directory, manifest = self._directory(node)
        return self.store.load(directory, manifest, output)

    def table(self, node: str, output: str | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.dataset as pads

        value = self.outputs(node, output)
        if isinstance(value, pads.Dataset):
            return value.to_table()
        if not isinstance(value, pa.Table):
            raise TypeError(f"node '{node}' output is a {type(value).__name__}, not a table; use outputs()")
        return value

    def metrics(self, node: str) -> dict:
        return self._directory(node)[1].get("metrics", {})


def _open_lineage(settings: RunSettings) -> Lineage | None:
    return Lineage(settings.resolved_tracking_uri(), settings.experiment, register=settings.register) \
        if settings.lineage else None


def _progress(settings: RunSettings, progress: bool | None):
    if not (settings.progress if progress is None else progress):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def run_graph(graph: Graph, settings: RunSettings | None = None, *, workflow: str = "graph",
              spec: dict | None = None, config: dict | None = None, run_id: str | None = None,
              progress: bool | None = None, origin: str | None = None) -> RunHandle:
    """Run a graph built in code. Given the `run_id` of an existing run of the same workflow and config,
    continue that run as a new attempt of it (committed nodes are reused; its record lists the attempts);
    the id of a run of another spec, or of a run whose driver is still alive, is refused (RecordError).
    `origin` names the run this new run resumes (see `resume`)."""
    from interpflow.workflows.engine.runner import Runner

    settings = settings or RunSettings()
    store = Store(settings.resolved_store())
    digest = spec_digest(workflow, config or {})
    if run_id is not None and RunRecord.exists(store, check_run_id(run_id)):
        record = RunRecord.load(store, run_id)
        _check_reuse(record, workflow, digest)
    else:
        record = RunRecord.create(store, run_id or new_run_id(workflow), workflow, spec or {}, config or {},
                                  settings.model_dump(mode="json") | {"store": store.uri},
                                  spec_digest=digest, origin=origin)
    lineage = _open_lineage(settings)
    for orphan, open_runs in reap_orphans(store):  # runs whose driver died: killed, in MLflow too
        if lineage is not None and orphan.data.get("tracking_uri") == lineage.uri:
            lineage.mark_killed(open_runs)
    record.data["code"] = code_version()
    if lineage is not None:
        tags = {"code_commit": record.data["code"]["commit"], "code_dirty": record.data["code"]["dirty"]}
        if record.data.get("origin"):  # a resume: its parent run names the run it resumes, in MLflow too
            tags["origin"] = record.data["origin"]
            try:
                tags["origin_mlflow_run"] = RunRecord.load(store, record.data["origin"]).data.get("mlflow_run_id")
            except Exception:  # noqa: BLE001 - an unreadable origin record: its id is enough
                pass
        record.data["mlflow_run_id"] = lineage.start_parent(
            record.run_id, workflow, config or {}, settings.model_dump(mode="json"), tags,
            existing=record.data.get("mlflow_run_id"))
        record.data["tracking_uri"] = lineage.uri
    runner = Runner(graph, settings, store, record, lineage, _progress(settings, progress))
    runner.run()
    return RunHandle(store, record, graph)


def _check_reuse(record: RunRecord, workflow: str, digest: str) -> None:
    """Refuse to continue `record` as a run of another spec, or while its driver is alive (one line)."""
    if record.spec_digest != digest:
        theirs = record.data.get("workflow")
        what = f"workflow '{theirs}'" if theirs != workflow else f"spec digest {record.spec_digest[:12]}"
        raise RecordError(f"run id '{record.run_id}' exists with a different spec ({what}; this spec's digest is "
                          f"{digest[:12]}). Fix: give another --run-id, or none for a new one")
    driver = record.data.get("driver") or {}
    if record.status == "running" and driver.get("pid") != os.getpid():
        raise RecordError(f"run '{record.run_id}' is still running (driver pid {driver.get('pid')} on "
                          f"{driver.get('host')}). Fix: wait for it to end, or give another --run-id")


def run(spec: str | Path | dict | BaseModel | Spec, overrides: list[str] | tuple[str, ...] = (), *,
        settings: RunSettings | None = None, run_id: str | None = None, progress: bool | None = None,
        origin: str | None = None) -> RunHandle:
    """Run a spec file, a bundled spec name, a spec dict, or a workflow config object."""
    if isinstance(spec, BaseModel):
        name = workflow_of_config(spec)
        spec = Spec(name, spec, settings or RunSettings(), {"workflow": name, **spec.model_dump(mode="json")},
                    "<config>")
    elif not isinstance(spec, Spec):
        spec = load_spec(spec, overrides)
    if settings is not None:
        spec.settings = settings
    graph = spec.builder(spec.config)
    return run_graph(graph, spec.settings, workflow=spec.workflow, spec=spec.raw,
                     config=spec.config.model_dump(mode="json"), run_id=run_id, progress=progress, origin=origin)


def open_store(store: str | None = None) -> Store:
    """The given store, or the default one (INTERPFLOW_STORE or .interpflow/store)."""
    return Store(RunSettings(**({"store": store} if store else {})).resolved_store())


def resume(run_id: str, store: str | None = None, progress: bool | None = None,
           new_id: str | None = None) -> RunHandle:
    """Resume a recorded spec run as a new run: committed nodes and shards are reused, the rest runs.

    As in Metaflow, a resume is a NEW run (`new_id`, default a fresh id) whose record names the run it
    resumes (`record.origin`); the original's record stays as that run left it, so its history (what it
    computed, what failed) stays readable, and `interpflow explain` names the run that computed each node.
    The run resumes in the store its record was found in (a store moved or mounted elsewhere stays one
    store), with MLflow beside it unless the run named a tracking URI of its own."""
    st = open_store(store)
    record = RunRecord.load(st, run_id)
    if not record.data.get("spec"):
        raise ValueError(f"run {run_id} was started from a graph in code; resume it with "
                         "run_graph(graph, settings, run_id=...)")
    spec = load_spec(record.data["spec"], check_store=False)
    recorded = dict(record.data.get("settings") or {})
    recorded["store"] = st.uri  # a recorded tracking_uri of None keeps MLflow beside this store
    spec.settings = RunSettings(**{k: v for k, v in recorded.items() if k in RunSettings.model_fields})
    check_settings(spec.settings)
    if new_id is not None and RunRecord.exists(st, check_run_id(new_id)):
        raise RecordError(f"run id '{new_id}' exists already. Fix: give another id for the resumed run, or none")
    return run(spec, run_id=new_id, progress=progress, origin=record.run_id)


def open_run(run_id: str, store: str | None = None) -> RunHandle:
    """A recorded run's handle, to open its node outputs in a notebook (nothing runs)."""
    st = open_store(store)
    return RunHandle(st, RunRecord.load(st, run_id))


def load_record(run_id: str, store: str | None = None) -> RunRecord:
    return RunRecord.load(open_store(store), run_id)


@dataclass
class VerifyReport:
    """What `verify` checked and what it set aside."""

    commits: int = 0
    files: int = 0
    seconds: float = 0.0
    quarantined: list[dict] = field(default_factory=list)  # {"path", "reason", "moved_to"}

    @property
    def ok(self) -> bool:
        return not self.quarantined


def verify(run_id: str | None = None, store: str | None = None) -> VerifyReport:
    """Check every sha256 of a run's committed nodes (or of every commit in the store) and quarantine
    what is damaged, a damaged shard alone, so that the next run recomputes exactly that."""
    import time

    import pyarrow.fs as pafs

    st = open_store(store)
    started = time.time()
    if run_id is not None:
        record = RunRecord.load(st, run_id)
        directories = [st.node_path(name, state["key"]) for name, state in record.nodes.items()]
    else:
        directories = []
        for node_dir in st.fs.get_file_info(pafs.FileSelector(st.root, allow_not_found=True)):
            if node_dir.type != pafs.FileType.Directory or node_dir.base_name.startswith(".") \
                    or node_dir.base_name == "runs":
                continue
            directories += [info.path for info in st.fs.get_file_info(pafs.FileSelector(node_dir.path))
                            if info.type == pafs.FileType.Directory]
    report = VerifyReport()
    for directory in directories:
        if st.read_manifest(directory) is None:
            continue  # never committed (a failed or pending node): nothing to verify
        files, damaged = st.damaged_parts(directory)
        report.commits += 1
        report.files += files
        for where, reason in damaged:
            moved = st.set_aside(where)
            report.quarantined.append({"path": where[len(st.root):].strip("/"), "reason": reason,
                                       "moved_to": moved[-1] if moved else None})
    report.seconds = time.time() - started
    return report
