"""The attack interface and registry (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from interpflow.tasks.tamper.generation import Tampering
from interpflow.tasks.tamper.registry import configured
from interpflow.tasks.tamper.world import WorldConfig

ATTACKS: dict[str, type["Attack"]] = {}


@dataclass
class Tampered:
    model: str                                   # folder (or id) of the weights to evaluate
    tampering: Tampering = field(default_factory=Tampering)
    metrics: dict[str, float] = field(default_factory=dict)


class Attack(BaseModel):
    """Base of every attack config; subclasses set ``name`` and implement ``apply``."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""
    modifies_weights: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            ATTACKS[cls.name] = cls

    def apply(self, model: str, world: WorldConfig, workdir: str,
              run_training: Callable[..., Any] | None = None) -> Tampered:  # pragma: no cover - interface
        raise NotImplementedError


def attack_config(name: str, values: dict | None = None) -> Attack:
    """The attack ``name`` configured with ``values``; an unknown name lists the registry."""
    return configured(ATTACKS, "attack", name, values)


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for key, info in model.model_fields.items():
        path = prefix + key
        paths.add(path)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths |= _field_paths(ann, path + ".")
    return paths


def check_search_space(name: str, space: dict) -> None:
    """Every dotted key of a search space must name a field of the attack's config."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; the registry has: {', '.join(sorted(ATTACKS))}")
    known = _field_paths(ATTACKS[name])
    bad = [k for k in space if k not in known]
    if bad:
        leaves = sorted(k for k in known if not any(o.startswith(k + ".") for o in known))
        raise ValueError(f"search space of attack {name}: {bad} name no config field; fields: {', '.join(leaves)}")


def with_values(cfg: Attack, dotted: dict[str, Any]) -> Attack:
    """``cfg`` with dotted-key values set (a sampled trial), validated."""
    data = cfg.model_dump()
    for key, value in dotted.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return attack_config(cfg.name, data)
