"""Greedy generation for the safety evaluation, with the two inference-time tamperings an attack may
leave behind: a soft prompt (embeddings placed before the prompt's tokens) and a latent perturbation
(a vector added to the residual stream at one site through the site map's hooks).

One batched loop (left padding, no KV cache: the prompts are short and the models small) so that
plain, soft-prompted and perturbed generations are produced by the same code.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from interpflow.tasks.study.chat import cut_at_turn_marker


@dataclass
class Tampering:
    """What an attack leaves for inference time besides (or instead of) new weights."""

    jailbreak: str | None = None                  # a prompt format applied to every request (world.JAILBREAKS)
    soft_prompt: torch.Tensor | None = None       # (k, hidden) embeddings placed before the prompt
    latent_site: str | None = None                # site of the latent perturbation
    latent: torch.Tensor | None = None            # (hidden,) added at every position of latent_site


def prompt_batch(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and attention mask of ``prompts``."""
    encoded = [tokenizer(p, verbose=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    return ids, mask


def latent_hook(loaded, tampering: Tampering):
    """A context that adds the latent perturbation at its site (a no-op context without one)."""
    if tampering.latent is None:
        return nullcontext()
    from interpflow.tasks.sites import intervene

    site = loaded.sites.resolve(tampering.latent_site)
    delta = tampering.latent.to(loaded.device)
    return intervene(loaded.model, site, lambda h: h + delta.to(h.dtype))


@torch.no_grad()
def greedy(loaded, prompts: list[str], max_tokens: int, tampering: Tampering | None = None,
           batch_size: int = 32) -> list[str]:
    """Greedy replies to plain-format prompts (ending with "Assistant:"), cut at the next turn marker."""
    tampering = tampering or Tampering()
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = prompt_batch(tok, chunk, loaded.device)
        limit = loaded.max_length - (0 if tampering.soft_prompt is None else len(tampering.soft_prompt))
        steps = max(0, min(max_tokens, limit - ids.shape[1]))
        done = torch.zeros(len(chunk), dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(steps):
            logits = _logits(loaded, ids, mask, tampering)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            new.append(nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            if done.all():
                break
        generated = torch.stack(new, dim=1).tolist() if new else [[] for _ in chunk]
        for row in generated:
            if eos in row:
                row = row[:row.index(eos)]
            replies.append(cut_at_turn_marker(tok.decode(row, skip_special_tokens=True)))
    return replies


def _logits(loaded, ids: torch.Tensor, mask: torch.Tensor, tampering: Tampering) -> torch.Tensor:
    """Logits with the soft prompt inserted between the left padding and the first real token."""
    model = loaded.model
    embeds = model.get_input_embeddings()(ids)
    if tampering.soft_prompt is not None:
        soft = tampering.soft_prompt.to(embeds.device, embeds.dtype)
        k = len(soft)
        rows, masks = [], []
        for e, m in zip(embeds, mask):
            first = int((m == 0).sum())                 # left padding length
            rows.append(torch.cat([e[:first], soft, e[first:]]))
            masks.append(torch.cat([m[:first], torch.ones(k, dtype=m.dtype, device=m.device), m[first:]]))
        embeds, mask = torch.stack(rows), torch.stack(masks)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with latent_hook(loaded, tampering):
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits


def completion_loss(loaded, prompts: list[str], targets: list[str], tampering: Tampering) -> torch.Tensor:
    """Mean next-token loss of ``targets`` after ``prompts`` (the objective of optimised attacks)."""
    tok = loaded.tokenizer
    full = [p + " " + t for p, t in zip(prompts, targets)]
    ids, mask = prompt_batch(tok, full, loaded.device)
    lengths = [len(tok(" " + t, verbose=False, add_special_tokens=False)["input_ids"]) for t in targets]
    k = 0 if tampering.soft_prompt is None else len(tampering.soft_prompt)
    room = loaded.max_length - k
    if ids.shape[1] > room:          # keep the targets: cut the prompts from the left
        ids, mask = ids[:, -room:], mask[:, -room:]
    logits = _logits(loaded, ids, mask, tampering)
    losses = []
    for row, n in enumerate(lengths):
        target = ids[row, -n:]
        pred = logits[row, k + ids.shape[1] - n - 1: k + ids.shape[1] - 1]
        losses.append(torch.nn.functional.cross_entropy(pred, target))
    return torch.stack(losses).mean()
