"""Choosing which parameters influence is computed over, and the flat layout of their gradients.

Influence on an LLM is computed over a few layers (e.g. the MLPs), not all weights: the gradient of
every example is a vector of that subset's size, so the subset decides the cost. Patterns are
``fnmatch`` globs over ``model.named_parameters()`` (``*`` also matches dots), or regular expressions
with the prefix ``re:`` (full match):

    transformer.h.*.mlp.c_fc.weight          every block's MLP input projection (GPT-2)
    re:transformer\\.h\\.[01]\\.mlp\\..*     every MLP parameter of blocks 0 and 1

``ParamSelection`` is also the layout of a flat gradient: parameter ``names[k]`` occupies columns
``slices()[names[k]]`` of an ``(n, numel)`` matrix, row-major in the parameter's own shape, in model
order. Every module of this package that reads a flat gradient uses this one layout.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSelection:
    """Names and shapes of the selected parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Width of a flat (unprojected) gradient."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (n, *shape)} -> (n, numel) in this layout."""
        missing = [n for n in self.names if n not in grads]
        if missing:
            raise ValueError(f"flatten: gradients for {missing} are missing; pass one tensor per selected parameter")
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n, numel) -> {name: (n, *shape)} (views of ``flat``)."""
        if flat.ndim != 2 or flat.shape[1] != self.numel:
            raise ValueError(f"unflatten: expected an (n, {self.numel}) gradient matrix in this selection's layout, "
                             f"got shape {tuple(flat.shape)} (a projected gradient cannot be unflattened)")
        return {n: flat[:, s].reshape(flat.shape[0], *shape)
                for (n, s), shape in zip(self.slices().items(), self.shapes)}

    def split(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(selected, frozen): detached parameter tensors, and every other parameter and buffer.

        ``functional_call`` receives both, so gradients flow to the selected tensors only and no
        autograd graph is built for the frozen rest.
        """
        params = dict(model.named_parameters())
        selected = {n: params[n].detach() for n in self.names}
        frozen = {n: p.detach() for n, p in params.items() if n not in selected}
        frozen.update({n: b for n, b in model.named_buffers()})
        return selected, frozen


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return regex.fullmatch
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def select_parameters(model: nn.Module, patterns: Sequence[str]) -> ParamSelection:
    """The parameters whose names match any of ``patterns`` (each pattern must match at least one).

    A pattern that matches nothing raises ValueError listing the closest parameter names, so a typo
    is caught before any gradient is computed.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("params: no patterns given; pass globs over model.named_parameters(), "
                         "e.g. ['transformer.h.*.mlp.c_fc.weight']")
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            match = _matcher(pattern)
        except re.error as err:
            raise ValueError(f"params: {pattern!r} is not a valid regular expression ({err}); "
                             "fix it or drop the 're:' prefix to use a glob") from None
        hits = [n for n in names if match(n)]
        if not hits:
            raise ValueError(_no_match_message(pattern, names, type(model).__name__))
        chosen.update(hits)
    kept = [(n, p) for n, p in named if n in chosen]
    return ParamSelection(tuple(n for n, _ in kept), tuple(tuple(p.shape) for _, p in kept))


def _no_match_message(pattern: str, names: list[str], model_name: str) -> str:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    closest = difflib.get_close_matches(probe, names, n=5, cutoff=0.0)
    listing = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (f"params: pattern {pattern!r} matches no parameter of {model_name}. "
            f"Closest names: {', '.join(closest) or '(the model has no parameters)'}. "
            "Patterns are fnmatch globs over model.named_parameters() ('*' also matches '.'), or "
            "'re:<regex>' for a full-match regular expression; fix the pattern or pick names from: "
            f"{listing}")
