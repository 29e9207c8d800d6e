"""Layerwise probes of clip variables on stored video activations, and the depth report.

One probe node per (model, layer, variable): nested grouped CV (the scene id groups a clip with its
impossible twin, so a trajectory never sits on both sides of a split) with a shuffled-label control.
The kind follows the variable: ridge for speed, |a|, (vx, vy) and (ax, ay); a circular probe
(sin/cos) for the direction; logistic for possible/impossible. ``depth_report`` lays the curves of the
trained model, its shuffled-label control and a randomly initialised model of the same shape side by
side, and names where each variable emerges and peaks (``probes.crossval.emergence``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.probes.crossval import CVConfig, EmergenceConfig, LayerProbeConfig, emergence, probe_layer
from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import VARIABLES, column, targets
from interpflow.tasks.video.extract import aligned, read_pooled

KIND_OF = {"scalar": "ridge", "vector2": "ridge", "angle": "circular", "class": "logistic"}


def probe_kind(variable: str) -> str:
    if variable not in VARIABLES:
        raise ValueError(f"unknown variable '{variable}'; the clips carry {sorted(VARIABLES)}")
    return KIND_OF[VARIABLES[variable]]


class ProbeGrid(BaseModel):
    """The probe fan-out's cross-validation: one grid of l2 strengths per probe kind."""

    model_config = ConfigDict(extra="forbid")
    folds: int = Field(5, ge=2, description="outer grouped folds (mean +- std over them)")
    inner_folds: int = Field(3, ge=2, description="inner grouped folds choosing l2")
    grids: dict[str, list[float]] = Field(default_factory=lambda: {"ridge": [1.0, 10.0, 100.0, 1000.0],
                                                                   "circular": [1.0, 10.0, 100.0, 1000.0],
                                                                   "logistic": [1e-4, 1e-3, 1e-2]},
                                          description="candidate l2 values per kind (ridge, circular, logistic)")
    control_repeats: int = Field(1, ge=0, description="label permutations for the shuffled control")
    seed: Seed = 0

    def for_variable(self, variable: str) -> LayerProbeConfig:
        kind = probe_kind(variable)
        if kind not in self.grids:
            raise ValueError(f"probes.grids has no '{kind}' entry, which variable '{variable}' needs; "
                             f"add probes.grids.{kind}=[...]")
        cv = CVConfig(kind=kind, folds=self.folds, inner_folds=self.inner_folds, seed=self.seed,
                      grid=self.grids[kind])
        return LayerProbeConfig(cv=cv, control_repeats=self.control_repeats)


class VariableProbe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variable: str
    probe: LayerProbeConfig


def probe_variable(cfg: VariableProbe, activations, data) -> dict:
    """Graph node: nested grouped CV of one variable on one layer's pooled activations."""
    ids, x = read_pooled(activations)
    rows = data.select(aligned(data, ids))
    return probe_layer(cfg.probe, x, targets(rows, cfg.variable), column(rows, "scene"))


class StudyScope(BaseModel):
    """What a study node spans, filled in by the workflow: site names in depth order and the variables."""

    model_config = ConfigDict(extra="forbid")
    sites: list[str] = Field(default_factory=list, description="set by the workflow")
    variables: list[str] = Field(default_factory=list, description="set by the workflow")


class DepthConfig(StudyScope):
    emergence: EmergenceConfig = EmergenceConfig()
    chance_max: float = Field(0.05, description="a score at most this counts as chance (direction at the "
                                                "embedding output must be)")
    decoded_min: float = Field(0.8, description="a score at least this counts as decoded (direction must be "
                                                "at some layer)")


def _curves(metrics: dict, prefix: str, variables: list[str], n_layers: int) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for var in variables:
        per_layer = [metrics[f"{prefix}.{var}.{i}"] for i in range(n_layers)]
        out[var] = {k: np.array([m.get(k, np.nan) for m in per_layer], dtype=float)
                    for k in ("mean", "std", "control_mean")}
    return out


def depth_report(cfg: DepthConfig, **metrics) -> dict:
    """Graph node: the depth table, emergence/peak layer per variable and the score-vs-depth figure.

    ``metrics`` are the probe nodes' metrics named ``trained.<variable>.<layer>`` and, for the random
    initialisation control, ``random.<variable>.<layer>``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites, variables = cfg.sites, cfg.variables
    n = len(sites)
    trained = _curves(metrics, "trained", variables, n)
    random = _curves(metrics, "random", variables, n) if f"random.{variables[0]}.0" in metrics else None
    rows, summary = [], {}
    for var in variables:
        t = trained[var]
        em = emergence(t["mean"], cfg.emergence, t["std"])
        summary.update({f"{var}.peak_layer": em["peak_layer"], f"{var}.peak_score": em["peak_score"],
                        f"{var}.emergence_layer": -1 if em["emergence_layer"] is None else em["emergence_layer"],
                        f"{var}.embed_score": float(t["mean"][0]),
                        f"{var}.control_max": float(np.nanmax(t["control_mean"]))})
        if random is not None:
            summary[f"{var}.random_peak_score"] = float(np.nanmax(random[var]["mean"]))
        for i, site in enumerate(sites):
            row = {"variable": var, "layer": i, "site": site, "kind": probe_kind(var), "mean": t["mean"][i],
                   "std": t["std"][i], "control_mean": t["control_mean"][i]}
            if random is not None:
                row.update(random_mean=random[var]["mean"][i], random_std=random[var]["std"][i])
            rows.append(row)
    if "direction" in variables:
        d = trained["direction"]["mean"]
        summary["direction.chance_at_embed"] = float(d[0] <= cfg.chance_max)
        summary["direction.decoded"] = float(d.max() >= cfg.decoded_min)
        summary["direction.control_at_chance"] = float(np.nanmax(trained["direction"]["control_mean"]) <= cfg.chance_max)

    cols = min(3, len(variables))
    fig_rows = -(-len(variables) // cols)
    fig, axes = plt.subplots(fig_rows, cols, figsize=(4.2 * cols, 3.2 * fig_rows), squeeze=False)
    layers = np.arange(n)
    for ax, var in zip(axes.flat, variables):
        t = trained[var]
        ax.plot(layers, t["mean"], marker="o", ms=3, color="C0", label="trained")
        ax.fill_between(layers, t["mean"] - t["std"], t["mean"] + t["std"], color="C0", alpha=0.2, lw=0)
        ax.plot(layers, t["control_mean"], ls="--", color="C0", alpha=0.7, label="shuffled labels")
        if random is not None:
            r = random[var]
            ax.plot(layers, r["mean"], marker="s", ms=3, color="C3", label="random init")
            ax.fill_between(layers, r["mean"] - r["std"], r["mean"] + r["std"], color="C3", alpha=0.15, lw=0)
        e = summary[f"{var}.emergence_layer"]
        if e >= 0:
            ax.axvline(e, color="C0", ls=":", lw=1)
            ax.plot([e], [t["mean"][e]], marker="*", ms=12, color="C0", zorder=5)
        ax.set_title(f"{var} ({probe_kind(var)})", fontsize=9)
        ax.set_xticks(layers)
        ax.set_xticklabels(sites, rotation=60, ha="right", fontsize=6)
        ax.axhline(0, color="0.6", lw=0.6)
    for ax in list(axes.flat)[len(variables):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel("CV score (R^2 / circular skill / accuracy)")
    fig.suptitle("score vs depth (mean +- std over grouped folds); * = emergence layer", fontsize=10)
    fig.tight_layout()
    return {"table": pa.Table.from_pylist(rows), "figure": fig, "metrics": summary}
