"""Representation noising (RepNoise-style, simplified): harmful-compliance representations at the shaped
layers are pushed towards Gaussian noise of the same scale (an MSE to a fixed random target per step),
and the compliance itself is made unlikely by bounded gradient ascent (its loss is capped at ``ascent_cap``
so that it cannot run away), beside the shared retain loss."""

from __future__ import annotations

import torch
from pydantic import Field

from interpflow.tasks.tamper.defenses.base import Defense, hidden, lm_loss


class RepNoiseDefense(Defense):
    name = "repnoise"
    noise_weight: float = Field(1.0, ge=0)
    ascent_weight: float = Field(0.1, ge=0)
    ascent_cap: float = Field(5.0, gt=0, description="compliance loss above this gives no more gradient")

    def extra_loss(self, model, reference, batch) -> torch.Tensor:
        h = hidden(model, batch["comply"], self._layers)
        noise = torch.randn_like(h) * h.detach().std()
        ascent = -torch.clamp(lm_loss(model, batch["comply"]), max=self.ascent_cap)
        return self.noise_weight * torch.nn.functional.mse_loss(h, noise) / h.detach().var().clamp(min=1e-6) \
            + self.ascent_weight * ascent
