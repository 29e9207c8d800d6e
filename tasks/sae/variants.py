"""SAE variants with a free, unit-norm dictionary: ReLU + L1, TopK (+AuxK), BatchTopK, JumpReLU.

Each class overrides only what makes it different from ``SparseAutoencoder``: its ``activation``
and, where it has one, its penalty. The archetypal variants live in ``archetypal.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import SAEConfig, SparseAutoencoder, register


@register("relu")
class ReLUSAE(SparseAutoencoder):
    """codes = ReLU(pre); penalty l1_coeff * mean_rows sum_i z_i ||d_i|| (L1 weighted by atom norms,
    so shrinking codes by growing atoms does not pay; with unit-norm atoms it is the plain L1)."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def penalties(self, codes, aux):
        norms = self.dictionary().norm(dim=1)
        return {"l1_penalty": self.cfg.l1_coeff * (codes * norms).sum(-1).mean()}


@register("topk")
class TopKSAE(SparseAutoencoder):
    """Keep the k largest pre-activations of each row (ReLU after), zero the rest (Gao et al. 2024).

    AuxK loss: the residual e = x - x_hat (detached) is reconstructed from the ``aux_k`` largest
    pre-activations among *dead* latents (no firing for ``dead_steps`` training steps), and
    aux_coeff * ||e - e_hat||^2 / ||e - mean e||^2 is added, which gives dead latents gradient.
    """

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def penalties(self, codes, aux):
        if self.cfg.aux_coeff <= 0:
            return {}
        return {"auxk_penalty": self.cfg.aux_coeff * self.aux_loss(aux)}

    def aux_loss(self, aux: dict) -> torch.Tensor:
        pre = aux["pre"]
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or not self.training:
            return pre.new_zeros(())
        k_aux = min(self.cfg.aux_k_effective, n_dead)
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        e = (aux["x_norm"] - aux["x_hat_norm"]).detach()
        e_hat = aux_codes @ self.dictionary()
        scale = (e - e.mean(dim=0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (e_hat - e).pow(2).sum(-1).mean() / scale


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training: keep the top k * batch ReLU'd pre-activations across the whole batch (Bussmann et al.
    2024), so the batch's mean L0 is exactly k while single rows may use more or fewer latents.

    Inference (``eval()``): a global threshold theta, codes = pre * [pre > theta]. theta is an
    exponential moving average (momentum ``threshold_momentum``) of the smallest activation kept in
    each training batch, or set from data with ``estimate_threshold_(x)``; mean L0 is then about k.
    """

    threshold_momentum = 0.99

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))     # < 0: not estimated yet

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            codes, kept_min = self._batch_topk(pre)
            if kept_min is not None:
                with torch.no_grad():
                    if self.threshold < 0:
                        self.threshold.fill_(kept_min)
                    else:
                        m = self.threshold_momentum
                        self.threshold.mul_(m).add_((1 - m) * kept_min)
            return codes
        if self.threshold < 0:
            raise RuntimeError("BatchTopK inference threshold is not estimated yet; train the SAE first "
                               "or call estimate_threshold_(x) on representative rows")
        return pre * (pre > self.threshold)

    def _batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        flat = torch.relu(pre).reshape(-1)
        n_keep = min(self.cfg.k * (flat.numel() // pre.shape[-1]), flat.numel())
        vals, idx = flat.topk(n_keep)
        codes = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        positive = vals.detach()[vals.detach() > 0]
        return codes, (positive.min() if positive.numel() else None)

    @torch.no_grad()
    def estimate_threshold_(self, x: torch.Tensor) -> float:
        """Set theta to the smallest activation batch-top-k keeps on raw rows x (all at once)."""
        self.check_input(x)
        _, kept_min = self._batch_topk(self.pre_activations(x * self.input_scale))
        if kept_min is None:
            raise ValueError("estimate_threshold_: no positive pre-activation on these rows")
        self.threshold.fill_(kept_min)
        return float(kept_min)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta), d/dtheta = -(theta / eps) * K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((z - theta).abs() < eps / 2).to(g.dtype) / eps          # rectangle kernel K(u)/eps
        g_z = g * (z > theta).to(g.dtype)
        g_theta = (-theta * kernel * g).sum_to_size(theta.shape)
        return g_z, g_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta); d/dz = 0, d/dtheta = -(1 / eps) * K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((z - theta).abs() < eps / 2).to(g.dtype) / eps
        return torch.zeros_like(z), (-kernel * g).sum_to_size(theta.shape), None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """codes = pre * [pre > theta_i] with a learned per-latent theta = exp(log_threshold)
    (Rajamanoharan et al. 2024). Penalty: l0_coeff * mean_rows #{i: pre_i > theta_i}. The step has no
    gradient, so theta is trained with straight-through estimators: a rectangle kernel of width
    ``jumprelu_bandwidth`` around the threshold (see ``_JumpReLU`` and ``_Step``). log_threshold trains
    at 10x the learning rate: Adam moves it ~lr per step and thresholds must travel to the scale of
    real activations (about 1 in normalised units) within a short run."""

    lr_scale = {"log_threshold": 10.0}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_latents,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def penalties(self, codes, aux):
        l0 = _Step.apply(aux["pre"], self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return {"l0_penalty": self.cfg.l0_coeff * l0}
