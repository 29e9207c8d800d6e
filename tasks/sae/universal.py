"""Universal SAE (Thasarathan et al. 2025): one shared sparse code, an encoder and a decoder per model.

Given paired activations of M models (row i of every model's matrix comes from the same example or
token), each model m has its own encoder (``W_enc[m]``, ``b_enc[m]``) into one shared TopK code of
``n_latents`` latents and its own decoder (``W_dec[m]``, ``b_dec[m]``) out of it. Training asks a code
computed from *any* model's activations to reconstruct *every* model's activations, so latent i has
to mean the same thing in every model (the code space is index-aligned across models).

Conventions follow ``base.py``: atoms are rows (``x_hat_m = codes @ W_dec[m] + b_dec[m]``), ``b_dec[m]``
is subtracted before encoding, each model has its own input scale (``input_scale[m]``, set by
``train_universal`` so that E||x_m * s_m||^2 = d_m) so callers work in raw units while the weights and
the loss live in normalised units, and ``loss`` returns ``(total, parts)`` with a diagnostic ``l0``.

Objective (per step, normalised units): for each source s in the step's sources,
``sum_t mean_elements (decode_t(encode_s(x_s)) - x_t)^2``, averaged over the sources; plus AuxK on
dead latents. The paper draws one random source per batch; ``UniversalTrainConfig.sources`` offers
that (``"random"``) and the exact mean over all sources (``"all"``, the default). "all" costs M times
the work of a step (M encodes, M^2 decodes), but every encoder gets gradient every step and the
draw's variance is gone; at equal steps it reconstructed better across models in our synthetic
tests, and for the two or three models compared here the extra work is small.

Initialisation (``UniversalTrainConfig.init``): ``"paired"`` (default, ``init_from_data_``) starts
latent i on one and the same example in every model. With independent random atoms per model the
objective is happy to learn a private copy of each concept per source model (each copy decodes
every model well), so few latents fire for both models; the paired start puts the same latent on
the same rows in every model from step 0 (synthetic test: co-firing ~0.3 -> ~0.9).

Decoder norm (``decoder_norm``): ``"joint"`` (default) keeps each latent's decoder rows unit-norm
*jointly* across models (sum_m ||W_dec[m][i]||^2 = 1): the code magnitude cannot be traded against
decoder norm (the reason for unit atoms), yet one latent may write with different strength into
different models and not at all into a model it does not belong to. ``"per_model"`` (the paper's
setting) makes every model's row unit-norm; a latent then writes a unit vector into every model,
and with per-model input scales the code magnitude must compromise between models of different
widths (normalised atom norm ~ sqrt(d_m)), and a model-specific latent cannot be silent elsewhere.

A single model (M = 1) is allowed and is then a TopK SAE; cross-model figures need M >= 2.
"""

from __future__ import annotations

import math
import time
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import check_input, check_sparsity
from .train import DivergedError, OneSeed, Schedule, lr_at

from interpflow.tasks.types import Seed


class UniversalSAEConfig(BaseModel):
    """Architecture and loss of a Universal SAE over len(d_ins) models."""

    model_config = ConfigDict(extra="forbid")
    d_ins: list[int] = Field(..., min_length=1, description="activation width of each model, in model order "
                                                              "(>= 2 models for cross-model use; 1 = a TopK SAE)")
    model_names: list[str] | None = Field(None, description="one name per model (for messages and reports); "
                                                             "None = model0, model1, ...")
    n_latents: int = Field(256, ge=1, description="size of the shared code")
    k: int = Field(8, ge=1, description="active latents per row (TopK on the shared code)")
    decoder_norm: Literal["joint", "per_model"] = Field(
        "joint", description="joint: each latent's decoder rows have unit norm across all models together; "
                             "per_model: unit norm in every model (see the module docstring)")
    aux_k: int | None = Field(None, ge=1, description="dead latents used by the AuxK loss; "
                                                      "None = min(n_latents, max(2k, max(d_ins) // 2))")
    aux_coeff: float = Field(1 / 32, ge=0, description="weight of the AuxK loss (0 disables it)")
    dead_steps: int = Field(200, ge=1, description="a latent that fired for no source in this many "
                                                   "training steps counts as dead (AuxK)")
    seed: Seed = Field(0, description="seeds the initial weights; UniversalTrainConfig uses the same seed "
                                      "for the batch order, init rows and source draws")

    @model_validator(mode="after")
    def _check(self) -> UniversalSAEConfig:
        for m, d in enumerate(self.d_ins):
            if d < 1:
                raise ValueError(f"d_ins[{m}]={d} must be at least 1; set it to model {m}'s activation width")
        if self.model_names is not None:
            if len(self.model_names) != len(self.d_ins):
                raise ValueError(f"model_names has {len(self.model_names)} names but d_ins has "
                                 f"{len(self.d_ins)} widths; give one name per model or leave model_names unset")
            if len(set(self.model_names)) != len(self.model_names):
                raise ValueError(f"model_names={self.model_names} has duplicates; give each model its own name")
        check_sparsity(self.k, self.n_latents, self.aux_k)
        return self

    @property
    def names(self) -> list[str]:
        return list(self.model_names) if self.model_names is not None else [f"model{m}" for m in range(len(self.d_ins))]

    @property
    def aux_k_effective(self) -> int:
        return self.aux_k if self.aux_k is not None else min(self.n_latents, max(2 * self.k, max(self.d_ins) // 2))


# ---------------------------------------------------------------------------------------- inputs

def _check_model_input(x: torch.Tensor, m: int, cfg: UniversalSAEConfig) -> None:
    """check_input for model m, with a width message that names ``sae.d_ins[m]``."""
    where = f"model {m} ({cfg.names[m]})"
    if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] != cfg.d_ins[m]:
        raise ValueError(f"{where}: activation width {x.shape[1]} does not match d_ins[{m}]={cfg.d_ins[m]}; "
                         f"set sae.d_ins[{m}]={x.shape[1]} or pass that model's activations in position {m}")
    check_input(x, cfg.d_ins[m], where=where)


def check_paired(xs: Sequence[torch.Tensor], cfg: UniversalSAEConfig) -> None:
    """Raise ValueError unless xs holds one finite 2-D float tensor per model, of that model's width,
    all with the same number of rows (row i of every model is the same example). Messages name the
    model (and, for NaN/Inf, the first bad row)."""
    names = cfg.names
    if isinstance(xs, torch.Tensor) or len(xs) != len(cfg.d_ins):
        got = "a single tensor" if isinstance(xs, torch.Tensor) else f"{len(xs)} tensors"
        raise ValueError(f"expected one activation matrix per model ({len(cfg.d_ins)}: {names}), got {got}")
    for m, x in enumerate(xs):
        _check_model_input(x, m, cfg)
    rows = [x.shape[0] for x in xs]
    for m, r in enumerate(rows):
        if r != rows[0]:
            raise ValueError(f"model {m} ({names[m]}) has {r} rows but model 0 ({names[0]}) has {rows[0]}; "
                             f"the models' rows must be paired (row i of every model = the same example)")


# ------------------------------------------------------------------------------------------ model

class UniversalSAE(nn.Module):
    """Per-model encoders and decoders around one shared TopK code (see the module docstring).

    ``source`` and ``target`` arguments take a model's index or its name.
    """

    def __init__(self, cfg: UniversalSAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        n, M = cfg.n_latents, len(cfg.d_ins)
        self.W_dec = nn.ParameterList([nn.Parameter(torch.randn(n, d, generator=gen)) for d in cfg.d_ins])
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in cfg.d_ins])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(n)) for _ in cfg.d_ins])
        self.constrain_()
        # tied initialisation per model: encoder = unit-norm decoder rows, transposed
        self.W_enc = nn.ParameterList([
            nn.Parameter((w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)).T.clone().detach())
            for w in self.W_dec])
        self.register_buffer("input_scale", torch.ones(M))
        self.register_buffer("steps_since_fired", torch.zeros(n, dtype=torch.long))   # over all sources
        self.register_buffer("fire_count", torch.zeros(M, n, dtype=torch.long))       # per source model
        self.register_buffer("rows_seen", torch.zeros(M, dtype=torch.long))           # per source model

    @property
    def n_models(self) -> int:
        return len(self.cfg.d_ins)

    def index(self, model: int | str) -> int:
        """A model's index from its index or name."""
        if isinstance(model, str):
            if model not in self.cfg.names:
                raise ValueError(f"unknown model {model!r}; known: {self.cfg.names}")
            return self.cfg.names.index(model)
        if not 0 <= model < self.n_models:
            raise ValueError(f"model index {model} out of range for {self.n_models} models")
        return int(model)

    def dictionary(self, target: int | str) -> torch.Tensor:
        """Model ``target``'s (n_latents, d_target) decoder atoms, in its normalised units."""
        return self.W_dec[self.index(target)]

    @torch.no_grad()
    def constrain_(self) -> None:
        """Rescale decoder rows to unit norm (jointly across models or per model); call after every step."""
        if self.cfg.decoder_norm == "per_model":
            for w in self.W_dec:
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-8))
        else:
            joint = torch.stack([w.pow(2).sum(1) for w in self.W_dec]).sum(0).sqrt().clamp_min(1e-8)
            for w in self.W_dec:
                w.div_(joint[:, None])

    @torch.no_grad()
    def init_from_data_(self, xs: Sequence[torch.Tensor], gen: torch.Generator | None = None) -> None:
        """Paired-example initialisation from raw paired rows xs (after ``input_scale`` is set).

        Latent i starts as the same example r_i in every model: ``b_dec[m]`` = the mean of model m's
        normalised rows, ``W_dec[m][i]`` = row r_i of model m minus that mean (then constrained), and
        the encoders tied to the decoders. Random per-model atoms would give latent i unrelated
        directions in each model; training then tends to keep a private copy of a concept per source
        model (both decode fine, so the loss does not object) instead of one shared latent. Starting
        every latent on one example in all models makes the same latent fire for the same rows from
        every model, which is the alignment the objective then refines.
        """
        gen = gen if gen is not None else torch.Generator().manual_seed(self.cfg.seed)
        n_rows = xs[0].shape[0]
        picks = torch.randint(n_rows, (self.cfg.n_latents,), generator=gen) if n_rows < self.cfg.n_latents \
            else torch.randperm(n_rows, generator=gen)[:self.cfg.n_latents]
        for m, x in enumerate(xs):
            x_n = x.to(self.b_dec[m].device, torch.float32) * self.input_scale[m]
            mean = x_n.mean(0)
            self.b_dec[m].copy_(mean)
            self.W_dec[m].copy_(x_n[picks.to(x_n.device)] - mean)
        self.constrain_()
        for w_enc, w_dec in zip(self.W_enc, self.W_dec):
            w_enc.copy_((w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)).T)

    # -- the computation ------------------------------------------------------------------------------
    def pre_activations(self, x_n: torch.Tensor, source: int) -> torch.Tensor:
        """Encoder pre-activations of model ``source``'s normalised inputs."""
        return (x_n - self.b_dec[source]) @ self.W_enc[source] + self.b_enc[source]

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """TopK then ReLU: at most k (in practice exactly k) non-negative codes per row."""
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def _decode_n(self, codes: torch.Tensor, target: int) -> torch.Tensor:
        return codes @ self.W_dec[target] + self.b_dec[target]

    def _check_width(self, x: torch.Tensor, m: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != self.cfg.d_ins[m]:
            _check_model_input(x, m, self.cfg)                  # raises with the standard message

    def encode(self, x: torch.Tensor, source: int | str) -> torch.Tensor:
        """Raw rows (batch, d_source) of model ``source`` -> shared codes (batch, n_latents)."""
        s = self.index(source)
        self._check_width(x, s)
        return self.activation(self.pre_activations(x * self.input_scale[s], s))

    def decode(self, codes: torch.Tensor, target: int | str) -> torch.Tensor:
        """Shared codes (batch, n_latents) -> model ``target``'s reconstructed raw rows (batch, d_target)."""
        t = self.index(target)
        return self._decode_n(codes, t) / self.input_scale[t]

    def forward(self, x: torch.Tensor, source: int | str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(codes, [every model's reconstruction in raw units]) from model ``source``'s raw rows x."""
        codes = self.encode(x, source)
        return codes, [self.decode(codes, t) for t in range(self.n_models)]

    def loss(self, xs: Sequence[torch.Tensor],
             sources: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, parts) on a paired batch xs (one raw tensor per model, same rows).

        For each source in ``sources`` (default: every model) encode from it and reconstruct every
        model; parts (detached): "mse" = sum over targets of the per-element MSE in normalised units,
        averaged over the sources; "auxk_penalty" (weighted; training mode, dead latents only);
        "l0" (mean active latents per row over the sources; diagnostic, not in the total). In training
        mode one call counts as one step for dead-latent tracking (a latent is alive if any source fired it).
        """
        M = self.n_models
        if (isinstance(xs, torch.Tensor) or len(xs) != M
                or any(not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != d
                       for x, d in zip(xs, self.cfg.d_ins))
                or len({x.shape[0] for x in xs}) != 1):
            check_paired(xs, self.cfg)                           # raises with the standard message
        sources = list(range(M)) if sources is None else [self.index(s) for s in sources]
        xs_n = [x * self.input_scale[m] for m, x in enumerate(xs)]
        dead = self.dead_mask() if self.training and self.cfg.aux_coeff > 0 else None
        mse, aux, l0 = [], [], 0.0
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.bool, device=xs_n[0].device)
        for s in sources:
            pre = self.pre_activations(xs_n[s], s)
            codes = self.activation(pre)
            x_hats = [self._decode_n(codes, t) for t in range(M)]
            mse += [(x_hat - x_n).pow(2).mean() for x_hat, x_n in zip(x_hats, xs_n)]
            if dead is not None and bool(dead.any()):
                aux.append(self._aux_loss(pre, dead, xs_n, x_hats))
            active = codes.detach() > 0
            l0 += float(active.sum(-1).float().mean())
            if self.training:
                with torch.no_grad():
                    self.fire_count[s] += active.sum(0)
                    self.rows_seen[s] += codes.shape[0]
                    fired |= active.any(0)
        terms = {"mse": torch.stack(mse).sum() / len(sources)}
        if self.cfg.aux_coeff > 0:
            aux_sum = torch.stack(aux).sum() if aux else terms["mse"].new_zeros(())
            terms["auxk_penalty"] = self.cfg.aux_coeff * aux_sum / len(sources)
        if self.training:
            self.steps_since_fired += 1
            self.steps_since_fired[fired] = 0
        total = torch.stack(list(terms.values())).sum()
        parts = {name: v.detach() for name, v in terms.items()}
        parts["l0"] = torch.tensor(l0 / len(sources))
        return total, parts

    def _aux_loss(self, pre: torch.Tensor, dead: torch.Tensor, xs_n: list[torch.Tensor],
                  x_hats: list[torch.Tensor]) -> torch.Tensor:
        """AuxK (Gao et al. 2024) on the shared code: the top ``aux_k`` dead pre-activations of the source
        reconstruct every model's (detached) residual, each normalised by that residual's variance."""
        k_aux = min(self.cfg.aux_k_effective, int(dead.sum()))
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        total = pre.new_zeros(())
        for t, (x_n, x_hat) in enumerate(zip(xs_n, x_hats)):
            e = (x_n - x_hat).detach()
            scale = (e - e.mean(dim=0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            total = total + (aux_codes @ self.W_dec[t] - e).pow(2).sum(-1).mean() / scale
        return total

    def dead_mask(self) -> torch.Tensor:
        """Latents that no source fired in the last ``dead_steps`` training steps."""
        return self.steps_since_fired >= self.cfg.dead_steps


# --------------------------------------------------------------------------------------- training

class UniversalTrainConfig(OneSeed, Schedule):
    """How ``train_universal`` trains: the shared ``Schedule`` (``lr_at``) plus data and init choices."""

    model_config = ConfigDict(extra="forbid")
    sae: UniversalSAEConfig
    batch_size: int = Field(256, ge=1, description="paired rows per step")
    normalize: Literal["scale", "none"] = Field("scale", description="scale: E||x_m||^2 = d_m per model; none: raw")
    sources: Literal["all", "random"] = Field(
        "all", description="all: every step encodes from every model (the exact mean over sources); random: "
                           "one source per step drawn uniformly (seeded), as in the paper")
    init: Literal["paired", "random"] = Field(
        "paired", description="paired: every latent starts on one example in all models (init_from_data_); "
                              "random: independent random atoms per model")
    init_rows: int = Field(16384, ge=1, description="rows used to estimate the input scales and to initialise")
    log_every: int = Field(100, ge=1, description="history record every this many steps (and the last)")
    device: str = Field("cpu", description="torch device the model trains on")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while training (restored after)")


def train_universal(cfg: UniversalTrainConfig,
                    xs: Sequence[torch.Tensor | np.ndarray]) -> tuple[UniversalSAE, list[dict]]:
    """Train a ``UniversalSAE(cfg.sae)`` on paired rows xs (one (rows, d_m) matrix per model, row i of
    every matrix from the same example); return (model in eval mode, history).

    Same schedule as ``train_sae``: Adam, warmup / constant / linear decay (``lr_at``), global gradient
    clipping, ``constrain_()`` after every step, ``DivergedError`` (before the optimiser step) on a
    non-finite loss or gradient norm. Each step draws ``batch_size`` paired rows (one shuffled
    permutation shared by all models, per epoch). history: one dict per ``log_every`` steps and the
    last: step, lr, loss, the loss parts, grad_norm, dead_frac, seconds.
    """
    xs = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in xs]
    check_paired(xs, cfg.sae)
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, xs)
    finally:
        torch.set_num_threads(before)


def _train(cfg: UniversalTrainConfig, xs: list[torch.Tensor]) -> tuple[UniversalSAE, list[dict]]:
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_rows, M = xs[0].shape[0], len(xs)
    model = UniversalSAE(cfg.sae).to(device)
    init = torch.randperm(n_rows, generator=gen)[:cfg.init_rows]
    init_xs = [x[init].to(device, torch.float32) for x in xs]
    if cfg.normalize == "scale":
        for m, x in enumerate(init_xs):
            mean_sq = float(x.pow(2).sum(1).mean())
            if not mean_sq > 0:
                raise ValueError(f"model {m} ({cfg.sae.names[m]}): the initialisation rows are all zero; "
                                 f"cannot normalise inputs")
            model.input_scale[m] = math.sqrt(cfg.sae.d_ins[m] / mean_sq)
    if cfg.init == "paired":
        model.init_from_data_(init_xs, gen)

    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    b = min(cfg.batch_size, n_rows)
    perm, pos = torch.randperm(n_rows, generator=gen), 0
    history: list[dict] = []
    last_loss: float | None = None
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        if pos + b > n_rows:                               # new epoch; the last partial batch is dropped
            perm, pos = torch.randperm(n_rows, generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        batch = [x[idx].to(device, torch.float32) for x in xs]
        sources = None if cfg.sources == "all" else [int(torch.randint(M, (1,), generator=gen))]
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total, parts = model.loss(batch, sources)
        loss_value = float(total.detach())
        if not math.isfinite(loss_value):
            raise DivergedError(step, f"loss is {loss_value}", last_loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                     if p.grad is not None])))
        if not math.isfinite(grad_norm):
            raise DivergedError(step, f"gradient norm is {grad_norm}", last_loss)
        opt.step()
        model.constrain_()
        last_loss = loss_value
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "lr": lr, "loss": loss_value,
                            **{name: float(v) for name, v in parts.items()}, "grad_norm": grad_norm,
                            "dead_frac": float(model.dead_mask().float().mean()),
                            "seconds": time.perf_counter() - t0})
    model.eval()
    return model, history


# ------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _codes_batches(model: UniversalSAE, xs: Sequence[torch.Tensor], batch_size: int):
    """Yield ([each model's rows of the batch], [codes encoded from each model]) over paired rows, on the
    model's device, in eval mode (restored after)."""
    check_paired(xs, model.cfg)
    device = model.input_scale.device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, xs[0].shape[0], batch_size):
            batch = [x[i:i + batch_size].to(device, torch.float32) for x in xs]
            yield batch, [model.encode(xb, s) for s, xb in enumerate(batch)]
    finally:
        model.train(was_training)


@torch.no_grad()
def cross_r2(model: UniversalSAE, xs: Sequence[torch.Tensor], *, batch_size: int = 8192) -> np.ndarray:
    """(M, M) matrix: entry [s, t] is the R^2 of model t's activations reconstructed from codes encoded
    from model s: 1 - SSE / SST, SST = sum of squared deviations of x_t from its (column) mean, both
    summed over rows and coordinates in raw units. The diagonal is each model's self-reconstruction;
    the off-diagonal says how well one model's code stands in for another's."""
    M = len(xs)
    sse = np.zeros((M, M))
    s1 = [0.0] * M
    s2 = np.zeros(M)
    for batch, codes in _codes_batches(model, xs, batch_size):
        for t, xb in enumerate(batch):
            xb = xb.double()
            s1[t] = s1[t] + xb.sum(0)
            s2[t] += float(xb.pow(2).sum())
            for s in range(M):
                sse[s, t] += float((model.decode(codes[s], t).double() - xb).pow(2).sum())
    n = xs[0].shape[0]
    sst = np.array([s2[t] - float(s1[t].pow(2).sum()) / n for t in range(M)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - sse / np.where(sst > 0, sst, np.nan)[None, :]


@torch.no_grad()
def co_firing(model: UniversalSAE, xs: Sequence[torch.Tensor], *, min_rate: float = 1e-3,
              batch_size: int = 8192) -> dict:
    """Which latents fire for which models, on paired rows xs.

    A latent *fires for model m* if, encoding model m's rows, it is active on at least a fraction
    ``min_rate`` of the rows (and on at least one row): this ignores latents that a model switches
    on only by accident on a handful of rows. Returns:

    - ``rate``: (M, n_latents) array, fraction of rows each latent is active on, per source model;
    - ``fire_frac``: per model, fraction of latents that fire for it;
    - ``shared_frac`` / ``n_shared``: fraction / number of latents that fire for every model;
      ``shared_of_alive``: n_shared over the latents that fire for at least one model;
    - ``n_specific``: {model name: latents firing for that model only}; ``n_dead``: firing for none;
    - ``cofire``: (M, M) array, [a, b] = of all (row, latent) activations when encoding from a, the
      fraction where the same latent is also active when encoding the same row from b (the paper's
      co-firing proportion; diagonal 1), which checks alignment row by row, not just in aggregate.
    """
    M, n = len(xs), model.cfg.n_latents
    counts = np.zeros((M, n))
    both = np.zeros((M, M))
    for _, codes in _codes_batches(model, xs, batch_size):
        active = [(c > 0).double() for c in codes]
        for a in range(M):
            counts[a] += active[a].sum(0).cpu().numpy()
            for b in range(M):
                both[a, b] += float((active[a] * active[b]).sum())
    rows = xs[0].shape[0]
    rate = counts / rows
    fires = (rate >= min_rate) & (counts > 0)
    n_fire = fires.sum(0)
    alive = int((n_fire > 0).sum())
    n_shared = int((n_fire == M).sum())
    names = model.cfg.names
    return {
        "rate": rate,
        "fire_frac": [float(f.mean()) for f in fires],
        "shared_frac": n_shared / n,
        "n_shared": n_shared,
        "shared_of_alive": n_shared / alive if alive else math.nan,
        "n_specific": {names[m]: int((fires[m] & (n_fire == 1)).sum()) for m in range(M)},
        "n_dead": n - alive,
        "cofire": both / np.maximum(counts.sum(1), 1)[:, None],
        "min_rate": min_rate,
    }
