"""Attention ablations on video transformers: which tokens may read which, layer by layer.

An ablation forbids some (query, key) pairs in chosen blocks and leaves the rest of the model as it is,
so a change in a probe's accuracy can be pinned on the interactions removed. Kinds:

  * ``all``          every token attends only to itself: no token mixing in that block.
  * ``cross_frame``  tokens attend only to tokens of their own frame; prefix tokens (CLS) attend only to
                     themselves and no patch token reads them, so nothing crosses frames through CLS.
  * ``local``        each query is barred from the tokens in a spatiotemporal window around it
                     (|dt| <= window_frames, |drow|, |dcol| <= window_patches), itself excepted; distant
                     tokens and CLS stay visible. This removes local interactions, keeps global ones.

Mechanism: one attention function registered with transformers' ``AttentionInterface`` that is eager
softmax attention plus -inf on the forbidden pairs of modules carrying a mask. ``ablate`` switches the
model to it and marks the attention modules of the chosen blocks, and undoes both on exit. This needs
models whose attention goes through the interface (VideoMAE, ViViT); TimeSformer computes its divided
space-time attention itself and is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface

from .layout import TokenGrid, token_grid

Kind = Literal["all", "cross_frame", "local"]
KINDS = ("all", "cross_frame", "local")
SUPPORTED = ("videomae", "vivit")
IMPLEMENTATION = "interpflow_ablation"
_MASK_ATTR = "_interpflow_ablation_mask"


def ablation_mask(kind: Kind, grid: TokenGrid, window_frames: int = 1, window_patches: int = 1) -> torch.Tensor:
    """Allowed (query, key) pairs, a bool tensor (n_tokens, n_tokens); every token keeps itself."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not an ablation; choose one of {', '.join(KINDS)}")
    if window_frames < 0 or window_patches < 0:
        raise ValueError(f"window_frames={window_frames}, window_patches={window_patches}: both must be >= 0")
    frame, patch = grid.frame_of(), grid.patch_of()
    on_grid = frame >= 0
    both = on_grid[:, None] & on_grid[None, :]
    self_only = np.eye(grid.n_tokens, dtype=bool)
    if kind == "all":
        allowed = self_only
    elif kind == "cross_frame":
        allowed = (both & (frame[:, None] == frame[None, :])) | self_only
    else:
        row, col = patch // grid.width, patch % grid.width
        near = (both & (np.abs(frame[:, None] - frame[None, :]) <= window_frames)
                & (np.abs(row[:, None] - row[None, :]) <= window_patches)
                & (np.abs(col[:, None] - col[None, :]) <= window_patches))
        allowed = ~near | self_only
    return torch.from_numpy(allowed)


def _ablated_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs):
    """Eager attention (as transformers' ``eager_attention_forward``) plus -inf where the module's mask forbids."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    allowed = getattr(module, _MASK_ATTR, None)
    if allowed is not None:
        if tuple(allowed.shape) != tuple(weights.shape[-2:]):
            raise ValueError(f"ablation mask is {tuple(allowed.shape)} but the block sees "
                             f"{tuple(weights.shape[-2:])} (query, key) tokens; build the grid for these clips")
        weights = weights.masked_fill(~allowed.to(weights.device), float("-inf"))
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(IMPLEMENTATION, _ablated_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each encoder block, in block order (the first block list of full depth)."""
    depth = model.config.num_hidden_layers
    for _, blocks in model.named_modules():
        if isinstance(blocks, nn.ModuleList) and len(blocks) == depth:
            found = [[m for m in block.modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]
                     for block in blocks]
            if all(len(f) == 1 for f in found):
                return [f[0] for f in found]
    raise ValueError(f"cannot find the {depth} self-attention modules of {type(model).__name__}")


@contextmanager
def ablate(model: nn.Module, layers: list[int], kind: Kind, grid: TokenGrid, window_frames: int = 1,
           window_patches: int = 1) -> Iterator[torch.Tensor]:
    """Run ``model`` with attention ablation ``kind`` in blocks ``layers``; yields the allowed-pairs mask.

    The previous attention implementation is restored and the masks removed on exit, also on errors.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED:
        raise ValueError(f"ablate supports VideoMAE and ViViT (attention through transformers' "
                         f"AttentionInterface); model type {model_type!r} is not one of them")
    expected = token_grid(config)
    if grid != expected:
        raise ValueError(f"grid={grid} does not match the model's token layout {expected}; "
                         f"build it with token_grid(model.config)")
    depth = config.num_hidden_layers
    bad = [i for i in layers if not isinstance(i, (int, np.integer)) or not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers={list(layers)}: {bad} out of range; valid block indices are 0..{depth - 1}")
    mask = ablation_mask(kind, grid, window_frames, window_patches)
    modules = attention_modules(model)
    previous = config._attn_implementation
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} did not switch its attention implementation; "
                             f"ablate supports VideoMAE and ViViT")
        for i in sorted(set(int(i) for i in layers)):
            setattr(modules[i], _MASK_ATTR, mask)
        yield mask
    finally:
        for m in modules:
            if hasattr(m, _MASK_ATTR):
                delattr(m, _MASK_ATTR)
        model.set_attn_implementation(previous)
