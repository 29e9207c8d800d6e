"""Inside the zone: the geometry of the direction code and where in the frame it can be read.

Both nodes work at the study's **zone layer**: the layer where direction emerges (the peak, if it never
clearly does), read from the depth report unless the config names a layer.

* ``direction_geometry``: the ring of direction-class means (PCA, circular correlation with the true
  angles), orthogonal-probe dimensionality with its basis (the subspace steering moves), and the
  principal angles between the direction probe's plane and the possible/impossible probe.
* ``patch_decoding``: a circular probe per spatial patch on that patch's token (mean over frames),
  out of fold; per (clip, patch) the decoding skill cos(predicted - true direction) is set against
  how often the ball covers that patch. At the embedding output every patch must be at chance.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from interpflow.tasks.probes.crossval import circular_score, grouped_folds
from interpflow.tasks.probes.geometry import GeometryConfig, geometry_report, orthogonal_probe_dimensionality, principal_angles
from interpflow.tasks.probes.linear import ProbeConfig, fit_probe
from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import column
from interpflow.tasks.video.extract import PATCHES, aligned, read_patches, read_pooled
from interpflow.tasks.video.probing import StudyScope


def zone_layer(depth: dict, layer: int | None) -> int:
    """The configured layer, else direction's emergence layer from the depth report, else its peak."""
    if layer is not None:
        return layer
    emerged = int(depth.get("direction.emergence_layer", -1))
    return emerged if emerged >= 0 else int(depth["direction.peak_layer"])


def _layer_input(inputs: dict, sites: list[str], layer: int, suffix: str = ""):
    if not 0 <= layer < len(sites):
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{len(sites) - 1} "
                         f"({sites[0]} .. {sites[-1]})")
    return inputs[sites[layer] + suffix]


class DirectionGeometryConfig(StudyScope):
    layer: int | None = Field(None, description="layer index (0 = embedding output); None: the zone layer")
    geometry: GeometryConfig = GeometryConfig(permutations=200)
    possible_l2: float = Field(1e-3, ge=0, description="l2 of the possible/impossible probe whose plane is "
                                                       "compared with direction's")


def direction_geometry(cfg: DirectionGeometryConfig, depth: dict, data, **activations) -> dict:
    """Graph node: ring, dimensionality (+ basis) and subspace angles of direction at the zone layer."""
    layer = zone_layer(depth, cfg.layer)
    ids, x = read_pooled(_layer_input(activations, cfg.sites, layer))
    rows = data.select(aligned(data, ids))
    angles = column(rows, "direction")
    out = geometry_report(cfg.geometry, x, angles)
    dim = orthogonal_probe_dimensionality(x, angles, "circular", cfg.geometry.probe, chance=cfg.geometry.chance,
                                          max_dims=cfg.geometry.max_dims, margin=cfg.geometry.margin,
                                          pcs=cfg.geometry.pcs)
    metrics = {**out["metrics"], "layer": layer}
    possible = column(rows, "possible")
    if len(np.unique(possible)) > 1:
        direction_plane = fit_probe(cfg.geometry.probe, x, angles).direction.T
        possibility = fit_probe(ProbeConfig(kind="logistic", l2=cfg.possible_l2), x, possible).direction.T
        metrics["direction_vs_possible_angle_deg"] = float(principal_angles(direction_plane, possibility).min())
    return {**out, "basis": dim["basis"], "metrics": metrics}


class PatchDecodingConfig(StudyScope):
    layer: int | None = Field(None, description="layer index of the map; None: the zone layer")
    l2: float = Field(100.0, ge=0, description="ridge strength of each patch's circular probe (standardised)")
    folds: int = Field(5, ge=2, description="grouped folds for out-of-fold predictions")
    examples: int = Field(4, ge=0, description="example clips drawn in the figure")
    seed: Seed = 0


def _out_of_fold_skill(cfg: PatchDecodingConfig, x: np.ndarray, theta: np.ndarray,
                       groups: np.ndarray) -> tuple[np.ndarray, float]:
    """cos(predicted - true angle) per clip, out of fold, and the overall circular score."""
    pred = np.zeros_like(theta)
    for train, test in grouped_folds(groups, cfg.folds, cfg.seed):
        # the fold's own test part is what is scored: the probe fits on all of the fold's training part
        probe = ProbeConfig(kind="circular", l2=cfg.l2, test_fraction=0)
        res = fit_probe(probe, x[train], theta[train])
        pred[test] = res.predict(x[test])
    return np.cos(pred - theta), circular_score(theta, pred)


def patch_decoding(cfg: PatchDecodingConfig, depth: dict, data, **patches) -> dict:
    """Graph node: per-patch direction decoding at the embedding output and at the zone layer, and its
    correlation with ball occupancy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interpflow.tasks.video.layout import TokenGrid, patch_occupancy

    layer = zone_layer(depth, cfg.layer)
    metrics: dict[str, float] = {"layer": layer}
    maps, skills = {}, {}
    for name, index in (("embed", 0), ("zone", layer)):
        ids, x, shape = read_patches(_layer_input(patches, cfg.sites, index, PATCHES))
        rows = data.select(aligned(data, ids))
        theta, groups = column(rows, "direction"), column(rows, "scene")
        per_patch = [_out_of_fold_skill(cfg, x[:, p], theta, groups) for p in range(x.shape[1])]
        skills[name] = np.stack([s for s, _ in per_patch], axis=1)               # (clips, patches)
        maps[name] = np.array([score for _, score in per_patch])
        metrics[f"{name}.max_patch_score"] = float(maps[name].max())
        metrics[f"{name}.mean_patch_score"] = float(maps[name].mean())
    masks = column(rows, "masks")
    grid = TokenGrid(prefix=0, frames=masks.shape[1], height=shape[0], width=shape[1], order="tp")
    occupancy = patch_occupancy(masks, grid, masks.shape[-1])                     # (clips, patches)
    zone = skills["zone"]
    metrics["occupancy_correlation"] = float(np.corrcoef(zone.ravel(), occupancy.ravel())[0, 1])
    metrics["skill_where_ball"] = float(zone[occupancy > 0].mean())
    metrics["skill_where_no_ball"] = float(zone[occupancy == 0].mean()) if (occupancy == 0).any() else float("nan")
    table = pa.table({"id": np.repeat(ids, x.shape[1]), "patch": np.tile(np.arange(x.shape[1]), len(ids)),
                      "occupancy": occupancy.ravel(), "skill_zone": zone.ravel(), "skill_embed": skills["embed"].ravel()})

    n_ex = min(cfg.examples, len(ids))
    fig, axes = plt.subplots(2, 2 + n_ex, figsize=(2.3 * (2 + n_ex), 4.6), squeeze=False)
    for r, name in enumerate(("embed", "zone")):
        im = axes[r, 0].imshow(maps[name].reshape(shape), vmin=-0.2, vmax=1, cmap="viridis")
        axes[r, 0].set_title(f"{name} (layer {0 if name == 'embed' else layer}): patch score", fontsize=7)
        fig.colorbar(im, ax=axes[r, 0], fraction=0.046)
    bins = np.linspace(0, 1, 6)
    which = np.digitize(occupancy.ravel(), bins[1:-1])
    axes[0, 1].bar(range(len(bins) - 1), [zone.ravel()[which == b].mean() if (which == b).any() else 0
                                         for b in range(len(bins) - 1)])
    axes[0, 1].set_xticks(range(len(bins) - 1))
    axes[0, 1].set_xticklabels([f"{bins[b]:.1f}+" for b in range(len(bins) - 1)], fontsize=6)
    axes[0, 1].set_title(f"zone skill by occupancy (r={metrics['occupancy_correlation']:.2f})", fontsize=7)
    axes[1, 1].axis("off")
    frames = column(rows.select(range(n_ex)), "frames") if n_ex else None
    for k in range(n_ex):
        axes[0, 2 + k].imshow(frames[k].max(axis=0))
        axes[0, 2 + k].set_title(f"clip {int(ids[k])} (all frames)", fontsize=7)
        axes[1, 2 + k].imshow(zone[k].reshape(shape), vmin=-1, vmax=1, cmap="coolwarm")
        axes[1, 2 + k].set_title("cos(pred - true) per patch", fontsize=7)
    fig.tight_layout()
    return {"table": table, "maps": np.stack([maps["embed"], maps["zone"]]), "figure": fig, "metrics": metrics}
