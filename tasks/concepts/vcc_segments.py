"""VCC's top-down segmentation, segment images, and per-layer concepts.

 * Tokens: every analysed layer's patch tokens for each image (a sharded task on model actors), with
   the logits and, for the class edges, d(class logit)/d(top layer) summed over tokens.
 * Segmentation, top down: the top layer by k-means on each image's patch tokens (connected pieces of
   a cluster are separate segments); each lower layer by SLIC on its own patch tokens inside each
   parent segment's mask. Masks live on the patch grid; pixels are the grid scaled by the patch size.
 * Segment images: the segment's bounding box cropped, everything outside the mask set to the data
   set's mean colour, resized to the model's input; their pooled activations at the segment's layer.
 * Concepts: k-means (elbow) on a layer's pooled segment activations, with a size filter on segments
   and a frequency filter on concepts; each concept labelled with the ground-truth region its
   segments overlap most (mean pixel IoU over its segments).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.clustering import kmeans, kmeans_elbow
from interpflow.tasks.concepts.vcc_images import REGIONS, pixel_values, region_masks
from interpflow.tasks.concepts.vcc_model import (gradient_sums, hooked_forward, patch_tokens, pooled, token_grid)
from interpflow.tasks.types import Seed


def concat(parts) -> np.ndarray:
    """A sharded node's per-shard arrays (shard order = id order), as one array."""
    return np.concatenate(list(parts)) if isinstance(parts, (list, tuple)) else np.asarray(parts)


def _pixel_stats(model) -> tuple[list[float], list[float]]:
    from interpflow.tasks.video.model import pixel_stats

    mean, std = pixel_stats(model.source)
    return (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)


# --- tokens ---------------------------------------------------------------------------------------------

class TokenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks, bottom to top (set by the workflow)")
    batch_size: int = Field(32, ge=1)
    classes: int = Field(2, ge=1, description="class logits 0..classes-1 get TCAV gradients (the data set's)")


def extract_tokens(cfg: TokenConfig, shard, model, images) -> dict:
    """Per image of the shard: patch tokens of every analysed layer, logits, and d(logit_c)/d(top
    layer) summed over tokens for each class c (the TCAV gradients of the class edges)."""
    mean, std = _pixel_stats(model)
    grid = token_grid(model.model.config)
    rows = np.asarray(shard.ids)
    top = max(cfg.layers)
    tokens = {layer: [] for layer in cfg.layers}
    logits_all, grads_all = [], []
    for start in range(0, len(rows), cfg.batch_size):
        pixels = torch.from_numpy(pixel_values(images["images"][rows[start:start + cfg.batch_size]], mean, std))
        with torch.no_grad():
            logits, captured, _ = hooked_forward(model, pixels, cfg.layers)
        for layer in cfg.layers:
            tokens[layer].append(patch_tokens(captured[layer].float(), grid).cpu().numpy())
        logits_all.append(logits.float().cpu().numpy())
        # the centred logit (logit_c minus the mean logit): a softmax ignores what all logits share, and
        # raw logits of a 2-class model moved together, so every CAV scored ~0 or ~1 on both classes
        per_class = [gradient_sums(model, pixels, top, lambda lg, _, c=c: lg[:, c].float() - lg.float().mean(-1),
                                   patches=grid[0] * grid[1]) for c in range(min(cfg.classes, logits.shape[-1]))]
        grads_all.append(torch.stack(per_class, 1).numpy())
    out = {f"tokens.{layer}": np.concatenate(v).astype(np.float32) for layer, v in tokens.items()}
    return {**out, "ids": rows.astype(np.int64), "logits": np.concatenate(logits_all).astype(np.float32),
            "class_grads": np.concatenate(grads_all).astype(np.float32)}


# --- segmentation ---------------------------------------------------------------------------------------

class SegmentConfig(BaseModel):
    """How one layer is segmented (k-means at the top layer, SLIC inside parents below)."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(0, description="the block (set by the workflow)")
    top_clusters: int = Field(3, ge=2, description="k-means clusters of each image's top-layer tokens")
    slic_segments: int = Field(2, ge=1, description="SLIC's n_segments inside each parent (a grid target)")
    compactness: float = Field(0.3, gt=0, description="SLIC compactness (features are standardised per image)")
    min_patches: int = Field(3, ge=1, description="size filter: segments smaller than this many patches are "
                                                  "dropped (a parent too small to split stays whole)")
    seed: Seed = 0


def _standardise(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1, x.shape[-1])
    return (x - flat.mean(0)) / (flat.std(0) + 1e-6)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    return [labels == i for i in range(1, n + 1)]


def segment_layer(cfg: SegmentConfig, tokens, ids, parents=None) -> dict:
    """Segments of every image at one layer: k-means on the image's patch tokens (top layer, no
    ``parents``) or SLIC on this layer's tokens inside each parent segment. ``tokens`` (N, rows, cols, D)
    and image ``ids`` come per shard of the tokens node."""
    from skimage.segmentation import slic

    feats = concat(tokens)          # (N, rows, cols, D)
    images = concat(ids)
    masks, rows = [], []
    if parents is None:
        for i, image in enumerate(images):
            x = _standardise(feats[i])
            flat = x.reshape(-1, x.shape[-1])
            k = min(cfg.top_clusters, len(flat))
            labels = kmeans(flat, k, seed=cfg.seed + int(image)).labels.reshape(x.shape[:2])
            for c in range(k):
                for piece in _components(labels == c):
                    if piece.sum() >= cfg.min_patches:
                        masks.append(piece)
                        rows.append((int(image), -1))
    else:
        parent_masks = parents["masks"].astype(bool)
        parent_table = parents["segments"].to_pylist()
        position = {int(v): i for i, v in enumerate(images)}
        for p, record in enumerate(parent_table):
            i = position[record["image"]]
            mask = parent_masks[p]
            x = _standardise(feats[i])
            if mask.sum() < 2 * cfg.min_patches or cfg.slic_segments == 1:
                pieces = [mask]
            else:
                labels = slic(x, n_segments=cfg.slic_segments, compactness=cfg.compactness, mask=mask,
                              channel_axis=-1, start_label=1, enforce_connectivity=True)
                pieces = [labels == v for v in np.unique(labels[mask]) if v > 0]
            for piece in pieces:
                if piece.sum() >= cfg.min_patches:
                    masks.append(piece)
                    rows.append((record["image"], record["segment"]))
    if not masks:
        raise ValueError(f"layer {cfg.layer}: no segment of at least {cfg.min_patches} patches; lower "
                         "min_patches or use more images")
    table = pa.table({"segment": np.arange(len(rows), dtype=np.int64),
                      "image": np.asarray([r[0] for r in rows], np.int64),
                      "parent": np.asarray([r[1] for r in rows], np.int64),
                      "patches": np.asarray([int(m.sum()) for m in masks], np.int64)})
    per_image = np.bincount(table.column("image").to_numpy())
    return {"segments": table, "masks": np.asarray(masks, np.uint8),
            "metrics": {"segments": float(len(rows)), "segments_per_image": float(per_image[per_image > 0].mean()),
                        "mean_patches": float(np.mean([m.sum() for m in masks]))}}


def segment_ids(cfg, segments, **_) -> list[int]:
    table = segments["segments"] if isinstance(segments, dict) else segments
    return table.column("segment").to_pylist()


def pixel_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A patch-grid mask (rows, cols) as a pixel mask (size, size)."""
    scale = size // mask.shape[0]
    return np.kron(mask.astype(np.uint8), np.ones((scale, size // mask.shape[1]), np.uint8)).astype(bool)


def segment_images(images: np.ndarray, image_rows: np.ndarray, masks: np.ndarray, fill: np.ndarray,
                   out_size: int) -> np.ndarray:
    """Segment images (N, out, out, 3) uint8: each segment's bounding box cropped from its image, the
    pixels outside the mask set to ``fill`` (the data set's mean colour), resized (bilinear)."""
    size = images.shape[1]
    out = np.empty((len(masks), out_size, out_size, 3), np.uint8)
    for j, (row, mask) in enumerate(zip(image_rows, masks)):
        m = pixel_mask(mask, size)
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = np.where(m[y0:y1, x0:x1, None], images[row, y0:y1, x0:x1], fill).astype(np.float32)
        resized = torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None],
                                                  size=(out_size, out_size), mode="bilinear", align_corners=False)
        out[j] = resized[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    return out


def mean_colour(images: np.ndarray) -> np.ndarray:
    return images.reshape(-1, images.shape[-1]).mean(0)


class SegmentActivationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks (set by the workflow)")
    batch_size: int = Field(64, ge=1)


def _segment_pixels(model, images, segments, ids) -> torch.Tensor:
    """Normalised pixels of the segment images of ``ids`` (segment numbers of one layer's table)."""
    mean, std = _pixel_stats(model)
    table = segments["segments"]
    position = {int(v): i for i, v in enumerate(table.column("segment").to_pylist())}
    rows = np.asarray([position[int(s)] for s in ids])
    image_rows = table.column("image").to_numpy()[rows]
    config = model.model.config
    out_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    seg = segment_images(images["images"], image_rows, segments["masks"][rows], mean_colour(images["images"]),
                         out_size)
    return torch.from_numpy(pixel_values(seg, mean, std))


def layer_segment_ids(cfg: SegmentActivationConfig, **segments) -> list[tuple[int, int]]:
    """Stable ids (layer, segment) of every analysed layer's segments (inputs ``segments_<layer>``): one
    sharded node (one actor pool) serves all layers."""
    return [(layer, s) for layer in cfg.layers for s in segment_ids(None, segments[f"segments_{layer}"])]


def _by_layer(ids, layers) -> dict[int, np.ndarray]:
    ids = [tuple(int(v) for v in i) for i in ids]
    return {layer: np.asarray([s for lay, s in ids if lay == layer], np.int64) for layer in layers}


def extract_segments(cfg: SegmentActivationConfig, shard, model, images, **segments) -> dict:
    """Pooled activations of the segment images of one shard of (layer, segment) ids, each at its own
    layer: outputs ``ids.<layer>`` and ``pooled.<layer>`` for every layer (empty where the shard has none)."""
    rows, cols = token_grid(model.model.config)
    n_patches = rows * cols
    width = model.model.config.hidden_size
    out = {}
    for layer, ids in _by_layer(shard.ids, cfg.layers).items():
        pooled_rows = [np.zeros((0, width), np.float32)]
        if len(ids):
            pixels = _segment_pixels(model, images, segments[f"segments_{layer}"], ids)
            for start in range(0, len(ids), cfg.batch_size):
                with torch.no_grad():
                    _, captured, _ = hooked_forward(model, pixels[start:start + cfg.batch_size], [layer])
                pooled_rows.append(pooled(captured[layer], n_patches).cpu().numpy())
        out[f"ids.{layer}"] = ids
        out[f"pooled.{layer}"] = np.concatenate(pooled_rows).astype(np.float32)
    return out


# --- concepts -------------------------------------------------------------------------------------------

class ConceptConfig(BaseModel):
    """Concept discovery at one layer and the ground-truth labelling of concepts."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(0, description="the block (set by the workflow)")
    max_concepts: int = Field(10, ge=1, description="k-means tries k = min_concepts..max_concepts; the elbow's k")
    min_concepts: int = Field(4, ge=1)
    min_image_share: float = Field(0.05, ge=0, le=1, description="frequency filter: a concept must occur in at "
                                                                 "least this share of the images")
    min_segments: int = Field(5, ge=1, description="frequency filter: and have at least this many segments")
    label_iou: float = Field(0.3, ge=0, le=1, description="a concept is labelled with the ground-truth region "
                                                          "of highest mean pixel IoU if that IoU reaches this")
    seed: Seed = 0


def segment_ious(masks: np.ndarray, image_rows: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """(segments, regions) pixel IoU of each segment with each ground-truth region of its image."""
    size = parts.shape[1]
    ious = np.zeros((len(masks), len(REGIONS)))
    for j, (row, mask) in enumerate(zip(image_rows, masks)):
        m = pixel_mask(mask, size)
        regions = region_masks(parts[row])
        for r, name in enumerate(REGIONS):
            union = np.logical_or(m, regions[name]).sum()
            ious[j, r] = np.logical_and(m, regions[name]).sum() / union if union else 0.0
    return ious


def find_concepts(cfg: ConceptConfig, segments, ids, pooled, images) -> dict:
    """Cluster a layer's segments into concepts; keep the frequent ones; label them by ground truth.
    ``ids`` and ``pooled`` are the segment activations (per shard)."""
    ids, x = concat(ids), concat(pooled)
    order = np.argsort(ids)
    ids, x = ids[order], x[order]
    table = segments["segments"]
    image_rows = table.column("image").to_numpy()[ids]
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    fit, curve = kmeans_elbow(z, cfg.max_concepts, seed=cfg.seed, min_k=min(cfg.min_concepts, len(z)))
    ious = segment_ious(segments["masks"][ids], image_rows, images["parts"])
    n_images = len(images["labels"])
    rows, keep = [], []
    for k in range(len(fit.centroids)):
        members = fit.labels == k
        share = len(np.unique(image_rows[members])) / n_images
        kept = bool(members.sum() >= cfg.min_segments and share >= cfg.min_image_share)
        mean_iou = ious[members].mean(0) if members.any() else np.zeros(len(REGIONS))
        best = int(mean_iou.argmax())
        label = REGIONS[best] if mean_iou[best] >= cfg.label_iou else "unlabelled"
        rows.append({"cluster": k, "kept": kept, "segments": int(members.sum()), "image_share": share,
                     "label": label, "label_iou": float(mean_iou[best]),
                     **{f"iou.{r}": float(v) for r, v in zip(REGIONS, mean_iou)}})
        if kept:
            keep.append(k)
    names = {k: f"L{cfg.layer}.c{j}" for j, k in enumerate(keep)}
    for row in rows:
        row["concept"] = names.get(row["cluster"], "")
    assigned = np.asarray([names.get(int(k), "") for k in fit.labels])
    centroids = np.stack([x[fit.labels == k].mean(0) for k in keep]) if keep else np.zeros((0, x.shape[1]))
    kept_rows = [r for r in rows if r["kept"]]
    return {"concepts": pa.Table.from_pylist(rows),
            "assignments": pa.table({"segment": ids, "image": image_rows, "concept": assigned}),
            "centroids": centroids.astype(np.float32), "layer_mean": x.mean(0).astype(np.float32),
            "spread": np.asarray([float(np.mean([((x[fit.labels == k] - x[fit.labels == k].mean(0)) ** 2).sum(1).mean()
                                                 for k in keep])) if keep else 1.0], np.float32),
            "metrics": {"clusters": float(len(rows)), "concepts": float(len(keep)),
                        "labelled": float(sum(r["label"] != "unlabelled" for r in kept_rows)),
                        "elbow_k": float(len(fit.centroids)), "inertia_first": float(curve[0])}}


def _kept_segments(concepts) -> list[int]:
    table = concepts["assignments"]
    return [s for s, c in zip(table.column("segment").to_pylist(), table.column("concept").to_pylist()) if c]


class GradientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks, bottom to top (set by the "
                                                                "workflow); every adjacent pair gets gradients")
    objective: Literal["centroid", "contrast", "assignment"] = Field("assignment", description=(
        "what the gradient into upper concept u is of: 'centroid' = -||pool(upper) - centroid_u|| (the issue's "
        "form; for u's own members it points along each member's idiosyncratic offset from the centroid, and "
        "its ITCAV scores sat at chance, see README); 'contrast' = that plus ||pool(upper) - mean segment||; "
        "'assignment' = log softmax_u(-||pool(upper) - centroid_k||^2 / spread) over the layer's concepts k "
        "(closer to u than to the other concepts; spread = mean squared distance to own centroid)"))
    batch_size: int = Field(32, ge=1)


def concept_segment_ids(cfg: GradientConfig, **concepts) -> list[tuple[int, int]]:
    """Stable ids (upper layer, segment) of the segments that belong to a kept concept of each upper
    layer (inputs ``concepts_<layer>``): the targets of the edges into that layer, all pairs in one node."""
    return [(upper, s) for upper in cfg.layers[1:] for s in _kept_segments(concepts[f"concepts_{upper}"])]


def concept_gradients(cfg: GradientConfig, shard, model, images, **inputs) -> dict:
    """For each segment image of an upper concept u (ids (upper, segment); inputs ``segments_<upper>``,
    ``concepts_<upper>``): d objective_u / d(the block below), summed over patch tokens (the gradients of
    the ITCAV edges into u). Outputs ``grads.<lower>-<upper>``, ``concept.<lower>-<upper>`` (u's index) and
    ``segment.<lower>-<upper>`` (the segment)."""
    out = {}
    for lower, upper in zip(cfg.layers, cfg.layers[1:]):
        ids = _by_layer(shard.ids, [upper])[upper]
        grads, index = _pair_gradients(cfg, lower, upper, ids, model, images, inputs[f"segments_{upper}"],
                                       inputs[f"concepts_{upper}"])
        out[f"grads.{lower}-{upper}"], out[f"concept.{lower}-{upper}"] = grads, index
        out[f"segment.{lower}-{upper}"] = ids          # the upper segment of each row (for edges.within)
    return out


def _pair_gradients(cfg: GradientConfig, lower: int, upper: int, ids: np.ndarray, model, images, segments,
                    concepts) -> tuple[np.ndarray, np.ndarray]:
    table = concepts["assignments"]
    concept_of = dict(zip(table.column("segment").to_pylist(), table.column("concept").to_pylist()))
    names = [r["concept"] for r in concepts["concepts"].to_pylist() if r["kept"]]
    index = np.asarray([names.index(concept_of[int(s)]) for s in ids], np.int64)
    if not len(ids):
        return np.zeros((0, model.model.config.hidden_size), np.float32), index
    centroids = torch.from_numpy(np.asarray(concepts["centroids"], np.float32))
    layer_mean = torch.from_numpy(np.asarray(concepts["layer_mean"], np.float32))
    spread = float(np.asarray(concepts["spread"]).reshape(-1)[0])
    targets = centroids[torch.from_numpy(index)]
    u_all = torch.from_numpy(index)
    pixels = _segment_pixels(model, images, segments, ids)
    rows, cols = token_grid(model.model.config)
    n_patches = rows * cols
    grads = []
    for start in range(0, len(ids), cfg.batch_size):
        c = targets[start:start + cfg.batch_size]
        u = u_all[start:start + cfg.batch_size]

        def objective(logits, captured, c=c, u=u):
            a = pooled(captured[upper], n_patches)
            if cfg.objective == "assignment":
                logp = torch.log_softmax(-torch.cdist(a, centroids) ** 2 / max(spread, 1e-6), dim=-1)
                return logp[torch.arange(len(u)), u]
            value = -(a - c).norm(dim=-1)
            return value + (a - layer_mean).norm(dim=-1) if cfg.objective == "contrast" else value

        grads.append(gradient_sums(model, pixels[start:start + cfg.batch_size], lower, objective,
                                   layers=(upper,), patches=n_patches).numpy())
    return np.concatenate(grads).astype(np.float32), index
