"""Per-example gradients of a task's loss or measurement, with ``torch.func``.

``vmap(grad(f))`` differentiates every example of a batch in one vectorised pass, where a Python loop
would run n forward/backward passes (``benchmarks/influence_grads.py`` measures the difference).
Each example is run as a batch of one, with its own padding and masks, through
``functional_call(model, {selected, frozen})``: only the selected parameters (``params.py``) are
differentiated; every other parameter and buffer is passed detached, so no graph is built for them.

While gradients are computed the model is put in eval mode (no dropout: vmap would need a random
stream per example, and influence is defined at fixed weights) and, for Hugging Face models, on
``eager`` attention: SDPA's mask construction branches on tensor values, which vmap cannot batch.
Both are restored afterwards.

Output per batch: ``PerExampleGrads(ids, grads)`` with ``grads`` (n, p) float32 in the selection's flat
layout, or (n, dim) after a ``RandomProjection``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad, vmap

from .params import ParamSelection, select_parameters
from .projection import ProjectionConfig, RandomProjection
from .task import Batch, Task

Kind = Literal["train_loss", "measurement"]


class GradConfig(BaseModel):
    """Which parameters to differentiate, how to project, how many examples per vmap call."""

    model_config = ConfigDict(extra="forbid")
    params: list[str] = Field(..., min_length=1, description="fnmatch globs (or 're:' regexes) over "
                                                             "model.named_parameters(), e.g. "
                                                             "'transformer.h.*.mlp.c_fc.weight'")
    projection: ProjectionConfig | None = Field(None, description="random projection of each gradient; "
                                                                  "None keeps full per-parameter gradients")
    chunk_size: int | None = Field(None, ge=1, description="examples differentiated per vectorised call "
                                                           "(bounds memory); None = the whole batch")
    id_key: str = Field("id", description="batch key holding each example's stable integer id")


@dataclass(frozen=True)
class PerExampleGrads:
    """One row per example: ``ids`` (n,) int64 and ``grads`` (n, p or dim) float32."""

    ids: torch.Tensor
    grads: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict for safetensors (the store never pickles)."""
        return {"ids": self.ids.contiguous(), "grads": self.grads.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> PerExampleGrads:
        return cls(tensors["ids"], tensors["grads"])

    @classmethod
    def concat(cls, parts: list[PerExampleGrads]) -> PerExampleGrads:
        return cls(torch.cat([p.ids for p in parts]), torch.cat([p.grads for p in parts]))


class TaskCall(nn.Module):
    """``functional_call(TaskCall(model), {"model.<name>": tensor}, (fn, batch))`` runs ``fn(model, batch)``
    with the model's parameters swapped for the given tensors, however ``fn`` calls the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module, Batch], torch.Tensor], batch: Batch) -> torch.Tensor:
        return fn(self.model, batch)


@contextmanager
def functional_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and eager attention for the duration (restored after); see the module docstring."""
    was_training = model.training
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    switch = attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    model.eval()
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(attn)
        model.train(was_training)


def split_batch(batch: Batch, id_key: str | None) -> tuple[torch.Tensor | None, Batch]:
    """(ids, tensors): check that every value is a tensor with one row per example."""
    if not batch:
        raise ValueError("empty batch: pass a dict of tensors with one row per example")
    ids = None
    if id_key is not None:
        if id_key not in batch:
            raise ValueError(f"the batch has no {id_key!r} key (keys: {sorted(batch)}); add each example's "
                             "stable integer id (shards are keyed by ids), or set id_key")
        ids = torch.as_tensor(batch[id_key]).to(torch.int64).reshape(-1)
    rest = {k: v for k, v in batch.items() if k != id_key and v is not None}
    n = ids.shape[0] if ids is not None else next(iter(rest.values())).shape[0]
    for key, value in rest.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != n:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch[{key!r}] must be a tensor with {n} rows (one per example), got {shape}")
    return ids, rest


def _task_fn(task: Task, kind: Kind) -> Callable[[nn.Module, Batch], torch.Tensor]:
    if kind == "train_loss":
        return task.train_loss
    if kind == "measurement":
        return task.measurement
    raise ValueError(f"kind={kind!r}; use 'train_loss' (training side) or 'measurement' (query side)")


def per_example_grad_dict(model: nn.Module, task: Task, batch: Batch, selection: ParamSelection, *,
                          kind: Kind = "train_loss", chunk_size: int | None = None,
                          id_key: str | None = "id") -> dict[str, torch.Tensor]:
    """{parameter name: (n, *shape)} gradients of each example's ``task.<kind>`` (in the model's dtype)."""
    fn = _task_fn(task, kind)
    _, tensors = split_batch(batch, id_key)
    bound = TaskCall(model)
    selected, frozen = selection.split(model)
    frozen = {f"model.{k}": v for k, v in frozen.items()}

    def one(params: dict[str, torch.Tensor], item: Batch) -> torch.Tensor:
        single = {k: v.unsqueeze(0) for k, v in item.items()}
        out = functional_call(bound, {**{f"model.{k}": v for k, v in params.items()}, **frozen}, (fn, single))
        if out.shape != (1,):
            raise ValueError(f"task.{kind} must return one value per example, shape (n,); got shape "
                             f"{tuple(out.shape)} for a batch of one")
        return out[0]

    with functional_mode(model):
        return vmap(grad(one), in_dims=(None, 0), chunk_size=chunk_size)(selected, tensors)


def per_example_grads(model: nn.Module, task: Task, batch: Batch, selection: ParamSelection, *,
                      kind: Kind = "train_loss", projection: RandomProjection | None = None,
                      chunk_size: int | None = None, id_key: str = "id") -> PerExampleGrads:
    """(ids, float32 gradient matrix (n, p), or (n, dim) projected) for one batch."""
    ids, _ = split_batch(batch, id_key)
    grads = per_example_grad_dict(model, task, batch, selection, kind=kind, chunk_size=chunk_size, id_key=id_key)
    if projection is not None:
        if projection.selection != selection:
            raise ValueError("projection was built for a different parameter selection; build it with "
                             "RandomProjection(cfg, selection) for the selection being differentiated")
        return PerExampleGrads(ids, projection.project(grads))
    return PerExampleGrads(ids, selection.flatten(grads).float())


def compute_grads(cfg: GradConfig, model: nn.Module, task: Task, batch: Batch,
                  kind: Kind = "train_loss") -> PerExampleGrads:
    """``per_example_grads`` driven by a config, for one-off calls. It resolves the selection and builds
    the projection each time: a shard looping over batches should build both once and call
    ``per_example_grads``, so that the projection's generated matrix is cached between batches."""
    selection = select_parameters(model, cfg.params)
    projection = RandomProjection(cfg.projection, selection) if cfg.projection else None
    return per_example_grads(model, task, batch, selection, kind=kind, projection=projection,
                             chunk_size=cfg.chunk_size, id_key=cfg.id_key)


def loop_per_example_grads(model: nn.Module, task: Task, batch: Batch, selection: ParamSelection, *,
                           kind: Kind = "train_loss", id_key: str | None = "id") -> dict[str, torch.Tensor]:
    """The reference: plain autograd on the real parameters, one example at a time (slow; for tests
    and benchmarks). Same layout and dtype as ``per_example_grad_dict``."""
    fn = _task_fn(task, kind)
    _, tensors = split_batch(batch, id_key)
    n = next(iter(tensors.values())).shape[0]
    params = dict(model.named_parameters())
    targets = [params[name] for name in selection.names]
    flags = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in selection.names)
    rows: list[tuple[torch.Tensor, ...]] = []
    try:
        with functional_mode(model):
            for i in range(n):
                out = fn(model, {k: v[i:i + 1] for k, v in tensors.items()})
                gs = torch.autograd.grad(out.sum(), targets, allow_unused=True)
                rows.append(tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, targets)))
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(selection.names)}
