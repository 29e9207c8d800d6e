"""Per-(layer, head) features of a transformer and a hook that zeroes them at chosen tokens.

VTCD reads a block's keys (or queries, values) head by head, or the block's output tokens, and
measures a concept's importance by zeroing that same feature at the tokens its tubelets cover. Both
go through forward hooks on the modules that compute the feature, so any HF encoder whose attention
has separate ``query``/``key``/``value`` projections (VideoMAE, ViViT, TimeSformer's blocks, ViT, ...)
works without code of its own; a model that fuses them raises a clear error naming what it has.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn


Feature = Literal["keys", "queries", "values", "tokens"]
FEATURES = ("keys", "queries", "values", "tokens")
_PROJECTION = {"keys": ("key", "k_proj"), "queries": ("query", "q_proj"), "values": ("value", "v_proj")}


def _blocks(model: nn.Module) -> list[nn.Module]:
    depth = model.config.num_hidden_layers
    for _, blocks in model.named_modules():
        if isinstance(blocks, nn.ModuleList) and len(blocks) == depth:
            return list(blocks)
    raise ValueError(f"cannot find the {depth} blocks of {type(model).__name__}")


def feature_modules(model: nn.Module, feature: str) -> list[nn.Module]:
    """The module whose output is ``feature``, one per block in depth order."""
    if feature not in FEATURES:
        raise ValueError(f"feature '{feature}' is unknown; choose one of {', '.join(FEATURES)}")
    if feature == "tokens":
        return _blocks(model)
    names = _PROJECTION[feature]
    name = names[0]
    modules = []
    for i, block in enumerate(_blocks(model)):
        found = [getattr(m, n) for m in block.modules() for n in names if isinstance(getattr(m, n, None), nn.Linear)]
        if len(found) != 1:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"feature '{feature}': block {i} of {type(model).__name__} has "
                             f"{'no separate' if not found else len(found)} '{name}' projection"
                             f"{'' if not found else 's'} (its linear layers: {linear}); use feature=tokens")
        modules.append(found[0])
    return modules


def heads_of(model: nn.Module, feature: str) -> int:
    """Heads a feature splits into: the attention heads for keys/queries/values, 1 for tokens."""
    return 1 if feature == "tokens" else int(model.config.num_attention_heads)


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def captured(model: nn.Module, feature: str, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, forward passes fill ``{layer: (batch, tokens, heads, head_dim)}`` (last pass)."""
    modules = feature_modules(model, feature)
    heads = heads_of(model, feature)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_module, _inputs, output, layer=layer):
            x = _tensor(output).detach()
            store[layer] = x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)
        handles.append(modules[layer].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def zeroed(model: nn.Module, feature: str, keep: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward passes with ``feature`` multiplied by ``keep[layer]`` (batch, tokens, heads) in {0, 1}:
    0 zeroes that head's slice of the feature at that token, for that batch row."""
    modules = feature_modules(model, feature)
    heads = heads_of(model, feature)
    handles = []
    for layer, mask in keep.items():
        def hook(_module, _inputs, output, mask=mask):
            x = _tensor(output)
            b, n, d = x.shape
            scaled = (x.reshape(b, n, heads, d // heads) * mask.to(x.dtype)[..., None]).reshape(b, n, d)
            return (scaled, *output[1:]) if isinstance(output, (tuple, list)) else scaled
        handles.append(modules[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
