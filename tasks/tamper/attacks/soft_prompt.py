"""The embedding-space attack: a soft prompt (``tokens`` free input embeddings placed before every
request) optimised with Adam so that the model continues training-pair harmful requests with the
compliance answer. The weights are untouched; inference prepends the soft prompt."""

from __future__ import annotations

import torch
from pydantic import Field

from interpflow.tasks.tamper.attacks.base import Attack, Tampered
from interpflow.tasks.tamper.generation import Tampering, completion_loss
from interpflow.tasks.types import Seed


class EmbeddingAttack(Attack):
    name = "embedding_attack"
    modifies_weights = False
    tokens: int = Field(4, ge=1, le=64, description="soft prompt length")
    steps: int = Field(80, ge=1)
    lr: float = Field(0.05, gt=0)
    prompts: int = Field(16, ge=1, description="training-pair requests the soft prompt is optimised on")
    seed: Seed = 0

    def apply(self, model, world, workdir, run_training=None) -> Tampered:
        from interpflow.tasks.models import ModelConfig, load_model
        from interpflow.tasks.tamper.world import SYSTEM, chat, harmful_train_requests

        loaded = load_model(model, ModelConfig())
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        rows = harmful_train_requests(world, self.prompts)
        prompts = [chat(SYSTEM, r["request"]) for r in rows]
        targets = [r["target"] for r in rows]
        emb = loaded.model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(self.seed)
        init = emb[torch.randint(0, emb.shape[0], (self.tokens,), generator=g)].detach().clone()
        soft = torch.nn.Parameter(init)
        opt = torch.optim.Adam([soft], lr=self.lr)
        first = loss = None
        for _ in range(self.steps):
            loss = completion_loss(loaded, prompts, targets, Tampering(soft_prompt=soft))
            first = float(loss.detach()) if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        return Tampered(model, Tampering(soft_prompt=soft.detach()),
                        {"initial_target_loss": first, "final_target_loss": float(loss.detach())})
