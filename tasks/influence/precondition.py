"""Preconditioners: what an influence score puts between the query and training gradients.

A score is ``-grad m(q)^T P^-1 grad L(z)``; P approximates the curvature (Fisher / Gauss-Newton) of
the mean training loss. Strategies are swappable by name, as in kronfluence:

    identity  P = I: plain gradient dot products (TracIn-style). No statistics.
    diagonal  P = diag(E[g^2]) + damping. Statistics: ``DiagonalStats`` of per-example gradients
              (projected or not: with a projection it is the diagonal of the projected Fisher).
    kfac      per linear layer, P = S (x) A: input-activation and output-gradient covariances
              (``kfac.py``). Statistics: ``CovarianceStats`` -> ``eigendecompose`` -> ``KroneckerBasis``.
    ekfac     K-FAC's eigenbasis with eigenvalues refitted to per-example gradients (George et al.
              2018): the best diagonal in that basis, so never a worse fit than K-FAC.
              Statistics: the basis + ``LambdaStats``.

Every statistic is a *sum with a count*: a sharded node computes one per shard and a reduce node adds
them (``a + b`` or ``sum_stats``), independent of how examples were split. Each has ``to_tensors`` /
``from_tensors`` for safetensors. The K-FAC basis is an artifact of its own: EK-FAC's second pass must
rotate by the very eigenvectors that will be used (recomputing ``eigh`` elsewhere could rotate within
a degenerate eigenspace), so ship the basis to the shards rather than the covariances.

Damping: ``damping`` x mean eigenvalue (per layer for kfac/ekfac; over all coordinates for diagonal),
or ``absolute_damping`` as given. The Fisher is the *empirical* one (gradients of the task's train
loss at the observed labels); for a well-specified model at its optimum it matches the true Fisher /
Gauss-Newton in expectation.

K-FAC/EK-FAC restrictions: every selected parameter must be the weight of an ``nn.Linear`` or GPT-2
``Conv1D`` (or its bias, selected together with the weight); select those layers only, e.g.
``transformer.h.*.mlp.c_fc.weight``. They need unprojected gradients (the Kronecker structure lives in
parameter space). With a random projection, precondition the few query gradients unprojected and
project afterwards (``scores.influence(..., projection=...)``); training gradients stay projected.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .grads import per_example_grad_dict
from .kfac import (
    KroneckerBasis, LambdaStats, check_unprojected, scatter_layer, covariance_stats, eigendecompose,
    kronecker_layers, lambda_stats, layer_matrices,
)
from .params import ParamSelection
from .task import Batch, Task

Strategy = Literal["identity", "diagonal", "kfac", "ekfac"]

# Which statistics passes a strategy needs, in order (what a workflow schedules before ``fit``):
# "grads": DiagonalStats of per-example gradients; "covariance": CovarianceStats, then eigendecompose;
# "lambda": LambdaStats in the basis from the previous pass.
STAGES: dict[str, tuple[str, ...]] = {"identity": (), "diagonal": ("grads",), "kfac": ("covariance",),
                                      "ekfac": ("covariance", "lambda")}


class PreconditionerConfig(BaseModel):
    """Which curvature approximation, and how much damping."""

    model_config = ConfigDict(extra="forbid")
    strategy: Strategy = Field("ekfac", description="identity, diagonal, kfac or ekfac (see precondition.py)")
    damping: float = Field(0.1, ge=0, description="damping as a multiple of the mean eigenvalue (per layer for "
                                                   "kfac/ekfac, over all coordinates for diagonal)")
    absolute_damping: float | None = Field(None, ge=0, description="damping added as given; overrides damping")

    def damping_for(self, eigenvalues: torch.Tensor) -> float:
        if self.absolute_damping is not None:
            return float(self.absolute_damping)
        return self.damping * float(eigenvalues.mean())


# --------------------------------------------------------------------------------- statistics

@dataclass
class DiagonalStats:
    """Sum of squared per-example gradients (p,) and how many examples were summed."""

    sum_sq: torch.Tensor
    count: int

    @classmethod
    def of(cls, grads: torch.Tensor) -> DiagonalStats:
        return cls(grads.double().pow(2).sum(dim=0), int(grads.shape[0]))

    def __add__(self, other: DiagonalStats) -> DiagonalStats:
        return DiagonalStats(self.sum_sq + other.sum_sq.to(self.sum_sq.device), self.count + other.count)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"sum_sq": self.sum_sq, "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> DiagonalStats:
        return cls(t["sum_sq"], int(t["count"]))


def sum_stats(parts: Iterable[Any]) -> Any:
    """Add per-shard statistics of one kind (DiagonalStats, CovarianceStats or LambdaStats)."""
    parts = list(parts)
    if not parts:
        raise ValueError("sum_stats: no statistics to add; every shard produced nothing")
    return functools.reduce(lambda a, b: a + b, parts)


# ----------------------------------------------------------------------------- preconditioners

class Preconditioner(ABC):
    """Applies P^-1 (damped) to gradients in the layout they were fitted on."""

    strategy: str = "base"

    @abstractmethod
    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """(n, p) -> (n, p): each row multiplied by the damped inverse curvature."""


class IdentityPreconditioner(Preconditioner):
    strategy = "identity"

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        return grads


class DiagonalPreconditioner(Preconditioner):
    strategy = "diagonal"

    def __init__(self, fisher_diag: torch.Tensor, damping: float):
        self.fisher_diag, self.damping = fisher_diag, damping
        self.inverse = 1.0 / (fisher_diag + damping)

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.inverse.shape[0]:
            raise ValueError(f"diagonal preconditioner was fitted on width {self.inverse.shape[0]} but got "
                             f"gradients of width {grads.shape[-1]}; fit and apply it on the same layout "
                             "(both projected with the same projection, or both unprojected)")
        return (grads.double() * self.inverse.to(grads.device)).to(grads.dtype)


class KroneckerPreconditioner(Preconditioner):
    """K-FAC or EK-FAC: rotate each layer's gradient into the Kronecker eigenbasis, divide by
    (eigenvalue + damping), rotate back."""

    def __init__(self, strategy: str, selection: ParamSelection, basis: KroneckerBasis,
                 eigenvalues: dict[str, torch.Tensor], damping: dict[str, float]):
        self.strategy, self.selection, self.basis = strategy, selection, basis
        self.eigenvalues, self.damping = eigenvalues, damping

    def _map(self, grads: torch.Tensor, scale: Callable[[str], torch.Tensor]) -> torch.Tensor:
        check_unprojected(grads, self.selection, self.strategy)
        per_param = self.selection.unflatten(grads.double())
        out: dict[str, torch.Tensor] = {}
        for layer in self.basis.layers:
            k = layer.module
            qs, qa = self.basis.qs[k].to(grads.device), self.basis.qa[k].to(grads.device)
            rotated = qs.T @ layer_matrices(layer, per_param) @ qa
            scatter_layer(layer, qs @ (rotated * scale(k).to(grads.device)) @ qa.T, out)
        return self.selection.flatten(out).to(grads.dtype)

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        return self._map(grads, lambda k: 1.0 / (self.eigenvalues[k] + self.damping[k]))

    def curvature(self, vectors: torch.Tensor) -> torch.Tensor:
        """The undamped approximation itself applied to rows of ``vectors`` (for diagnostics/tests)."""
        return self._map(vectors, lambda k: self.eigenvalues[k])

    def dense(self) -> torch.Tensor:
        """The (p, p) approximate curvature matrix (small problems only)."""
        return self.curvature(torch.eye(self.selection.numel, dtype=torch.float64))


@dataclass
class KroneckerStats:
    """What kfac (basis) and ekfac (basis + lambdas) are fitted from."""

    selection: ParamSelection
    basis: KroneckerBasis
    lambdas: LambdaStats | None = None


FITTERS: dict[str, Callable[[PreconditionerConfig, Any], Preconditioner]] = {}


def register(name: str):
    """Make ``fit`` build strategy ``name`` with ``fn(cfg, stats) -> Preconditioner``."""
    def deco(fn):
        FITTERS[name] = fn
        return fn
    return deco


@register("identity")
def _fit_identity(cfg: PreconditionerConfig, stats: Any) -> Preconditioner:
    return IdentityPreconditioner()


@register("diagonal")
def _fit_diagonal(cfg: PreconditionerConfig, stats: DiagonalStats) -> Preconditioner:
    if not isinstance(stats, DiagonalStats) or stats.count <= 0:
        raise ValueError("diagonal: fit needs DiagonalStats of at least one example (DiagonalStats.of(grads))")
    fisher = stats.sum_sq / stats.count
    return DiagonalPreconditioner(fisher, cfg.damping_for(fisher))


def _kronecker_stats(cfg: PreconditionerConfig, stats: Any) -> KroneckerStats:
    if not isinstance(stats, KroneckerStats):
        raise ValueError(f"{cfg.strategy}: fit needs KroneckerStats(selection, basis, lambdas) "
                         f"(from covariance_stats -> eigendecompose [-> lambda_stats]), got {type(stats).__name__}")
    return stats


@register("kfac")
def _fit_kfac(cfg: PreconditionerConfig, stats: KroneckerStats) -> Preconditioner:
    stats = _kronecker_stats(cfg, stats)
    b = stats.basis
    eig = {l.module: torch.outer(b.ls[l.module], b.la[l.module]) for l in b.layers}
    return KroneckerPreconditioner("kfac", stats.selection, b, eig, {k: cfg.damping_for(v) for k, v in eig.items()})


@register("ekfac")
def _fit_ekfac(cfg: PreconditionerConfig, stats: KroneckerStats) -> Preconditioner:
    stats = _kronecker_stats(cfg, stats)
    if stats.lambdas is None or stats.lambdas.count <= 0:
        raise ValueError("ekfac: fit needs KroneckerStats.lambdas (lambda_stats over per-example gradients, "
                         "rotated by this basis); use strategy=kfac to skip the eigenvalue correction")
    eig = {k: v / stats.lambdas.count for k, v in stats.lambdas.sum_sq.items()}
    return KroneckerPreconditioner("ekfac", stats.selection, stats.basis, eig,
                                   {k: cfg.damping_for(v) for k, v in eig.items()})


def fit(cfg: PreconditionerConfig, stats: Any = None) -> Preconditioner:
    """Build the preconditioner ``cfg.strategy`` from its (already summed) statistics."""
    if cfg.strategy not in FITTERS:
        raise ValueError(f"strategy={cfg.strategy!r} is not registered; known: {sorted(FITTERS)}")
    return FITTERS[cfg.strategy](cfg, stats)


def fit_on_batches(cfg: PreconditionerConfig, model: nn.Module, task: Task, batches: list[Batch],
                   selection: ParamSelection, *, chunk_size: int | None = None,
                   id_key: str | None = "id") -> Preconditioner:
    """Every statistics pass of ``cfg.strategy`` over in-memory batches, then ``fit``: the single-process
    version of what a sharded workflow does stage by stage (``STAGES``)."""
    def grads_of(batch: Batch) -> torch.Tensor:
        grads = per_example_grad_dict(model, task, batch, selection, chunk_size=chunk_size, id_key=id_key)
        return selection.flatten(grads)

    if cfg.strategy == "identity":
        return fit(cfg)
    if cfg.strategy == "diagonal":
        return fit(cfg, sum_stats(DiagonalStats.of(grads_of(b)) for b in batches))
    layers = kronecker_layers(model, selection)
    cov = sum_stats(covariance_stats(model, task, b, layers, id_key=id_key) for b in batches)
    stats = KroneckerStats(selection, eigendecompose(cov, layers))
    if cfg.strategy == "ekfac":
        stats.lambdas = sum_stats(lambda_stats(stats.basis, grads_of(b), selection) for b in batches)
    return fit(cfg, stats)
