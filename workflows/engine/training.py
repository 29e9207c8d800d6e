"""Training nodes: resumable from their last checkpoint, with Ray kept out of `tasks/`.

A training task is a plain function `fn(config, train, **inputs)`. `train` is a small context:

    state = train.restore()            # None, or the tensors (and "step") of the last checkpoint
    model = train.prepare(model)       # DDP-wrapped when there are several workers
    train.sync_gradients(params)       # or: average gradients across workers by hand
    train.report(step, metrics, state) # metrics to MLflow; with `state`, a checkpoint (all ranks call it)

With several workers (or a task that needs a process group, such as DeepSpeed) the engine runs the
function inside a `TorchTrainer` whose `RunConfig(name=...)` is derived from the node key and whose storage
is in the store (`.train/`). One worker needs none of that: the function runs in the node's own Ray task
(holding the worker's CPUs and GPU) with `StoreTrainContext`, which writes the same checkpoints to the same
place itself. That saves the 20-40 s a TorchTrainer takes to start and stop (its controller, placement
group and worker actor), which dominates small runs. Either way a killed node that runs again resumes from
its last checkpoint, and rank 0 commits the function's return value like any other node output.
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
    distributed: bool = False  # the task needs a torch.distributed process group even on one worker (DeepSpeed)

    @property
    def on_ray_train(self) -> bool:
        """Several workers, or a process group, need Ray Train; one worker runs in the node's own task."""
        return self.num_workers > 1 or self.distributed

    def run_name(self, node: str, key: str) -> str:
        """The checkpoint folder under `.train/` (Ray Train's run name): one per node key."""
        return f"{node}-{key[:24]}"


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
        _log_step_metrics(self._mlflow, step, metrics)
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


def _log_step_metrics(run: tuple[str | None, str] | None, step: int, metrics: dict[str, float]) -> None:
    if run is not None:
        from interpflow.workflows.engine.lineage import log_step_metrics

        log_step_metrics(*run, step, metrics)


class StoreTrainContext:
    """One worker in the node's own Ray task, checkpointing into the store itself (local or S3).

    A checkpoint is `.train/<run name>/checkpoint_<step>/` holding `state.safetensors`, then `state.json`:
    the JSON is written last, so a folder without it (a crash mid-write) is never restored. The newest
    `keep` checkpoints are kept.
    """

    rank, world_size = 0, 1

    def __init__(self, store, run_dir: str, keep: int, use_gpu: bool = False, mlflow_uri: str | None = None,
                 mlflow_run_id: str | None = None):
        self.store, self.run_dir, self.keep = store, run_dir, max(1, keep)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self._mlflow = (mlflow_uri, mlflow_run_id) if mlflow_run_id else None

    def _checkpoints(self) -> list[tuple[int, str]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        import pyarrow.fs as pafs

        found = []
        for info in self.store.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name[11:].isdigit():
                meta = self.store.fs.get_file_info(f"{info.path}/{META_FILE}")
                if meta.type == pafs.FileType.File:
                    found.append((int(name[11:]), info.path))
        return sorted(found)

    def restore(self) -> dict[str, Any] | None:
        from safetensors.torch import load

        checkpoints = self._checkpoints()
        if not checkpoints:
            return None
        _, folder = checkpoints[-1]
        with self.store.fs.open_input_stream(f"{folder}/{STATE_FILE}") as f:
            state: dict[str, Any] = dict(load(f.read()))
        state.update(self.store.read_json(f"{folder}/{META_FILE}"))
        return state

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def sync_gradients(self, params) -> None:
        """One worker: nothing to average."""

    def report(self, step: int, metrics: dict[str, float], state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save

        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        _log_step_metrics(self._mlflow, step, metrics)
        if state is None:
            return
        folder = f"{self.run_dir}/checkpoint_{step:09d}"
        self.store.fs.create_dir(folder, recursive=True)
        with self.store.fs.open_output_stream(f"{folder}/{STATE_FILE}") as f:
            f.write(save({k: v.detach().contiguous().cpu() for k, v in state.items()}))
        self.store.write_json_atomic(f"{folder}/{META_FILE}", {"step": step})
        for _, old in self._checkpoints()[:-self.keep]:
            self.store.fs.delete_dir(old)


def run_in_task(job, kwargs: dict, training: Training, store, timings: dict) -> None:
    """Run `job.fn` with one worker in this task, resuming the node's last checkpoint in the store."""
    from interpflow.workflows.engine.execute import commit_result

    torch.set_num_threads(max(1, int(training.cpus_per_worker)))  # see _train_loop
    context = StoreTrainContext(store, store.path(".train", training.run_name(job.node, job.key)),
                                training.keep_checkpoints, training.use_gpu, job.mlflow_uri, job.mlflow_run_id)
    commit_result(job, job.fn(job.config, train=context, **kwargs), timings, store)


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
        run_config=RunConfig(name=training.run_name(job.node, job.key), storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
                             # metrics go to MLflow; Ray Train's per-report INFO lines would flood the console
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
