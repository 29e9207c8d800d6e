"""Hyperparameter sweeps on Ray Tune (OptunaSearch: TPE, seeded) whose trials are durable sub-nodes.

A sweep node (a node function that declares ``node``) calls ``run_sweep``. Every trial:
  * gets a key from everything its result depends on (the sweep's identity and the trial's own values);
  * is committed to the store under the node's scratch directory (``.nodes/<node>/<key>/trials/<trial>``)
    with a manifest, like any node;
  * gets a child MLflow run of the sweep node's run: its values as params, its metrics, the URI of its
    commit (checkpoint), and, if it failed, its traceback (tag and artifact).
A killed sweep that runs again replays the same search: the sampler is seeded and a committed trial
returns its stored metrics instead of running, so the searcher sees the same results in the same order
(exactly so with one trial at a time; with several, TPE's startup draws are still the same) and only
unfinished trials compute.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed
from interpflow.workflows.engine.store import Store


class SearchDimension(BaseModel):
    """One dotted key's range: uniform / loguniform floats, int, or a choice among values."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice dimension needs values: [...]")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.kind} dimension needs low < high, got low={self.low}, high={self.high}")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform dimension needs low > 0, got {self.low}")
        return self

    def tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)


TRIAL_SLOT_CPUS = 0.01    # what a trial asks Ray for inside its sweep's reservation (Tune needs a nonzero bundle)


class SweepSettings(BaseModel):
    """A sweep node reserves ``concurrent_trials x trial_cpus`` CPUs and runs its trials inside that
    reservation, so sweeps side by side never oversubscribe the cluster (on 2 cores with the defaults, one
    sweep at a time with two trials at once)."""

    model_config = ConfigDict(extra="forbid")
    concurrent_trials: int = Field(2, ge=1, description="trials run at once")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs each trial may use (torch threads follow it)")
    seed: Seed = Field(0, description="seeds the TPE sampler")

    def node_cpus(self) -> float:
        """What the sweep node asks Ray for: its trials' CPUs, less the slots the trials ask for themselves."""
        return max(0.0, self.concurrent_trials * (self.trial_cpus - TRIAL_SLOT_CPUS))


@dataclass
class TrialOutcome:
    trial: str
    values: dict
    metrics: dict
    status: str
    cached: bool
    uri: str


def trial_key(identity: dict, values: dict) -> str:
    blob = json.dumps({"identity": identity, "values": values}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _child_run(node, name: str, params: dict) -> str | None:
    if not (node.mlflow_uri and node.mlflow_run_id):
        return None
    from interpflow.workflows.engine.lineage import _client, _retry, flatten

    client = _client(node.mlflow_uri)
    parent = _retry(client.get_run, node.mlflow_run_id)
    run = _retry(client.create_run, parent.info.experiment_id,
                 tags={"mlflow.parentRunId": node.mlflow_run_id, "mlflow.runName": name,
                       "interpflow.node": f"{node.node}.trial", "interpflow.trial": name})
    from mlflow.entities import Param

    _retry(client.log_batch, run.info.run_id, params=[Param(k, v) for k, v in flatten(params).items()][:100])
    return run.info.run_id


def _end_child_run(node, run_id: str | None, metrics: dict, tags: dict, status: str,
                   failure: str | None = None) -> None:
    if run_id is None:
        return
    import os
    import tempfile

    from mlflow.entities import Metric, RunTag

    from interpflow.workflows.engine.lineage import _client, _retry, metric_key

    client = _client(node.mlflow_uri)
    now = int(time.time() * 1000)
    _retry(client.log_batch, run_id,
           metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))],
           tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    if failure:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "traceback.txt")
            with open(path, "w") as f:
                f.write(failure)
            _retry(client.log_artifact, run_id, path)
    _retry(client.set_terminated, run_id, status)


def _trial(values: dict, *, setup: dict) -> None:
    """A Tune trial: a committed result is returned as it is; otherwise ``compute`` runs and commits."""
    from ray import tune

    import torch

    node, identity, compute = setup["node"], setup["identity"], setup["compute"]
    torch.set_num_threads(max(1, int(setup["threads"])))
    store = Store(node.store_uri)
    key = trial_key(identity, values)
    directory = node.scratch("trials", key)
    manifest = store.committed(directory)
    cached = manifest is not None
    if cached:
        metrics = store.load(directory, manifest, "metrics")
        tune.report({**metrics, "trial_key": key, "status": "ok", "cached": True})
        return
    run_id = _child_run(node, f"trial {key[:8]}", values)
    try:
        outputs = compute(values)
        metrics = {k: float(v) for k, v in outputs["metrics"].items() if isinstance(v, (int, float))}
        outputs = {**outputs, "metrics": metrics}
        store.commit(directory, outputs, {"node": f"{node.node}.trial", "key": key, "values": values,
                                          "metrics": metrics})
        _end_child_run(node, run_id, metrics, {"interpflow.checkpoint_uri": store.uri_of(directory),
                                               "interpflow.trial_key": key}, "FINISHED")
        tune.report({**metrics, "trial_key": key, "status": "ok", "cached": False})
    except Exception:  # a failed trial keeps its traceback; the sweep goes on
        failure = traceback.format_exc()
        _end_child_run(node, run_id, {}, {"interpflow.trial_key": key, "interpflow.error": failure[-4000:]},
                       "FAILED", failure)
        tune.report({setup["metric"]: setup["failed_value"], "trial_key": key, "status": "failed",
                     "cached": False, "error": failure.strip().splitlines()[-1][:500]})


def run_sweep(node, identity: dict, space: dict[str, SearchDimension], trials: int, settings: SweepSettings,
              compute: Callable[[dict], dict], metric: str = "objective", failed_value: float = -1.0
              ) -> list[TrialOutcome]:
    """Run ``trials`` trials of ``compute(values)`` (values: one draw of ``space``) on Ray Tune, TPE-guided
    to maximise ``metric``; return every distinct trial's outcome in the order Tune created them (a draw
    that repeats earlier values is the same trial: it is computed once and listed once)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    import logging

    logging.getLogger("ray.tune").setLevel(logging.WARNING)    # Tune's per-save INFO lines would flood the run
    store = Store(node.store_uri)
    setup = {"node": node, "identity": identity, "compute": compute, "metric": metric, "failed_value": failed_value,
             "threads": settings.trial_cpus}

    # Tune registers a trainable cluster-wide under its function's name: sweeps running side by side need
    # names of their own, or they would run each other's trials.
    def trial(values: dict, setup: dict) -> None:
        _trial(values, setup=setup)

    trial.__name__ = trial.__qualname__ = f"trial-{node.node}-{node.key[:16]}"
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup), {"cpu": TRIAL_SLOT_CPUS})
    if space:
        searcher = OptunaSearch(metric=metric, mode="max",
                                sampler=optuna.samplers.TPESampler(seed=settings.seed))
        searcher = ConcurrencyLimiter(searcher, max_concurrent=settings.concurrent_trials)
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=trials, metric=metric, mode="max")
        param_space = {k: d.tune() for k, d in space.items()}
    else:   # nothing to search: the configured values, once
        tune_config = tune.TuneConfig(num_samples=1, metric=metric, mode="max")
        param_space = {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")      # no per-experiment console tables from inside a node
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                       run_config=tune.RunConfig(name=f"{node.node}-{node.key[:20]}-{int(time.time())}",
                                                 storage_path=store.uri_of(store.path(".tune")), verbose=0))
    grid = tuner.fit()
    outcomes, seen = [], set()
    for result in grid:
        m = dict(result.metrics or {})
        values = dict(result.config or {})
        key = m.get("trial_key") or trial_key(identity, values)
        status = m.get("status", "failed" if result.error else "ok")
        if key in seen:       # the sampler drew values it had drawn before: one trial, already listed
            continue
        seen.add(key)
        outcomes.append(TrialOutcome(key, values, m, status, bool(m.get("cached")),
                                     store.uri_of(node.scratch("trials", key))))
    return outcomes
