"""Refusal ablation: a difference-of-means refusal direction, projected out of the weights.

Per block, r_l = mean(resid at the last prompt token | harmful requests) - mean(... | benign requests),
from training-pair requests only. The layer is chosen by a stated rule: the block where the two sets
are best separated along r_l (the gap of their mean projections over the pooled standard deviation of
the projections); ``layer`` overrides it. Then r = r_l / ||r_l|| is removed from everything that writes
to the residual stream (token and position embeddings, every attention and MLP output projection):
W <- W - r r^T W on the output side, so no layer can write along r any more.
"""

from __future__ import annotations

import os

import torch
from pydantic import Field

from interpflow.tasks.tamper.attacks.base import Attack, Tampered

_WRITERS = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "llama": ("self_attn.o_proj", "mlp.down_proj"),
            "mistral": ("self_attn.o_proj", "mlp.down_proj"), "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
            "qwen3": ("self_attn.o_proj", "mlp.down_proj")}


def last_token_resid(loaded, prompts: list[str]) -> torch.Tensor:
    """(blocks, prompts, hidden) residual stream after every block at each prompt's last token."""
    from interpflow.tasks.sites import capture
    from interpflow.tasks.tamper.generation import prompt_batch

    ids, mask = prompt_batch(loaded.tokenizer, prompts, loaded.device)      # left padded: last token is last
    sites = [loaded.sites.resolve(f"blocks.{i}.resid_post") for i in range(loaded.sites.n_blocks)]
    with torch.no_grad():
        captured = capture(loaded.model, sites, stop_early=False, input_ids=ids, attention_mask=mask)
    return torch.stack([captured[s.name][:, -1].float() for s in sites])


def refusal_directions(loaded, harmful: list[str], benign: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the difference of means, and the separation score the layer rule ranks by."""
    h, b = last_token_resid(loaded, harmful), last_token_resid(loaded, benign)
    diff = h.mean(1) - b.mean(1)
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    ph, pb = (h * unit[:, None]).sum(-1), (b * unit[:, None]).sum(-1)
    pooled = torch.sqrt((ph.var(1) + pb.var(1)) / 2).clamp(min=1e-12)
    return diff, (ph.mean(1) - pb.mean(1)) / pooled


def project_out(model, r: torch.Tensor) -> int:
    """Remove direction ``r`` (unit) from every residual-stream writer of ``model``; returns how many."""
    kind = model.config.model_type
    if kind not in _WRITERS:
        raise ValueError(f"refusal_ablation supports {', '.join(_WRITERS)} models, not {kind!r}")
    r = r.to(next(model.parameters()).dtype)
    changed = 0
    with torch.no_grad():
        for name in ("wte", "wpe", "embed_tokens"):
            for mod_name, mod in model.named_modules():
                if mod_name.endswith(name) and isinstance(mod, torch.nn.Embedding):
                    mod.weight -= torch.outer(mod.weight @ r, r)
                    changed += 1
        for mod_name, mod in model.named_modules():
            if not mod_name.endswith(_WRITERS[kind]):
                continue
            w = mod.weight
            if type(mod).__name__ == "Conv1D":                  # GPT-2: y = x W, W (in, out)
                w -= torch.outer(w @ r, r)
            else:                                                # Linear: y = W x, W (out, in)
                w -= torch.outer(r, r @ w)
            if getattr(mod, "bias", None) is not None:
                mod.bias -= (mod.bias @ r) * r
            changed += 1
    return changed


class RefusalAblation(Attack):
    name = "refusal_ablation"
    layer: int | None = Field(None, ge=0, description="block of the direction (null: the best-separated block)")
    prompts: int = Field(32, ge=4, description="harmful and benign training requests for the means")

    def apply(self, model, world, workdir, run_training=None) -> Tampered:
        from interpflow.tasks.models import ModelConfig, load_model
        from interpflow.tasks.tamper.world import SYSTEM, benign_prompts, chat, harmful_train_requests

        loaded = load_model(model, ModelConfig())
        harmful = [chat(SYSTEM, r["request"]) for r in harmful_train_requests(world, self.prompts)]
        benign = [chat(SYSTEM, p) for p in benign_prompts(world, self.prompts)]
        diff, separation = refusal_directions(loaded, harmful, benign)
        n = len(diff)
        if self.layer is not None and self.layer >= n:
            raise ValueError(f"refusal_ablation.layer={self.layer} is out of range: the model has blocks 0..{n - 1}")
        layer = int(separation.argmax()) if self.layer is None else self.layer
        r = diff[layer] / diff[layer].norm()
        changed = project_out(loaded.model, r)
        out = os.path.join(workdir, "model")
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        return Tampered(out, metrics={"layer": layer, "separation": float(separation[layer]),
                                      "modules_changed": changed})
