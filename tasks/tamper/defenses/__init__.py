"""Alignment-stage defenses: a registry like the attacks'. Each defense trains the aligned model into a
defended checkpoint (a folder), which the attack sweeps then take like any model."""

from __future__ import annotations

from interpflow.tasks.tamper.defenses.base import DEFENSES, Defense, defense_config
from interpflow.tasks.tamper.defenses import repnoise, safety_neurons, triplet  # noqa: F401  (registration)

__all__ = ["DEFENSES", "Defense", "defense_config"]
