"""The runner: submits every ready node and shard to Ray at once and reacts as results arrive.

A node whose key is committed in the store is a cache hit and runs nothing. A sharded node first
evaluates its stable ids (a small task), then submits only the shards not yet committed. When a node
finally fails, its error is recorded, its dependents are skipped and independent branches finish.
Ray is started only when something has to execute, so a fully cached run never pays for it.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

from interpflow.workflows.engine.execute import InputRef, Job, execute_job, execute_shards, plan_ids
from interpflow.workflows.engine.graph import Graph, Node, OutputRef, split_ids
from interpflow.workflows.engine.keys import config_dict, content_keyed, node_key, source_hash
from interpflow.workflows.engine.lineage import Lineage
from interpflow.workflows.engine.ray_cluster import ensure_ray
from interpflow.workflows.engine.record import RunRecord
from interpflow.workflows.engine.settings import RunSettings, exception_class
from interpflow.workflows.engine.store import CorruptArtifact, Store, content_digest

log = logging.getLogger("interpflow")

DONE = ("ran", "cached")
LOST_ACTOR_RETRIES = 10  # times a shard goes back to its pool after its actor's host was lost
MAX_ACTOR_REPLACEMENTS = 10  # new actors a pool may start (per actor it has) for ones dead for good
_UNFETCHED = object()


def key_parts(n: Node, upstream_keys: dict[str, str]) -> dict[str, Any]:
    """Everything that decides a node's output, as plain JSON (see keys.py)."""
    config, external = content_keyed(config_dict(n.config), n.external)
    parts: dict[str, Any] = {
        "name": n.name,
        "version": n.version,
        "source": source_hash(n.fn),
        "config": config,
        "upstream": upstream_keys,
        "external": external,
    }
    if n.is_sharded:
        parts["sharding"] = {"ids": source_hash(n.ids), "num_shards": n.num_shards}
    if n.training is not None:  # the worker count splits batches, so it changes the numbers
        parts["training"] = {"num_workers": n.training.num_workers, "use_gpu": n.training.use_gpu}
    if n.actors is not None:  # how the resource is built matters; how many actors build it does not
        parts["resource"] = {"setup": source_hash(n.actors.setup), "config": config_dict(n.actors.config)}
    return parts


def plan_keys(graph: Graph) -> dict[str, tuple[str, dict]]:
    keys: dict[str, tuple[str, dict]] = {}
    for n in graph:
        upstream = {}
        for arg, ref in n.inputs.items():
            up_key = keys[_ref_node(ref).name][0]
            upstream[arg] = f"{up_key}:{ref.output}" if isinstance(ref, OutputRef) else up_key
        parts = key_parts(n, upstream)
        keys[n.name] = (node_key(parts), parts)
    return keys


def _ref_node(ref: Node | OutputRef) -> Node:
    return ref.node if isinstance(ref, OutputRef) else ref


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(one line, full traceback) of a task failure; a Ray task error carries the worker's frames."""
    cause = getattr(exc, "cause", None) or exc
    line = f"{type(cause).__name__}: {cause}"
    if hasattr(exc, "as_instanceof_cause"):  # ray.exceptions.RayTaskError: str() is the remote traceback
        text = "Traceback (most recent call last), on the Ray worker " + _ANSI.sub("", str(exc)).lstrip()
    else:
        text = "".join(traceback.format_exception(exc))
    return line, text


@dataclass
class _Pool:
    actors: list
    inflight: dict  # actor index -> count
    queue: deque
    make_actor: Any = None  # a new actor like the others: replaces one that is dead for good
    replaced: int = 0


class Runner:
    def __init__(self, graph: Graph, settings: RunSettings, store: Store, record: RunRecord,
                 lineage: Lineage | None, progress: Any = None):
        self.graph, self.settings, self.store, self.record = graph, settings, store, record
        self.lineage, self.progress = lineage, progress
        self.keys = plan_keys(graph)
        self.inflight: dict[Any, tuple[str, str, Any]] = {}  # ref -> (kind, node, shard or (actor index, job))
        self.pools: dict[str, _Pool] = {}
        self.shards: dict[str, list] = {}
        self.started_ray = False
        self._remote = None
        self._retry_options: dict[str, Any] = {}
        self._recoveries: dict[str, int] = {}
        # Shard jobs whose actor was lost with its host, to hand to the pool again once it has had time to
        # restart the actor elsewhere: (due time, node, job); and how often each shard was handed back.
        self._lost: list[tuple[float, str, Any]] = []
        self._lost_count: dict[tuple[str, int], int] = {}
        self._bars: dict[str, Any] = {}
        # Scheduling state that keeps each event O(its neighbours), not O(graph): the nodes to look at next
        # (dependents of a node that just settled, nodes put back to pending), shard jobs not yet submitted,
        # and what is known of each node's shards (from their manifests or results, never read twice).
        self._order = {n.name: i for i, n in enumerate(graph)}
        self._dependents: dict[str, list[str]] = {n.name: [] for n in graph}
        for n in graph:
            for up in {u.name for u in n.upstream()}:
                self._dependents[up].append(n.name)
        self._candidates: set[str] = set(self._order)
        self._deferred: set[str] = set()  # training nodes waiting for CPUs
        self._queued: dict[str, deque] = {}  # node -> shard jobs waiting for a slot in the window
        self._submitted: dict[str, int] = {}  # node -> shard tasks in flight
        self._shard_info: dict[str, dict[int, dict]] = {}
        self._windows: dict[str, tuple[int, int]] = {}  # node -> (tasks in flight, shards a task)
        self._progress_at = 0.0
        attempt = {"started": time.time()}
        self.record.data.setdefault("attempts", []).append(attempt)
        self.record.claim()
        for n in graph:
            key, parts = self.keys[n.name]
            self.record.nodes[n.name] = {
                "key": key, "parts": parts, "sharded": n.is_sharded, "status": "pending",
                "upstream": {arg: _ref_node(ref).name for arg, ref in n.inputs.items()},
                "shards": {"total": 0, "ran": 0, "cached": 0} if n.is_sharded else None,
                "error": None, "traceback": None, "mlflow_run_id": None, "seconds": None,
                "output_uri": store.uri_of(store.node_path(n.name, key)),
            }
        self.record.save()

    # --- helpers ---------------------------------------------------------------------------
    def _state(self, name: str) -> dict:
        return self.record.nodes[name]

    def _input_refs(self, inputs: dict[str, Node | OutputRef]) -> dict[str, InputRef]:
        return {arg: InputRef(_ref_node(ref).name, self.keys[_ref_node(ref).name][0],
                              ref.output if isinstance(ref, OutputRef) else None)
                for arg, ref in inputs.items()}

    def _job(self, n: Node, shard=None, inputs: dict | None = None) -> Job:
        state = self._state(n.name)
        return Job(node=n.name, key=state["key"], fn=n.fn, config=n.config,
                   inputs=self._input_refs(inputs if inputs is not None else n.inputs),
                   store_uri=self.store.uri, run_id=self.record.run_id, shard=shard,
                   verify=self.settings.verify,
                   mlflow_uri=self.lineage.uri if self.lineage else None,
                   mlflow_run_id=state["mlflow_run_id"], training=n.training)

    def _remotes(self):
        if self._remote is None:
            import ray

            # Ray Train's PlacementGroupCleaner polls the State API, which the dashboard serves (on
            # 127.0.0.1, behind token auth); without it every TorchTrainer.fit() waits ~12 s at shutdown.
            training = any(n.training is not None and n.training.on_ray_train for n in self.graph)
            self.started_ray = ensure_ray(self.settings, dashboard=training)
            self.record.data["ray_job_id"] = ray.get_runtime_context().get_job_id()
            retry = [exception_class(name) for name in self.settings.retry_exceptions] or False
            self._retry_options = {"max_retries": self.settings.max_retries, "retry_exceptions": retry}
            self._remote = {
                "execute": ray.remote(execute_job),
                "shards": ray.remote(execute_shards),
                "plan": ray.remote(plan_ids).options(num_cpus=0.25, **self._retry_options),
            }
        return self._remote

    def _task_options(self, n: Node) -> dict:
        opts: dict[str, Any] = {"num_cpus": n.resources.num_cpus, "num_gpus": n.resources.num_gpus,
                                **self._retry_options}
        if n.resources.memory:
            opts["memory"] = n.resources.memory
        if n.training is not None and n.training.on_ray_train:
            # Ray Train's PlacementGroupCleaner actor (a child of this task's TrainController) asks the State
            # API whether the controller lives; that client finds its cluster by RAY_ADDRESS, else by the
            # last `ray start` head recorded in /tmp/ray (stale, or another cluster), else by pgrep. Name
            # this cluster's GCS so it asks the right one (its env_vars merge into the job's).
            import ray

            opts["runtime_env"] = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
        return opts

    def _open_lineage(self, n: Node, cache_hit: bool, produced_by: dict | None = None) -> None:
        if self.lineage is None:
            return
        state = self._state(n.name)
        upstream = {arg: self.keys[name][0] for arg, name in state["upstream"].items()}
        inputs = {}  # what this node reads (the lineage writer reads their manifests, not the driver)
        for arg, ref in n.inputs.items():
            name = _ref_node(ref).name
            key, up = self.keys[name][0], self._state(name)
            inputs[arg] = {"node": name, "key": key, "output": ref.output if isinstance(ref, OutputRef) else None,
                           "directory": self.store.node_path(name, key), "uri": up["output_uri"],
                           "run": up["mlflow_run_id"]}
        # node code that logs into its own run (Ray Train metrics, sweep trials) needs it to exist first
        from interpflow.workflows.engine.execute import wants_context

        live = not cache_hit and (n.training is not None or wants_context(n.fn))
        state["mlflow_run_id"] = self.lineage.start_node(n.name, state["key"], state["parts"], upstream,
                                                         cache_hit, produced_by, inputs, store=self.store, live=live)

    def _close_lineage(self, name: str, metrics: dict | None = None, tags: dict | None = None) -> None:
        state = self._state(name)
        if self.lineage is not None and state["mlflow_run_id"]:
            committed = state["status"] in DONE  # its figures, report tables and models, read by the writer
            if committed:
                tags = {**(tags or {}), **{k: state[k] for k in ("rows", "bytes") if state.get(k) is not None}}
            self.lineage.end_node(state["mlflow_run_id"], state["status"], metrics, tags, state["traceback"],
                                  store=self.store, node=name, key=state["key"], config=state["parts"].get("config"),
                                  directory=self.store.node_path(name, state["key"]) if committed else None)

    # --- scheduling ------------------------------------------------------------------------
    def _set_aside(self, name: str, directory: str, reason: str) -> None:
        """Quarantine a damaged commit of `name` (a whole node, or one shard) and say so in the record."""
        try:
            moved = self.store.set_aside(directory)
        except (FileNotFoundError, OSError):
            moved = []  # another driver set it aside first
        rel = directory[len(self.store.root):].strip("/")
        log.warning("%s is damaged (%s): set aside%s and recomputing", rel, reason,
                    f" in {moved[-1]}" if moved else "")
        self._state(name).setdefault("quarantined", []).append({"path": rel, "reason": reason, "moved_to": moved})

    def _reset(self, name: str) -> None:
        """Put a node back to pending, counters and errors cleared (an upstream artifact was damaged)."""
        state = self._state(name)
        state.update(status="pending", error=None, traceback=None)
        state.pop("failed_shards", None)
        self._candidates.add(name)
        self._queued.pop(name, None)
        if state["shards"] is not None:
            state["shards"] = {"total": 0, "ran": 0, "cached": 0}

    def _start(self, n: Node) -> None:
        state = self._state(n.name)
        directory = self.store.node_path(n.name, state["key"])
        manifest, damage = self.store.inspect(directory)
        if damage is not None and not n.is_sharded:  # a sharded node's damaged shards go alone (_submit_shards)
            self._set_aside(n.name, directory, damage)
        if manifest is not None:
            state.update(status="cached", produced_by=manifest.get("produced_by"), seconds=0.0,
                         rows=manifest.get("rows"), bytes=manifest.get("bytes"))
            if n.is_sharded:
                state["shards"].update(total=len(manifest["shards"]), cached=len(manifest["shards"]))
            self._open_lineage(n, True, manifest.get("produced_by"))  # figures too: logged by _close_lineage
            self._close_lineage(n.name, manifest.get("metrics"), {"output_uri": state["output_uri"]})
            self._advance(n.name)
            return
        remotes = self._remotes()
        if n.training is not None and n.training.on_ray_train and not self._training_slot(n):
            self._deferred.add(n.name)
            return  # stays pending until a running training node finishes
        state.update(started=time.time(), status="running")
        self._open_lineage(n, False)
        if n.is_sharded:
            ref = remotes["plan"].remote(self.store.uri, n.ids, n.config, self._input_refs(n.inputs),
                                         self.settings.verify)
            self.inflight[ref] = ("plan", n.name, None)
        else:
            ref = remotes["execute"].options(**self._task_options(n)).remote(self._job(n))
            self.inflight[ref] = ("node", n.name, None)

    def _training_slot(self, n: Node) -> bool:
        """Start a training node only while the running ones leave CPUs for its workers: each waiting
        TorchTrainer holds a controller and placement group, and a pile of them thrashes a small node."""
        import ray

        def need(node: Node) -> float:
            return node.training.num_workers * node.training.cpus_per_worker

        running = [m for m in self.graph if m.training is not None and m.training.on_ray_train
                   and self._state(m.name)["status"] == "running"]
        busy = sum(need(m) for m in running)
        return not running or busy + need(n) <= ray.cluster_resources().get("CPU", 1)

    def _submit_shards(self, n: Node, ids: list) -> None:
        import pyarrow.fs as pafs

        state = self._state(n.name)
        shards = split_ids(ids, n.num_shards)
        self.shards[n.name] = shards
        info = self._shard_info[n.name] = {}
        node_dir = self.store.node_path(n.name, state["key"])
        present = {i.base_name for i in self.store.fs.get_file_info(pafs.FileSelector(node_dir, allow_not_found=True))}
        missing = []
        for shard in shards:
            if shard.name not in present:  # one listing instead of a look per shard
                missing.append(shard)
                continue
            directory = f"{node_dir}/{shard.name}"
            manifest, damage = self.store.inspect(directory)
            if manifest is not None:
                state["shards"]["cached"] += 1
                info[shard.index] = _shard_summary(manifest)
                continue
            if damage is not None:
                self._set_aside(n.name, directory, damage)
            missing.append(shard)
        state["shards"]["total"] = len(shards)
        state["shards"]["pending"] = len(missing)
        if self.progress is not None:
            self._bars[n.name] = self.progress.add_task(f"{n.name} shards", total=len(shards),
                                                        completed=state["shards"]["cached"])
        if not missing:
            self._finish_sharded(n)
            return
        import ray

        self._remotes()  # Ray is up (started or joined) before the first actor or task is made
        if n.actors is None:
            self._queued[n.name] = deque(missing)
            self._submitted[n.name] = 0
            self._feed_tasks(n)
            return
        pool_cfg = n.actors
        setup_inputs = {k: v for k, v in n.inputs.items() if k in pool_cfg.setup_inputs}
        task_inputs = {k: v for k, v in n.inputs.items() if k not in pool_cfg.setup_inputs}
        from interpflow.actors.pool import PoolWorker

        # Restarted actors rebuild their resource; in-flight shard jobs are retried (they are idempotent).
        actor_cls = ray.remote(pool_cfg.actor or PoolWorker).options(
            num_cpus=pool_cfg.num_cpus, num_gpus=pool_cfg.num_gpus, max_restarts=pool_cfg.max_restarts,
            max_task_retries=self.settings.max_retries + 1)
        setup_refs = self._input_refs(setup_inputs)

        def make_actor():
            return actor_cls.remote(self.store.uri, pool_cfg.setup, pool_cfg.config, setup_refs,
                                    pool_cfg.resource_arg, self.settings.verify)

        actors = [make_actor() for _ in range(min(pool_cfg.size, len(missing)))]
        pool = _Pool(actors, {i: 0 for i in range(len(actors))},
                     deque(self._job(n, shard, task_inputs) for shard in missing), make_actor)
        self.pools[n.name] = pool
        self._feed_pool(n.name)

    def _feed_tasks(self, n: Node) -> None:
        """Keep a window of a sharded node's shard tasks in flight (a few per CPU): the driver's memory and
        each wait stay flat however many shards the node has."""
        import ray

        queue = self._queued.get(n.name)
        if not queue:
            return
        if n.name not in self._windows:
            # A window of tasks, each running a group of shards once there are many more shards than task
            # slots (up to 64 a task, at least 4 tasks per slot), so a small shard does not pay a whole task.
            window = max(16, 4 * int(ray.cluster_resources().get("CPU", 1)))
            self._windows[n.name] = (window, max(1, min(64, len(queue) // (4 * window))))
        window, group = self._windows[n.name]
        options = self._task_options(n)
        while queue and self._submitted[n.name] < window:
            shards = [queue.popleft() for _ in range(min(group, len(queue)))]
            if len(shards) == 1:
                ref = self._remotes()["execute"].options(**options).remote(self._job(n, shards[0]))
                self.inflight[ref] = ("shard", n.name, shards[0])
            else:
                retryable = tuple(self._retry_options.get("retry_exceptions") or ())
                ref = self._remotes()["shards"].options(**options).remote([self._job(n, s) for s in shards], retryable)
                self.inflight[ref] = ("shards", n.name, shards)
            self._submitted[n.name] += 1

    def _feed_pool(self, name: str) -> None:
        pool = self.pools[name]
        for index, actor in enumerate(pool.actors):
            while pool.queue and pool.inflight[index] < 2:  # one running, one queued per actor
                job = pool.queue.popleft()
                ref = actor.run.remote(job)
                pool.inflight[index] += 1
                self.inflight[ref] = ("shard", name, (index, job))

    def _finish_sharded(self, n: Node) -> None:
        state = self._state(n.name)
        shards = self.shards[n.name]
        entries, outputs, rows, nbytes = [], {}, 0, 0
        summed: dict[str, float] = {}
        info = self._shard_info.get(n.name, {})
        for shard in shards:
            manifest = info.get(shard.index)
            if manifest is None:  # not seen by this driver (committed by another): read it
                manifest = self.store.read_manifest(
                    self.store.shard_path(n.name, state["key"], shard.index, shard.count)) or {}
            outputs = outputs or manifest.get("outputs", {})
            for k, v in manifest.get("metrics", {}).items():
                summed[k] = summed.get(k, 0) + v
            entries.append({"dir": shard.name, "rows": manifest.get("rows", 0), "num_ids": len(shard.ids),
                            "bytes": manifest.get("bytes", 0), "digest": manifest.get("digest")})
            rows += manifest.get("rows", 0)
            nbytes += manifest.get("bytes", 0)
        # A sharded node's metrics: its shards' metrics summed, plus sizes, counts and throughput.
        wall = max(time.time() - state.get("started", time.time()), 1e-9)
        metrics = {**summed, "rows": rows, "bytes": nbytes, "shards": len(shards), "wall_s": wall,
                   "shards_ran": state["shards"]["ran"], "shards_cached": state["shards"]["cached"]}
        if "tokens" in summed and state["shards"]["ran"] == len(shards):
            metrics["tokens_per_s"] = summed["tokens"] / wall
        directory = self.store.node_path(n.name, state["key"])
        if self.store.read_manifest(directory) is not None:  # a concurrent run sealed it first (its shards
            # are the ones this run saw committed: one manifest read, not one per shard)
            self._complete(n.name, "ran" if state["shards"]["ran"] else "cached", metrics, rows=rows, bytes=nbytes)
            self._drop_pool(n.name)
            return
        self.store.commit_manifest(directory, {
            "node": n.name, "key": state["key"], "shards": entries, "outputs": outputs, "rows": rows,
            "digest": content_digest([e["digest"] for e in entries]),
            "bytes": nbytes, "files": {}, "metrics": metrics,
            "produced_by": {"run_id": self.record.run_id, "mlflow_run_id": state["mlflow_run_id"]}})
        self._complete(n.name, "ran", metrics, rows=rows, bytes=nbytes)
        self._drop_pool(n.name)

    def _complete(self, name: str, status: str, metrics: dict | None = None, **fields) -> None:
        state = self._state(name)
        state.update(status=status, finished=time.time(), **fields)
        state["seconds"] = state["finished"] - state.get("started", state["finished"])
        self._close_lineage(name, metrics, {"output_uri": state["output_uri"], "seconds": f"{state['seconds']:.3f}",
                                            "ray_job_id": self.record.data.get("ray_job_id", "none")})
        self._advance(name)

    def _fail(self, name: str, exc: BaseException) -> None:
        state = self._state(name)
        state["error"], state["traceback"] = describe_failure(exc)
        log.error("node %s failed: %s", name, state["error"])
        self._complete(name, "failed")
        self._drop_pool(name)

    def _drop_pool(self, name: str) -> None:
        pool = self.pools.pop(name, None)
        if pool is not None:
            import ray

            for actor in pool.actors:
                ray.kill(actor, no_restart=True)

    def _advance(self, name: str) -> None:
        """`name` settled (done, failed or skipped): its dependents, and training nodes waiting for CPUs,
        are looked at next."""
        self._candidates.update(self._dependents[name])
        if self._deferred:
            self._candidates |= self._deferred
            self._deferred.clear()
        now = time.monotonic()
        if self.progress is not None and "_nodes" in self._bars and now - self._progress_at > 0.2:
            self._progress_at = now
            done = sum(s["status"] in DONE + ("failed", "skipped") for s in self.record.nodes.values())
            self.progress.update(self._bars["_nodes"], completed=done)

    # --- results ---------------------------------------------------------------------------
    def _recover_corrupt(self, name: str, exc: CorruptArtifact) -> bool:
        """A node read a damaged upstream artifact: set it aside (only the damaged shard of a sharded
        node) and recompute it, then the reader."""
        count = self._recoveries.get(exc.node, 0)
        if count >= 2 or exc.node not in self.record.nodes:
            return False
        self._recoveries[exc.node] = count + 1
        directory = self.store.node_path(exc.node, exc.key)
        inside = exc.path[len(directory):].strip("/").split("/")[0] if exc.path.startswith(directory + "/") else ""
        if inside.startswith("shard-"):
            directory = f"{directory}/{inside}"
        self._set_aside(exc.node, directory, exc.reason)
        self._reset(exc.node)
        self._state(exc.node)["recomputed_after_corruption"] = True
        if name != exc.node:
            self._state(name)["status"] = "pending"
            self._candidates.add(name)
        return True

    def _on_result(self, ref, value: Any = _UNFETCHED) -> None:
        import ray

        kind, name, extra = self.inflight.pop(ref)
        n = self.graph[name]
        pool_job = None
        if kind == "shard" and isinstance(extra, tuple):
            actor_index, pool_job = extra
            shard = pool_job.shard
            if name in self.pools:
                self.pools[name].inflight[actor_index] -= 1
        else:
            shard = extra
            if kind in ("shard", "shards"):
                self._submitted[name] -= 1
                self._feed_tasks(n)
        try:
            result = ray.get(ref) if value is _UNFETCHED else value
        except Exception as exc:  # noqa: BLE001 - a task's failure is data for the run record
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, CorruptArtifact) and kind not in ("shard", "shards") \
                    and self._recover_corrupt(name, cause):
                return
            if pool_job is not None and self._hand_back(name, pool_job, exc, actor_index):
                return
            if kind in ("shard", "shards"):
                for one in (shard if kind == "shards" else [shard]):
                    self._shard_failed(name, one, *describe_failure(exc), cause)
                return
            self._fail(name, exc)
            return
        if kind == "plan":
            self._submit_shards(n, result)
        elif kind == "node":  # "cached" here: another process committed the same key first
            self._complete(name, "ran" if result["status"] == "ran" else "cached", result.get("metrics"),
                           rows=result.get("rows"), bytes=result.get("bytes"), produced_by=result.get("produced_by"))
        elif kind == "shards":
            for one, outcome in zip(shard, result):
                if "line" in outcome:
                    self._shard_failed(name, one, outcome["line"], outcome["text"], outcome["error"])
                else:
                    self._shard_done(name, one, outcome)
        else:
            self._shard_done(name, shard, result)

    def _hand_back(self, name: str, job, exc: BaseException, actor_index: int) -> bool:
        """A shard whose actor became unreachable (its host was lost) goes back to the pool after a pause,
        up to LOST_ACTOR_RETRIES times: Ray restarts the actor once a node has room, and Ray's own task
        retries are spent in the seconds before the cluster declares the host dead. An actor reported dead
        (ActorDiedError: its restarts spent on earlier lost hosts) is replaced by a new one, up to
        MAX_ACTOR_REPLACEMENTS times a pool size; one whose set-up raised is not (the shard fails with that
        error). True if handed back."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        if not isinstance(exc, (ActorUnavailableError, RayActorError)) or name not in self.pools \
                or getattr(exc, "actor_init_failed", False):
            return False
        tries = self._lost_count.get((name, job.shard.index), 0) + 1
        if tries > LOST_ACTOR_RETRIES:
            return False
        pool = self.pools[name]
        if isinstance(exc, ActorDiedError) and self._dead_for_good(pool, actor_index, exc):
            if pool.replaced >= MAX_ACTOR_REPLACEMENTS * len(pool.actors):
                return False
            pool.actors[actor_index] = pool.make_actor()
            pool.replaced += 1
            log.warning("node %s: model actor %d is dead for good (%s); started a new one (%d so far)", name,
                        actor_index, str(exc).splitlines()[0][:200], pool.replaced)
        self._lost_count[(name, job.shard.index)] = tries
        log.warning("node %s: shard %d lost its actor (%s); handing it back to the pool (%d/%d)", name,
                    job.shard.index, type(exc).__name__, tries, LOST_ACTOR_RETRIES)
        self._lost.append((time.time() + min(2.0 * tries, 10.0), name, job))
        return True

    @staticmethod
    def _dead_for_good(pool: _Pool, actor_index: int, exc: BaseException) -> bool:
        """Whether the actor now at `actor_index` is the one `exc` reports dead (not one that already replaced
        it on an earlier shard's report). Replacing one that Ray might still restart costs nothing: the pool
        drops its last handle, and Ray ends an actor nobody holds."""
        dead_id = getattr(exc, "actor_id", None)
        return dead_id is None or dead_id == pool.actors[actor_index]._actor_id.hex()

    def _requeue_lost(self) -> None:
        now, later = time.time(), []
        for due, name, job in self._lost:
            if due > now:
                later.append((due, name, job))
            elif name in self.pools:
                self.pools[name].queue.append(job)
                self._feed_pool(name)
        self._lost = later

    def _shard_done(self, name: str, shard, result: dict) -> None:
        state = self._state(name)
        state["shards"]["ran" if result["status"] == "ran" else "cached"] += 1
        state["shards"]["pending"] -= 1
        self._shard_info.setdefault(name, {})[shard.index] = _shard_summary(result)
        if name in self._bars:
            self.progress.advance(self._bars[name])
        if name in self.pools:
            self._feed_pool(name)
        if state["shards"]["pending"] == 0:
            if state.get("failed_shards") or state["status"] == "pending":
                self._maybe_close_failed_shards(name)
            else:
                self._finish_sharded(self.graph[name])

    def _shard_failed(self, name: str, shard, line: str, text: str, cause: BaseException | None) -> None:
        state = self._state(name)
        state["shards"]["pending"] -= 1
        state.setdefault("failed_shards", []).append(shard.index)
        state["error"] = state["error"] or f"shard {shard.index}: {line}"
        state["traceback"] = state["traceback"] or f"shard {shard.index}: {text}"
        if isinstance(cause, CorruptArtifact):
            self._recover_corrupt(name, cause)
        if name in self.pools:
            self._feed_pool(name)
        self._maybe_close_failed_shards(name)

    def _maybe_close_failed_shards(self, name: str) -> None:
        state = self._state(name)
        if state["shards"]["pending"] > 0:
            return  # let the other shards commit, so that a resume has less to do
        if state["status"] == "pending":  # an upstream artifact was corrupt: the node starts over
            self._reset(name)
            self._drop_pool(name)
            return
        failed = state.get("failed_shards", [])
        state["status"] = "failed"
        state["finished"] = time.time()
        state["seconds"] = state["finished"] - state.get("started", state["finished"])
        state["error"] = f"{len(failed)} shard(s) failed ({failed[:10]}); first: {state['error']}"
        log.error("node %s failed: %s", name, state["error"])
        self._close_lineage(name, {"shards_ran": state["shards"]["ran"], "shards_failed": len(failed)})
        self._drop_pool(name)
        self._advance(name)

    # --- main loop -------------------------------------------------------------------------
    def run(self) -> bool:
        import contextlib

        started = time.time()
        if self.progress is not None:
            self._bars["_nodes"] = self.progress.add_task("nodes", total=len(self.graph))
        try:
            with self.progress if self.progress is not None else contextlib.nullcontext():
                self._loop()
        finally:
            ok = all(s["status"] in DONE for s in self.record.nodes.values())
            self.record.data["status"] = "succeeded" if ok else "failed"
            self.record.data["attempts"][-1].update(finished=time.time(), seconds=time.time() - started,
                                                    status=self.record.data["status"])
            self.record.save()
            if self.lineage is not None:
                counts = {s: sum(v["status"] == s for v in self.record.nodes.values())
                          for s in ("ran", "cached", "failed", "skipped")}
                self.lineage.end_parent(self.record.data["status"], self.record.data.get("ray_job_id", "none"),
                                        {f"nodes_{k}": v for k, v in counts.items()} | {"seconds": time.time() - started})
            for name in list(self.pools):
                self._drop_pool(name)
            if self.started_ray:
                import ray

                ray.shutdown()
        return ok

    def _loop(self) -> None:
        while True:
            batch = sorted(self._candidates, key=self._order.__getitem__)  # graph order, as a full scan had
            self._candidates.clear()
            for name in batch:
                n = self.graph[name]
                state = self._state(name)
                if state["status"] != "pending":
                    continue
                ups = [self._state(u.name)["status"] for u in n.upstream()]
                if any(s in ("failed", "skipped") for s in ups):
                    state["status"] = "skipped"
                    state["error"] = "an upstream node failed"
                    self._open_lineage(n, False)
                    self._close_lineage(n.name)
                    self._advance(name)
                elif all(s in DONE for s in ups):
                    self._start(n)
            self.record.save(force=False)
            if self._lost:
                self._requeue_lost()
            if not self.inflight:
                if self._candidates:
                    continue
                if self._lost:  # only shards waiting to go back to their pool
                    time.sleep(0.2)
                    continue
                pending = [n.name for n in self.graph if self._state(n.name)["status"] == "pending"]
                if not pending:
                    return
                startable = [p for p in pending
                             if all(self._state(u.name)["status"] in DONE for u in self.graph[p].upstream())]
                if not startable:
                    raise RuntimeError(f"scheduler stalled with pending nodes {pending}")
                self._candidates.update(startable)  # a recovery put nodes back to pending; schedule them
                continue
            import ray  # here, not above: a run whose nodes are all committed never imports it

            refs = list(self.inflight)
            ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
            if ready and rest:  # take every result that is already there, not one per wait
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            try:  # one get for the batch; a failed task's error is taken up by its own get below
                values = ray.get(ready)
            except Exception:  # noqa: BLE001
                values = [_UNFETCHED] * len(ready)
            for ref, value in zip(ready, values):
                self._on_result(ref, value)


def _shard_summary(manifest: dict) -> dict:
    """What sealing a sharded node needs of one shard (from its manifest or its task's summary)."""
    return {"rows": manifest.get("rows") or 0, "bytes": manifest.get("bytes") or 0, "digest": manifest.get("digest"),
            "metrics": manifest.get("metrics") or {}, "outputs": manifest.get("outputs") or {}}
