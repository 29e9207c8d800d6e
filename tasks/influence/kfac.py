"""K-FAC statistics for linear layers: the layers, A and S covariances, their eigenbases, EK-FAC's
eigenvalue-correction sums. ``precondition.py`` turns them into preconditioners.

For a linear layer y = W a (nn.Linear, or GPT-2's Conv1D with W stored transposed) an example's weight
gradient is G = sum_t d_t a_t^T (d_t: gradient of its loss w.r.t. y_t). K-FAC approximates
E[vec G vec G^T] by S (x) A with

    A = mean over real tokens of a a^T      (a with a 1 appended when the layer's bias is selected)
    S = mean over examples of sum_t d d^T   (so that S (x) A has the scale of T tokens' gradients)

and EK-FAC keeps K-FAC's eigenbasis Q_S (x) Q_A but refits the eigenvalues to E[(Q_S^T G Q_A)^2] from
per-example gradients. Every statistic is a sum with a count (``+`` adds shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .grads import TaskCall, functional_mode, split_batch
from .params import ParamSelection
from .task import Batch, Task


@dataclass(frozen=True)
class KronLayer:
    """One linear layer seen by K-FAC: gradients as (d_out, d_in [+1 for the bias column])."""

    module: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    transposed: bool          # GPT-2 Conv1D stores its weight as (d_in, d_out)

    @property
    def width(self) -> int:
        return self.d_in + (self.bias is not None)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def kronecker_layers(model: nn.Module, selection: ParamSelection) -> tuple[KronLayer, ...]:
    """The linear layers behind ``selection``; ValueError names any parameter K-FAC cannot take."""
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, str]] = {}
    bad = []
    for name in selection.names:
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if attr in ("weight", "bias") and (isinstance(module, nn.Linear) or _is_conv1d(module)):
            by_module.setdefault(path, {})[attr] = name
        else:
            bad.append(f"{name} ({type(module).__name__ if module is not None else 'no module'})")
    orphans = [parts["bias"] for parts in by_module.values() if "weight" not in parts]
    if bad or orphans:
        raise ValueError("kfac/ekfac: every selected parameter must be the weight of an nn.Linear or GPT-2 Conv1D "
                         "(or its bias, selected with the weight); cannot take "
                         f"{', '.join(bad + [f'{o} (bias without its weight)' for o in orphans])}. Narrow params "
                         "to linear layers (e.g. 'transformer.h.*.mlp.c_fc.weight') or use strategy=diagonal")
    layers = []
    for path, parts in by_module.items():
        w = modules[path].weight
        transposed = _is_conv1d(modules[path])
        d_in, d_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        layers.append(KronLayer(path, parts["weight"], parts.get("bias"), int(d_in), int(d_out), transposed))
    return tuple(layers)


@dataclass
class CovarianceStats:
    """Per layer: sum of a a^T over real tokens and that token count; sum of d d^T over every token
    and the number of examples."""

    a_sum: dict[str, torch.Tensor]
    a_count: dict[str, float]
    s_sum: dict[str, torch.Tensor]
    examples: int

    def __add__(self, other: CovarianceStats) -> CovarianceStats:
        return CovarianceStats({k: v + other.a_sum[k] for k, v in self.a_sum.items()},
                               {k: v + other.a_count[k] for k, v in self.a_count.items()},
                               {k: v + other.s_sum[k] for k, v in self.s_sum.items()},
                               self.examples + other.examples)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"examples": torch.tensor(self.examples)}
        for k in self.a_sum:
            out.update({f"a_sum.{k}": self.a_sum[k], f"a_count.{k}": torch.tensor(self.a_count[k]),
                        f"s_sum.{k}": self.s_sum[k]})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> CovarianceStats:
        names = [k[len("a_sum."):] for k in t if k.startswith("a_sum.")]
        return cls({k: t[f"a_sum.{k}"] for k in names}, {k: float(t[f"a_count.{k}"]) for k in names},
                   {k: t[f"s_sum.{k}"] for k in names}, int(t["examples"]))


def covariance_stats(model: nn.Module, task: Task, batch: Batch, layers: tuple[KronLayer, ...],
                     id_key: str | None = "id") -> CovarianceStats:
    """K-FAC's A and S sums for one batch: one batched forward/backward of the summed train loss,
    with hooks on the layers (padding tokens, per ``task.attention_mask``, are left out of A)."""
    _, tensors = split_batch(batch, id_key)
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {l.module: [] for l in layers}
    handles = [modules[l.module].register_forward_hook(
        lambda mod, args, out, path=l.module: seen[path].append((args[0], out))) for l in layers]
    bound = TaskCall(model)
    leaves = {l.weight for l in layers}
    params = {f"model.{k}": (v.detach().requires_grad_() if k in leaves else v.detach())
              for k, v in model.named_parameters()}
    params.update({f"model.{k}": b for k, b in model.named_buffers()})
    try:
        with functional_mode(model), torch.enable_grad():
            total = functional_call(bound, params, (task.train_loss, tensors)).sum()
            outputs = [out for l in layers for _, out in seen[l.module]]
            deltas = iter(torch.autograd.grad(total, outputs, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    mask = task.attention_mask(tensors)
    n = next(iter(tensors.values())).shape[0]
    stats = CovarianceStats({}, {}, {}, n)
    for layer in layers:
        a_sum = s_sum = 0.0
        count = 0.0
        for a, out in seen[layer.module]:
            d = next(deltas)
            d = torch.zeros_like(out) if d is None else d
            a = a.detach().double()
            if layer.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            keep = _token_weights(mask, a)
            a2 = a.reshape(-1, layer.width)
            a_sum += (a2 * keep[:, None]).T @ a2
            count += float(keep.sum())
            d2 = d.detach().double().reshape(-1, layer.d_out)
            s_sum += d2.T @ d2
        if not seen[layer.module]:
            raise ValueError(f"kfac: layer {layer.module!r} did not run in the task's forward pass; "
                             "select parameters of layers the train loss uses")
        stats.a_sum[layer.module], stats.a_count[layer.module] = a_sum.cpu(), count
        stats.s_sum[layer.module] = s_sum.cpu()
    return stats


def _token_weights(mask: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """1 for each row of ``a`` flattened to (rows, width) that is a real token, 0 for padding."""
    rows = a.reshape(-1, a.shape[-1]).shape[0]
    if mask is None or a.ndim != 3 or tuple(mask.shape) != tuple(a.shape[:2]):
        return torch.ones(rows, dtype=a.dtype, device=a.device)
    return mask.reshape(-1).to(a.dtype)


@dataclass
class KroneckerBasis:
    """Eigendecompositions of each layer's A = Q_A diag(la) Q_A^T and S = Q_S diag(ls) Q_S^T."""

    layers: tuple[KronLayer, ...]
    qa: dict[str, torch.Tensor]
    la: dict[str, torch.Tensor]
    qs: dict[str, torch.Tensor]
    ls: dict[str, torch.Tensor]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{k}": v.contiguous() for part in ("qa", "la", "qs", "ls")
                for k, v in getattr(self, part).items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], layers: tuple[KronLayer, ...]) -> KroneckerBasis:
        return cls(layers, *({l.module: t[f"{part}.{l.module}"] for l in layers} for part in ("qa", "la", "qs", "ls")))


def eigendecompose(stats: CovarianceStats, layers: tuple[KronLayer, ...]) -> KroneckerBasis:
    """A = a_sum / tokens, S = s_sum / examples, each eigendecomposed in float64."""
    basis = KroneckerBasis(layers, {}, {}, {}, {})
    for layer in layers:
        k = layer.module
        if stats.a_count[k] <= 0 or stats.examples <= 0:
            raise ValueError(f"kfac: no tokens reached layer {k!r}; fit on a non-empty batch")
        la, qa = torch.linalg.eigh(stats.a_sum[k].double() / stats.a_count[k])
        ls, qs = torch.linalg.eigh(stats.s_sum[k].double() / stats.examples)
        basis.qa[k], basis.la[k] = qa, la.clamp_min(0)
        basis.qs[k], basis.ls[k] = qs, ls.clamp_min(0)
    return basis


def layer_matrices(layer: KronLayer, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, d_out, width): the layer's per-example weight gradient as (out, in), bias as last column."""
    w = grads[layer.weight]
    w = w.transpose(1, 2) if layer.transposed else w
    if layer.bias is not None:
        w = torch.cat([w, grads[layer.bias].unsqueeze(-1)], dim=-1)
    return w


def scatter_layer(layer: KronLayer, mats: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    w = mats[..., :layer.d_in]
    out[layer.weight] = w.transpose(1, 2) if layer.transposed else w
    if layer.bias is not None:
        out[layer.bias] = mats[..., layer.d_in]


@dataclass
class LambdaStats:
    """EK-FAC: per layer, the sum over examples of (Q_S^T G Q_A)^2 (d_out, width), and the count."""

    sum_sq: dict[str, torch.Tensor]
    count: int

    def __add__(self, other: LambdaStats) -> LambdaStats:
        return LambdaStats({k: v + other.sum_sq[k] for k, v in self.sum_sq.items()}, self.count + other.count)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self.count), **{f"sum_sq.{k}": v for k, v in self.sum_sq.items()}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LambdaStats:
        return cls({k[len("sum_sq."):]: v for k, v in t.items() if k.startswith("sum_sq.")}, int(t["count"]))


def check_unprojected(grads: torch.Tensor, selection: ParamSelection, what: str) -> None:
    if grads.ndim != 2 or grads.shape[1] != selection.numel:
        raise ValueError(f"{what}: needs unprojected per-example gradients of width {selection.numel} (the selected "
                         f"parameters), got shape {tuple(grads.shape)}; compute them without a projection "
                         "(K-FAC lives in parameter space), or use strategy=diagonal/identity on projected gradients")


def lambda_stats(basis: KroneckerBasis, grads: torch.Tensor, selection: ParamSelection) -> LambdaStats:
    """EK-FAC's eigenvalue-correction sums for per-example gradients (n, p) in ``selection``'s layout.

    The rotation runs in the gradients' own precision (float32 as stored; float64 stays float64) and the
    sums accumulate in float64: measured (``benchmarks/influence_scale.py``) float32 rotation is 2.2x
    faster than float64 and moves EK-FAC scores by 3e-8 relative (Spearman 1.0), so float64 bought nothing."""
    check_unprojected(grads, selection, "ekfac lambda_stats")
    dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    per_param = selection.unflatten(grads.to(dtype))
    out = {}
    for layer in basis.layers:
        k = layer.module
        g = layer_matrices(layer, per_param)
        rotated = basis.qs[k].T.to(g) @ g @ basis.qa[k].to(g)
        out[k] = rotated.pow(2).sum(dim=0, dtype=torch.float64).cpu()
    return LambdaStats(out, int(grads.shape[0]))
