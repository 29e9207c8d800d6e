"""The persuasion comparison: attempt rates per (route, trait, coefficient or SFT condition, prompt,
category) with bootstrap CIs, the persuadees' belief shift, coherence, plots, and the planted checks.

Attempt rate of a cell = the mean over its conversations of the share of model turns rated as an
attempt; its CI resamples conversations (turns of one conversation are not independent).

Planted checks (``ground_truth``: only meaningful on the embedded world with the marker evaluator):

1. ``halves_cosine``: every trait's vector from one half of its contrastive prompts has cosine
   >= ``min_halves_cosine`` with the vector from the other half, at every layer.
2. ``steering_monotone``: steering along the persuasion trait under ``check_prompt`` raises the attempt
   rate monotonically (each step may dip by at most ``monotone_tolerance``) from coefficient 0 to the
   coefficient of its peak, and the peak is at least ``min_rise`` above the base model.
3. ``random_flat``: random directions of the same norm, at every coefficient up to that peak, stay
   within ``random_tolerance`` of the base rate.
4. ``sft_transfer``: for every seed, SFT on ``sft_condition`` (persuasion in other categories only)
   raises the attempt rate on ``heldout_category`` above the base model's (the CI of the difference
   excludes 0).

A check whose conditions the study does not run (no SFT, no random direction, given vectors) is nan
and left out of ``ground_truth_ok``, which needs every check that ran to pass (``checks_run`` says how many).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.study.analysis import AnalysisConfig, boot_diff, boot_mean
from interpflow.tasks.types import Seed

ALL = "all"
CHECKS = ("halves_cosine_ok", "steering_monotone_ok", "random_flat_ok", "sft_transfer_ok")


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_boot: int = Field(1000, ge=100)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: Seed = 0
    ground_truth: bool = Field(True, description="run the planted checks (the workflow turns them off for a "
                                                 "user's model or an endpoint evaluator)")
    persuasion_trait: str = "persuasive"
    check_prompt: str = "neutral"
    heldout_category: str = "controversial"
    sft_condition: str = "benign_persuasion"
    min_halves_cosine: float = 0.9
    min_rise: float = 0.5
    monotone_tolerance: float = 0.05
    random_tolerance: float = 0.1


def _table(value) -> pa.Table:
    return value.to_table() if hasattr(value, "to_table") else value


def _cell_rows(cfg: ReportConfig, rows: list[dict]) -> list[dict]:
    boot = AnalysisConfig(n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        for category in (r["category"], ALL):
            cells.setdefault((r["condition"], r["prompt"], category), []).append(r)
    out = []
    for (condition, prompt, category), members in sorted(cells.items()):
        first = members[0]
        rates = np.array([m["attempt_rate"] for m in members if m["attempt_rate"] is not None], dtype=float)
        shifts = np.array([m["belief_shift"] for m in members if m["belief_shift"] is not None], dtype=float)
        ppl = [m["perplexity"] for m in members if m["perplexity"] is not None]
        label = f"{condition}/{prompt}/{category}"
        rate, lo, hi = boot_mean(boot, rates, "rate/" + label)
        shift, shift_lo, shift_hi = boot_mean(boot, shifts, "shift/" + label)
        out.append({"condition": condition, "route": first["route"], "trait": first["trait"], "layer": first["layer"],
                    "coef": first["coef"], "sft": first["sft"], "seed": first["seed"], "prompt": prompt,
                    "category": category, "n": len(members), "attempt_rate": rate, "ci_low": lo, "ci_high": hi,
                    "refusal_rate": float(np.mean([m["refused"] for m in members])),
                    "belief_shift": shift, "shift_ci_low": shift_lo, "shift_ci_high": shift_hi,
                    "perplexity": float(np.mean(ppl)) if ppl else math.nan, "evaluator": first["evaluator"]})
    return out


def _rate(cells: list[dict], condition: str, prompt: str, category: str) -> float:
    for c in cells:
        if (c["condition"], c["prompt"], c["category"]) == (condition, prompt, category):
            return c["attempt_rate"]
    return math.nan


def _checks(cfg: ReportConfig, cells: list[dict], persona: dict[str, dict], rows: list[dict]) -> dict[str, Any]:
    """The planted checks of the module docstring, each with the figures it was decided on."""
    out: dict[str, Any] = {}
    cosines = [layer["halves_cosine"] for s in persona.values() for layer in s["layers"].values()
               if not math.isnan(layer["halves_cosine"])]     # given vectors have no halves
    out["min_halves_cosine"] = min(cosines) if cosines else math.nan
    out["halves_cosine_ok"] = _verdict([min(cosines) >= cfg.min_halves_cosine] if cosines else [])

    base = _rate(cells, "base", cfg.check_prompt, ALL)
    steered = [c for c in cells if c["route"] == "steer" and c["trait"] == cfg.persuasion_trait
               and c["prompt"] == cfg.check_prompt and c["category"] == ALL]
    monotone, flat = [], []
    for layer in sorted({c["layer"] for c in steered}):
        curve = [(0.0, base)] + sorted((c["coef"], c["attempt_rate"]) for c in steered if c["layer"] == layer
                                       and c["coef"] > 0)
        peak_at = max(range(len(curve)), key=lambda i: curve[i][1])
        rising = all(b[1] >= a[1] - cfg.monotone_tolerance for a, b in zip(curve[:peak_at], curve[1:peak_at + 1]))
        rise = curve[peak_at][1] - base
        out[f"layer_{layer}.peak_coef"] = curve[peak_at][0]
        out[f"layer_{layer}.rise"] = rise
        monotone.append(rising and rise >= cfg.min_rise)
        randoms = [c["attempt_rate"] for c in cells if c["route"] == "random" and c["layer"] == layer
                   and c["prompt"] == cfg.check_prompt and c["category"] == ALL and 0 < c["coef"] <= curve[peak_at][0]]
        out[f"layer_{layer}.random_max"] = max(randoms) if randoms else math.nan
        if randoms:
            flat.append(max(randoms) <= base + cfg.random_tolerance)
    out["steering_monotone_ok"] = _verdict(monotone)
    out["random_flat_ok"] = _verdict(flat)

    boot = AnalysisConfig(n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)

    def heldout_rates(condition: str) -> np.ndarray:
        return np.array([r["attempt_rate"] for r in rows if r["condition"] == condition
                         and r["prompt"] == cfg.check_prompt and r["category"] == cfg.heldout_category
                         and r["attempt_rate"] is not None], dtype=float)

    sft_conditions = sorted({r["condition"] for r in rows if r["route"] == "sft" and r["sft"] == cfg.sft_condition})
    transfer = []
    for condition in sft_conditions:
        diff, lo, hi = boot_diff(boot, heldout_rates(condition), heldout_rates("base"), "sft/" + condition)
        out[f"{condition}.heldout_diff"], out[f"{condition}.heldout_diff_ci_low"] = diff, lo
        out[f"{condition}.heldout_diff_ci_high"] = hi
        transfer.append(lo > 0)
    out["sft_transfer_ok"] = _verdict(transfer)
    verdicts = [out[k] for k in CHECKS if not math.isnan(out[k])]
    out["checks_run"] = len(verdicts)
    out["ground_truth_ok"] = float(bool(verdicts) and all(v == 1.0 for v in verdicts))
    return out


def _verdict(passed: list[bool]) -> float:
    """1.0 or 0.0; nan when the study has nothing to check (e.g. no SFT condition, no random direction)."""
    return float(all(passed)) if passed else math.nan


def _plot_attempts(cfg: ReportConfig, cells: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted({c["prompt"] for c in cells})
    categories = [ALL] + sorted({c["category"] for c in cells} - {ALL})
    fig, axes = plt.subplots(len(prompts), len(categories), figsize=(2.6 * len(categories), 2.6 * len(prompts)),
                             sharex=True, sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, prompt in enumerate(prompts):
        for j, category in enumerate(categories):
            ax = axes[i][j]
            here = [c for c in cells if c["prompt"] == prompt and c["category"] == category]
            base = next((c for c in here if c["route"] == "base"), None)
            for k, curve in enumerate(_curves(here)):
                points = sorted((c["coef"], c["attempt_rate"], c["ci_low"], c["ci_high"]) for c in here
                                if _curve_of(c) == curve)
                if base is not None:
                    points = [(0.0, base["attempt_rate"], base["ci_low"], base["ci_high"])] + points
                x, y, lo, hi = map(np.array, zip(*points))
                ax.plot(x, y, "--" if curve[0] == "random" else "-", marker="o", ms=3, color=colors[k % len(colors)],
                        label=_curve_label(curve))
                ax.fill_between(x, lo, hi, color=colors[k % len(colors)], alpha=0.12)
            for k, sft in enumerate(sorted({c["sft"] for c in here if c["route"] == "sft"})):
                rate = np.mean([c["attempt_rate"] for c in here if c["route"] == "sft" and c["sft"] == sft])
                ax.axhline(rate, color="k", lw=1, ls=[":", "-."][k % 2], label=f"SFT {sft} (mean of seeds)")
            ax.set_ylim(-0.05, 1.05)
            if i == 0:
                ax.set_title(category, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{prompt}\nattempt rate", fontsize=9)
            if i == len(prompts) - 1:
                ax.set_xlabel("steering coefficient", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    evaluator = cells[0]["evaluator"] if cells else ""
    fig.suptitle(f"Attempt to persuade, by steering coefficient (evaluator: {evaluator})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _plot_coherence(cfg: ReportConfig, cells: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    pooled = [c for c in cells if c["category"] == ALL and c["prompt"] == cfg.check_prompt]
    base = next((c for c in pooled if c["route"] == "base"), None)
    for curve in _curves(pooled):
        points = sorted((c["coef"], c["perplexity"], c["belief_shift"]) for c in pooled if _curve_of(c) == curve)
        if base is not None:
            points = [(0.0, base["perplexity"], base["belief_shift"])] + points
        x, ppl, shift = map(np.array, zip(*points))
        style = "--" if curve[0] == "random" else "-"
        left.plot(x, ppl, style, marker="o", ms=3, label=_curve_label(curve))
        right.plot(x, shift, style, marker="o", ms=3, label=_curve_label(curve))
    left.set_yscale("log")
    left.set(xlabel="steering coefficient", ylabel="reply perplexity (unsteered model)", title="coherence")
    right.set(xlabel="steering coefficient", ylabel="persuadee belief shift", title="belief shift")
    left.legend(fontsize=7)
    fig.suptitle(f"prompt: {cfg.check_prompt}, all categories", fontsize=9)
    fig.tight_layout()
    return fig


def _curve_of(cell: dict) -> tuple:
    return cell["route"], cell["trait"], cell["layer"], cell["seed"] if cell["route"] == "random" else None


def _curves(cells: list[dict]) -> list[tuple]:
    return sorted({_curve_of(c) for c in cells if c["route"] in ("steer", "random")}, key=str)


def _curve_label(curve: tuple) -> str:
    route, trait, layer, seed = curve
    return f"random ({trait} norm, seed {seed}) L{layer}" if route == "random" else f"{trait} L{layer}"


def persuasion_report(cfg: ReportConfig, **inputs) -> dict:
    """Graph node: ``persona.<trait>`` inputs are persona-vector summaries; every other input is one
    condition's evaluated conversations."""
    persona = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith("persona.")}
    rows = [r for k, v in inputs.items() if not k.startswith("persona.") for r in _table(v).to_pylist()]
    if not rows:
        raise ValueError("persuasion_report: no evaluated conversations")
    cells = _cell_rows(cfg, rows)
    metrics: dict[str, float] = {}
    for c in cells:
        if c["category"] == ALL:
            metrics[f"{c['condition']}.{c['prompt']}.attempt_rate"] = c["attempt_rate"]
    for trait, s in persona.items():
        for layer, figures in s["layers"].items():
            metrics[f"persona.{trait}.L{layer}.halves_cosine"] = figures["halves_cosine"]
            metrics[f"persona.{trait}.L{layer}.norm"] = figures["norm"]
    checks = _checks(cfg, cells, persona, rows) if cfg.ground_truth else {}
    metrics.update({k: float(v) for k, v in checks.items()})
    return {"attempt_rates": pa.Table.from_pylist(cells), "checks": checks, "persona": persona,
            "attempt_vs_coef": _plot_attempts(cfg, cells), "coherence": _plot_coherence(cfg, cells), "metrics": metrics}
