"""The study's one-page report: the headline numbers and the ground-truth checks, as one figure."""

from __future__ import annotations

from pydantic import Field

from interpflow.tasks.video.probing import StudyScope


class ReportConfig(StudyScope):
    occupancy_min: float = Field(0.1, description="patch decoding must correlate with ball occupancy at least "
                                                  "this much")
    chance_max: float = Field(0.05, description="a direction score at most this counts as chance: every patch at "
                                                "the embedding output, and every layer under cross-frame "
                                                "ablation in every block")


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def physics_report(cfg: ReportConfig, depth: dict, geometry: dict, patches: dict, ablation: dict,
                   steering: dict) -> dict:
    """Graph node: the checks of issue #9's must-show points that a run can show, and a one-page figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = cfg.sites
    checks = {   # metric name: (what it shows, passed)
        "embed_pooled_chance": ("direction at chance at the embedding output (pooled)",
                                depth.get("direction.chance_at_embed")),
        "embed_patches_chance": ("direction at chance at the embedding output (every patch)",
                                 float(patches["embed.max_patch_score"] <= cfg.chance_max)),
        "direction_decoded": ("direction decoded at some layer", depth.get("direction.decoded")),
        "control_chance": ("shuffled-label control at chance", depth.get("direction.control_at_chance")),
        "patches_follow_ball": ("patch decoding follows the ball",
                                float(patches["occupancy_correlation"] >= cfg.occupancy_min)),
    }
    ablated = ablation.get("cross_frame@all.direction.max_score")
    if ablated is not None:
        checks["cross_frame_ablation_chance"] = ("cross-frame ablation in every block keeps direction at chance",
                                                 float(ablated <= cfg.chance_max))
    checks = {k: v for k, v in checks.items() if v[1] is not None}
    metrics = {f"check.{k}": float(passed) for k, (_, passed) in checks.items()}
    metrics["ground_truth_ok"] = float(all(passed == 1.0 for _, passed in checks.values()))
    peak = int(depth["direction.peak_layer"]) if "direction.peak_layer" in depth else None
    emerged = int(depth.get("direction.emergence_layer", -1))
    metrics.update({"direction.peak_layer": peak if peak is not None else -1, "direction.emergence_layer": emerged})

    lines = ["Physics Emergence Zone study", ""]
    for var in cfg.variables:
        e = int(depth.get(f"{var}.emergence_layer", -1))
        p = int(depth.get(f"{var}.peak_layer", -1))
        lines.append(f"{var:>13}: embed {_fmt(depth.get(f'{var}.embed_score'))}, peak {_fmt(depth.get(f'{var}.peak_score'))}"
                     f" at {sites[p] if p >= 0 else '-'}, emerges at {sites[e] if e >= 0 else 'no clear layer'}"
                     f"; random init peak {_fmt(depth.get(f'{var}.random_peak_score'))}")
    lines += ["", f"zone layer: {sites[int(geometry['layer'])]}; ring circular correlation "
                  f"{_fmt(geometry.get('circular_correlation'))}; direction dimensionality "
                  f"{_fmt(geometry.get('dimensionality'))}; angle to the possible/impossible probe "
                  f"{_fmt(geometry.get('direction_vs_possible_angle_deg'))} deg",
              f"patch decoding: zone map max {_fmt(patches.get('zone.max_patch_score'))}, embed map max "
              f"{_fmt(patches.get('embed.max_patch_score'))}, skill vs occupancy r = "
              f"{_fmt(patches.get('occupancy_correlation'))}",
              f"cross-frame ablation in every block: best direction score {_fmt(ablated)}"]
    rotations = sorted(((int(k[1:].split('.')[0]), v) for k, v in steering.items()
                        if k.endswith(".probe_rotation_deg")))
    lines.append("steering (k dims -> decoded rotation, deg): " + ", ".join(f"{k}: {v:.0f}" for k, v in rotations))
    lines += ["", "checks:"] + [f"  [{'x' if passed == 1.0 else ' '}] {what}" for what, passed in checks.values()]
    fig = plt.figure(figsize=(8.5, 0.22 * len(lines) + 0.8))
    fig.text(0.02, 0.98, "\n".join(lines), va="top", family="monospace", fontsize=7.5)
    return {"figure": fig, "summary": {"lines": lines, "checks": {what: passed for what, passed in checks.values()}},
            "metrics": metrics}
