"""The actor behind a sharded node's ActorPool: builds a resource once, then runs shard jobs."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from interpflow.workflows.engine.execute import InputRef, Job, execute_job, load_inputs
from interpflow.workflows.engine.store import Store


class PoolWorker:
    """Body of a pool actor: builds its resource (a loaded model, say) once, then runs shards.

    Methods are idempotent (a shard commits atomically or not at all), so Ray may retry them
    after an actor restart.
    """

    def __init__(self, store_uri: str | None, setup: Callable, config: BaseModel | None,
                 setup_inputs: dict[str, InputRef] | None = None, resource_arg: str = "model",
                 verify: bool = True, **setup_kwargs: Any):
        inputs = load_inputs(Store(store_uri), setup_inputs, verify) if setup_inputs else {}
        self.resource = setup(config, **inputs, **setup_kwargs)
        self.resource_arg = resource_arg

    def run(self, job: Job) -> dict:
        return execute_job(job, self.resource, self.resource_arg)
