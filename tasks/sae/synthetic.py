"""Synthetic activations with a known dictionary, for identifiability benchmarks.

x = codes @ dictionary + noise, where dictionary is ``n_atoms`` random unit-norm rows in R^d
(Gaussian directions), every row of ``codes`` has exactly ``k`` non-zero entries on distinct atoms
chosen uniformly at random, each magnitude drawn from Uniform[coef_low, coef_high] (non-negative),
and noise is i.i.d. Gaussian with standard deviation ``noise_std`` per coordinate. Seeded.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d: int = Field(32, ge=1, le=65_536, description="activation width")
    n_atoms: int = Field(48, ge=1, le=1_000_000, description="size of the true dictionary")
    k: int = Field(3, ge=1, description="active atoms per row (exactly)")
    n: int = Field(20000, ge=1, le=10_000_000, description="rows")
    coef_low: float = Field(0.5, ge=0, description="smallest code magnitude")
    coef_high: float = Field(1.5, gt=0, description="largest code magnitude")
    noise_std: float = Field(0.01, ge=0, description="Gaussian noise per coordinate")
    seed: Seed = 0

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.k > self.n_atoms:
            raise ValueError(f"k={self.k} must be at most n_atoms={self.n_atoms}; lower k or raise n_atoms")
        if self.coef_low > self.coef_high:
            raise ValueError(f"coef_low={self.coef_low} must not exceed coef_high={self.coef_high}")
        return self


def make_synthetic(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x (n, d), dictionary (n_atoms, d) with unit rows, codes (n, n_atoms) dense, k non-zeros)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = torch.randn(cfg.n_atoms, cfg.d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    # k distinct atoms per row: the k largest of n_atoms uniform keys (a uniformly random k-subset)
    active = torch.rand(cfg.n, cfg.n_atoms, generator=gen).topk(cfg.k, dim=1).indices
    mags = cfg.coef_low + (cfg.coef_high - cfg.coef_low) * torch.rand(cfg.n, cfg.k, generator=gen)
    codes = torch.zeros(cfg.n, cfg.n_atoms).scatter(1, active, mags)
    x = codes @ dictionary + cfg.noise_std * torch.randn(cfg.n, cfg.d, generator=gen)
    return x, dictionary, codes


def as_activations(x: torch.Tensor, tokens_per_example: int = 16) -> pa.Table:
    """Rows laid out as the extraction node stores them: (id, position, vector), consecutive rows
    grouped into examples of ``tokens_per_example`` tokens."""
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) // tokens_per_example
    positions = (np.arange(n) % tokens_per_example).astype(np.int32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.float().numpy().reshape(-1)), d)
    return pa.table({"id": ids, "position": positions, "vector": vectors})


def synthetic_activations(cfg: SyntheticConfig) -> dict:
    """A graph node: synthetic rows as an activations table, with the true dictionary (for recovery)."""
    x, dictionary, _ = make_synthetic(cfg)
    return {"activations": as_activations(x), "dictionary": dictionary}
