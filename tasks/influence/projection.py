"""A seeded Gaussian random projection of gradients, identical on every shard, process and run.

Influence over millions of parameters stores one gradient per training example; projecting each to
``dim`` coordinates (Johnson-Lindenstrauss) keeps dot products up to ~1/sqrt(dim) relative error.
Every shard must use the *same* matrix without shipping it, so the matrix is a pure function of
``(seed, parameter name, parameter shape)``: parameter ``name``'s block is cut into chunks of
``CHUNK_ROWS`` flattened coordinates, and chunk ``c`` is ``randn(rows, dim) / sqrt(dim)`` drawn from a
CPU ``torch.Generator`` seeded with the first 8 bytes of
``sha256("interpflow.influence.projection|{seed}|{name}|{shape}|{c}")``. ``CHUNK_ROWS`` is therefore
part of the projection's definition. At most one chunk is materialised at a time beyond the cache
(``cache_bytes``), so a large parameter never needs its whole (numel, dim) block in memory.

The matmul accumulates in float64 and rounds to float32, so a row's projection does not depend on
which other rows share its batch (in practice bit-identical across batch splits and orders).
Identity across machines assumes the same torch version (CPU ``randn`` stream).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from .params import ParamSelection

from interpflow.tasks.types import Seed

CHUNK_ROWS = 1 << 16          # flattened coordinates per generated chunk (part of the definition)


class ProjectionConfig(BaseModel):
    """Which random projection (dimension and seed); the same config gives the same matrix everywhere."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(4096, ge=1, description="projected gradient width (JL dot-product error ~ 1/sqrt(dim))")
    seed: Seed = Field(0, description="seeds every block of the matrix with the parameter's name and shape")
    cache_bytes: int = Field(256 << 20, ge=0, description="keep generated chunks up to this many bytes (per "
                                                            "process) instead of regenerating them every batch")


def chunk_seed(seed: int, name: str, shape: tuple[int, ...], chunk: int) -> int:
    """The generator seed of one chunk: a hash of everything that identifies it, nothing else."""
    key = f"interpflow.influence.projection|{seed}|{name}|{tuple(int(s) for s in shape)}|{chunk}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class RandomProjection:
    """Projects gradients of ``selection``'s parameters to ``cfg.dim`` coordinates: sum over
    parameters of ``g_param (n, numel) @ P_param (numel, dim)``."""

    def __init__(self, cfg: ProjectionConfig, selection: ParamSelection):
        self.cfg, self.selection = cfg, selection
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def chunks(self, name: str) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows of the flattened parameter, float32 block (rows, dim)) for each chunk of ``name``."""
        shape = self.selection.shapes[self.selection.names.index(name)]
        numel = int(torch.Size(shape).numel())
        for c, start in enumerate(range(0, numel, CHUNK_ROWS)):
            rows = min(CHUNK_ROWS, numel - start)
            block = self._cache.get((name, c))
            if block is None:
                gen = torch.Generator(device="cpu").manual_seed(chunk_seed(self.cfg.seed, name, shape, c))
                block = torch.randn(rows, self.cfg.dim, generator=gen, dtype=torch.float32)
                block /= math.sqrt(self.cfg.dim)
                if self._cached_bytes + block.numel() * 4 <= self.cfg.cache_bytes:
                    self._cache[(name, c)] = block
                    self._cached_bytes += block.numel() * 4
            yield slice(start, start + rows), block

    def matrix(self, name: str) -> torch.Tensor:
        """The whole (numel, dim) block of one parameter (for tests and small parameters)."""
        return torch.cat([block for _, block in self.chunks(name)], dim=0)

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (n, *shape)} -> (n, dim) float32."""
        first = grads[self.selection.names[0]]
        out = torch.zeros(first.shape[0], self.cfg.dim, dtype=torch.float64, device=first.device)
        for name in self.selection.names:
            g = grads[name].reshape(grads[name].shape[0], -1)
            for rows, block in self.chunks(name):
                out += g[:, rows].double() @ block.to(g.device, torch.float64)
        return out.float()

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """(n, numel) in the selection's layout -> (n, dim) float32."""
        return self.project(self.selection.unflatten(flat))
