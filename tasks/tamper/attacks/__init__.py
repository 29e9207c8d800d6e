"""Tampering attacks: a registry of typed configs, one small module each.

An attack is a pydantic config class with a ``name`` and an ``apply`` method that takes the model folder
under attack and returns a `Tampered`: the folder of the tampered weights (the input folder if the
weights are untouched) and what inference must add (a jailbreak format, a soft prompt, a latent
perturbation). Adding an attack is one module defining one config class, imported below.

Fine-tuning attacks run `tasks.finetune.finetune` through ``run_training`` (the orchestration layer
passes a Ray Train launcher; without one they train in-process with the same code).
"""

from __future__ import annotations

from interpflow.tasks.tamper.attacks.base import ATTACKS, Attack, Tampered, attack_config, check_search_space
from interpflow.tasks.tamper.attacks import (  # noqa: F401  (each module registers its attack)
    finetuning, latent, none, refusal_ablation, soft_prompt,
)

__all__ = ["ATTACKS", "Attack", "Tampered", "attack_config", "check_search_space"]
