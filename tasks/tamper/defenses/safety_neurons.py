"""Safety-neuron tuning: find the MLP neurons whose activation at a request's last token differs most
between harmful and benign requests (|difference of means| over the pooled standard deviation, top
``neurons`` over all blocks), then train only those neurons' input and output weights on the retain loss
(refusals and benign answers), with the rest of the model frozen."""

from __future__ import annotations

import torch
from pydantic import Field

from interpflow.tasks.tamper.defenses.base import Defense, encode


def _mlp_modules(model):
    """(in, out) MLP projection modules per block of a GPT-2 style model."""
    if model.config.model_type != "gpt2":
        raise ValueError(f"safety_neurons supports gpt2 models, not {model.config.model_type!r}")
    return [(block.mlp.c_fc, block.mlp.c_proj) for block in model.transformer.h]


class SafetyNeuronDefense(Defense):
    name = "safety_neurons"
    neurons: int = Field(64, ge=1, description="neurons tuned, over all blocks")
    lr: float = Field(2e-3, gt=0)

    def prepare(self, model, reference, texts) -> None:
        tok = texts["tokenizer"]
        acts = {}
        hooks = [c_fc.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o))
                 for k, (c_fc, _) in enumerate(_mlp_modules(model))]
        stats = []
        try:
            for kind in ("prompt", "benign"):
                batch = encode(tok, texts[kind])
                last = batch["attention_mask"].sum(1) - 1
                with torch.no_grad():
                    model(**batch)
                stats.append(torch.stack([torch.nn.functional.gelu(acts[k])[torch.arange(len(last)), last]
                                          for k in sorted(acts)]))      # (blocks, n, width)
        finally:
            for h in hooks:
                h.remove()
        harm, benign = stats
        score = (harm.mean(1) - benign.mean(1)).abs() / torch.sqrt((harm.var(1) + benign.var(1)) / 2 + 1e-6)
        flat = score.flatten().topk(min(self.neurons, score.numel())).indices
        width = score.shape[1]
        self._chosen = [(int(i) // width, int(i) % width) for i in flat]
        for p in model.parameters():
            p.requires_grad_(False)
        masks = {}
        for block, neuron in self._chosen:
            masks.setdefault(block, []).append(neuron)
        self._params = []
        for block, (c_fc, c_proj) in enumerate(_mlp_modules(model)):
            if block not in masks:
                continue
            keep = torch.zeros(c_fc.weight.shape[1])
            keep[masks[block]] = 1
            for param, mask in ((c_fc.weight, keep[None, :]), (c_fc.bias, keep), (c_proj.weight, keep[:, None])):
                param.requires_grad_(True)
                param.register_hook(lambda g, m=mask: g * m)
                self._params.append(param)

    def trainable(self, model):
        return self._params

    def extra_loss(self, model, reference, batch) -> torch.Tensor:
        return torch.zeros(())
