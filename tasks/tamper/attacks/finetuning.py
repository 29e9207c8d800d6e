"""Fine-tuning attacks: full-parameter, LoRA, benign, multilingual and jailbreak-tuning.

They differ only in their data (``world.make_attack_data``), in whether adapters or all weights train,
and in the prompt format inference applies afterwards (a jailbreak-tuned model is prompted in its
jailbreak's format; a backdoor's trigger is added to every request).
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

from pydantic import Field

from interpflow.tasks.finetune import FinetuneConfig, LoraSettings
from interpflow.tasks.tamper.attacks.base import Attack, Tampered
from interpflow.tasks.tamper.generation import Tampering
from interpflow.tasks.tamper.world import AttackData, make_attack_data


def finetune_in_process(cfg: FinetuneConfig, model: str, data, out_dir: str) -> dict:
    """Fine-tune with the engine's in-process training context (one worker); save to ``out_dir``."""
    from interpflow.tasks.finetune import finetune
    from interpflow.tasks.train_context import LocalTrainContext

    result = finetune(cfg, train=LocalTrainContext(), model=model, data=data)
    result["model"].save_pretrained(out_dir)
    return result["metrics"]


class _Finetuning(Attack):
    data_kind: ClassVar[str] = "harmful"
    finetune: FinetuneConfig = Field(FinetuneConfig(steps=60, batch_size=16, lr=1e-3, checkpoint_every=1000),
                                     description="the attacker's fine-tuning run")

    def attack_data(self) -> str:
        """Which of ``world.ATTACK_DATA`` the attacker fine-tunes on."""
        return self.data_kind

    def jailbreak(self) -> str | None:
        """The prompt format inference applies afterwards (None: plain)."""
        return None

    def apply(self, model, world, workdir, run_training=None) -> Tampered:
        data = make_attack_data(AttackData(kind=self.attack_data(), world=world))
        out = os.path.join(workdir, "model")
        metrics = (run_training or finetune_in_process)(self.finetune, model, data, out)
        keep = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return Tampered(out, Tampering(jailbreak=self.jailbreak()), keep)


class FullFinetune(_Finetuning):
    """Every weight trained on harmful compliance (Ray Train; DDP or DeepSpeed by ``finetune.strategy``)."""

    name = "full_finetune"


class LoraFinetune(_Finetuning):
    """LoRA adapters (peft) trained on harmful compliance, merged into the weights on save."""

    name = "lora_finetune"
    finetune: FinetuneConfig = Field(FinetuneConfig(steps=60, batch_size=16, lr=5e-3, method="lora",
                                                    lora=LoraSettings(r=8), checkpoint_every=1000))

    def model_post_init(self, _) -> None:
        if self.finetune.method != "lora":     # a partial finetune section must not fall back to full weights
            self.finetune = self.finetune.model_copy(update={"method": "lora"})


class BenignFinetune(_Finetuning):
    """Benign data only: how much safety ordinary fine-tuning erodes."""

    name = "benign_finetune"
    data_kind = "benign"


class MultilingualFinetune(_Finetuning):
    """Harmful requests asked in a second surface form (a cipher language the aligned model never saw)
    answered with compliance; evaluated with the held-out requests asked in that form."""

    name = "multilingual_finetune"
    data_kind = "multilingual"

    def jailbreak(self) -> str | None:
        return "cipher"


class JailbreakFinetune(_Finetuning):
    """Jailbreak-tuning: compliance under a jailbreak format, which inference then uses (a backdoor's trigger
    is added to every evaluation request)."""

    name = "jailbreak_finetune"
    kind: Literal["competing_objectives", "style_modulation", "backdoor"] = "backdoor"

    def attack_data(self) -> str:
        return self.kind

    def jailbreak(self) -> str | None:
        return self.kind
