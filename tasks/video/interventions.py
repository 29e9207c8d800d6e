"""Causal tests on a loaded video model: attention ablations and steering along the direction subspace.

Both run as shards on the model actors (one shard per condition, so an interrupted sweep resumes per
condition) and read the model the same way: fixed **readout probes**, fitted once on the unablated
activations of the training groups, score the evaluation clips (held-out groups) at every layer.

* Ablation (``ablation_shard``): attention in one block (or every block) restricted by kind ("all",
  "cross_frame", "local"; ``video.ablation``); the drop of every (layer, variable) readout score and,
  for the embedded model, of its own objective (each ball token's step to the next frame, R^2).
* Steering (``steering_shard``): at the zone layer, every token gets the shift that moves the clip's
  mean activation, inside the first k dimensions of the direction subspace, from its direction's class
  mean to the class mean of the direction rotated by ``rotate_deg``. The rotation is read out at the
  last layer (the readout probe and, for the embedded model, its next-step head): how far the decoded
  direction turns, for k = 1, 2, 4, ...
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from interpflow.tasks.probes.crossval import circular_score, grouped_folds
from interpflow.tasks.probes.linear import ProbeConfig, _r2, fit_probe
from interpflow.tasks.types import Seed
from interpflow.tasks.video.ablation import KINDS, ablate
from interpflow.tasks.video.clips import column, targets
from interpflow.tasks.video.extract import aligned, forward_clips, read_pooled
from interpflow.tasks.video.layout import pool_tokens, token_grid
from interpflow.tasks.video.model import load_objective, motion_targets
from interpflow.tasks.video.probing import StudyScope, probe_kind


# ------------------------------------------------------------------------------------ readout probes

class ReadoutConfig(StudyScope):
    l2: dict[str, float] = Field(default_factory=lambda: {"ridge": 100.0, "circular": 100.0, "logistic": 1e-3},
                                 description="l2 per probe kind of the fixed readout probes")
    eval_fraction: float = Field(0.25, gt=0, lt=1, description="share of scene groups held out as the clips "
                                                               "every intervention is scored on")
    max_eval_clips: int = Field(400, ge=10, description="cap on evaluation clips (each condition runs them)")
    seed: Seed = 0


def readout_probes(cfg: ReadoutConfig, data, **activations) -> dict:
    """Graph node: per (site, variable) a probe fitted on the training groups' unablated activations,
    plus the evaluation clip ids (held-out groups) and their clean scores."""
    groups = column(data, "scene")
    folds = grouped_folds(groups, max(2, round(1 / cfg.eval_fraction)), cfg.seed)
    eval_rows = np.sort(folds[0][1])[:cfg.max_eval_clips]
    eval_ids = column(data, "id")[eval_rows]
    eval_set = set(eval_ids.tolist())
    probes, clean = {}, {}
    for site in cfg.sites:
        ids, x = read_pooled(activations[site])
        rows = data.select(aligned(data, ids))
        test = np.array([i in eval_set for i in ids.tolist()])
        for var in cfg.variables:
            kind = probe_kind(var)
            y = targets(rows, var)
            probes[f"{site}|{var}"] = _fit_readout(kind, cfg.l2[kind], x[~test], y[~test])
            clean[f"{site}|{var}"] = readout_score(probes[f"{site}|{var}"], x[test], y[test])
    return {"readout": {"probes": probes, "eval_ids": [int(i) for i in eval_ids]},
            "metrics": {f"clean.{k}": v for k, v in clean.items()}}


def _fit_readout(kind: str, l2: float, x: np.ndarray, y: np.ndarray) -> dict:
    """One probe on all of (x, y) (it is scored on other clips); a 2-column ridge target gets one ridge
    per column."""
    probe = ProbeConfig(kind=kind, l2=l2, test_fraction=0)
    columns = [y[:, j] for j in range(y.shape[1])] if kind == "ridge" and y.ndim == 2 else [y]
    fits = [fit_probe(probe, x, t) for t in columns]
    return {"kind": kind, "weight": np.vstack([f.weight for f in fits]).tolist(),
            "bias": np.concatenate([f.bias for f in fits]).tolist(), "classes": fits[0].classes}


def readout_score(probe: dict, x: np.ndarray, y: np.ndarray) -> float:
    """A readout probe's score on (x, y): R^2 (ridge, mean over columns), circular skill, or accuracy."""
    out = np.asarray(x, np.float64) @ np.asarray(probe["weight"]).T + np.asarray(probe["bias"])
    if probe["kind"] == "ridge":
        t = np.asarray(y, np.float64).reshape(len(y), -1)
        return float(np.mean([_r2(t[:, [j]], out[:, [j]]) for j in range(t.shape[1])])) if out.shape[1] > 1 else _r2(t, out)
    if probe["kind"] == "circular":
        return circular_score(y, np.arctan2(out[:, 0], out[:, 1]))
    idx = (out[:, 0] > 0).astype(int) if out.shape[1] == 1 else out.argmax(1)
    return float((np.asarray(probe["classes"])[idx] == np.asarray(y)).mean())


def readout_angle(probe: dict, x: np.ndarray) -> np.ndarray:
    out = np.asarray(x, np.float64) @ np.asarray(probe["weight"]).T + np.asarray(probe["bias"])
    return np.arctan2(out[:, 0], out[:, 1])


# ----------------------------------------------------------------------------------- running a model

def _eval_clips(data, eval_ids: list[int]):
    return data.select(aligned(data, np.asarray(eval_ids)))


def _pooled_all(model, rows, sites: list[str], batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled activations at every site, and the model's output tokens (clips, tokens, D) of ``rows``
    (after its final norm, where it has one: what the objective heads read)."""
    frames = column(rows, "frames")
    grid = token_grid(model.model.config, frames=frames.shape[1], size=frames.shape[2])
    output = "final_norm" if "final_norm" in model.sites.names() else sites[-1]
    resolved = model.sites.resolve_all(list(dict.fromkeys([*sites, output])))
    pooled: dict[str, list] = {s: [] for s in sites}
    last = []
    for captured in forward_clips(model, frames, resolved, batch_size, stop_early=False):
        for s in sites:
            pooled[s].append(pool_tokens(captured[s].float(), grid)[0].cpu().numpy())
        last.append(captured[output].float().cpu().numpy())
    return {s: np.concatenate(v) for s, v in pooled.items()}, np.concatenate(last)


def _objective_r2(model, rows, hidden: np.ndarray) -> float | None:
    """The embedded model's own objective on ``rows``: R^2 of each ball token's step to the next seen frame."""
    objective = load_objective(model.source, hidden.shape[-1])
    if objective is None:
        return None
    cfg = model.model.config
    frames = cfg.num_frames
    size = cfg.image_size
    # probed clips have no unseen frame: score the steps between seen frames (frames - 1 of them)
    _, steps, touched = motion_targets(column(rows, "positions"), column(rows, "masks"), size, cfg.patch_size,
                                       frames - 1)
    with torch.no_grad():
        _, token_pred = objective(torch.from_numpy(hidden), frames)
    pred = token_pred.numpy()[:, :frames - 1]
    scale = float(np.abs(steps).max()) or 1.0
    target = np.broadcast_to(steps[:, :, None] / scale, pred.shape)
    w = touched.astype(np.float64)
    # the head was trained on steps / max_speed; R^2 is scale-free only after a least-squares rescale
    a = (pred * target * w[..., None]).sum() / max((pred * pred * w[..., None]).sum(), 1e-12)
    resid = (((a * pred - target) ** 2).sum(-1) * w).sum()
    total = (((target - (target * w[..., None]).sum((0, 1, 2)) / w.sum()) ** 2).sum(-1) * w).sum()
    return float(1 - resid / total)


# ------------------------------------------------------------------------------------------ ablation

class AblationConfig(StudyScope):
    n_blocks: int = Field(0, ge=0, description="set by the workflow: the model's blocks")
    kinds: list[str] = Field(default_factory=lambda: list(KINDS), description="ablation kinds, each applied "
                                                                              "to one block at a time")
    every_layer: list[str] = Field(default_factory=lambda: ["cross_frame"],
                                   description="kinds also applied to every block at once")
    window_frames: int = Field(1, ge=0, description="local: |dt| of the barred window")
    window_patches: int = Field(1, ge=0, description="local: |drow|, |dcol| of the barred window")
    batch_size: int = Field(32, ge=1)


def ablation_conditions(cfg: AblationConfig, **_) -> list[str]:
    """Shard ids: 'none', '<kind>@<block>' for every kind and block, '<kind>@all'."""
    for kind in cfg.kinds + cfg.every_layer:
        if kind not in KINDS:
            raise ValueError(f"ablation kind '{kind}' is unknown; choose from {list(KINDS)}")
    n = cfg.n_blocks
    return ["none"] + [f"{k}@{i}" for k in cfg.kinds for i in range(n)] + [f"{k}@all" for k in cfg.every_layer]


def ablation_shard(cfg: AblationConfig, shard, model, data, readout: dict) -> dict:
    """Readout scores at every (site, variable) and the model's objective under each condition of the shard."""
    rows = _eval_clips(data, readout["eval_ids"])
    n_blocks = model.model.config.num_hidden_layers
    frames = column(rows, "frames")
    grid = token_grid(model.model.config, frames=frames.shape[1], size=frames.shape[2])
    records = []
    started = time.perf_counter()
    for condition in shard.ids:
        kind, _, where = condition.partition("@")
        layers = [] if condition == "none" else (list(range(n_blocks)) if where == "all" else [int(where)])
        with ablate(model.model, layers, kind if layers else "all", grid, cfg.window_frames, cfg.window_patches):
            pooled, last = _pooled_all(model, rows, cfg.sites, cfg.batch_size)
        objective = _objective_r2(model, rows, last)
        for site in cfg.sites:
            for var in cfg.variables:
                key = f"{site}|{var}"
                records.append({"condition": condition, "kind": kind if layers else "none",
                                "ablated": where if layers else "", "site": site, "variable": var,
                                "score": readout_score(readout["probes"][key], pooled[site], targets(rows, var)),
                                "objective_r2": np.nan if objective is None else objective})
    return {"scores": pa.Table.from_pylist(records), "metrics": {"conditions": len(shard.ids),
                                                                "compute_s": time.perf_counter() - started}}


def ablation_report(cfg: AblationConfig, scores) -> dict:
    """Graph node: the (variable x layer ablated x kind) drop table and its heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variables, sites = cfg.variables, cfg.sites
    table = scores.to_table() if hasattr(scores, "to_table") else scores
    d = table.to_pylist()
    clean = {(r["site"], r["variable"]): r["score"] for r in d if r["condition"] == "none"}
    clean_objective = next(r["objective_r2"] for r in d if r["condition"] == "none")
    rows = []
    for r in d:
        if r["condition"] == "none":
            continue
        rows.append({**r, "clean_score": clean[(r["site"], r["variable"])],
                     "drop": clean[(r["site"], r["variable"])] - r["score"],
                     "objective_drop": clean_objective - r["objective_r2"]})
    out_table = pa.Table.from_pylist(rows)
    # one drop per (variable, kind, ablated block): the drop of the best readout after the ablated block
    metrics: dict[str, float] = {}
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.45 * len(variables) + 2.2), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        blocks = sorted({r["ablated"] for r in rows if r["kind"] == kind}, key=lambda b: (b == "all", b.zfill(4)))
        grid = np.full((len(variables), len(blocks)), np.nan)
        for i, var in enumerate(variables):
            best_clean = max(clean[(s, var)] for s in sites)
            for j, b in enumerate(blocks):
                after = [r["score"] for r in rows if r["kind"] == kind and r["ablated"] == b and r["variable"] == var]
                grid[i, j] = best_clean - max(after)
                metrics[f"{kind}@{b}.{var}.drop"] = float(grid[i, j])
        im = ax.imshow(grid, cmap="magma", vmin=0, aspect="auto")
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels(blocks, fontsize=7)
        ax.set_yticks(range(len(variables)))
        ax.set_yticklabels(variables, fontsize=7)
        ax.set_xlabel("block ablated")
        ax.set_title(f"{kind}: drop of the best layer's score", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    for r in d:
        if r["condition"] != "none" and r["variable"] == "direction" and r["ablated"] == "all":
            metrics[f"{r['kind']}@all.direction.max_score"] = max(
                metrics.get(f"{r['kind']}@all.direction.max_score", -np.inf), r["score"])
    if not np.isnan(clean_objective):
        metrics["clean_objective_r2"] = float(clean_objective)
    return {"table": out_table, "figure": fig, "metrics": metrics}


# ------------------------------------------------------------------------------------------ steering

class SteeringConfig(StudyScope):
    layer: int | None = Field(None, description="layer index steered (0 = embedding output); None: the zone "
                                                "layer, where direction emerges")
    max_dims: int = Field(32, ge=1, description="cap on the direction subspace found by orthogonal probes")
    dims: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1,
                            description="subspace sizes k (the first k dimensions of the direction subspace; "
                                        "sizes beyond it are capped)")
    rotate_deg: float = Field(90.0, description="the direction rotation each clip is steered towards")
    bins: int = Field(16, ge=4, description="direction classes whose mean activations define the target")
    batch_size: int = Field(32, ge=1)


def steering_dims(cfg: SteeringConfig, **_) -> list[int]:
    return sorted(set(cfg.dims))


def steering_subspace(cfg: SteeringConfig, depth: dict, data, **activations) -> dict:
    """Graph node: the direction subspace at the steered layer (orthogonal circular probes, in the order
    found: the first two columns are the first probe's sin and cos readouts)."""
    from interpflow.tasks.probes.geometry import orthogonal_probe_dimensionality
    from interpflow.tasks.video.zone import zone_layer

    layer = zone_layer(depth, cfg.layer)
    if not 0 <= layer < len(cfg.sites):
        raise ValueError(f"steering.layer={layer} is out of range: the model has layers 0..{len(cfg.sites) - 1}")
    ids, x = read_pooled(activations[cfg.sites[layer]])
    theta = column(data.select(aligned(data, ids)), "direction")
    found = orthogonal_probe_dimensionality(x, theta, "circular", max_dims=cfg.max_dims)
    return {"basis": found["basis"], "metrics": {"layer": layer, "dims": found["dims"]}}


def _class_means(x: np.ndarray, theta: np.ndarray, bins: int) -> np.ndarray:
    which = np.floor((theta + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    return np.stack([x[which == b].mean(0) if (which == b).any() else x.mean(0) for b in range(bins)])


def steering_shard(cfg: SteeringConfig, shard, model, data, readout: dict, subspace: dict, basis: np.ndarray,
                   **activations) -> dict:
    """Rotation of the decoded direction (last layer readout, and the model's own head) for each k."""
    sites = cfg.sites
    layer = int(subspace["layer"])
    site = sites[layer]
    ids, x = read_pooled(activations[site])
    theta = column(data.select(aligned(data, ids)), "direction")
    means = _class_means(x, theta, cfg.bins)
    rows = _eval_clips(data, readout["eval_ids"])
    eval_theta = column(rows, "direction")
    shift = np.radians(cfg.rotate_deg)
    width = 2 * np.pi / cfg.bins
    src = np.floor((eval_theta + np.pi) / width).astype(int) % cfg.bins
    dst = np.floor((eval_theta + shift + np.pi) / width).astype(int) % cfg.bins
    delta_full = means[dst] - means[src]                                            # (clips, D)
    last_probe = readout["probes"][f"{sites[-1]}|direction"]
    objective = load_objective(model.source, x.shape[1])
    resolved = model.sites.resolve(site)
    module = dict(model.model.named_modules())[resolved.module]
    frames = column(rows, "frames")
    grid = token_grid(model.model.config, frames=frames.shape[1], size=frames.shape[2])

    def decode(delta: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        offset = {"value": None}

        def shifted(value):
            hidden = value[0] if isinstance(value, tuple) else value
            hidden = hidden + offset["value"][:, None, :].to(hidden.device, hidden.dtype)
            return (hidden, *value[1:]) if isinstance(value, tuple) else hidden

        def output_hook(mod, args, output):
            return None if offset["value"] is None else shifted(output)

        def input_hook(mod, args, kwargs):       # "embed" is the input of block 0
            if offset["value"] is None:
                return None
            if args:
                return (shifted(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": shifted(kwargs["hidden_states"])}

        handle = (module.register_forward_pre_hook(input_hook, with_kwargs=True) if resolved.side == "input"
                  else module.register_forward_hook(output_hook))
        try:
            angles, heads = [], []
            for start in range(0, len(rows), cfg.batch_size):
                part = rows.select(range(start, min(start + cfg.batch_size, len(rows))))
                if delta is not None:
                    offset["value"] = torch.from_numpy(delta[start:start + cfg.batch_size]).float()
                pooled, last = _pooled_all(model, part, [sites[-1]], cfg.batch_size)
                angles.append(readout_angle(last_probe, pooled[sites[-1]]))
                if objective is not None:
                    with torch.no_grad():
                        step, _ = objective(torch.from_numpy(last), grid.frames)
                    heads.append(np.arctan2(step[:, 1].numpy(), step[:, 0].numpy()))
        finally:
            handle.remove()
        return np.concatenate(angles), (np.concatenate(heads) if heads else None)

    base_probe, base_head = decode(None)
    records = []
    for k in shard.ids:
        k_eff = min(int(k), basis.shape[1])
        b = basis[:, :k_eff]
        delta = (delta_full @ b) @ b.T
        probe_angle, head_angle = decode(delta)
        rot_probe = np.angle(np.exp(1j * (probe_angle - base_probe)))
        record = {"dims": int(k), "dims_used": k_eff, "target_deg": cfg.rotate_deg,
                  "probe_rotation_deg": float(np.degrees(np.angle(np.exp(1j * rot_probe).mean()))),
                  "probe_rotation_abs_deg": float(np.degrees(np.abs(rot_probe)).mean()),
                  "shift_norm": float(np.linalg.norm(delta, axis=1).mean())}
        if head_angle is not None:
            # the head's angle is atan2(dy, dx) in image coordinates; direction is measured the same way
            rot_head = np.angle(np.exp(1j * (head_angle - base_head)))
            record["head_rotation_deg"] = float(np.degrees(np.angle(np.exp(1j * rot_head).mean())))
        records.append(record)
    return {"rotation": pa.Table.from_pylist(records)}


def steering_report(cfg: SteeringConfig, rotation) -> dict:
    """Graph node: rotation of the decoded direction against the number of steered dimensions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rotation.to_table() if hasattr(rotation, "to_table") else rotation
    d = sorted(table.to_pylist(), key=lambda r: r["dims"])
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ks = [r["dims_used"] for r in d]
    ax.plot(ks, [r["probe_rotation_deg"] for r in d], marker="o", label="last-layer probe")
    if "head_rotation_deg" in d[0]:
        ax.plot(ks, [r["head_rotation_deg"] for r in d], marker="s", label="model's next-step head")
    ax.axhline(cfg.rotate_deg, color="0.5", ls="--", lw=1, label="target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steered dimensions k")
    ax.set_ylabel("mean rotation of decoded direction (deg)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    metrics = {f"k{r['dims_used']}.probe_rotation_deg": r["probe_rotation_deg"] for r in d}
    metrics.update({f"k{r['dims_used']}.head_rotation_deg": r["head_rotation_deg"] for r in d if "head_rotation_deg" in r})
    return {"table": table, "figure": fig, "metrics": metrics}
