"""What a belief-change study found: per-arm change with bootstrap CIs and effect sizes, arm contrasts,
an OLS of change on persona and arm, and two figures.

Rows are sorted by participant id before anything random happens, so the numbers do not depend on how
the results were sharded. A participant without a parsed pre or post belief is left out of the change
statistics (counted in ``n_missing``); ``belief_final`` is only read for arms that have one.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from .config import ATTRIBUTES, StudyConfig

from interpflow.tasks.types import Seed

REQUIRED = ("participant", "arm", "belief_pre", "belief_post")
OPTIONAL = ("claim", "belief_final", "ai_rating", "trust", "unparseable")


class AnalysisConfig(BaseModel):
    """How the results are summarised."""

    model_config = ConfigDict(extra="forbid")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples per interval")
    ci: float = Field(0.95, gt=0, lt=1, description="confidence level of every interval")
    seed: Seed = Field(0, description="seeds the bootstrap")
    contrasts: list[tuple[str, str]] = Field(
        [("bunk", "debunk"), ("debunk", "control"), ("bunk", "control")],
        description="pairs (a, b): mean change of arm a minus that of arm b")
    covariates: list[str] = Field(list(ATTRIBUTES), description="categorical columns one-hot encoded in "
                                                                "the regression of change")
    reference_levels: dict[str, str] = Field(
        {"arm": "control", "trust_in_ai": "mid", "political_leaning": "centre", "prior_belief_band": "mid"},
        description="column -> level left out of its one-hot block (the baseline of its coefficients); "
                    "a column not listed, or whose level is absent, uses its alphabetically first level")
    bins: int = Field(30, ge=2, description="bins of the change histogram")

    def check_against(self, study: StudyConfig) -> None:
        """Fail before compute when a contrast names an arm the study does not have."""
        _check_contrasts(self.contrasts, [a.name for a in study.arms])


def _check_contrasts(contrasts: list[tuple[str, str]], arms: list[str]) -> None:
    for a, b in contrasts:
        for name in (a, b):
            if name not in arms:
                raise ValueError(f"analysis.contrasts: ({a!r}, {b!r}) names arm {name!r}, which the study "
                                 f"does not have (arms: {', '.join(arms)}); fix the contrast or the arm name")


# ------------------------------------------------------------------------------------ statistics

def _rng(cfg: AnalysisConfig, label: str) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, zlib.crc32(label.encode())])


def _boot_indices(rng: np.random.Generator, n: int, n_boot: int):
    """Resample index blocks of bounded size (memory ~ 2M indices at a time, whatever n is)."""
    per_block = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_boot, per_block):
        yield rng.integers(0, n, size=(min(per_block, n_boot - start), n))


def _percentile(samples: np.ndarray, ci: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def boot_mean(cfg: AnalysisConfig, x: np.ndarray, label: str) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high): percentile bootstrap of the mean of x."""
    if x.size == 0:
        return math.nan, math.nan, math.nan
    means = np.concatenate([x[idx].mean(axis=1) for idx in _boot_indices(_rng(cfg, label), x.size, cfg.n_boot)])
    return (float(x.mean()), *_percentile(means, cfg.ci))


def boot_ratio(cfg: AnalysisConfig, num: np.ndarray, den: np.ndarray, label: str) -> tuple[float, float, float]:
    """(mean(num) / mean(den), CI) resampling participants (paired rows of num and den)."""
    if num.size == 0 or den.mean() == 0:
        return math.nan, math.nan, math.nan
    ratios = []
    for idx in _boot_indices(_rng(cfg, label), num.size, cfg.n_boot):
        d = den[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(d != 0, num[idx].mean(axis=1) / d, np.nan))
    return (float(num.mean() / den.mean()), *_percentile(np.concatenate(ratios), cfg.ci))


def boot_diff(cfg: AnalysisConfig, a: np.ndarray, b: np.ndarray, label: str) -> tuple[float, float, float]:
    """(mean(a) - mean(b), CI): independent resampling within each group."""
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    rng = _rng(cfg, label)
    ma = np.concatenate([a[i].mean(axis=1) for i in _boot_indices(rng, a.size, cfg.n_boot)])
    mb = np.concatenate([b[i].mean(axis=1) for i in _boot_indices(rng, b.size, cfg.n_boot)])
    return (float(a.mean() - b.mean()), *_percentile(ma - mb, cfg.ci))


def cohen_d_paired(change: np.ndarray) -> float:
    """Mean change over the sd of change (d_z of a paired design)."""
    if change.size < 2:
        return math.nan
    sd = change.std(ddof=1)
    return float(change.mean() / sd) if sd > 0 else math.nan


def hedges_g(a: np.ndarray, b: np.ndarray) -> float:
    """Standardised difference of two independent groups' means, small-sample corrected."""
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return float((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def ols(y: np.ndarray, design: dict[str, np.ndarray], ci: float) -> list[dict]:
    """OLS of y on an intercept and the given columns: coef, se, CI (t quantile), per term.

    Columns that are constant zero are dropped; a rank-deficient design reports NaN standard errors.
    """
    from scipy.stats import t as student_t

    names = ["intercept"] + [k for k, v in design.items() if np.any(v)]
    X = np.column_stack([np.ones_like(y)] + [design[k] for k in names[1:]])
    n, p = X.shape
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    dof = n - p
    if rank < p or dof < 1:
        se = np.full(p, math.nan)
    else:
        sigma2 = float(((y - X @ coef) ** 2).sum() / dof)
        se = np.sqrt(np.diag(sigma2 * np.linalg.inv(X.T @ X)))
    q = float(student_t.ppf((1 + ci) / 2, dof)) if dof >= 1 else math.nan
    return [{"term": k, "coef": float(c), "se": float(s), "ci_low": float(c - q * s), "ci_high": float(c + q * s)}
            for k, c, s in zip(names, coef, se)]


def one_hot(column: list[str], name: str, reference: str | None) -> dict[str, np.ndarray]:
    """Indicator columns ``name=level`` for every level but the reference."""
    levels = sorted(set(column))
    ref = reference if reference in levels else levels[0]
    values = np.asarray(column, dtype=object)
    return {f"{name}={lv}": (values == lv).astype(float) for lv in levels if lv != ref}


# ---------------------------------------------------------------------------------------- analysis

def _load(results: pa.Table | pads.Dataset, covariates: list[str]) -> pa.Table:
    names = results.schema.names
    needed = list(dict.fromkeys([*REQUIRED, *covariates]))
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"results lack column(s) {missing} (have: {names}); the study driver must write "
                         f"them, or drop them from analysis.covariates")
    columns = needed + [c for c in OPTIONAL if c in names and c not in needed]
    table = results.to_table(columns=columns) if isinstance(results, pads.Dataset) else results.select(columns)
    if table.num_rows == 0:
        raise ValueError("results: no rows; the study produced no participants")
    return table.sort_by("participant")


def _col(table: pa.Table, name: str) -> np.ndarray:
    """A float column with nulls as NaN (NaN everywhere when the column is absent)."""
    if name not in table.schema.names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).to_numpy(zero_copy_only=False).astype(float)


def _arm_row(cfg: AnalysisConfig, arm: str, pre, post, final, ai, trust, unparseable) -> dict:
    ok = np.isfinite(pre) & np.isfinite(post)
    change = post[ok] - pre[ok]
    mean_change, lo, hi = boot_mean(cfg, change, f"{arm}/change")
    row = {"arm": arm, "n": int(ok.sum()), "n_missing": int((~ok).sum()),
           "mean_pre": float(pre[ok].mean()) if ok.any() else math.nan,
           "mean_post": float(post[ok].mean()) if ok.any() else math.nan,
           "mean_change": mean_change, "sd_change": float(change.std(ddof=1)) if change.size > 1 else math.nan,
           "ci_low": lo, "ci_high": hi, "cohen_d": cohen_d_paired(change)}
    fin = ok & np.isfinite(final)
    corrective = bool(fin.any())
    f_change = final[fin] - post[fin]
    net = final[fin] - pre[fin]
    f_mean, f_lo, f_hi = boot_mean(cfg, f_change, f"{arm}/final") if corrective else (math.nan,) * 3
    n_mean, n_lo, n_hi = boot_mean(cfg, net, f"{arm}/net") if corrective else (math.nan,) * 3
    r, r_lo, r_hi = (boot_ratio(cfg, -f_change, post[fin] - pre[fin], f"{arm}/reversal")
                     if corrective else (math.nan,) * 3)
    row.update({
        "corrective": corrective, "n_final": int(fin.sum()),
        "mean_final": float(final[fin].mean()) if corrective else math.nan,
        "final_change": f_mean, "final_ci_low": f_lo, "final_ci_high": f_hi,
        "final_cohen_d": cohen_d_paired(f_change) if corrective else math.nan,
        "net_change": n_mean, "net_ci_low": n_lo, "net_ci_high": n_hi,
        "reversal": r, "reversal_ci_low": r_lo, "reversal_ci_high": r_hi,
        "mean_ai_rating": float(np.nanmean(ai)) if np.isfinite(ai).any() else math.nan,
        "mean_trust": float(np.nanmean(trust)) if np.isfinite(trust).any() else math.nan,
        "unparseable": int(np.nansum(unparseable)),
    })
    return row


def analyse(cfg: AnalysisConfig, results: pa.Table | pads.Dataset) -> dict:
    """Per-arm change, contrasts, regression, figures and flat metrics of a study's results table.

    ``arms`` (one row per arm): n, means of pre and post, mean change with bootstrap CI, sd and Cohen's
    d_z of change; for arms with a corrective, the same for final - post (``final_*``) and final - pre
    (``net_*``), and ``reversal`` = -mean(final - post) / mean(post - pre) with a paired bootstrap CI.
    ``contrasts``: difference in mean change of each configured pair, bootstrap CI, Hedges' g.
    ``regression``: OLS of change on one-hot covariates (+ arm in the pooled model), pooled and per arm.
    """
    table = _load(results, cfg.covariates)
    arm_col = table.column("arm").to_pylist()
    arms = sorted(set(arm_col))
    _check_contrasts(cfg.contrasts, arms)
    pre, post, final = _col(table, "belief_pre"), _col(table, "belief_post"), _col(table, "belief_final")
    ai, trust, unparseable = _col(table, "ai_rating"), _col(table, "trust"), _col(table, "unparseable")
    masks = {a: np.asarray([x == a for x in arm_col]) for a in arms}
    ok = np.isfinite(pre) & np.isfinite(post)

    arm_rows = [_arm_row(cfg, a, pre[m], post[m], final[m], ai[m], trust[m], unparseable[m])
                for a, m in masks.items()]
    contrast_rows = []
    for a, b in cfg.contrasts:
        ca = (post - pre)[masks[a] & ok]
        cb = (post - pre)[masks[b] & ok]
        diff, lo, hi = boot_diff(cfg, ca, cb, f"{a}-{b}")
        contrast_rows.append({"a": a, "b": b, "n_a": int(ca.size), "n_b": int(cb.size), "diff": diff,
                              "ci_low": lo, "ci_high": hi, "hedges_g": hedges_g(ca, cb)})

    regression = _regression(cfg, table, masks, post - pre, ok)
    metrics: dict[str, float] = {"n": float(table.num_rows), "n_missing": float((~ok).sum()),
                                 "unparseable": float(np.nansum(unparseable))}
    for row in arm_rows:
        keys = ["n", "mean_change", "ci_low", "ci_high", "cohen_d"]
        if row["corrective"]:
            keys += ["final_change", "final_ci_low", "final_ci_high", "net_change", "net_ci_low",
                     "net_ci_high", "reversal", "reversal_ci_low", "reversal_ci_high"]
        keys += ["mean_ai_rating", "mean_trust", "unparseable"]
        metrics.update({f"{row['arm']}.{k}": float(row[k]) for k in keys})
    for row in contrast_rows:
        for k in ("diff", "ci_low", "ci_high", "hedges_g"):
            metrics[f"contrast.{row['a']}-{row['b']}.{k}"] = float(row[k])

    arms_table = pa.Table.from_pylist(arm_rows)
    return {"arms": arms_table,
            "contrasts": pa.Table.from_pylist(contrast_rows, schema=_CONTRAST_SCHEMA),
            "regression": pa.Table.from_pylist(regression, schema=_REGRESSION_SCHEMA),
            "pre_post": _pre_post_figure(cfg, arms, masks, pre, post, final, ok),
            "change_hist": _change_hist(cfg, arms, masks, post - pre, ok),
            "metrics": metrics}


_CONTRAST_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("n_a", pa.int64()), ("n_b", pa.int64()),
                              ("diff", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
                              ("hedges_g", pa.float64())])
_REGRESSION_SCHEMA = pa.schema([("model", pa.string()), ("term", pa.string()), ("n", pa.int64()),
                                ("coef", pa.float64()), ("se", pa.float64()), ("ci_low", pa.float64()),
                                ("ci_high", pa.float64())])


def _regression(cfg: AnalysisConfig, table: pa.Table, masks: dict, change: np.ndarray,
                ok: np.ndarray) -> list[dict]:
    """The pooled model (change ~ arm + covariates) and one per arm (change ~ covariates)."""
    covariates = {c: table.column(c).to_pylist() for c in cfg.covariates}
    covariates["arm"] = table.column("arm").to_pylist()
    rows = []
    subsets = [("pooled", ok, ["arm", *cfg.covariates])] + [(a, m & ok, cfg.covariates) for a, m in masks.items()]
    for model, mask, terms in subsets:
        if mask.sum() < 2:
            continue
        design: dict[str, np.ndarray] = {}
        for c in terms:
            design.update(one_hot([v for v, k in zip(covariates[c], mask) if k], c, cfg.reference_levels.get(c)))
        for r in ols(change[mask], design, cfg.ci):
            rows.append({"model": model, "n": int(mask.sum()), **r})
    return rows


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure   # not pyplot: no global figure registry to leak into

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _pre_post_figure(cfg, arms, masks, pre, post, final, ok):
    fig, ax = _figure(6, 4)
    for i, arm in enumerate(arms):
        m = masks[arm] & ok
        stages = [("pre", pre[m]), ("post", post[m])]
        fin = m & np.isfinite(final)
        if fin.any():
            stages.append(("final", final[fin]))
        stats = [boot_mean(cfg, x, f"{arm}/{stage}/figure") for stage, x in stages]
        xs = np.arange(len(stages)) + (i - (len(arms) - 1) / 2) * 0.04
        means = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
        ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xticks([0, 1, 2], ["pre", "post", "final"])
    ax.set_ylabel(f"mean belief ({cfg.ci:.0%} bootstrap CI)")
    ax.set_title("belief before and after the conversation(s), by arm")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _change_hist(cfg, arms, masks, change, ok):
    fig, ax = _figure(6, 4)
    finite = change[ok]
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=cfg.bins)
    for arm in arms:
        x = change[masks[arm] & ok]
        counts, _ = np.histogram(x, bins=edges)
        line = ax.stairs(counts, edges, label=f"{arm} (mean {x.mean():+.1f})" if x.size else arm)
        if x.size:
            ax.axvline(x.mean(), color=line.get_edgecolor(), linestyle="--", linewidth=1)
    ax.set_xlabel("belief change (post - pre)")
    ax.set_ylabel("participants")
    ax.set_title("distribution of belief change by arm")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
