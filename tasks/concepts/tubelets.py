"""VTCD step 1: tubelets within each video, per (layer, head).

For one video and one (layer, head), the feature (keys by default) is a frames x rows x cols x C volume
on the token grid. SLIC (scikit-image) over that volume groups tokens that are near in space-time and
alike in feature into supervoxels; segments smaller than ``min_tokens`` are dropped, and each tubelet
is kept as its token indices and the masked mean of its features. Features are standardised per
volume before SLIC, so ``compactness`` means the same at every layer and head; the stored means are of
the raw features (the clustering across videos standardises them itself).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.features import FEATURES, captured
from interpflow.tasks.video.clips import column, pixel_values
from interpflow.tasks.video.layout import TokenGrid, token_grid
from interpflow.tasks.video.model import pixel_stats


class TubeletConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feature: str = Field("keys", description=f"which feature to segment and later mask: one of {list(FEATURES)}")
    layers: list[int] = Field(default_factory=list, description="blocks to study (empty: every block)")
    heads: list[int] = Field(default_factory=list, description="heads to study (empty: every head; "
                                                               "feature=tokens has one)")
    n_segments: int = Field(12, ge=2, description="SLIC's target number of supervoxels per video")
    compactness: float = Field(0.5, gt=0, description="SLIC: weight of space-time distance against feature "
                                                      "distance (features standardised per volume)")
    min_tokens: int = Field(2, ge=1, description="tubelets with fewer tokens are dropped")
    time_spacing: float = Field(1.0, gt=0, description="SLIC's distance between token frames, in patches (below 1: "
                                                       "tubelets reach further in time than in space)")
    target_class: int = Field(1, ge=0, description="the class whose videos are studied (index into the "
                                                   "model's labels)")
    batch_size: int = Field(32, ge=1)


SLIC_MIN_SIZE = 1.0   # tokens


def grid_volume_index(grid: TokenGrid) -> np.ndarray:
    """(frames, rows, cols) array of token indices: where each grid cell's token sits in the sequence."""
    index = np.empty((grid.frames, grid.height, grid.width), dtype=np.int64)
    frame, patch = grid.frame_of(), grid.patch_of()
    for token in range(grid.prefix, grid.n_tokens):
        index[frame[token], patch[token] // grid.width, patch[token] % grid.width] = token
    return index


def object_tokens(masks: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """(videos, n_tokens) bool: tokens whose tubelet patch the object touches in any of its frames.

    ``masks`` (videos, T, H, W) or a static (videos, H, W) mask (the same in every frame)."""
    m = np.asarray(masks) != 0
    if m.ndim == 3:
        m = np.repeat(m[:, None], grid.frames, axis=1)
    b, t, h, w = m.shape
    tube, ph, pw = t // grid.frames, h // grid.height, w // grid.width
    cells = m.reshape(b, grid.frames, tube, grid.height, ph, grid.width, pw).any(axis=(2, 4, 6))
    out = np.zeros((b, grid.n_tokens), dtype=bool)
    out[:, grid_volume_index(grid).reshape(-1)] = cells.reshape(b, -1)
    return out


def segment_volume(features: np.ndarray, grid: TokenGrid, n_segments: int, compactness: float,
                   min_tokens: int, time_spacing: float = 1.0) -> list[np.ndarray]:
    """Tubelets of one (video, layer, head): a list of token-index arrays (sorted), tiny ones dropped."""
    from skimage.segmentation import slic

    index = grid_volume_index(grid)
    volume = features[index].astype(np.float64)                              # (F, H, W, C)
    volume = (volume - volume.mean(axis=(0, 1, 2))) / max(float(volume.std()), 1e-8)
    # SLIC's own small-segment merge (min_size_factor) would fold a small object into its surroundings
    # before ``min_tokens`` is applied, so it is turned down to a single token
    labels = slic(volume, n_segments=n_segments, compactness=compactness, channel_axis=-1, start_label=0,
                  enforce_connectivity=True, spacing=(time_spacing, 1.0, 1.0),
                  min_size_factor=SLIC_MIN_SIZE / max(volume.size / volume.shape[-1] / n_segments, 1))
    tubelets = []
    for label in np.unique(labels):
        tokens = np.sort(index[labels == label])
        if len(tokens) >= min_tokens:
            tubelets.append(tokens)
    return tubelets


def study_layers_heads(cfg: TubeletConfig, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    layers = cfg.layers or list(range(n_layers))
    heads = [0] if cfg.feature == "tokens" else (cfg.heads or list(range(n_heads)))
    return [(layer, head) for layer in layers for head in heads]


def target_ids(cfg: TubeletConfig, data, **_) -> list[int]:
    """Shard ids: the videos of the target class, in dataset order."""
    ids, labels = column(data, "id"), column(data, "label")
    chosen = ids[labels == cfg.target_class].tolist()
    if not chosen:
        raise ValueError(f"no video has label {cfg.target_class} (tubelets.target_class); labels present: "
                         f"{sorted(set(labels.tolist()))}")
    return chosen


def rows_of(data, ids) -> np.ndarray:
    position = {v: i for i, v in enumerate(column(data, "id").tolist())}
    return np.asarray([position[int(i)] for i in ids])


def model_pixels(model, frames: np.ndarray) -> torch.Tensor:
    mean, std = pixel_stats(model.source)
    return torch.from_numpy(pixel_values(frames, mean, std)).to(model.device, model.model.dtype)


def tubelet_shard(cfg: TubeletConfig, shard, model, data) -> dict:
    """Tubelets of every video of the shard at every studied (layer, head): rows (video, layer, head,
    tubelet, tokens, feature)."""
    started = time.perf_counter()
    net = model.model
    frames = column(data.select(rows_of(data, shard.ids)), "frames")
    grid = token_grid(net.config, frames=frames.shape[1], size=frames.shape[2])
    n_heads = 1 if cfg.feature == "tokens" else net.config.num_attention_heads
    pairs = study_layers_heads(cfg, net.config.num_hidden_layers, n_heads)
    layers = sorted({layer for layer, _ in pairs})
    records: dict[str, list] = {k: [] for k in ("video", "layer", "head", "tubelet", "tokens", "feature")}
    for start in range(0, len(frames), cfg.batch_size):
        with captured(net, cfg.feature, layers) as store, torch.no_grad():
            net(pixel_values=model_pixels(model, frames[start:start + cfg.batch_size]))
        for b in range(min(cfg.batch_size, len(frames) - start)):
            video = int(shard.ids[start + b])
            for layer, head in pairs:
                feats = store[layer][b, :, head].float().cpu().numpy()           # (tokens, C)
                for j, tokens in enumerate(segment_volume(feats, grid, cfg.n_segments, cfg.compactness,
                                                          cfg.min_tokens, cfg.time_spacing)):
                    for key, value in (("video", video), ("layer", layer), ("head", head), ("tubelet", j),
                                       ("tokens", tokens.astype(np.int32)),
                                       ("feature", feats[tokens].mean(0).astype(np.float32))):
                        records[key].append(value)
    table = pa.table({"video": pa.array(records["video"], pa.int64()), "layer": pa.array(records["layer"], pa.int32()),
                      "head": pa.array(records["head"], pa.int32()), "tubelet": pa.array(records["tubelet"], pa.int32()),
                      "tokens": pa.array(records["tokens"], pa.list_(pa.int32())),
                      "feature": pa.array(records["feature"], pa.list_(pa.float32()))})
    return {"tubelets": table.replace_schema_metadata({"n_tokens": str(grid.n_tokens), "feature": cfg.feature}),
            "metrics": {"videos": len(shard.ids), "tubelets": table.num_rows, "compute_s": time.perf_counter() - started}}
