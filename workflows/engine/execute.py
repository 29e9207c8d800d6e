"""What runs on a Ray worker for one node or shard: load inputs, call the task, commit, log.

This module holds no scheduling: the runner decides what to run and where, and hands a `Job` to
`execute_job` (in a Ray task) or to a pool actor. Data never passes through the driver.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from interpflow.workflows.engine.graph import Shard
from interpflow.workflows.engine.store import Store, normalise_outputs


@dataclass(frozen=True)
class InputRef:
    node: str
    key: str
    output: str | None = None


@dataclass
class Job:
    node: str
    key: str
    fn: Callable
    config: BaseModel | None
    inputs: dict[str, InputRef]
    store_uri: str
    run_id: str
    shard: Shard | None = None
    verify: bool = True
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    training: Any = None  # engine.training.Training for nodes trained on Ray Train

    @property
    def label(self) -> str:
        return f"{self.node}[{self.shard.name}]" if self.shard else self.node


@dataclass(frozen=True)
class NodeContext:
    """What a node function that declares a ``node`` parameter is told about its own execution: where the
    store is, its name and key, and its MLflow run (for nodes that run sub-steps of their own, such as a
    hyperparameter sweep whose trials get child runs and durable per-trial commits)."""

    store_uri: str
    node: str
    key: str
    run_id: str
    mlflow_uri: str | None
    mlflow_run_id: str | None

    def scratch(self, *parts: str) -> str:
        """A durable directory of this node's own (under the store's ``.nodes/``), e.g. for sub-commits."""
        return Store(self.store_uri).path(".nodes", self.node, self.key, *parts)


def wants_context(fn: Callable) -> bool:
    import inspect

    try:
        return "node" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def target_dir(store: Store, job: Job) -> str:
    if job.shard is not None:
        return store.shard_path(job.node, job.key, job.shard.index, job.shard.count)
    return store.node_path(job.node, job.key)


def load_inputs(store: Store, inputs: dict[str, InputRef], verify: bool) -> dict[str, Any]:
    loaded = {}
    for arg, ref in inputs.items():
        directory = store.node_path(ref.node, ref.key)
        manifest, damage = store.inspect(directory)
        if manifest is None:
            from interpflow.workflows.engine.store import CorruptArtifact

            # a damage reason starts with the damaged path, so that only that shard is recomputed
            where = f"{directory}/{damage.split(':', 1)[0]}" if damage else directory
            raise CorruptArtifact(ref.node, ref.key, where, damage or "not committed (removed or damaged)")
        loaded[arg] = store.load(directory, manifest, ref.output, verify=verify)
    return loaded


def plan_ids(store_uri: str, ids_fn: Callable, config: BaseModel | None, inputs: dict[str, InputRef],
             verify: bool) -> list:
    """Evaluate a sharded node's stable input ids (runs as a small Ray task)."""
    store = Store(store_uri)
    return list(ids_fn(config, **load_inputs(store, inputs, verify)))


def _node_ip() -> str | None:
    """The Ray node this runs on (hosts in containers or namespaces can share a hostname); None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.util.get_node_ip_address()


def commit_result(job: Job, result: Any, timings: dict[str, float], store: Store | None = None) -> dict:
    """Commit a task's return value as the node's (or shard's) outputs; return the manifest."""
    store = store or Store(job.store_uri)
    computed = time.time()
    outputs = normalise_outputs(result)
    metrics = outputs.get("metrics") if isinstance(outputs.get("metrics"), dict) else {}
    meta = {
        "node": job.node,
        "key": job.key,
        "shard": None if job.shard is None else {"index": job.shard.index, "count": job.shard.count,
                                                "num_ids": len(job.shard.ids)},
        "produced_by": {"run_id": job.run_id, "mlflow_run_id": job.mlflow_run_id,
                        "host": socket.gethostname(), "node_ip": _node_ip(), "pid": os.getpid()},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "timings": timings,
    }
    manifest = store.commit(target_dir(store, job), outputs, meta)
    manifest["timings"]["commit_s"] = time.time() - computed
    return manifest


def execute_job(job: Job, resource: Any = None, resource_arg: str | None = None) -> dict:
    """Compute and commit one node or shard unless it is committed already; return a summary."""
    store = Store(job.store_uri)
    directory = target_dir(store, job)
    manifest = store.committed(directory)
    if manifest is not None:
        return _summary(job, manifest, "cached")
    with store.lock(directory, is_done=lambda: store.committed(directory) is not None) as acquired:
        manifest = store.committed(directory)
        if not acquired or manifest is not None:
            return _summary(job, manifest or store.committed(directory), "cached")
        started = time.time()
        kwargs = load_inputs(store, job.inputs, job.verify)
        if resource_arg is not None:
            kwargs[resource_arg] = resource
        if job.shard is not None:
            kwargs["shard"] = job.shard
        if wants_context(job.fn):
            kwargs["node"] = NodeContext(job.store_uri, job.node, job.key, job.run_id, job.mlflow_uri,
                                         job.mlflow_run_id)
        loaded = time.time()
        if job.training is not None:  # rank 0 commits; a rerun resumes the last checkpoint
            from interpflow.workflows.engine.training import run_in_task, run_training

            if job.training.on_ray_train:
                run_training(job, kwargs, job.training, store.uri_of(store.path(".train")),
                             {"load_s": loaded - started})
            else:
                run_in_task(job, kwargs, job.training, store, {"load_s": loaded - started})
            manifest = store.committed(directory)
            manifest.setdefault("timings", {})["compute_s"] = time.time() - loaded
        else:
            result = job.fn(job.config, **kwargs)
            manifest = commit_result(job, result, {"load_s": loaded - started, "compute_s": time.time() - loaded},
                                     store)
    # MLflow: the driver logs the node's metrics, figures and models from the summary and the store; a
    # worker writes into the tracking store only from node code that asks for its run (training, sweeps)
    return _summary(job, manifest, "ran")


def _summary(job: Job, manifest: dict | None, status: str) -> dict:
    manifest = manifest or {}
    return {
        "node": job.node,
        "shard": None if job.shard is None else job.shard.index,
        "status": status,
        "rows": manifest.get("rows", 0),
        "bytes": manifest.get("bytes", 0),
        "outputs": manifest.get("outputs", {}),
        "digest": manifest.get("digest"),
        "metrics": manifest.get("metrics", {}),
        "timings": manifest.get("timings", {}),
        "produced_by": manifest.get("produced_by", {}),
    }


def execute_shards(jobs: list[Job], retryable: tuple[type, ...] = ()) -> list[dict]:
    """Run several shards of one node in one Ray task, each computed and committed on its own (a node of
    many small shards would otherwise pay a task per shard). A shard's failure is returned as data, its
    CorruptArtifact kept so the driver can recompute the damaged input; an error of a class Ray retries is
    raised once the others ran, so Ray retries the task and the committed shards are cache hits."""
    import traceback

    from interpflow.workflows.engine.store import CorruptArtifact

    outcomes: list[dict] = []
    transient: BaseException | None = None
    for job in jobs:
        try:
            outcomes.append(execute_job(job))
        except retryable as exc:
            transient = transient or exc
            outcomes.append({})
        except Exception as exc:  # noqa: BLE001 - a shard's failure is data for the run record
            line = f"{type(exc).__name__}: {exc}"
            outcomes.append({"error": exc if isinstance(exc, CorruptArtifact) else None, "line": line,
                             "text": f"Traceback (most recent call last), on the Ray worker {socket.gethostname()}:\n"
                                     + "".join(traceback.format_exception(exc)[1:])})
    if transient is not None:
        raise transient
    return outcomes

