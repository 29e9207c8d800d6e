"""Triplet representation loss (the strongest defense TamperBench reports), as implemented here: on
harmful-compliance texts, the defended model's representation h at the shaped layers is pulled towards
the original model's representation of the same request answered with a refusal (positive) and pushed
from the original's representation of the compliance (negative): relu(d(h, pos) - d(h, neg) + margin),
with d the cosine distance; plus a KL term keeping benign next-token distributions at the original's."""

from __future__ import annotations

import torch
from pydantic import Field

from interpflow.tasks.tamper.defenses.base import Defense, hidden


class TripletDefense(Defense):
    name = "triplet"
    margin: float = Field(0.5, ge=0)
    triplet_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(1.0, ge=0)

    def extra_loss(self, model, reference, batch) -> torch.Tensor:
        h = hidden(model, batch["comply"], self._layers)
        with torch.no_grad():
            pos = hidden(reference, batch["refuse"], self._layers)
            neg = hidden(reference, batch["comply"], self._layers)
        cos = torch.nn.functional.cosine_similarity
        triplet = torch.relu((1 - cos(h, pos, dim=-1)) - (1 - cos(h, neg, dim=-1)) + self.margin).mean()
        mask = batch["benign"]["attention_mask"].bool()
        logp = torch.log_softmax(model(**batch["benign"]).logits[mask], -1)
        with torch.no_grad():
            ref = torch.log_softmax(reference(**batch["benign"]).logits[mask], -1)
        kl = torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="batchmean")
        return self.triplet_weight * triplet + self.kl_weight * kl
