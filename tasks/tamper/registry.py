"""What attacks and defenses share: a registry of config classes by name, configured with clear errors."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


def configured(registry: dict[str, type[BaseModel]], kind: str, name: str, values: dict | None = None):
    """``registry[name]`` configured with ``values``; an unknown name lists the registry."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; the registry has: {', '.join(sorted(registry))}")
    try:
        return registry[name].model_validate(values or {})
    except ValidationError as exc:
        raise ValueError(f"{kind} {name}: {exc}") from None
