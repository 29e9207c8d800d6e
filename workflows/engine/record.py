"""The run record: spec, resolved config, graph and per-node/per-shard state, kept in the store.

It is rewritten atomically as the run goes, so a driver killed with SIGKILL leaves a record that
`interpflow resume` and `interpflow status` can read. Committed outputs live in the store itself;
the record says what this run did with them.
"""

from __future__ import annotations

import datetime as _dt
import secrets
import time
from typing import Any

from interpflow.workflows.engine.store import Store

RUNS = "runs"


def new_run_id(workflow: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{workflow}-{stamp}-{secrets.token_hex(3)}"


class RunRecord:
    def __init__(self, store: Store, data: dict[str, Any]):
        self.store = store
        self.data = data
        self._last_save = 0.0

    @classmethod
    def create(cls, store: Store, run_id: str, workflow: str, spec: dict, config: dict, settings: dict) -> "RunRecord":
        return cls(store, {"run_id": run_id, "workflow": workflow, "spec": spec, "config": config,
                           "settings": settings, "status": "running", "created": time.time(),
                           "attempts": [], "nodes": {}})

    @classmethod
    def load(cls, store: Store, run_id: str) -> "RunRecord":
        path = store.path(RUNS, run_id, "record.json")
        try:
            return cls(store, store.read_json(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no run '{run_id}' in store {store.uri}; `interpflow ls` lists runs") from None

    @classmethod
    def list(cls, store: Store) -> list["RunRecord"]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(store.path(RUNS), allow_not_found=True)
        records = []
        for info in store.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory:
                try:
                    records.append(cls.load(store, info.base_name))
                except (FileNotFoundError, ValueError):
                    continue
        return sorted(records, key=lambda r: r.data.get("created", 0))

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def nodes(self) -> dict[str, dict]:
        return self.data["nodes"]

    def node(self, name: str) -> dict:
        return self.data["nodes"][name]

    def save(self, force: bool = True) -> None:
        """Persist now (`force`) or at most every half second while a run is busy."""
        now = time.time()
        if not force and now - self._last_save < 0.5:
            return
        self._last_save = now
        self.store.write_json_atomic(self.store.path(RUNS, self.run_id, "record.json"), self.data)
