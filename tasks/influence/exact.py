"""Exact influence on models small enough for the full Hessian: the yardstick for the approximations.

``exact_hessian`` differentiates the mean training loss twice over the selected parameters
(``torch.func.hessian``), ``exact_influence`` solves ``(H + damping I)^-1`` directly, and
``spearman_table`` says how well an approximation's ranking agrees with it.

``LogisticProblem`` is the reference case: L2-regularised logistic regression on generated data,
fitted to its optimum by Newton's method. There the damped influence is exactly the first-order
effect of removing a point under the regularised objective J = mean L + (l2/2)||theta||^2 with
damping = l2, so leave-one-out retraining (``leave_one_out``) checks it without any approximation
of ours in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, hessian

from .grads import TaskCall, functional_mode, split_batch
from .params import ParamSelection
from .task import Batch, Task

from interpflow.tasks.types import Seed


def exact_hessian(model: nn.Module, task: Task, batch: Batch, selection: ParamSelection,
                  id_key: str | None = "id") -> torch.Tensor:
    """(p, p) Hessian of the batch's mean ``task.train_loss`` over the selected parameters, computed in the
    model's dtype (use a float64 model for a reference) and returned as float64."""
    _, batch = split_batch(batch, id_key)
    selected, frozen = selection.split(model)
    flat0 = torch.cat([selected[n].reshape(-1) for n in selection.names])
    shapes = dict(zip(selection.names, selection.shapes))
    call = TaskCall(model)
    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params = {f"model.{n}": t.reshape(shapes[n])
                  for n, t in zip(selection.names, torch.split(flat, selection.sizes))}
        params.update({f"model.{k}": v for k, v in frozen.items()})
        return functional_call(call, params, (task.train_loss, batch)).mean()

    with functional_mode(model):
        return hessian(mean_loss)(flat0).double()


def exact_influence(hessian_matrix: torch.Tensor, query_grads: torch.Tensor, train_grads: torch.Tensor,
                    damping: float) -> torch.Tensor:
    """(n,): -mean_q grad m(q)^T (H + damping I)^-1 g_i, by a direct solve (the sign of ``scores.influence``)."""
    h = hessian_matrix.double() + damping * torch.eye(hessian_matrix.shape[0], dtype=torch.float64)
    q = torch.linalg.solve(h, query_grads.double().mean(dim=0))
    return -(train_grads.double() @ q)


def spearman_table(reference: torch.Tensor, candidates: dict[str, torch.Tensor]) -> pa.Table:
    """(method, spearman) of each candidate's scores against the reference scores."""
    ref = np.asarray(reference.detach().double().cpu())
    rows = [(name, float(spearmanr(ref, np.asarray(s.detach().double().cpu())).statistic))
            for name, s in candidates.items()]
    return pa.table({"method": [r[0] for r in rows], "spearman": [r[1] for r in rows]})


# --------------------------------------------------------------------------- logistic regression

class LogisticConfig(BaseModel):
    """A generated logistic-regression problem (planted weights, Gaussian inputs with unequal scales)."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(200, ge=4, le=1_000_000, description="training examples")
    d: int = Field(12, ge=1, description="input features (the model has d weights and a bias)")
    n_query: int = Field(4, ge=1, le=100_000, description="query examples whose log-likelihood is attributed")
    l2: float = Field(1e-2, gt=0, description="L2 penalty (l2/2)||theta||^2 on the mean loss = influence damping")
    flip: float = Field(0.1, ge=0, le=0.5, description="fraction of training labels flipped (outliers to find)")
    seed: Seed = Field(0, description="seeds the data")


class LogisticTask(Task):
    """Per-example binary cross-entropy of ``model(batch['x'])`` against ``batch['y']`` (0/1)."""

    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["x"]).reshape(-1)
        return F.binary_cross_entropy_with_logits(logits, batch["y"].to(logits.dtype), reduction="none")


@dataclass
class LogisticProblem:
    cfg: LogisticConfig
    model: nn.Linear          # fitted to the optimum of the regularised objective (float64)
    train: Batch              # id, x, y
    query: Batch              # id, x, y


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def newton_fit(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 50) -> torch.Tensor:
    """theta = [w, b] minimising mean BCE + (l2/2)||theta||^2 (strictly convex: Newton converges)."""
    xd = _design(x.double())
    theta = torch.zeros(xd.shape[1], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(xd @ theta)
        g = xd.T @ (p - y.double()) / len(y) + l2 * theta
        h = (xd.T * (p * (1 - p))) @ xd / len(y) + l2 * torch.eye(len(theta), dtype=torch.float64)
        step = torch.linalg.solve(h, g)
        theta = theta - step
        if float(step.abs().max()) < 1e-13:
            break
    return theta


def _set_theta(model: nn.Linear, theta: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(theta[:-1].reshape(1, -1))
        model.bias.copy_(theta[-1:])


def make_logistic_problem(cfg: LogisticConfig) -> LogisticProblem:
    gen = torch.Generator().manual_seed(cfg.seed)
    n_all = cfg.n + cfg.n_query
    scales = torch.linspace(0.5, 2.0, cfg.d, dtype=torch.float64)
    x = torch.randn(n_all, cfg.d, generator=gen, dtype=torch.float64) * scales
    w_true = torch.randn(cfg.d, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(x @ w_true / cfg.d ** 0.5 + 0.3)
    y = (torch.rand(n_all, generator=gen, dtype=torch.float64) < p).double()
    flip = torch.rand(cfg.n, generator=gen, dtype=torch.float64) < cfg.flip
    y[:cfg.n][flip] = 1 - y[:cfg.n][flip]
    model = nn.Linear(cfg.d, 1).double()
    _set_theta(model, newton_fit(x[:cfg.n], y[:cfg.n], cfg.l2))
    train = {"id": torch.arange(cfg.n), "x": x[:cfg.n], "y": y[:cfg.n]}
    query = {"id": torch.arange(cfg.n, n_all), "x": x[cfg.n:], "y": y[cfg.n:]}
    return LogisticProblem(cfg, model, train, query)


def logistic_hessian(problem: LogisticProblem) -> torch.Tensor:
    """Closed form of the data Hessian X~^T diag(p(1-p)) X~ / n (layout: weight then bias)."""
    xd = _design(problem.train["x"].double())
    with torch.no_grad():
        p = torch.sigmoid(problem.model(problem.train["x"]).reshape(-1)).double()
    return (xd.T * (p * (1 - p))) @ xd / xd.shape[0]


def leave_one_out(problem: LogisticProblem, indices: list[int]) -> torch.Tensor:
    """Retrained effect of removing each training example, on the influence scale: -n (m(theta_-i) - m(theta))
    with m the mean query log-likelihood and the 1/n of the objective kept (so damping = l2 exactly)."""
    cfg, x, y = problem.cfg, problem.train["x"], problem.train["y"]
    qx, qy = _design(problem.query["x"].double()), problem.query["y"].double()
    theta = torch.cat([problem.model.weight.detach().reshape(-1), problem.model.bias.detach()]).double()

    def measurement(t: torch.Tensor) -> float:
        return float(-F.binary_cross_entropy_with_logits(qx @ t, qy, reduction="mean"))

    base = measurement(theta)
    out = []
    for i in indices:
        keep = torch.ones(cfg.n, dtype=torch.bool)
        keep[i] = False
        # same objective minus one term: (1/n) sum_{j != i} L_j + (l2/2)||theta||^2 == l2' = l2 * n/(n-1) on the
        # mean over n-1 points, scaled by (n-1)/n (which does not move the minimiser)
        t = newton_fit(x[keep], y[keep], cfg.l2 * cfg.n / (cfg.n - 1))
        out.append(-cfg.n * (measurement(t) - base))
    return torch.tensor(out, dtype=torch.float64)
