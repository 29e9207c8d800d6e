"""VTCD step 4: importance table and plots, check curves, head importance and pruning, and the planted checks.

The checks (``check.*``, ``ground_truth_ok``) read the planted clips: a concept is a *ball* concept when
its token IoU with the ball is at least ``object_iou`` and larger than its IoU with the square, a
*square* (distractor) concept in the mirror case.
  * ``check.ball_in_top``        one of the ``top`` most important concepts has ball IoU >= ``ball_iou``;
  * ``check.distractor_below``   the best square concept ranks below the best ball concept, and square
                                 concepts are on average less important than ball concepts;
  * ``check.curve_order``        AUC(most -> least) < AUC(random) < AUC(least -> most).
They are meaningful for a model that solved the task (the embedded classifier); for any other model the
report shows the same numbers and checks without expecting them to pass.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.cris import head_importance, importance_scores
from interpflow.tasks.video.layout import TokenGrid


class ImportanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    show: int = Field(20, ge=1, description="concepts in the importance bar chart")


def _label(row: dict, threshold: float) -> str:
    ball, square = row.get("ball_iou", 0.0), row.get("square_iou", 0.0)
    if max(ball, square) < threshold:
        return "other"
    return "ball" if ball >= square else "square"


COLOURS = {"ball": "tab:orange", "square": "tab:red", "other": "tab:gray"}


def cris_importance(cfg: ImportanceConfig, draws, **concepts) -> dict:
    """Graph node: concept importance from the CRIS draws (one row per concept, ranked) and head importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = importance_scores(draws, concepts)
    rows = sorted(table.to_pylist(), key=lambda r: r["rank"])[:cfg.show]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 3.4))
    ax.bar(range(len(rows)), [r["importance"] for r in rows],
           color=[COLOURS[_label(r, 0.3)] for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["concept_id"] for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("CRIS importance\n(kept - dropped performance)")
    ax.set_title("most important concepts (orange: ball, red: distractor square, grey: other)", fontsize=9)
    fig.tight_layout()
    perf = (draws.to_table() if hasattr(draws, "to_table") else draws).column("performance").to_numpy()
    return {"importance": table, "heads": head_importance(table), "figure": fig,
            "metrics": {"concepts": table.num_rows, "draws": len(perf), "draw_performance_mean": float(perf.mean()),
                        "draw_performance_std": float(perf.std())}}


class VtcdReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top: int = Field(3, ge=1, description="the ball must be among this many most important concepts")
    ball_iou: float = Field(0.5, gt=0, le=1, description="token IoU a top concept must reach with the ball")
    object_iou: float = Field(0.3, gt=0, le=1, description="token IoU that labels a concept ball or square")
    examples: int = Field(3, ge=1, description="videos shown per top concept in the tubelet figure")
    flat_margin: float = Field(0.05, ge=0, description=(
        "removal_flat = 1 when no point of the most-important-first curve is this much below no removal"))
    grid: list[int] = Field(default_factory=list, description="set by the workflow: prefix, frames, rows, cols")


def _auc(curve: list[dict]) -> float:
    curve = sorted(curve, key=lambda r: r["fraction"])
    return float(np.trapezoid([r["performance"] for r in curve], [r["fraction"] for r in curve]))


def vtcd_report(cfg: VtcdReportConfig, importance, heads, curves, pruning, data, **members) -> dict:
    """Graph node: checks and figures of the VTCD run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    importance = importance.to_table() if hasattr(importance, "to_table") else importance
    rows = sorted(importance.to_pylist(), key=lambda r: r["rank"])
    for r in rows:
        r["label"] = _label(r, cfg.object_iou)
    curve_rows = (curves.to_table() if hasattr(curves, "to_table") else curves).to_pylist()
    orders = sorted({r["order"] for r in curve_rows})
    auc = {o: _auc([r for r in curve_rows if r["order"] == o]) for o in orders}
    auc_random = float(np.mean([v for o, v in auc.items() if o.startswith("random")]))
    ball = [r for r in rows if r["label"] == "ball"]
    square = [r for r in rows if r["label"] == "square"]
    top = rows[:cfg.top]
    metrics = {"auc.most_first": auc["most"], "auc.least_first": auc["least"], "auc.random": auc_random,
               "concepts": len(rows), "ball_concepts": len(ball), "square_concepts": len(square),
               "top_ball_iou": max((r.get("ball_iou", 0.0) for r in top), default=0.0),
               "best_ball_rank": min((r["rank"] for r in ball), default=np.nan),
               "best_square_rank": min((r["rank"] for r in square), default=np.nan),
               "ball_mean_importance": float(np.mean([r["importance"] for r in ball])) if ball else np.nan,
               "square_mean_importance": float(np.mean([r["importance"] for r in square])) if square else np.nan}
    checks = {
        "ball_in_top": any(r.get("ball_iou", 0.0) >= cfg.ball_iou for r in top),
        "distractor_below": bool(ball) and (not square or (
            metrics["best_square_rank"] > metrics["best_ball_rank"]
            and metrics["square_mean_importance"] < metrics["ball_mean_importance"])),
        "curve_order": auc["most"] < auc_random < auc["least"]}
    metrics.update({f"check.{k}": float(v) for k, v in checks.items()})
    # does any removal matter? A model whose output without evidence is the target class (it learned
    # "left, or else right") loses nothing when concepts go, so no concept can rank: study another class
    most = sorted((r for r in curve_rows if r["order"] == "most"), key=lambda r: r["fraction"])
    if most:
        metrics["performance.none_removed"] = most[0]["performance"]
        metrics["performance.lowest"] = min(r["performance"] for r in most)
        metrics["removal_flat"] = float(metrics["performance.lowest"] >= most[0]["performance"] - cfg.flat_margin)
    metrics["ground_truth_ok"] = float(all(checks.values()))
    prune_rows = (pruning.to_table() if hasattr(pruning, "to_table") else pruning).to_pylist()
    for r in prune_rows:
        metrics[f"pruning.{r['condition']}"] = r["performance"]
    head_rows = (heads.to_table() if hasattr(heads, "to_table") else heads).to_pylist()
    return {"table": pa.Table.from_pylist(rows), "metrics": metrics,
            "curves_figure": _curves_figure(plt, curve_rows, auc, auc_random),
            "heads_figure": _heads_figure(plt, head_rows, prune_rows),
            "tubelets_figure": _tubelets_figure(plt, top, data, members, cfg.examples, TokenGrid(*cfg.grid))}


def _curves_figure(plt, curve_rows, auc, auc_random):
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for order, style in (("most", "tab:red"), ("least", "tab:green")):
        pts = sorted((r for r in curve_rows if r["order"] == order), key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in pts], [r["performance"] for r in pts], color=style, marker="o", ms=3,
                label=f"{order} important first (AUC {auc[order]:.3f})")
    randoms = sorted({r["order"] for r in curve_rows if r["order"].startswith("random")})
    fractions = sorted({r["fraction"] for r in curve_rows})
    mean = [np.mean([r["performance"] for r in curve_rows if r["order"] in randoms and r["fraction"] == f])
            for f in fractions]
    ax.plot(fractions, mean, color="tab:gray", ls="--", label=f"random order, mean of {len(randoms)} "
                                                               f"(AUC {auc_random:.3f})")
    ax.set_xlabel("fraction of concepts removed")
    ax.set_ylabel("target-class probability")
    ax.set_title("concept removal curves", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _heads_figure(plt, head_rows, prune_rows):
    layers = sorted({r["layer"] for r in head_rows})
    n_heads = max((r["head"] for r in head_rows), default=0) + 1
    grid = np.full((len(layers), n_heads), np.nan)
    for r in head_rows:
        grid[layers.index(r["layer"]), r["head"]] = r["importance"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    im = a.imshow(grid, cmap="viridis", aspect="auto")
    a.set_xlabel("head")
    a.set_ylabel("layer")
    a.set_yticks(range(len(layers)))
    a.set_yticklabels(layers)
    a.set_title("head importance (sum of its concepts')", fontsize=9)
    fig.colorbar(im, ax=a, fraction=0.046)
    for order, colour in (("least", "tab:green"), ("random", "tab:gray"), ("most", "tab:red")):
        pts = sorted((r for r in prune_rows if r["order"] == order), key=lambda r: r["pruned"])
        b.plot([r["pruned"] for r in pts], [r["performance"] for r in pts], marker="o", color=colour,
               label=f"{order} important pruned")
    b.set_xlabel("heads pruned")
    b.set_ylabel("target-class probability")
    b.set_title("head pruning", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tubelets_figure(plt, top: list[dict], data, members: dict, examples: int, grid: TokenGrid):
    """Top concepts on a few of their videos: the middle frame with the concept's tokens outlined."""
    from interpflow.tasks.concepts.tubelets import rows_of
    from interpflow.tasks.video.clips import column

    tables = [t.to_table() if hasattr(t, "to_table") else t for t in members.values()]
    by_concept: dict[str, list[dict]] = {}
    wanted = {r["concept_id"] for r in top}
    for t in tables:
        for r in t.to_pylist():
            if r["concept_id"] in wanted:
                by_concept.setdefault(r["concept_id"], []).append(r)
    fig, axes = plt.subplots(len(top), examples, figsize=(2.2 * examples, 2.3 * len(top)), squeeze=False)
    for i, concept in enumerate(top):
        shown = by_concept.get(concept["concept_id"], [])[:examples]
        for j in range(examples):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(shown):
                continue
            video = shown[j]["video"]
            frames = column(data.select(rows_of(data, [video])), "frames")[0]
            mask = np.zeros(grid.n_tokens, dtype=bool)
            mask[shown[j]["tokens"]] = True
            ax.imshow(frames[len(frames) // 2])
            share = _token_overlay(mask, grid, frames.shape[1])       # untouched patches stay as they are
            ax.imshow(np.ma.masked_equal(share, 0), alpha=0.5, cmap="autumn_r", vmin=0, vmax=1)
            ax.set_title(f"{concept['concept_id']} (rank {concept['rank']})\nvideo {video}", fontsize=7)
    fig.suptitle("most important concepts: their tokens over the middle frame (all token frames merged)", fontsize=8)
    fig.tight_layout()
    return fig


def _token_overlay(mask: np.ndarray, grid, size: int) -> np.ndarray:
    """A (size, size) map: the share of token frames in which each patch belongs to the concept."""
    from interpflow.tasks.concepts.tubelets import grid_volume_index

    share = mask[grid_volume_index(grid)].mean(0)                                   # (rows, cols)
    return np.kron(share, np.ones((size // grid.height, size // grid.width)))
