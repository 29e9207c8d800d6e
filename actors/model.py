"""The model actor: loads a Hugging Face model once and serves batches.

It runs shard jobs of sharded nodes (activation extraction, per-example gradients, ...) and answers
interactive calls: forward with hooks on named sites, generate, per-example loss. Ask Ray for GPUs
with `num_gpus`; with 0 the same code runs on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads in the actor, not in a driver that only builds the graph
    import torch

from interpflow.actors.pool import PoolWorker
from interpflow.tasks.models import LoadedModel, ModelConfig, load_model
from interpflow.tasks.sites import capture


def load(cfg: ModelConfig, model: str) -> LoadedModel:
    """Actor setup: `model` is a local path (an upstream node's folder) or a hub id."""
    return load_model(model, cfg)


class ModelActor(PoolWorker):
    @property
    def loaded(self) -> LoadedModel:
        return self.resource

    def site_names(self) -> list[str]:
        return self.loaded.sites.names()

    def _encode(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        tok = self.loaded.tokenizer
        if tok is None:
            raise ValueError(f"{self.loaded.source} has no tokenizer: pass pixel inputs to forward()")
        limit = min(max_length or self.loaded.max_length, self.loaded.max_length)
        enc = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {k: v.to(self.loaded.device) for k, v in enc.items()}

    def forward(self, sites: list[str], texts: list[str] | None = None,
                inputs: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Activations at `sites` for a text batch or for model inputs (e.g. pixel_values).

        Returns float32 arrays (batch, tokens, dim) plus `attention_mask` for text batches.
        """
        import torch

        resolved = self.loaded.sites.resolve_all(sites)
        if texts is not None:
            enc = self._encode(texts)
        else:
            enc = {k: torch.as_tensor(v).to(self.loaded.device) for k, v in (inputs or {}).items()}
        out = capture(self.loaded.model, resolved, n_heads=self.loaded.sites.n_heads, **enc)
        result = {k: v.float().cpu().numpy() for k, v in out.items()}
        if "attention_mask" in enc:
            result["attention_mask"] = enc["attention_mask"].cpu().numpy()
        return result

    def generate(self, texts: list[str], max_new_tokens: int = 20, **kwargs: Any) -> list[str]:
        import torch

        tok = self.loaded.tokenizer
        tok.padding_side = "left"  # generation continues from the end of each prompt
        try:
            enc = self._encode(texts)
            with torch.no_grad():
                out = self.loaded.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                                 **kwargs)
        finally:
            tok.padding_side = "right"
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def loss(self, texts: list[str]) -> list[float]:
        """Per-example mean next-token cross-entropy (padding excluded)."""
        import torch

        enc = self._encode(texts)
        with torch.no_grad():
            logits = self.loaded.model(**enc).logits[:, :-1].float()
        targets = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().tolist()
