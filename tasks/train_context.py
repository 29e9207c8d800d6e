"""The training context a training task sees, in-process and without Ray (one worker, checkpoints kept
in memory); the engine's Ray Train context (`workflows/engine/training.py`) has the same interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class LocalTrainContext:
    """The same interface in-process, without Ray: one worker, checkpoints kept in memory.

    For notebooks and unit tests of training tasks; `restore()` returns `resume_from` if given.
    """

    rank, world_size = 0, 1

    def __init__(self, resume_from: dict[str, Any] | None = None, device: str = "cpu"):
        self.device = device
        self.resume_from = resume_from
        self.checkpoints: list[dict[str, Any]] = []
        self.reports: list[dict[str, float]] = []

    def restore(self) -> dict[str, Any] | None:
        return self.resume_from

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def sync_gradients(self, params) -> None:
        """One worker: nothing to average."""

    def report(self, step: int, metrics: dict[str, float], state: dict[str, torch.Tensor] | None = None) -> None:
        self.reports.append({**metrics, "step": step})
        if state is not None:
            self.checkpoints.append({**{k: v.detach().clone() for k, v in state.items()}, "step": step})
