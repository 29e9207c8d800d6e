"""The sparse autoencoder every variant shares: config, encode/decode, loss, constraint, metrics.

Conventions (all variants):

- **Atoms are rows.** ``dictionary()`` returns the decoder as an ``(n_latents, d_in)`` matrix whose
  row ``i`` is the direction latent ``i`` writes; ``x_hat = codes @ dictionary() + b_dec``. (In the
  ``x_hat = W_dec z`` convention of papers these rows are the *columns* of ``W_dec``.)
- **Pre-encoder bias.** ``b_dec`` is subtracted from the input before encoding and added back after
  decoding: ``pre = (x - b_dec) @ W_enc + b_enc``.
- **Input scale.** Every model holds a scalar buffer ``input_scale`` (1 by default; ``train_sae`` sets
  it so that E||x * input_scale||^2 = d_in). ``encode`` multiplies raw inputs by it and ``decode``
  divides by it, so callers always work in the units of their data; the dictionary, the biases and
  the loss live in the normalised space, which keeps coefficients (l1, l0, delta) independent of the
  data's scale.
- **Loss.** ``loss(x)`` returns ``(total, parts)``: ``parts["mse"]`` is the per-element mean squared
  error in normalised units, the variant's already-weighted penalties follow, ``total`` is their
  sum, and ``parts["l0"]`` (active latents per row) is a diagnostic outside the total. In training
  mode one call of ``loss`` counts as one training step for dead-latent tracking.

A variant is a subclass that overrides ``activation`` (pre-activations -> codes) and, where it needs
one, ``penalties`` (extra loss terms), ``dictionary``/``constrain_`` (decoder parameterisation),
``init_from_data_`` and ``lr_scale`` (per-parameter learning-rate multipliers). Register it with
``@register("name")`` and add the name to ``Variant``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from interpflow.tasks.types import Seed

Variant = Literal["relu", "topk", "batchtopk", "jumprelu", "archetypal", "relaxed_archetypal"]
TOPK_FAMILY = ("topk", "batchtopk", "archetypal", "relaxed_archetypal")   # variants that use `k`
PENALTY_OF = {"relu": "l1_coeff", "jumprelu": "l0_coeff"}                 # what sets the others' sparsity
DEFAULT_K = 8


def check_sparsity(k: int | None, n_latents: int, aux_k: int | None) -> None:
    """TopK-style codes need k < n_latents, and AuxK at most n_latents dead latents."""
    if k is not None and k >= n_latents:
        raise ValueError(f"k={k} must be smaller than n_latents={n_latents}; lower k or raise n_latents")
    if aux_k is not None and aux_k > n_latents:
        raise ValueError(f"aux_k={aux_k} must be at most n_latents={n_latents}; lower aux_k or leave it unset")


class SAEConfig(BaseModel):
    """Everything that defines one SAE's architecture and loss (not its training schedule)."""

    model_config = ConfigDict(extra="forbid")
    variant: Variant = Field("topk", description="which SAE: " + ", ".join(Variant.__args__))
    d_in: int = Field(64, ge=1, description="activation width")
    n_latents: int = Field(256, ge=1, description="dictionary size (number of latents)")
    k: int | None = Field(None, ge=1, description="topk family only: active latents per row (topk, "
                          "archetypal) or per row on average across a batch (batchtopk); default 8. relu and "
                          "jumprelu refuse it (their L0 comes from l1_coeff / l0_coeff)")
    l1_coeff: float = Field(1e-2, ge=0, description="relu: weight of the L1 penalty sum_i |z_i| ||d_i||")
    jumprelu_bandwidth: float = Field(0.05, gt=0, description="jumprelu: width of the rectangle kernel "
                                                               "of the straight-through estimators")
    jumprelu_init_threshold: float = Field(0.05, gt=0, description="jumprelu: initial threshold of every latent")
    l0_coeff: float = Field(1e-2, ge=0, description="jumprelu: weight of the L0 penalty (latents per row)")
    aux_k: int | None = Field(None, ge=1, description="topk family: dead latents used by the AuxK loss; "
                                                      "None = min(n_latents, max(2k, d_in // 2))")
    aux_coeff: float = Field(1 / 32, ge=0, description="topk family: weight of the AuxK loss (0 disables it)")
    dead_steps: int = Field(200, ge=1, description="a latent that has not fired for this many training "
                                                   "steps counts as dead (AuxK)")
    delta: float = Field(1.0, ge=0, description="relaxed_archetypal: bound on ||Lambda_i|| per atom, "
                                                "in normalised units (E||x||^2 = d_in)")
    n_candidates: int = Field(256, ge=2, description="archetypal: candidate points (k-means centroids "
                                                     "of the data) whose convex hull holds the atoms")
    seed: Seed = Field(0, description="seeds the initial weights and the k-means of the candidates; "
                                      "SAETrainConfig uses the same seed for the batch order")

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.variant in TOPK_FAMILY:
            if self.k is None:
                self.k = DEFAULT_K
        elif self.k is not None:
            # a k that is accepted and ignored makes a sweep over k train one model several times
            raise ValueError(f"k={self.k} does not apply to variant={self.variant!r}: its sparsity is set by "
                             f"{PENALTY_OF[self.variant]}; remove k (or choose a variant of "
                             f"{', '.join(TOPK_FAMILY)})")
        check_sparsity(self.k, self.n_latents, self.aux_k)
        return self

    @property
    def aux_k_effective(self) -> int:
        if self.aux_k is not None:
            return self.aux_k
        return min(self.n_latents, max(2 * (self.k or DEFAULT_K), self.d_in // 2))


# ---------------------------------------------------------------------------------------- inputs

def check_input(x: torch.Tensor, d_in: int, *, row_offset: int = 0, where: str = "activations") -> None:
    """Raise ValueError unless x is a finite 2-D float tensor of width d_in.

    ``row_offset`` is added to reported row indices (the row's index in the whole stream) and ``where``
    names the source (e.g. ``"shard 3"``) so the message points at the bad row of the bad file.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D (rows, d_in) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != d_in:
        raise ValueError(f"{where}: activation width {x.shape[1]} does not match d_in={d_in}; "
                         f"set sae.d_in={x.shape[1]} or extract the site the SAE was built for")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: no rows")
    if not x.is_floating_point():
        raise ValueError(f"{where}: expected floating-point activations, got {x.dtype}")
    bad_rows = ~torch.isfinite(x).all(dim=1)
    if bool(bad_rows.any()):
        idx = torch.nonzero(bad_rows).flatten()
        first = int(idx[0])
        kind = "NaN" if bool(torch.isnan(x[first]).any()) else "Inf"
        raise ValueError(f"{where}: {kind} in row {first + row_offset} (first non-finite row; "
                         f"{idx.numel()} of {x.shape[0]} rows have NaN/Inf)")


# ------------------------------------------------------------------------------------------ base

class SparseAutoencoder(nn.Module):
    """The shared SAE: free encoder, free unit-norm decoder atoms (rows), pre-encoder bias.

    Subclasses must implement ``activation``; the rest has working defaults.
    """

    variant: str = "base"
    atoms_unit_norm: bool = True          # does constrain_() keep dictionary rows at unit norm?
    lr_scale: dict[str, float] = {}       # parameter name -> multiplier of the trainer's learning rate

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        d, n = cfg.d_in, cfg.n_latents
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self._init_decoder(gen)
        # tied initialisation: encoder = decoder transposed (standard for TopK/JumpReLU SAEs)
        self.W_enc = nn.Parameter(self._initial_encoder(gen))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("steps_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("fire_count", torch.zeros(n, dtype=torch.long))   # rows each latent fired on
        self.register_buffer("rows_seen", torch.tensor(0, dtype=torch.long))   # training rows seen

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: every trainable parameter at ``lr`` times ``lr_scale[name]``."""
        groups: dict[float, list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(self.lr_scale.get(name, 1.0), []).append(p)
        return [{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in groups.items()]

    # -- decoder parameterisation (override for constrained dictionaries) --------------------------
    def _init_decoder(self, gen: torch.Generator) -> None:
        w = torch.randn(self.cfg.n_latents, self.cfg.d_in, generator=gen)
        self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True))

    def _initial_encoder(self, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            d = self.dictionary()
            return (d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)).T.clone()

    def dictionary(self) -> torch.Tensor:
        """The (n_latents, d_in) atoms used for decoding, in normalised units."""
        return self.W_dec

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every atom (row of ``dictionary()``) to unit L2 norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the parameters back onto the variant's constraint set; call after every step."""
        self.normalize_decoder_()

    @torch.no_grad()
    def init_from_data_(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from raw rows x (after ``input_scale`` is set). Default: none."""

    # -- the computation ------------------------------------------------------------------------------
    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of normalised inputs."""
        return (x_n - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations -> sparse non-negative codes. The one method every variant must define."""
        raise NotImplementedError

    def penalties(self, codes: torch.Tensor, aux: dict) -> dict[str, torch.Tensor]:
        """Extra loss terms, already weighted (summed into the total with the MSE). Default: none."""
        return {}

    def _check_width(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[-1] != self.cfg.d_in:
            check_input(x, self.cfg.d_in)   # raises with the standard message

    def check_input(self, x: torch.Tensor, **kw) -> None:
        check_input(x, self.cfg.d_in, **kw)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw rows (batch, d_in) -> codes (batch, n_latents)."""
        self._check_width(x)
        return self.activation(self.pre_activations(x * self.input_scale))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (batch, n_latents) -> reconstructed raw rows (batch, d_in)."""
        return (codes @ self.dictionary() + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Return (x_hat in raw units, codes, aux); aux holds the normalised tensors the loss uses."""
        self._check_width(x)
        x_n = x * self.input_scale
        pre = self.pre_activations(x_n)
        codes = self.activation(pre)
        x_hat_n = codes @ self.dictionary() + self.b_dec
        return x_hat_n / self.input_scale, codes, {"x_norm": x_n, "x_hat_norm": x_hat_n, "pre": pre}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, parts). parts (detached): "mse", the variant's weighted penalties (total is
        their sum), and the diagnostic "l0" (mean active latents per row; not part of the total)."""
        _, codes, aux = self(x)
        terms = {"mse": (aux["x_hat_norm"] - aux["x_norm"]).pow(2).mean()}
        terms.update(self.penalties(codes, aux))
        total = torch.stack(list(terms.values())).sum()
        if self.training:
            self._record_firing(codes)
        parts = {name: v.detach() for name, v in terms.items()}
        parts["l0"] = (codes.detach() > 0).sum(-1).float().mean()
        return total, parts

    @torch.no_grad()
    def _record_firing(self, codes: torch.Tensor) -> None:
        fired = (codes > 0)
        per_latent = fired.sum(dim=0)
        self.fire_count += per_latent
        self.rows_seen += codes.shape[0]
        self.steps_since_fired += 1
        self.steps_since_fired[per_latent > 0] = 0

    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired in the last ``dead_steps`` training steps."""
        return self.steps_since_fired >= self.cfg.dead_steps

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self, x: torch.Tensor, *, firing_counts: torch.Tensor | None = None,
                n_rows: int | None = None, dense_threshold: float = 0.1,
                batch_size: int = 8192) -> dict[str, float]:
        """The figures every variant reports, on raw rows x (evaluated in batches, no gradient).

        mse: per-element mean squared error in raw units; fvu: sum||x - x_hat||^2 / sum||x - mean x||^2;
        l0: mean number of non-zero codes per row; dead_frac / dense_frac: fraction of latents that
        fire on no row / on more than ``dense_threshold`` of rows. Firing is counted on x unless
        ``firing_counts`` (rows each latent fired on) and ``n_rows`` are given (e.g. the training
        buffers ``fire_count`` and ``rows_seen``). Evaluated in eval mode (the mode is restored after).
        """
        check_input(x, self.cfg.d_in)
        was_training = self.training
        self.eval()
        try:
            return self._metrics(x, firing_counts, n_rows, dense_threshold, batch_size)
        finally:
            self.train(was_training)

    def _metrics(self, x, firing_counts, n_rows, dense_threshold, batch_size) -> dict[str, float]:
        n, d = x.shape
        sq_err = 0.0
        nnz = 0.0
        counts = torch.zeros(self.cfg.n_latents, dtype=torch.long, device=x.device)
        s1 = torch.zeros(d, dtype=torch.float64, device=x.device)
        s2 = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size]
            x_hat, codes, _ = self(xb)
            sq_err += float((x_hat - xb).double().pow(2).sum())
            fired = codes > 0
            nnz += float(fired.sum())
            counts += fired.sum(dim=0)
            s1 += xb.double().sum(dim=0)
            s2 += xb.double().pow(2).sum()
        total_var = float(s2 - s1.pow(2).sum() / n)
        if firing_counts is None:
            firing_counts, n_rows = counts, n
        elif n_rows is None:
            raise ValueError("metrics: firing_counts needs n_rows (the number of rows they were counted on)")
        freq = firing_counts.double() / max(int(n_rows), 1)
        return {
            "mse": sq_err / (n * d),
            "fvu": sq_err / total_var if total_var > 0 else math.nan,
            "l0": nnz / n,
            "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > dense_threshold).double().mean()),
        }


# -------------------------------------------------------------------------------------- registry

VARIANTS: dict[str, type[SparseAutoencoder]] = {}


def register(name: str) -> Callable[[type[SparseAutoencoder]], type[SparseAutoencoder]]:
    """Class decorator: make a variant buildable by ``make_sae`` under ``name``."""

    def deco(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        cls.variant = name
        VARIANTS[name] = cls
        return cls

    return deco


def make_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """Build the variant ``cfg.variant`` (archetypal ones still need ``init_from_data_``)."""
    from . import archetypal, variants  # noqa: F401  (importing registers the variants)

    if cfg.variant not in VARIANTS:
        raise ValueError(f"sae.variant={cfg.variant!r} has no registered class; known: {sorted(VARIANTS)}")
    return VARIANTS[cfg.variant](cfg)
