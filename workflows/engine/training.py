"""Training nodes on Ray Train: resumable from their last checkpoint, with Ray kept out of `tasks/`.

A training task is a plain function `fn(config, train, **inputs)`. `train` is a small context:

    state = train.restore()            # None, or the tensors (and "step") of the last checkpoint
    model = train.prepare(model)       # DDP-wrapped when there are several workers
    train.sync_gradients(params)       # or: average gradients across workers by hand
    train.report(step, metrics, state) # metrics to MLflow; with `state`, a checkpoint (all ranks call it)

The engine runs the function inside a `TorchTrainer` whose `RunConfig(name=...)` is derived from the
node key and whose storage is in the store (`.train/`), so a killed node that runs again resumes from
its last checkpoint. Rank 0 commits the function's return value like any other node output.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from interpflow.tasks.train_context import LocalTrainContext  # noqa: F401 - the engine's in-process context

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


@dataclass(frozen=True)
class Training:
    """How a training node runs. `num_workers` and `use_gpu` change the numbers, so they are in the key."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1
    keep_checkpoints: int = 2


class RayTrainContext:
    """What a training task sees of Ray Train (the task itself never imports Ray).

    `report` also logs the metrics, with their step, to the node's MLflow run (rank 0).
    """

    def __init__(self, mlflow_uri: str | None = None, mlflow_run_id: str | None = None):
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._mlflow = (mlflow_uri, mlflow_run_id) if mlflow_run_id and self.rank == 0 else None

    def restore(self) -> dict[str, Any] | None:
        import ray.train
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state: dict[str, Any] = dict(load_file(os.path.join(directory, STATE_FILE)))
            with open(os.path.join(directory, META_FILE)) as f:
                state.update(json.load(f))
        return state

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size > 1:
            from ray.train.torch import prepare_model

            return prepare_model(model)
        return model.to(self.device)

    def sync_gradients(self, params) -> None:
        """Average the gradients of `params` across workers (what DDP does, for models whose
        training step is not a plain forward call)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def _log_mlflow(self, step: int, metrics: dict[str, float]) -> None:
        from interpflow.workflows.engine.lineage import log_step_metrics

        log_step_metrics(*self._mlflow, step, metrics)

    def report(self, step: int, metrics: dict[str, float], state: dict[str, torch.Tensor] | None = None) -> None:
        """Metrics go to the node's MLflow run (rank 0). With `state`, every rank must call this at the
        same step: rank 0's state becomes a Ray Train checkpoint (tensors + step).

        Metrics alone are not sent to Ray Train: its report blocks until the controller has taken the
        previous one (it polls every 2 s), which would throttle a fast loop that logs often.
        """
        import ray.train
        from ray.train import Checkpoint
        from safetensors.torch import save_file

        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._mlflow is not None:
            self._log_mlflow(step, metrics)
        if state is None:
            return
        metrics["step"] = step
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(directory, STATE_FILE))
            with open(os.path.join(directory, META_FILE), "w") as f:
                json.dump({"step": step}, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def _train_loop(config: dict) -> None:
    from interpflow.workflows.engine.execute import commit_result

    job, kwargs = config["job"], config["kwargs"]
    # One intra-op thread per CPU the worker holds: more oversubscribes the node's cores (OpenMP
    # spin-waits make small models 10-40x slower when workers contend for cores).
    torch.set_num_threads(max(1, int(job.training.cpus_per_worker)))
    # Ray Train logs every report at INFO under a logger outside `ray.train` (only the root level reaches it).
    logging.getLogger().setLevel(logging.WARNING)
    context = RayTrainContext(job.mlflow_uri, job.mlflow_run_id)
    result = job.fn(job.config, train=context, **kwargs)
    if context.rank == 0:
        commit_result(job, result, config["timings"])


def run_training(job, kwargs: dict, training: Training, storage_path: str, timings: dict) -> None:
    """Run `job.fn` under a TorchTrainer that resumes a run of the same name from its checkpoint."""
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job, "kwargs": kwargs, "timings": timings},
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                     resources_per_worker={"CPU": training.cpus_per_worker}),
        run_config=RunConfig(name=f"{job.node}-{job.key[:24]}", storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
                             # metrics go to MLflow; Ray Train's per-report INFO lines would flood the console
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
