"""Video activations for one shard of clips: every layer's residual stream, mean-pooled over tokens and
per spatial patch (mean over token frames), through a loaded model (a model actor's `LoadedModel`).

Pixels are normalised by the model's own image-processor statistics (`model.pixel_stats`), so the
embedded model and any hub video encoder each see what they were trained on. Output tables:
``{site}`` rows (id, vector) and ``{site}.patches`` rows (id, patch, vector), patches in row-major
order; rows follow the shard's id order, so any number of actors writes the same bytes.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.activations import STORAGE, _to_storage, vectors_of
from interpflow.tasks.video.clips import column, pixel_values
from interpflow.tasks.video.layout import pool_tokens, token_grid
from interpflow.tasks.video.model import pixel_stats

PATCHES = ".patches"


class VideoExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[str] = Field(min_length=1, description="embed and blocks.I.resid_post names, in depth order")
    per_patch: bool = Field(True, description="also store each spatial patch's token (mean over frames)")
    batch_size: int = Field(32, ge=1, description="clips per forward pass")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$", description="storage dtype")


def residual_sites(n_blocks: int) -> list[str]:
    """The residual stream at every depth: the embedding output, then each block's output."""
    return ["embed"] + [f"blocks.{i}.resid_post" for i in range(n_blocks)]


def forward_clips(model, frames: np.ndarray, sites: list, batch_size: int, stop_early: bool = True):
    """Yield, batch by batch, the activations at ``sites`` (resolved) of clips ``frames``, with pixels
    normalised by the model's own image-processor statistics and cast to its dtype."""
    from interpflow.tasks.sites import capture

    mean, std = pixel_stats(model.source)
    for start in range(0, len(frames), batch_size):
        pixels = torch.from_numpy(pixel_values(frames[start:start + batch_size], mean, std))
        with torch.no_grad():
            yield capture(model.model, sites, stop_early=stop_early,
                          pixel_values=pixels.to(model.device, model.model.dtype))


def extract_clips_shard(cfg: VideoExtractConfig, shard, model, data) -> dict:
    """Pooled (and per-patch) activations at ``cfg.sites`` for the clips of one shard."""
    started = time.perf_counter()
    sites = model.sites.resolve_all(cfg.sites)
    position = {v: i for i, v in enumerate(column(data, "id").tolist())}
    rows = np.asarray([position[i] for i in shard.ids])
    frames = column(data.select(rows), "frames")
    grid = token_grid(model.model.config, frames=frames.shape[1], size=frames.shape[2])
    pooled: dict[str, list[np.ndarray]] = {s.name: [] for s in sites}
    patches: dict[str, list[np.ndarray]] = {s.name: [] for s in sites}
    dtype = STORAGE[cfg.dtype][0]
    for captured in forward_clips(model, frames, sites, cfg.batch_size):
        for site in sites:
            whole, per_patch = pool_tokens(captured[site.name].float(), grid)
            pooled[site.name].append(whole.cpu().to(dtype))
            patches[site.name].append(per_patch.cpu().to(dtype))
    ids = np.asarray(shard.ids, dtype=np.int64)
    outputs: dict = {}
    for site in sites:
        meta = {"dtype": cfg.dtype, "site": site.name}
        outputs[site.name] = pa.table({"id": ids, "vector": _to_storage(torch.cat(pooled[site.name]), cfg.dtype)}
                                      ).replace_schema_metadata(meta)
        if cfg.per_patch:
            per_patch = torch.cat(patches[site.name])                       # (clips, patches, D)
            outputs[site.name + PATCHES] = pa.table({
                "id": np.repeat(ids, grid.patches),
                "patch": np.tile(np.arange(grid.patches, dtype=np.int32), len(ids)),
                "vector": _to_storage(per_patch.reshape(-1, per_patch.shape[-1]), cfg.dtype),
            }).replace_schema_metadata({**meta, "patches": str(grid.patches), "grid": f"{grid.height}x{grid.width}"})
    outputs["metrics"] = {"clips": len(ids), "compute_s": time.perf_counter() - started,
                          "tokens_per_clip": grid.n_tokens}
    return outputs


def read_pooled(activations) -> tuple[np.ndarray, np.ndarray]:
    """(ids, X (clips, D)) from a stored pooled table or dataset, in id order."""
    table = activations.to_table() if hasattr(activations, "to_table") else activations
    table = table.sort_by("id")
    return table.column("id").to_numpy(), vectors_of(table).float().numpy()


def read_patches(activations) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(ids, X (clips, patches, D), (rows, cols) of the patch grid) from a stored per-patch table or
    dataset, in id order."""
    table = activations.to_table() if hasattr(activations, "to_table") else activations
    grid = (table.schema.metadata or {}).get(b"grid")
    table = table.sort_by([("id", "ascending"), ("patch", "ascending")])
    n_patches = int(pc.max(table.column("patch")).as_py()) + 1
    x = vectors_of(table).float().numpy()
    ids = table.column("id").to_numpy()[::n_patches]
    if grid:
        shape = tuple(int(v) for v in grid.decode().split("x"))
    else:
        side = int(round(np.sqrt(n_patches)))
        shape = (side, n_patches // side)
    return ids, x.reshape(len(ids), n_patches, -1), shape


def aligned(data, ids: np.ndarray) -> np.ndarray:
    """Row positions in ``data`` of clip ``ids`` (a stored activation's order)."""
    position = {v: i for i, v in enumerate(column(data, "id").tolist())}
    missing = [int(i) for i in ids if int(i) not in position]
    if missing:
        raise ValueError(f"activations hold clip ids that the dataset lacks (first {missing[0]}): they were "
                         "extracted from other clips")
    return np.asarray([position[int(i)] for i in ids])
