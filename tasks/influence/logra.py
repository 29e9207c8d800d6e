"""LoGra: low-rank projected per-example gradients of linear layers, without the full gradient.

For a linear layer y = W a an example's weight gradient is G = sum_t d_t a_t^T (d_t: the gradient of
its loss w.r.t. y_t). LoGra (Choe et al. 2024, "What is Your Data Worth to GPT?") projects each side
with its own small Gaussian matrix, P_in (r_in, d_in) and P_out (r_out, d_out):

    P_out G P_in^T = sum_t (P_out d_t)(P_in a_t)^T          an (r_out, r_in) matrix per example

which equals ``(P_out (x) P_in) vec(G)`` (row-major vec) but is built from the hooked activations and
output gradients of one batched forward/backward, so the (d_out, d_in) gradient of an example is never
formed: the cost is the backward pass plus O(T (d_in r_in + d_out r_out + r_in r_out)) per example,
where a dense projection (``projection.py``) first materialises the whole per-example gradient.

The matrices are a pure function of ``(seed, layer, side, width, rank)`` (a sha256 seeds a CPU
``torch.Generator``, as ``projection.py`` does), so every shard, process and run uses the same ones.
Entries are N(0, 1/r), so the Kronecker product preserves squared norms in expectation.

The projected space is again a set of "linear layers": layer ``m`` becomes an (r_out, r_in) matrix
named ``<m>.logra`` whose activations are P_in a and whose output gradients are P_out d. ``space``
and ``space_layers`` describe it in the package's usual layout, so K-FAC / EK-FAC / diagonal / identity
preconditioning (``kfac.py``, ``precondition.py``) run unchanged in the projected space, from
covariances this module collects in the same pass as the gradients.
"""

from __future__ import annotations

import hashlib
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from interpflow.tasks.types import Seed

from .grads import Kind, PerExampleGrads, TaskCall, _task_fn, functional_mode, split_batch
from .kfac import CovarianceStats, KronLayer, _token_weights, kronecker_layers, layer_matrices
from .params import ParamSelection
from .task import Batch, Task


class LograConfig(BaseModel):
    """Ranks of the two projections of every selected linear layer, and their seed."""

    model_config = ConfigDict(extra="forbid")
    rank_in: int = Field(32, ge=1, description="rows of P_in: projected input-activation width (at most each "
                                               "layer's input width, +1 with its bias)")
    rank_out: int = Field(32, ge=1, description="rows of P_out: projected output-gradient width (at most each "
                                                "layer's output width)")
    seed: Seed = Field(0, description="seeds every layer's two matrices with the layer's name and shape")


def matrix_seed(seed: int, module: str, side: str, width: int, rank: int) -> int:
    key = f"interpflow.influence.logra|{seed}|{module}|{side}|{width}|{rank}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class LograProjection:
    """The two projections of each linear layer behind ``selection``, and the projected space."""

    def __init__(self, cfg: LograConfig, model: nn.Module, selection: ParamSelection, field: str = "gradients"):
        self.cfg, self.selection = cfg, selection
        try:
            self.layers = kronecker_layers(model, selection)
        except ValueError as exc:
            cannot = str(exc).split("cannot take ", 1)[-1].split(". Narrow", 1)[0]
            raise ValueError(f"{field}.method=logra projects nn.Linear / GPT-2 Conv1D layers only, and {field}.params "
                             f"selects {cannot}; narrow {field}.params to linear weights (e.g. "
                             f"'transformer.h.*.mlp.c_fc.weight') or use {field}.method=full") from None
        if not self.layers:
            raise ValueError(f"{field}.method=logra: {field}.params selects no linear/Conv1D layer of "
                             f"{type(model).__name__}; select nn.Linear or Conv1D weights, or use method=full")
        for layer in self.layers:
            if cfg.rank_in > layer.width:
                raise ValueError(f"{field}.logra.rank_in={cfg.rank_in} is larger than the input width {layer.width} "
                                 f"of layer {layer.module!r}; use rank_in <= {min(l.width for l in self.layers)} "
                                 f"(the narrowest selected layer) or narrow {field}.params")
            if cfg.rank_out > layer.d_out:
                raise ValueError(f"{field}.logra.rank_out={cfg.rank_out} is larger than the output width "
                                 f"{layer.d_out} of layer {layer.module!r}; use rank_out <= "
                                 f"{min(l.d_out for l in self.layers)} or narrow {field}.params")
        self.space_layers = tuple(KronLayer(l.module, f"{l.module}.logra", None, cfg.rank_in, cfg.rank_out, False)
                                  for l in self.layers)
        self.space = ParamSelection(tuple(l.weight for l in self.space_layers),
                                    tuple((cfg.rank_out, cfg.rank_in) for _ in self.layers))
        self._mats: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def dim(self) -> int:
        """Width of a projected per-example gradient (sum over layers of r_out * r_in)."""
        return self.space.numel

    def _matrix(self, module: str, side: str, width: int, rank: int) -> torch.Tensor:
        key = (module, side)
        if key not in self._mats:
            gen = torch.Generator(device="cpu").manual_seed(matrix_seed(self.cfg.seed, module, side, width, rank))
            self._mats[key] = torch.randn(rank, width, generator=gen, dtype=torch.float64) / math.sqrt(rank)
        return self._mats[key]

    def p_in(self, layer: KronLayer) -> torch.Tensor:
        """(r_in, width) float64; a selected bias is the last input column (an activation of 1)."""
        return self._matrix(layer.module, "in", layer.width, self.cfg.rank_in)

    def p_out(self, layer: KronLayer) -> torch.Tensor:
        """(r_out, d_out) float64."""
        return self._matrix(layer.module, "out", layer.d_out, self.cfg.rank_out)

    def kronecker(self, layer: KronLayer) -> torch.Tensor:
        """P_out (x) P_in: what LoGra equals on a row-major vec of the (d_out, width) gradient (tests)."""
        return torch.kron(self.p_out(layer), self.p_in(layer))

    def project_full(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Brute force, for reference: {parameter: (n, *shape)} full gradients -> (n, dim) float32."""
        parts = []
        for layer in self.layers:
            g = layer_matrices(layer, grads).double()
            p_in, p_out = self.p_in(layer).to(g.device), self.p_out(layer).to(g.device)
            parts.append((p_out @ g @ p_in.T).reshape(g.shape[0], -1))
        return torch.cat(parts, dim=1).float()

    def grads(self, model: nn.Module, task: Task, batch: Batch, *, kind: Kind = "train_loss",
              id_key: str = "id", covariance: bool = False) -> tuple[PerExampleGrads, CovarianceStats | None]:
        """Projected per-example gradients of ``task.<kind>`` (n, dim) float32 for one batch, and with
        ``covariance`` K-FAC's A/S sums in the projected space from the same pass.

        One batched forward/backward of the summed per-example losses: examples do not interact in the
        forward pass (eval mode; padding masked), so the output gradient at example i's tokens is that of
        example i's own loss. A layer the measurement does not reach (a concept site before it)
        contributes zeros; a layer the training loss does not reach is an error.
        """
        fn = _task_fn(task, kind)
        ids, tensors = split_batch(batch, id_key)
        modules = dict(model.named_modules())
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {l.module: [] for l in self.layers}
        handles = [modules[l.module].register_forward_hook(
            lambda mod, args, out, path=l.module: seen[path].append((args[0], out))) for l in self.layers]
        leaves = {l.weight for l in self.layers}
        params = {f"model.{k}": (v.detach().requires_grad_() if k in leaves else v.detach())
                  for k, v in model.named_parameters()}
        params.update({f"model.{k}": b for k, b in model.named_buffers()})
        try:
            with functional_mode(model), torch.enable_grad():
                values = functional_call(TaskCall(model), params, (fn, tensors))
                if values.ndim != 1:
                    raise ValueError(f"task.{kind} must return one value per example, shape (n,); got "
                                     f"{tuple(values.shape)}")
                outputs = [out for l in self.layers for _, out in seen[l.module]]
                deltas = iter(torch.autograd.grad(values.sum(), outputs, allow_unused=True) if outputs else ())
        finally:
            for h in handles:
                h.remove()
        n = values.shape[0]
        mask = task.attention_mask(tensors) if covariance else None
        stats = CovarianceStats({}, {}, {}, n) if covariance else None
        parts = []
        for layer in self.layers:
            p_in, p_out = self.p_in(layer), self.p_out(layer)
            g = torch.zeros(n, self.cfg.rank_out, self.cfg.rank_in, dtype=torch.float64, device=values.device)
            if not seen[layer.module] and kind == "train_loss":
                raise ValueError(f"logra: layer {layer.module!r} did not run in the task's forward pass; "
                                 "select parameters of layers the train loss uses")
            a_sum = torch.zeros(self.cfg.rank_in, self.cfg.rank_in, dtype=torch.float64)
            s_sum = torch.zeros(self.cfg.rank_out, self.cfg.rank_out, dtype=torch.float64)
            count = 0.0
            for a, out in seen[layer.module]:
                d = next(deltas)
                d = torch.zeros_like(out) if d is None else d
                a = a.detach().double()
                if layer.bias is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                pa = (a @ p_in.T.to(a.device)).reshape(n, -1, self.cfg.rank_in)       # (n, T, r_in)
                pd = (d.detach().double() @ p_out.T.to(a.device)).reshape(n, -1, self.cfg.rank_out)
                g += torch.einsum("nto,nti->noi", pd, pa)
                if covariance:
                    keep = _token_weights(mask, a)
                    pa2, pd2 = pa.reshape(-1, self.cfg.rank_in), pd.reshape(-1, self.cfg.rank_out)
                    a_sum += ((pa2 * keep[:, None]).T @ pa2).cpu()
                    s_sum += (pd2.T @ pd2).cpu()
                    count += float(keep.sum())
            parts.append(g.reshape(n, -1))
            if covariance:
                stats.a_sum[layer.module], stats.a_count[layer.module] = a_sum, count
                stats.s_sum[layer.module] = s_sum
        return PerExampleGrads(ids, torch.cat(parts, dim=1).float().cpu()), stats


def fit_projected(cfg, projection: LograProjection, model: nn.Module, task: Task, batches: list[Batch], *,
                  id_key: str = "id"):
    """A preconditioner of ``cfg.strategy`` in LoGra's projected space, from in-memory batches (the
    single-process version of the workflow's passes): one pass gives projected gradients and projected
    covariances together; EK-FAC's eigenvalues come from those gradients, with no second model pass."""
    from .kfac import eigendecompose, lambda_stats
    from .precondition import DiagonalStats, KroneckerStats, fit, sum_stats

    if cfg.strategy == "identity":
        return fit(cfg)
    passes = [projection.grads(model, task, b, id_key=id_key, covariance=True) for b in batches]
    if not passes:
        raise ValueError("fit_projected: no batches; pass at least one training batch")
    if cfg.strategy == "diagonal":
        return fit(cfg, sum_stats(DiagonalStats.of(g.grads) for g, _ in passes))
    stats = KroneckerStats(projection.space, eigendecompose(sum_stats(c for _, c in passes), projection.space_layers))
    if cfg.strategy == "ekfac":
        stats.lambdas = sum_stats(lambda_stats(stats.basis, g.grads, projection.space) for g, _ in passes)
    return fit(cfg, stats)
