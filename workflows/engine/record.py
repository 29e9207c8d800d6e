"""The run record: spec, resolved config, graph and per-node/per-shard state, kept in the store.

It is rewritten atomically as the run goes, so a driver killed with SIGKILL leaves a record that
`interpflow resume` and `interpflow status` can read. Committed outputs live in the store itself;
the record says what this run did with them.

A record names its driver (host, pid, process start time) and when it last wrote (`updated`), so a run
whose driver died shows as `killed` rather than `running` forever; the next driver that finds it marks
it so for good (`reap_orphans`), MLflow runs included.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import socket
import time
from typing import Any

from interpflow.workflows.engine.store import Store, _process_alive, _process_started, check_name

RUNS = "runs"
RECORD = "record.json"
# A driver on another host cannot be asked whether it lives: a record it has not written for this long
# shows as `unknown` (a busy driver writes every second or so).
SILENT_REMOTE_DRIVER_S = 600.0
# A record's temporary file older than this is a leftover of a killed writer.
STALE_TMP_S = 60.0
REQUIRED = {"run_id": str, "workflow": str, "status": str, "nodes": dict}


class RecordError(ValueError):
    """A run record that is missing, unreadable or not a record: the message names the file."""


def new_run_id(workflow: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{check_name(workflow, 'workflow')}-{stamp}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    try:
        return check_name(run_id, "run id")
    except ValueError as exc:
        raise RecordError(str(exc)) from None


class RunRecord:
    def __init__(self, store: Store, data: dict[str, Any]):
        self.store = store
        self.data = data
        self._last_save = 0.0
        self._save_s = 0.0

    @classmethod
    def create(cls, store: Store, run_id: str, workflow: str, spec: dict, config: dict, settings: dict, *,
               spec_digest: str | None = None, origin: str | None = None) -> "RunRecord":
        """A new run's record. `origin` names the run this one resumes (a resume is a new run, so the
        origin's own record stays as that run left it); `spec_digest` is what the run computes
        (`spec.spec_digest`), so that reusing its run id for another spec can be refused."""
        data = {"run_id": check_run_id(run_id), "workflow": workflow, "spec": spec, "config": config,
                "settings": settings, "status": "running", "created": time.time(), "attempts": [], "nodes": {}}
        if spec_digest is not None:
            data["spec_digest"] = spec_digest
        if origin is not None:
            data["origin"] = check_run_id(origin)
        return cls(store, data)

    @classmethod
    def path_of(cls, store: Store, run_id: str) -> str:
        return store.path(RUNS, check_run_id(run_id), RECORD)

    @classmethod
    def exists(cls, store: Store, run_id: str) -> bool:
        import pyarrow.fs as pafs

        return store.fs.get_file_info(cls.path_of(store, run_id)).type == pafs.FileType.File

    @classmethod
    def load(cls, store: Store, run_id: str) -> "RunRecord":
        path = cls.path_of(store, run_id)
        try:
            data = store.read_json(path)
        except FileNotFoundError:
            raise RecordError(f"no run '{run_id}' in store {store.uri}; `interpflow ls` lists runs") from None
        except (OSError, ValueError) as exc:  # truncated, empty, not UTF-8, not JSON
            raise RecordError(f"run record {path} is unreadable ({type(exc).__name__}: {exc}); "
                              "it cannot be resumed: start the spec again under a new run id") from None
        problem = _record_problem(data, run_id)
        if problem:
            raise RecordError(f"run record {path} is not a run record ({problem}); "
                              "it cannot be resumed: start the spec again under a new run id")
        return cls(store, data)

    @classmethod
    def scan(cls, store: Store) -> tuple[list["RunRecord"], list[tuple[str, str]]]:
        """Every run in the store, oldest first, and the (run id, problem) of every unreadable record.

        Leftover temporary files of killed writers are removed on the way."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(store.path(RUNS), allow_not_found=True)
        records, broken = [], []
        for info in store.fs.get_file_info(selector):
            if info.type != pafs.FileType.Directory:
                continue
            _remove_stale_tmp(store, info.path)
            try:
                records.append(cls.load(store, info.base_name))
            except RecordError as exc:
                broken.append((info.base_name, str(exc)))
        records.sort(key=lambda r: _number(r.data.get("created")))
        return records, broken

    @classmethod
    def list(cls, store: Store) -> list["RunRecord"]:
        return cls.scan(store)[0]

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def nodes(self) -> dict[str, dict]:
        return self.data["nodes"]

    @property
    def origin(self) -> str | None:
        """The run this run resumes, if it is a resume."""
        return self.data.get("origin")

    @property
    def spec_digest(self) -> str:
        """What the run computes (workflow + config); records written before it was kept derive it."""
        if isinstance(self.data.get("spec_digest"), str):
            return self.data["spec_digest"]
        from interpflow.workflows.spec import spec_digest

        return spec_digest(self.data["workflow"], self.data.get("config") or {})

    def node(self, name: str) -> dict:
        return self.data["nodes"][name]

    # --- the driver ----------------------------------------------------------------------------
    def claim(self) -> None:
        """This process drives the run from now on."""
        pid = os.getpid()
        self.data["driver"] = {"host": socket.gethostname(), "pid": pid, "started": _process_started(pid)}
        self.data["status"] = "running"

    def driver_gone(self) -> bool | None:
        """True if the recorded driver is known dead, None if it cannot be told (another host, silent)."""
        driver = self.data.get("driver") or {}
        if driver.get("host") == socket.gethostname():
            return not _process_alive(driver.get("pid"), driver.get("started"))
        silent = time.time() - _number(self.data.get("updated"), time.time())
        return None if silent > SILENT_REMOTE_DRIVER_S else False

    @property
    def status(self) -> str:
        """The recorded status, except that a `running` run whose driver is gone reads `killed` (known
        dead) or `unknown` (a driver on another host that has been silent)."""
        status = self.data.get("status", "unknown")
        if status != "running":
            return status
        gone = self.driver_gone()
        return "killed" if gone else ("unknown" if gone is None else "running")

    def mark_killed(self) -> list[str]:
        """Record a dead driver's run as killed; return the MLflow run ids it left RUNNING."""
        open_runs = [self.data.get("mlflow_run_id")] if self.data.get("mlflow_run_id") else []
        for state in self.nodes.values():
            if state.get("status") == "running":  # pending nodes never started: they stay pending
                if state.get("mlflow_run_id"):
                    open_runs.append(state["mlflow_run_id"])
                state["status"] = "killed"
        self.data["status"] = "killed"
        if self.data.get("attempts"):
            self.data["attempts"][-1].setdefault("status", "killed")
        self.save()
        return open_runs

    def save(self, force: bool = True) -> None:
        """Persist now (`force`) or, while a run is busy, at most every half second and never more than a
        tenth of the time (a record of 10,000 nodes takes a while to write)."""
        now = time.time()
        if not force and now - self._last_save < max(0.5, 10 * self._save_s):
            return
        self._last_save = now
        self.data["updated"] = now
        self.store.write_json_atomic(self.path_of(self.store, self.run_id), self.data)
        self._save_s = time.time() - now


def reap_orphans(store: Store) -> list[tuple["RunRecord", list[str]]]:
    """Mark every `running` run whose driver is known dead as killed; return them with the MLflow runs
    they left open (the caller, who has MLflow at hand, closes those)."""
    reaped = []
    for record in RunRecord.list(store):
        if record.data.get("status") == "running" and record.driver_gone():
            reaped.append((record, record.mark_killed()))
    return reaped


def _record_problem(data: Any, run_id: str) -> str | None:
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for field, kind in REQUIRED.items():
        if not isinstance(data.get(field), kind):
            return f"field '{field}' is missing or not a {kind.__name__}"
    if data["run_id"] != run_id:
        return f"it names run '{data['run_id']}', not '{run_id}'"
    for name, state in data["nodes"].items():
        if not isinstance(state, dict) or not isinstance(state.get("key"), str) \
                or not isinstance(state.get("status"), str):
            return f"node '{name}' has no key or status"
    return None


def _remove_stale_tmp(store: Store, run_dir: str) -> None:
    import pyarrow.fs as pafs

    for info in store.fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.base_name.startswith(f"{RECORD}.") and info.base_name.endswith(".tmp") and info.mtime \
                and time.time() - info.mtime.timestamp() > STALE_TMP_S:
            store._remove(info.path)


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) else default
