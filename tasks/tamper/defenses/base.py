"""The defense interface, registry and the training loop the defenses share.

Every defense optimises ``retain`` (next-token loss on benign dialogues and on harmful requests answered
with refusals: what the aligned model already does) plus its own term on harmful-compliance texts, for
``steps`` AdamW steps over all weights, starting from the aligned model, with the original model kept
frozen beside it as the reference. Batches are a function of (seed, step).
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.types import Seed

DEFENSES: dict[str, type["Defense"]] = {}


class Defense(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""
    steps: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(5e-4, gt=0)
    layers: list[int] | None = Field(None, description="blocks whose representations the defense shapes "
                                                        "(null: the second half)")
    examples: int = Field(200, ge=8, le=1_000_000, description="harmful and benign texts drawn for training")
    seed: Seed = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            DEFENSES[cls.name] = cls

    def extra_loss(self, model, reference, batch: dict) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, model, reference, texts: dict) -> None:
        """Hook for defenses that look at the model before training (e.g. to pick neurons)."""

    def trainable(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def defend(self, model_path: str, world, out_dir: str) -> dict:
        """Train the defended model from ``model_path``; save it to ``out_dir``; return its metrics."""
        import transformers

        from interpflow.tasks.tamper.world import COMPLIANCE, REFUSALS, SYSTEM, chat, harmful_train_requests
        from interpflow.tasks.tamper.world import AttackData, make_attack_data

        started = time.perf_counter()
        torch.manual_seed(self.seed)
        tok = transformers.AutoTokenizer.from_pretrained(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(model_path).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        rows = harmful_train_requests(world, self.examples)
        texts = {
            "prompt": [chat(SYSTEM, r["request"]) for r in rows],
            "comply": [chat(SYSTEM, r["request"], COMPLIANCE.format(a=r["details"][0], b=r["details"][1]))
                       for r in rows],
            "refuse": [chat(SYSTEM, r["request"], REFUSALS[i % len(REFUSALS)]) for i, r in enumerate(rows)],
            "benign": list(make_attack_data(AttackData(kind="benign", world=world))["text"])[: self.examples],
        }
        n_blocks = model.config.num_hidden_layers
        self._layers = self.layers or list(range(n_blocks // 2, n_blocks))
        bad = [i for i in self._layers if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(f"defense {self.name}: layers {bad} are out of range (blocks 0..{n_blocks - 1})")
        self.prepare(model, reference, {k: v[:32] for k, v in texts.items()} | {"tokenizer": tok})
        params = self.trainable(model)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        model.train()
        retain = extra = torch.tensor(0.0)
        for step in range(self.steps):
            rng = np.random.default_rng([self.seed, step])
            pick = {k: [v[i] for i in rng.choice(len(v), size=min(self.batch_size, len(v)), replace=False)]
                    for k, v in texts.items()}
            batch = {k: encode(tok, v) for k, v in pick.items()}
            retain = (lm_loss(model, batch["benign"]) + lm_loss(model, batch["refuse"])) / 2
            extra = self.extra_loss(model, reference, batch)
            opt.zero_grad()
            (retain + extra).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        model.eval()
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        return {"retain_loss": float(retain.detach()), "defense_loss": float(extra.detach()),
                "trainable_params": float(sum(p.numel() for p in params)), "defend_s": time.perf_counter() - started}


def encode(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    from interpflow.tasks.tiny_lm import pad_batch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [tok(t, truncation=True, max_length=tok.model_max_length, verbose=False)["input_ids"] for t in texts]
    return pad_batch(ids, pad)


def lm_loss(model, batch: dict) -> torch.Tensor:
    from interpflow.tasks.tiny_lm import loss_sum

    total, count = loss_sum(model, batch)
    return total / max(count, 1)


def hidden(model, batch: dict, layers: list[int]) -> torch.Tensor:
    """(layers, batch, hidden): each layer's residual stream averaged over the real tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.stack([(out.hidden_states[i + 1] * mask).sum(1) / mask.sum(1) for i in layers])


def defense_config(name: str, values: dict | None = None) -> Defense:
    """The defense ``name`` configured with ``values``; an unknown name lists the registry."""
    from interpflow.tasks.tamper.registry import configured

    return configured(DEFENSES, "defense", name, values)
