"""Activation steering: add coef * v to the residual stream at chosen layers while a model generates,
and how much that costs the text's coherence.

A steering spec is a list of (site, vector) pairs and one coefficient. ``steer`` hooks every listed
site through ``sites.intervene`` (so it works on any architecture the site map knows), adding the
vector to every position the forward pass sees: the prompt on the first pass, then each generated
token (the KV cache keeps the steered prompt). ``coef = 0`` adds nothing at all (no hook), so the
unsteered condition is exactly the base model.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import numpy as np
import torch

from interpflow.tasks.sites import intervene


def layer_site(layer: int) -> str:
    """The residual-stream site steered at ``layer`` (block index)."""
    return f"blocks.{layer}.resid_post"


@contextmanager
def steer(loaded, vectors: dict[str, np.ndarray], coef: float) -> Iterator[None]:
    """Within the block, ``loaded.model`` runs with ``coef * vectors[site]`` added at each site."""
    if coef == 0 or not vectors:
        yield
        return
    with ExitStack() as stack:
        for name, vector in vectors.items():
            site = loaded.sites.resolve(name)
            width = loaded.sites.width(site)
            v = torch.as_tensor(np.asarray(vector), dtype=torch.float32).reshape(-1)
            if width is not None and v.shape[0] != width:
                raise ValueError(f"steering vector for {name} has {v.shape[0]} entries, the site has width {width}")
            shift = (coef * v).to(loaded.device)
            stack.enter_context(intervene(loaded.model, site, lambda h, s=shift: h + s.to(h.dtype)))
        yield


def random_like(vector: np.ndarray, seed: int) -> np.ndarray:
    """A random direction with the same norm as ``vector`` (the steering control)."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    r = np.random.default_rng(seed).standard_normal(v.shape[0])
    return (r / np.linalg.norm(r) * np.linalg.norm(v)).astype(np.float32)


@torch.no_grad()
def reply_perplexity(loaded, prompts: list[str], replies: list[str]) -> list[float]:
    """Perplexity of each reply given its prompt under the (unsteered) model: exp of the mean next-token
    loss over the reply's tokens. A reply with no tokens gets nan."""
    from interpflow.tasks.tiny_lm import pad_batch

    tok = loaded.tokenizer
    if not prompts:
        return []
    heads = [len(tok(prompt, verbose=False)["input_ids"]) for prompt in prompts]
    fulls = [tok(f"{p} {r}", verbose=False)["input_ids"][:loaded.max_length] for p, r in zip(prompts, replies)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = {k: v.to(loaded.device) for k, v in pad_batch(fulls, pad).items()}    # right-padded: causal logits
    logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    out = []
    for i, (head, full) in enumerate(zip(heads, fulls)):
        start = min(head, len(full))
        if start >= len(full) or start == 0:
            out.append(float("nan"))
            continue
        nll = torch.nn.functional.cross_entropy(logits[i, start - 1:len(full) - 1], batch["input_ids"][i, start:len(full)])
        out.append(float(torch.exp(nll)))
    return out
