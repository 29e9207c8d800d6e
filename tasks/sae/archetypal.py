"""Archetypal SAEs (Fel et al. 2025, "Archetypal SAE"): atoms tied to the geometry of the data.

A-SAE: D = W C, where C (n_candidates, d_in) is a fixed buffer of candidate points from the data
(k-means centroids, ``fit_candidates``) and W = softmax(W_logits) is row-stochastic, so every atom
lies in the convex hull of the candidates. RA-SAE: D = W C + Lambda with ||Lambda_i|| <= delta for
every atom, enforced by projection in ``constrain_()`` after each optimiser step. Both use the TopK
encoder (and its AuxK loss). Atoms are not unit norm (their scale is that of the data, which the
unpenalised TopK codes absorb), so ``normalize_decoder_`` does not apply to them. Unlike the
reference implementation there is no learned global multiplier on D: atoms stay inside the hull.

Candidates are fitted by ``init_from_data_(x)`` (``train_sae`` calls it on its initialisation rows)
in normalised units; the model refuses to encode or decode before that.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import register
from .variants import TopKSAE


@torch.no_grad()
def fit_candidates(x: torch.Tensor, n: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """k-means centroids of the rows of x: (n, d). k-means++ seeding, then Lloyd iterations.

    Deterministic for a given seed. A cluster that empties is re-seeded with the point farthest from
    its centroid. Raises ValueError if x has fewer rows than n.
    """
    if x.ndim != 2:
        raise ValueError(f"fit_candidates: expected (rows, d), got shape {tuple(x.shape)}")
    if x.shape[0] < n:
        raise ValueError(f"fit_candidates: {x.shape[0]} rows cannot give n_candidates={n} centroids; "
                         f"give more rows or lower sae.n_candidates")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sq = x.pow(2).sum(1)

    def dist2(c: torch.Tensor) -> torch.Tensor:
        return (sq[:, None] - 2 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min(0)

    # k-means++: each next centre drawn with probability proportional to squared distance
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    centres = [x[first]]
    d2 = dist2(x[first:first + 1]).squeeze(1)
    for _ in range(1, n):
        total = d2.sum()
        if total <= 0:                                   # fewer distinct points than n: any point
            i = int(torch.randint(x.shape[0], (1,), generator=gen))
        else:
            i = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen))
        centres.append(x[i])
        d2 = torch.minimum(d2, dist2(x[i:i + 1]).squeeze(1))
    c = torch.stack(centres)

    for _ in range(iters):
        dist = dist2(c)
        assign = dist.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n).to(x.dtype)
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if bool(empty.any()):
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            break
        c = new
    return c


@register("archetypal")
class ArchetypalSAE(TopKSAE):
    """A-SAE: TopK encoder, decoder D = softmax(W_logits) @ candidates."""

    atoms_unit_norm = False
    init_weight = 0.5          # initial weight of each atom's own candidate (the rest spread evenly)
    lr_scale = {"W_logits": 10.0}   # softmax logits need to travel far; Adam steps are ~lr each

    def _init_decoder(self, gen: torch.Generator) -> None:
        cfg = self.cfg
        self.register_buffer("candidates", torch.zeros(cfg.n_candidates, cfg.d_in))
        self.register_buffer("candidates_fitted", torch.tensor(False))
        self.W_logits = nn.Parameter(torch.zeros(cfg.n_latents, cfg.n_candidates))

    def _initial_encoder(self, gen: torch.Generator) -> torch.Tensor:
        w = torch.randn(self.cfg.d_in, self.cfg.n_latents, generator=gen)
        return w / w.norm(dim=0, keepdim=True)           # replaced by init_from_data_

    def weights(self) -> torch.Tensor:
        """The row-stochastic (n_latents, n_candidates) mixing matrix W."""
        return torch.softmax(self.W_logits, dim=-1)

    def _require_candidates(self) -> None:
        if not bool(self.candidates_fitted):
            raise RuntimeError(f"{self.variant} SAE has no candidate points yet; call "
                               f"init_from_data_(x) with representative rows first (train_sae does)")

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        self._require_candidates()
        return super().pre_activations(x_n)

    def dictionary(self) -> torch.Tensor:
        self._require_candidates()
        return self.weights() @ self.candidates

    def normalize_decoder_(self) -> None:
        raise NotImplementedError(f"{self.variant} atoms are convex combinations of candidate points and "
                                  f"are not rescaled; call constrain_() instead")

    @torch.no_grad()
    def constrain_(self) -> None:
        """Nothing to project: the softmax keeps W row-stochastic by construction."""

    @torch.no_grad()
    def init_from_data_(self, x: torch.Tensor) -> None:
        """Fit the candidates (k-means of the normalised rows), start atom i at (mostly) one candidate,
        and tie the encoder to the normalised initial atoms."""
        cfg = self.cfg
        self.check_input(x)
        x_n = (x * self.input_scale).to(self.candidates.device, self.candidates.dtype)
        self.candidates.copy_(fit_candidates(x_n, cfg.n_candidates, seed=cfg.seed))
        self.candidates_fitted.fill_(True)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        reps = math.ceil(cfg.n_latents / cfg.n_candidates)
        own = torch.cat([torch.randperm(cfg.n_candidates, generator=gen) for _ in range(reps)])[:cfg.n_latents]
        logit = math.log(self.init_weight * (cfg.n_candidates - 1) / (1 - self.init_weight))
        self.W_logits.zero_()
        self.W_logits[torch.arange(cfg.n_latents), own.to(self.W_logits.device)] = logit
        d = self.dictionary()
        self.W_enc.copy_((d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)).T)


@register("relaxed_archetypal")
class RelaxedArchetypalSAE(ArchetypalSAE):
    """RA-SAE: D = softmax(W_logits) @ candidates + Lambda, ||Lambda_i|| <= delta (projected)."""

    def _init_decoder(self, gen: torch.Generator) -> None:
        super()._init_decoder(gen)
        self.relaxation = nn.Parameter(torch.zeros(self.cfg.n_latents, self.cfg.d_in))

    def dictionary(self) -> torch.Tensor:
        return super().dictionary() + self.relaxation

    @torch.no_grad()
    def constrain_(self) -> None:
        """Scale each row of Lambda back onto the ball ||Lambda_i|| <= delta."""
        norms = self.relaxation.norm(dim=1, keepdim=True)
        self.relaxation.mul_((self.cfg.delta / norms.clamp_min(1e-12)).clamp(max=1.0))
