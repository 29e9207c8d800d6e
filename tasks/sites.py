"""Named activation sites on Hugging Face models, and capturing them with hooks.

One readable scheme across architectures (GPT-2, Llama/Mistral/Qwen, BERT, ViT, VideoMAE, ViViT,
TimeSformer):

    embed                       input to the first block (embeddings)
    blocks.3.resid_post         output of block 3 (the residual stream after it)
    blocks.3.attn_out           output of block 3's attention output projection
    blocks.3.mlp_out            output of block 3's MLP (down projection)
    blocks.3.attn.head.5        head 5's output before the attention output projection
    final_norm                  the final layer norm of decoder models (= last hidden state)

Any other name is taken as a raw module path from `model.named_modules()` (its output is captured).
Capturing stops the forward pass once the last requested site is reached.

TransformerLens hook names are accepted as aliases (``tl_alias`` gives the other direction):

    hook_embed, blocks.0.hook_resid_pre  -> embed     (TL's hook_embed is the token embedding alone;
                                                       for GPT-2 the block input here adds positions)
    blocks.3.hook_resid_pre              -> blocks.2.resid_post
    blocks.3.hook_resid_post             -> blocks.3.resid_post
    blocks.3.hook_attn_out               -> blocks.3.attn_out
    blocks.3.hook_mlp_out                -> blocks.3.mlp_out
    blocks.3.attn.hook_z.5 (or [5])      -> blocks.3.attn.head.5   (hook_z needs a head index)
    ln_final.hook_normalized             -> final_norm

A resolved ``Site`` always carries the canonical name (what stored rows and outputs are named by)
and, in ``alias``, the spelling that was asked for.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # torch loads with a model, not when a graph naming sites is built
    import torch
    from torch import nn

# Per architecture: where the blocks are, and, relative to a block, the attention output projection
# (its input holds the per-head outputs), the MLP output module and the final norm.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"blocks": ("h",), "attn_proj": "attn.c_proj", "mlp": "mlp", "final_norm": ("ln_f",)},
    "llama": {"blocks": ("layers",), "attn_proj": "self_attn.o_proj", "mlp": "mlp", "final_norm": ("norm",)},
    "mistral": {"blocks": ("layers",), "attn_proj": "self_attn.o_proj", "mlp": "mlp", "final_norm": ("norm",)},
    "qwen2": {"blocks": ("layers",), "attn_proj": "self_attn.o_proj", "mlp": "mlp", "final_norm": ("norm",)},
    "qwen3": {"blocks": ("layers",), "attn_proj": "self_attn.o_proj", "mlp": "mlp", "final_norm": ("norm",)},
    "bert": {"blocks": ("encoder.layer",), "attn_proj": "attention.output.dense", "mlp": "output.dense"},
    "vit": {"blocks": ("encoder.layer",), "attn_proj": "attention.output.dense", "mlp": "output.dense"},
    "videomae": {"blocks": ("encoder.layer",), "attn_proj": "attention.output.dense", "mlp": "output.dense",
                 "final_norm": ("layernorm",)},
    "vivit": {"blocks": ("layers",), "attn_proj": "attention.o_proj", "mlp": "mlp"},
    "timesformer": {"blocks": ("encoder.layer",), "attn_proj": "attention.output.dense", "mlp": "output.dense"},
}

class UnknownSite(ValueError):
    pass


_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(resid_post|attn_out|mlp_out|attn\.head\.(\d+))$")
_TL_BLOCK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|"
                       r"attn\.hook_z(?:\.(\d+)|\[(\d+)\])?)$")
_TL_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "final_norm"}
_TL_KIND = {"hook_resid_post": "resid_post", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}


def canonical_name(name: str) -> str:
    """The project's name for a TransformerLens hook name (any other name is returned unchanged)."""
    if name in _TL_GLOBAL:
        return _TL_GLOBAL[name]
    match = _TL_BLOCK.match(name)
    if not match:
        return name
    i, kind = int(match.group(1)), match.group(2)
    if kind == "hook_resid_pre":
        return "embed" if i == 0 else f"blocks.{i - 1}.resid_post"
    if kind in _TL_KIND:
        return f"blocks.{i}.{_TL_KIND[kind]}"
    head = match.group(3) or match.group(4)
    if head is None:
        raise UnknownSite(f"site '{name}': hook_z holds every head; name one head as blocks.{i}.attn.hook_z.H "
                          f"(= blocks.{i}.attn.head.H)")
    return f"blocks.{i}.attn.head.{int(head)}"


def tl_alias(name: str) -> str | None:
    """The TransformerLens hook name of a canonical site name (None for raw module paths)."""
    if name == "embed":
        return "hook_embed"
    if name == "final_norm":
        return "ln_final.hook_normalized"
    match = _BLOCK_SITE.match(name)
    if not match:
        return None
    i, kind = match.group(1), match.group(2)
    if match.group(3) is not None:
        return f"blocks.{i}.attn.hook_z.{match.group(3)}"
    return f"blocks.{i}.hook_{kind}"


def depth_order(name: str) -> tuple:
    """Sort key putting site names in model order: embed, blocks by index, final_norm, raw paths."""
    try:
        name = canonical_name(name)
    except UnknownSite:
        pass
    if name == "embed":
        return (-1, 0, name)
    match = _BLOCK_SITE.match(name)
    if match:
        return (int(match.group(1)), 1, name)
    return (10**6, 0, name) if name == "final_norm" else (10**6 + 1, 0, name)


@dataclass(frozen=True)
class Site:
    """Where a site's tensor comes from: a module, which side of it, and an optional head slice."""

    name: str
    module: str  # path in model.named_modules()
    side: str  # "output" | "input"
    block: int  # depth order used to stop the forward pass early (-1 before the blocks)
    head: int | None = None
    alias: str | None = None  # the spelling asked for, when it was not `name` (a TransformerLens hook name)


def _find_blocks(model: nn.Module, arch: dict | None, n_layers: int | None) -> tuple[str, nn.ModuleList]:
    from torch import nn

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if arch:
        for name, m in lists:
            if any(name == s or name.endswith("." + s) for s in arch["blocks"]):
                return name, m
    candidates = [(name, m) for name, m in lists if n_layers is None or len(m) == n_layers]
    if not candidates:
        raise UnknownSite(f"cannot find the transformer blocks of {type(model).__name__}; use raw module paths")
    return max(candidates, key=lambda nm: len(nm[1]))


class SiteMap:
    """Resolves site names for one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        self.model_type = getattr(config, "model_type", None)
        self.arch = ARCHITECTURES.get(self.model_type or "")
        self.n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        self.modules = dict(model.named_modules())
        try:
            self.blocks_path, blocks = _find_blocks(model, self.arch, n_layers)
            self.n_blocks = len(blocks)
        except UnknownSite:
            self.blocks_path, self.n_blocks = None, 0
        self.final_norm = None
        if self.arch and self.arch.get("final_norm"):
            self.final_norm = next((n for n in self.modules if any(n == s or n.endswith("." + s)
                                                                    for s in self.arch["final_norm"])), None)

    def names(self) -> list[str]:
        """Every named site of this model (raw module paths are accepted too)."""
        names = ["embed"] if self.blocks_path else []
        for i in range(self.n_blocks):
            names.append(f"blocks.{i}.resid_post")
            if self.arch:
                names += [f"blocks.{i}.attn_out", f"blocks.{i}.mlp_out"]
                names += [f"blocks.{i}.attn.head.{h}" for h in range(self.n_heads or 0)]
        if self.final_norm:
            names.append("final_norm")
        return names

    def resolve(self, name: str) -> Site:
        """The site called `name` (a project name, a TransformerLens hook name or a raw module path)."""
        canonical = canonical_name(name)
        if canonical == name:
            return self._resolve(name)
        try:
            site = self._resolve(canonical)
        except UnknownSite as exc:
            raise UnknownSite(f"site '{name}' (the TransformerLens name of '{canonical}'): {exc}") from None
        return replace(site, alias=name)

    def _resolve(self, name: str) -> Site:
        if name == "embed" and self.blocks_path:
            return Site(name, f"{self.blocks_path}.0", "input", -1)
        if name == "final_norm" and self.final_norm:
            return Site(name, self.final_norm, "output", self.n_blocks)
        match = _BLOCK_SITE.match(name)
        if match and self.blocks_path:
            i = int(match.group(1))
            if i >= self.n_blocks:
                raise UnknownSite(f"site '{name}': the model has {self.n_blocks} blocks (0..{self.n_blocks - 1})")
            block = f"{self.blocks_path}.{i}"
            kind = match.group(2)
            if kind == "resid_post":
                return Site(name, block, "output", i)
            if not self.arch:
                raise UnknownSite(f"site '{name}': {self.model_type} has no site map for attention/MLP; "
                                  "use a raw module path")
            if kind == "attn_out":
                return Site(name, f"{block}.{self.arch['attn_proj']}", "output", i)
            if kind == "mlp_out":
                return Site(name, f"{block}.{self.arch['mlp']}", "output", i)
            head = int(match.group(3))
            if head >= (self.n_heads or 0):
                raise UnknownSite(f"site '{name}': the model has {self.n_heads} heads per block "
                                  f"(0..{(self.n_heads or 1) - 1})")
            return Site(name, f"{block}.{self.arch['attn_proj']}", "input", i, head)
        if name in self.modules and name:
            depth = self._depth_of(name)
            return Site(name, name, "output", depth)
        names = self.names()
        examples = ", ".join(names[:8])
        tl_examples = ", ".join(str(tl_alias(n)) for n in names[:8])
        raise UnknownSite(f"unknown site '{name}' for {self.model_type or type(self.model).__name__}. "
                          f"Valid sites: {examples}, ... ({len(names)} in all: blocks.I.resid_post, "
                          f"blocks.I.attn_out, blocks.I.mlp_out, blocks.I.attn.head.H for I < {self.n_blocks}); "
                          f"the same by their TransformerLens names: {tl_examples}, ... (blocks.I.hook_resid_post, "
                          f"blocks.I.hook_attn_out, blocks.I.hook_mlp_out, blocks.I.attn.hook_z.H; "
                          f"blocks.I.hook_resid_pre is blocks.I-1.resid_post); or a raw module path such as "
                          f"'{next((n for n in self.modules if n), '')}'")

    def _depth_of(self, module_path: str) -> int:
        if self.blocks_path and module_path.startswith(self.blocks_path + "."):
            return int(module_path[len(self.blocks_path) + 1:].split(".")[0])
        return self.n_blocks  # unknown position: run the whole model

    def width(self, site: Site) -> int | None:
        """The last dimension of the site's tensor, from the config (None when it cannot be told)."""
        config = getattr(self.model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if site.head is not None:
            return hidden // self.n_heads if hidden and self.n_heads else None
        if site.name in ("embed", "final_norm") or _BLOCK_SITE.match(site.name):
            return hidden
        module = self.modules.get(site.module)
        for attr in ("out_features", "embedding_dim", "nf"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        shape = getattr(module, "normalized_shape", None)
        return int(shape[-1]) if shape else None

    def resolve_all(self, names: list[str]) -> list[Site]:
        if not names:
            raise UnknownSite("no sites requested; valid sites: " + ", ".join(self.names()[:8]) + ", ...")
        return [self.resolve(n) for n in names]


class _StopForward(Exception):
    pass


def _first_tensor(value: Any) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find a tensor in a module output of type {type(value).__name__}")


def capture(model: nn.Module, sites: list[Site], n_heads: int | None = None, stop_early: bool = True,
            **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `model(**inputs)` and return {site name: tensor (batch, tokens, ...)}.

    With `stop_early`, the forward pass ends once the deepest requested site is captured.
    """
    import torch

    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    last = max(sites, key=lambda s: s.block)
    handles = []

    def make_hook(group: list[Site], is_last: bool, side: str):
        def store(tensor: torch.Tensor) -> None:
            for site in group:
                value = tensor
                if site.head is not None:
                    heads = n_heads or 1
                    value = value.reshape(*value.shape[:-1], heads, value.shape[-1] // heads)[..., site.head, :]
                captured[site.name] = value.detach()

        if side == "input":
            def pre_hook(module, args, kwargs):
                store(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()))))
                if is_last and stop_early and len(captured) == len(sites):
                    raise _StopForward
            return pre_hook

        def hook(module, args, output):
            store(_first_tensor(output))
            if is_last and stop_early and len(captured) == len(sites):
                raise _StopForward
        return hook

    groups: dict[tuple[str, str], list[Site]] = {}
    for site in sites:
        groups.setdefault((site.module, site.side), []).append(site)
    try:
        for (path, side), group in groups.items():
            is_last = any(s.block == last.block for s in group)
            hook = make_hook(group, is_last, side)
            if side == "input":
                handles.append(modules[path].register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(modules[path].register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(**inputs)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    return captured


def _replace_first_tensor(value: Any, new: torch.Tensor) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        index = next(i for i, v in enumerate(value) if isinstance(v, torch.Tensor))
        return value[:index] + (new,) + value[index + 1:]
    if isinstance(value, list):
        index = next(i for i, v in enumerate(value) if isinstance(v, torch.Tensor))
        return value[:index] + [new] + value[index + 1:]
    if hasattr(value, "last_hidden_state"):
        value.last_hidden_state = new
        return value
    raise TypeError(f"cannot replace a tensor in a module output of type {type(value).__name__}")


@contextmanager
def intervene(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor],
              n_heads: int | None = None) -> Iterator[None]:
    """Within the block, every forward pass sees `fn(tensor)` in place of the site's tensor.

    The tensor is what `capture` returns for the site ((batch, tokens, dim), or one head's slice
    (batch, tokens, head_dim) for a head site, whose other heads are left alone). Splicing an SAE,
    ablating, patching and steering are all an `fn`.
    """
    module = dict(model.named_modules())[site.module]

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        if site.head is None:
            return fn(tensor).to(tensor.dtype)
        heads = n_heads or 1
        split = tensor.reshape(*tensor.shape[:-1], heads, tensor.shape[-1] // heads).clone()
        split[..., site.head, :] = fn(split[..., site.head, :]).to(tensor.dtype)
        return split.reshape(tensor.shape)

    if site.side == "input":
        def pre_hook(mod, args, kwargs):
            if args:
                return (apply(args[0]),) + tuple(args[1:]), kwargs
            name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, name: apply(kwargs[name])}
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(mod, args, output):
            return _replace_first_tensor(output, apply(_first_tensor(output)))
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
