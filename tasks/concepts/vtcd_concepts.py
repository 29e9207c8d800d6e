"""VTCD step 2: concepts across videos, one clustering per (layer, head).

Tubelets of all videos at one (layer, head) are clustered on their (per-dimension standardised)
mean features: k-means with the elbow rule over k in [min_concepts, max_concepts] by default, or
convex NMF at the elbow's k. A concept is a cluster; it keeps its member tubelets (their token masks,
per video), its spread (the share of the videos it appears in) and the mean silhouette of its members.
On planted clips each concept is also scored against the objects it may cover (token IoU with the
ball and with the distractor square), which is what the ground-truth checks read. The IoU is taken in
the token frames the concept occupies in each video: VTCD's concepts may be local in time (the ball
early in the clip, the ball late), and a tubelet that is exactly the ball in its two token frames is a
ball concept, not a third of one (the IoU over all frames is kept beside it, ``<object>_iou_all_frames``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.clustering import convex_nmf, kmeans_elbow, silhouette_samples
from interpflow.tasks.concepts.tubelets import object_tokens, rows_of
from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import column
from interpflow.tasks.video.layout import TokenGrid

OBJECTS = ("ball", "square")    # mask columns of the planted clips


class ConceptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field("kmeans", pattern="^(kmeans|convex_nmf)$", description="kmeans (elbow) or convex_nmf")
    min_concepts: int = Field(2, ge=1)
    max_concepts: int = Field(8, ge=1, description="the elbow rule picks k up to this")
    min_spread: float = Field(0.0, ge=0, le=1, description="concepts in fewer than this share of the videos are "
                                                           "dropped")
    seed: Seed = 0
    layer: int = Field(0, description="set by the workflow")
    head: int = Field(0, description="set by the workflow")
    grid: list[int] = Field(default_factory=list, description="set by the workflow: prefix, frames, rows, cols")


def concept_id(layer: int, head: int, concept: int) -> str:
    return f"L{layer}H{head}C{concept}"


def _token_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def frame_local_iou(mask: np.ndarray, obj: np.ndarray, frame_of: np.ndarray) -> float:
    """Token IoU of ``mask`` with ``obj`` restricted to the token frames that ``mask`` occupies."""
    return _token_iou(mask, obj & np.isin(frame_of, np.unique(frame_of[mask])))


def discover_concepts(cfg: ConceptConfig, tubelets, data) -> dict:
    """Graph node: the concepts of one (layer, head): ``members`` (concept, video, tokens) and ``concepts``
    (one row per concept: spread, silhouette, object IoUs)."""
    table = tubelets.to_table() if hasattr(tubelets, "to_table") else tubelets
    table = table.filter(pc.and_(pc.equal(table.column("layer"), cfg.layer), pc.equal(table.column("head"), cfg.head)))
    table = table.sort_by([("video", "ascending"), ("tubelet", "ascending")])
    videos = table.column("video").to_numpy()
    n_videos = len(np.unique(videos))
    features = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float64)
    x = (features - features.mean(0)) / np.maximum(features.std(0), 1e-8)
    fit, curve = kmeans_elbow(x, cfg.max_concepts, cfg.seed, min_k=cfg.min_concepts)
    if cfg.method == "convex_nmf":
        fit = convex_nmf(x, len(fit.centroids), cfg.seed)
    labels = fit.labels
    sil_all = silhouette_samples(x, labels)
    tokens = table.column("tokens").to_pylist()
    if len(cfg.grid) != 4:
        raise ValueError("concepts.grid must be set (prefix, frames, rows, cols of the token grid)")
    grid = TokenGrid(*cfg.grid)
    frame_of = grid.frame_of()
    rows = data.select(rows_of(data, np.unique(videos)))
    objects = {name: dict(zip(np.unique(videos).tolist(), object_tokens(column(rows, name), grid)))
               for name in OBJECTS if name in rows.column_names}
    member_rows, concept_rows = [], []
    kept = 0
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        if not len(idx):
            continue
        in_videos = np.unique(videos[idx])
        spread = len(in_videos) / n_videos
        if spread < cfg.min_spread:
            continue
        masks = {}
        for i in idx:
            masks.setdefault(int(videos[i]), set()).update(tokens[i])
        row = {"concept_id": concept_id(cfg.layer, cfg.head, kept), "layer": cfg.layer, "head": cfg.head,
               "concept": kept, "tubelets": len(idx), "videos": len(in_videos), "spread": spread,
               "silhouette": float(sil_all[idx].mean())}
        bool_masks = {video: np.isin(np.arange(grid.n_tokens), list(toks)) for video, toks in masks.items()}
        for name, per_video in objects.items():
            local = [frame_local_iou(mask, per_video[video], frame_of) for video, mask in bool_masks.items()]
            whole = [_token_iou(mask, per_video[video]) for video, mask in bool_masks.items()]
            row[f"{name}_iou"], row[f"{name}_iou_all_frames"] = float(np.mean(local)), float(np.mean(whole))
        concept_rows.append(row)
        for video, toks in masks.items():
            member_rows.append({"concept_id": row["concept_id"], "video": video, "tokens": sorted(toks)})
        kept += 1
    schema = pa.schema([("concept_id", pa.string()), ("video", pa.int64()), ("tokens", pa.list_(pa.int32()))],
                       metadata={"n_tokens": str(grid.n_tokens)})
    members = pa.Table.from_pylist(member_rows, schema=schema)
    return {"members": members, "concepts": pa.Table.from_pylist(concept_rows),
            "metrics": {"concepts": kept, "tubelets": len(labels), "videos": n_videos,
                        "silhouette": float(sil_all.mean()), "elbow_k": len(fit.centroids),
                        **{f"inertia.k{k}": v for k, v in zip(range(cfg.min_concepts, cfg.max_concepts + 1), curve)}}}


