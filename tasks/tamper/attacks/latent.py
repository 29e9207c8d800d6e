"""The latent-space attack: one vector delta added to the residual stream after block ``layer`` at every
position, with ||delta|| <= epsilon x (the mean residual norm there), optimised by projected gradient
descent so that the model continues training-pair harmful requests with the compliance answer.
Inference adds delta through the site map's hooks; the weights are untouched."""

from __future__ import annotations

import torch
from pydantic import Field

from interpflow.tasks.tamper.attacks.base import Attack, Tampered
from interpflow.tasks.tamper.generation import Tampering, completion_loss, prompt_batch


class LatentAttack(Attack):
    name = "latent_attack"
    modifies_weights = False
    layer: int = Field(1, ge=0, description="block whose output is perturbed")
    epsilon: float = Field(1.0, gt=0, description="bound on ||delta|| relative to the mean residual norm there")
    steps: int = Field(100, ge=1)
    lr: float = Field(0.1, gt=0, description="step size relative to the bound")
    prompts: int = Field(16, ge=1)

    def apply(self, model, world, workdir, run_training=None) -> Tampered:
        from interpflow.tasks.models import ModelConfig, load_model
        from interpflow.tasks.sites import capture
        from interpflow.tasks.tamper.world import SYSTEM, chat, harmful_train_requests

        loaded = load_model(model, ModelConfig())
        if not 0 <= self.layer < loaded.sites.n_blocks:
            raise ValueError(f"latent_attack.layer={self.layer} is out of range: the model has blocks "
                             f"0..{loaded.sites.n_blocks - 1}")
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        site_name = f"blocks.{self.layer}.resid_post"
        rows = harmful_train_requests(world, self.prompts)
        prompts = [chat(SYSTEM, r["request"]) for r in rows]
        ids, mask = prompt_batch(loaded.tokenizer, prompts, loaded.device)
        with torch.no_grad():
            h = capture(loaded.model, [loaded.sites.resolve(site_name)], input_ids=ids, attention_mask=mask)[site_name]
        bound = self.epsilon * float(h.norm(dim=-1)[mask.bool()].mean())
        delta = torch.zeros(h.shape[-1], requires_grad=True)
        first = loss = None
        for _ in range(self.steps):
            loss = completion_loss(loaded, prompts, [r["target"] for r in rows],
                                   Tampering(latent_site=site_name, latent=delta))
            first = float(loss.detach()) if first is None else first
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= self.lr * bound * grad / (grad.norm() + 1e-12)
                norm = delta.norm()
                if norm > bound:
                    delta *= bound / norm
        return Tampered(model, Tampering(latent_site=site_name, latent=delta.detach()),
                        {"bound": bound, "delta_norm": float(delta.norm()), "initial_target_loss": first,
                         "final_target_loss": float(loss.detach())})
