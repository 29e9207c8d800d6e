"""The one seam between a model and the influence machinery (after kronfluence's ``Task``).

A task says two things about a batch (a dict of tensors whose first dimension is the example):

- ``train_loss(model, batch) -> (n,)``: each example's training loss; its gradient is the training
  side of every score, and its curvature is what the preconditioners approximate.
- ``measurement(model, batch) -> (n,)``: the quantity whose change we attribute, **higher = more of
  the behaviour**. Scores are the estimated increase of the mean measurement when a training
  example is up-weighted (see ``scores.py``).

Both are written for an ordinary batched forward pass; ``grads.py`` runs them on batches of one
example under ``torch.func`` (``functional_call`` + ``vmap(grad(...))``), so they must be pure tensor
code: no ``.item()``, no Python branching on tensor values, no in-place writes to parameters.
Forward hooks are fine (``site_activation`` uses one). ``attention_mask(batch)`` names the real
(non-padding) tokens so K-FAC's activation statistics skip padding.

Two tasks for Hugging Face causal LMs ship here. The batch holds ``input_ids`` (n, T),
``attention_mask`` (n, T; 1 = real token, any padding side) and optionally ``loss_mask`` (n, T; 1 =
this token is a prediction target, e.g. the response tokens; default the attention mask) and, for
the concept measurement, ``query_mask`` (n, T; which tokens the concept is averaged over; default
``loss_mask``, then the attention mask). An optional ``labels`` (n, T) replaces the targets
(``input_ids`` shifted by one): ``sample_labels`` fills it from the model's own predictions, so the
gradients of that loss give the *true* Fisher (kronfluence's default) where the observed tokens give
the empirical one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import SiteMap, _first_tensor

Batch = dict[str, torch.Tensor]


class Task(ABC):
    """What influence needs to know about a model: a per-example loss and a measurement."""

    @abstractmethod
    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example training loss, shape (n,)."""

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example measurement to attribute, shape (n,); higher = more of the behaviour.

        Default: the negative training loss (the query's log-likelihood), i.e. classical influence.
        """
        return -self.train_loss(model, batch)

    def attention_mask(self, batch: Batch) -> torch.Tensor | None:
        """(n, T) mask of real tokens, or None when every position is real (default)."""
        return None


def _float_mask(batch: Batch, *keys: str, like: torch.Tensor) -> torch.Tensor:
    """The first present mask among ``keys`` as ``like``'s float dtype, else all ones of input_ids' shape."""
    for key in keys:
        if batch.get(key) is not None:
            return batch[key].to(like.dtype)
    return torch.ones(batch["input_ids"].shape, dtype=like.dtype, device=like.device)


class CausalLMTask(Task):
    """Next-token cross-entropy per example, padding and non-target tokens masked out.

    Target token t (t >= 1) counts when ``loss_mask[t]`` (default ``attention_mask[t]``) is 1. The
    per-example loss is the mean over its counted targets (``reduction="mean"``, as HF trains) or
    their sum. ``measurement`` is the negative loss: the log-likelihood of a query's tokens.
    """

    def __init__(self, reduction: Literal["mean", "sum"] = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"CausalLMTask: reduction={reduction!r}; use 'mean' or 'sum'")
        self.reduction = reduction

    @staticmethod
    def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
        if "input_ids" not in batch:
            raise ValueError(f"CausalLMTask: the batch has no 'input_ids' (keys: {sorted(batch)}); "
                             "pass tokenised inputs")
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs

    def attention_mask(self, batch: Batch) -> torch.Tensor | None:
        return batch.get("attention_mask")

    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids = batch["labels"] if batch.get("labels") is not None else batch["input_ids"]
        logits = model(**self.model_inputs(batch)).logits[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()                 # the softmax of a half-precision model, in float32
        mask = _float_mask(batch, "loss_mask", "attention_mask", like=logits)[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").reshape(mask.shape)
        total = (nll * mask).sum(dim=1)
        return total / mask.sum(dim=1).clamp_min(1.0) if self.reduction == "mean" else total


def label_seed(seed: int, example_id: int) -> int:
    """The sampling seed of one example: the same on every shard, batch split and process."""
    key = f"interpflow.influence.fisher|{seed}|{int(example_id)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_labels(model: nn.Module, batch: Batch, seed: int, id_key: str = "id") -> Batch:
    """``batch`` plus ``labels``: each target token drawn from the model's predictive distribution at that
    position, with a generator seeded by (seed, example id). Run once per batch *outside* ``vmap`` (no
    random stream is needed inside the transform), so the sampled loss is an ordinary deterministic task
    input and every shard draws the same labels for the same example."""
    from .grads import functional_mode

    with functional_mode(model):
        logits = model(**CausalLMTask.model_inputs(batch)).logits[:, :-1].double()
    probs = torch.softmax(logits, dim=-1).cpu()
    labels = batch["input_ids"].clone()
    for i, example_id in enumerate(torch.as_tensor(batch[id_key]).reshape(-1).tolist()):
        gen = torch.Generator().manual_seed(label_seed(seed, example_id))
        labels[i, 1:] = torch.multinomial(probs[i], 1, generator=gen)[:, 0].to(labels.device)
    return {**batch, "labels": labels}


class _SiteReached(Exception):
    """Raised by the capture hook to skip the layers after the site (their output is not needed)."""


def site_activation(model: nn.Module, site: str, inputs: dict[str, torch.Tensor],
                    stop_early: bool = True) -> torch.Tensor:
    """The tensor at ``site`` (a ``sites`` name such as ``blocks.3.resid_post``, or a module path)
    for ``model(**inputs)``, *kept in the autograd graph* (unlike ``sites.capture``, which detaches).

    Works under ``torch.func`` transforms: the hook only records the tensor the forward pass made,
    and with ``stop_early`` the rest of the model is skipped by an exception caught here. Note that
    ``blocks.I.resid_post`` is the block's output; HF's ``hidden_states[-1]`` is not the last
    block's output (the final norm is applied to it), which is why a hook is used, not
    ``output_hidden_states``.
    """
    site_map = SiteMap(model)
    resolved = site_map.resolve(site)
    module = site_map.modules[resolved.module]
    captured: list[torch.Tensor] = []

    def store(tensor: torch.Tensor) -> None:
        if resolved.head is not None:
            heads = site_map.n_heads or 1
            tensor = tensor.reshape(*tensor.shape[:-1], heads, tensor.shape[-1] // heads)[..., resolved.head, :]
        captured.append(tensor)
        if stop_early:
            raise _SiteReached

    if resolved.side == "input":
        def pre_hook(mod, args, kwargs):
            store(args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()))))
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(mod, args, output):
            store(_first_tensor(output))
        handle = module.register_forward_hook(hook)
    try:
        model(**inputs)
    except _SiteReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"site {site!r} (module {resolved.module!r}) was not reached by the forward pass")
    return captured[0]


class ConceptTask(CausalLMTask):
    """Concept Influence's measurement: f_v(x) = mean over query tokens of <h_l(x), v>.

    h_l is the activation at ``site`` (e.g. ``blocks.3.resid_post``) and v a concept direction (a
    linear probe's weight, an SAE feature's encoder row or decoder atom), used as given: scale v to
    unit norm yourself if scores of different directions are to be compared. The training loss is
    the causal-LM loss. Evaluated on the training set without gradients, the same measurement is
    the probe-projection score (``scores.probe_scores``), Concept Influence's first-order proxy.
    """

    def __init__(self, site: str, direction: torch.Tensor, reduction: Literal["mean", "sum"] = "mean",
                 stop_early: bool = True):
        super().__init__(reduction)
        direction = torch.as_tensor(direction)
        if direction.ndim != 1:
            raise ValueError(f"ConceptTask: direction must be a 1-D vector (d_model,), got shape "
                             f"{tuple(direction.shape)}; pass one probe/feature direction at a time")
        if not bool(torch.isfinite(direction).all()):
            raise ValueError("ConceptTask: direction has NaN/Inf entries")
        self.site, self.direction, self.stop_early = site, direction, stop_early

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        h = site_activation(model, self.site, self.model_inputs(batch), stop_early=self.stop_early)
        if h.shape[-1] != self.direction.shape[0]:
            raise ValueError(f"ConceptTask: site {self.site!r} has width {h.shape[-1]} but the direction has "
                             f"{self.direction.shape[0]} entries; use a direction fitted on this site")
        proj = h @ self.direction.to(h.device, h.dtype)
        mask = _float_mask(batch, "query_mask", "loss_mask", "attention_mask", like=proj)
        return (proj * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
