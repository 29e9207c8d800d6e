"""The no-modification baseline: the model as it is."""

from __future__ import annotations

from interpflow.tasks.tamper.attacks.base import Attack, Tampered


class NoAttack(Attack):
    name = "none"
    modifies_weights = False

    def apply(self, model, world, workdir, run_training=None) -> Tampered:
        return Tampered(model)
