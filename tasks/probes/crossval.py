"""Grouped, nested cross-validation of linear probes, label-shuffled controls, and where along depth a
quantity becomes readable (the "Physics Emergence Zone" of Joseph et al., arXiv 2602.07050).

Why grouped: rows of one trajectory or scene share nuisance features (a background, an object's
identity) that a probe can memorise, so a random row split lets it look up labels it has seen.
Every split here keeps all rows of a group on one side. Why nested: the regularisation strength is
chosen on an inner grouped split of the training part only, so the outer score is never tuned on
its own test rows. Why a control: a probe on high-dimensional features can fit noise; the same
procedure on labels permuted between groups estimates that floor, and **selectivity = score -
control** is what survives it.

Every score is "higher is better" and is 0 for a probe that learned nothing beyond a constant:
logistic - accuracy (chance is the majority rate, reported beside it); ridge - R^2, averaged over
target columns for (n, m) targets such as (vx, vy); circular - a circular skill score (see
``circular_score``). Regularisation strengths are ``ProbeConfig.l2`` values with the same meaning, so
a chosen value can be handed to ``fit_probe`` unchanged (``CVConfig.probe_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator  # noqa: E402

from interpflow.tasks.probes.linear import ProbeConfig, ProbeKind, _logistic, _scaler, check_features  # noqa: E402
from interpflow.tasks.types import Seed  # noqa: E402

CV_METRICS = {"logistic": "accuracy", "ridge": "r2", "circular": "circular_score"}
# Defaults in ProbeConfig.l2 units. Ridge/circular add l2 to Z^T Z (a sum over rows, so useful values
# grow with n); logistic adds l2/2 ||W||^2 to the *mean* cross-entropy (so useful values are small).
DEFAULT_GRIDS = {"logistic": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
                 "ridge": [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4],
                 "circular": [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]}


# --------------------------------------------------------------------------------------------------
# Splits

_FOLD_STREAM, _PERMUTE_STREAM = 0x666F6C64, 0x7065726D


def _rng(seed: int, stream: int, what: str) -> np.random.Generator:
    """A generator for (seed, purpose). Salted so that it never replays ``default_rng(seed)``: synthetic
    data made with the same small seed as the split would otherwise share its random stream with it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def grouped_folds(groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, test) index pairs in which every group lies wholly on one side.

    Groups are shuffled (seeded) and each is given, in that order, to the fold with the fewest rows so
    far (ties to the fold with fewer groups, then at random), so fold sizes differ by at most about one
    group. Each group is in exactly one test fold. Indices are sorted int64 arrays.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be one id per row (shape (n,)), got shape {groups.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (number of folds), got {k!r}")
    if groups.dtype.kind == "f" and not np.isfinite(groups).all():
        raise ValueError("groups has NaN/inf ids; give every row a finite group id (e.g. its trajectory index)")
    try:
        _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    except TypeError:
        raise ValueError("groups mixes id types that cannot be compared; use one type (int or str)") from None
    if len(sizes) < k:
        raise ValueError(f"groups has {len(sizes)} distinct ids but k={k} folds need at least {k}; "
                         "use fewer folds or more groups")
    rng = _rng(seed, _FOLD_STREAM, "seed")
    fold_rows = np.zeros(k, dtype=np.int64)
    fold_groups = np.zeros(k, dtype=np.int64)
    assign = np.empty(len(sizes), dtype=np.int64)
    for g in rng.permutation(len(sizes)):
        cand = np.flatnonzero(fold_rows == fold_rows.min())
        cand = cand[fold_groups[cand] == fold_groups[cand].min()]
        f = int(rng.choice(cand))
        assign[g] = f
        fold_rows[f] += sizes[g]
        fold_groups[f] += 1
    row_fold = assign[inverse]
    return [(np.flatnonzero(row_fold != f), np.flatnonzero(row_fold == f)) for f in range(k)]


# --------------------------------------------------------------------------------------------------
# Configs and results


class CVConfig(BaseModel):
    """Nested grouped cross-validation of one probe kind."""

    model_config = ConfigDict(extra="forbid")
    kind: ProbeKind = Field("logistic", description="logistic: class labels -> accuracy; ridge: scalar or "
                                                    "(n, m) targets -> R^2 (mean over columns); circular: "
                                                    "angles in radians -> circular skill score")
    folds: int = Field(5, ge=2, description="outer folds; the reported mean/std are over these")
    inner_folds: int = Field(3, ge=2, description="grouped folds inside each outer training part, used "
                                                  "only to pick the grid value (skipped for a 1-value grid)")
    seed: Seed = Field(0, description="seed of the outer split; inner splits use seed + 1 + outer fold")
    grid: list[float] | None = Field(None, description="candidate ProbeConfig.l2 values (ridge/circular: "
                                                       "added to Z^T Z; logistic: l2/2 ||W||^2 on the mean "
                                                       "loss); None -> DEFAULT_GRIDS[kind]. Ties go to the "
                                                       "larger value")
    standardize: bool = Field(True, description="scale features by training-part statistics in every fit")
    max_iter: int = Field(200, ge=1, description="logistic: LBFGS iterations per fit")

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("grid is empty; give at least one l2 value, e.g. [0.1, 1, 10], or None for the default")
        if any(not np.isfinite(g) or g < 0 for g in v):
            raise ValueError(f"grid values must be finite and >= 0 (l2 strengths), got {v}")
        return sorted(set(float(g) for g in v))

    @model_validator(mode="after")
    def _fill_grid(self) -> "CVConfig":
        if self.grid is None:   # filled in so that the dumped config (and a node key) names the grid
            self.grid = list(DEFAULT_GRIDS[self.kind])
        return self

    def probe_config(self, l2: float, test_fraction: float = 0.2) -> ProbeConfig:
        """A ``ProbeConfig`` for a final ``fit_probe`` at a chosen strength (e.g. the median chosen)."""
        return ProbeConfig(kind=self.kind, l2=l2, test_fraction=test_fraction, seed=self.seed,
                           standardize=self.standardize, max_iter=self.max_iter)


@dataclass
class CVResult:
    """Outer-fold scores of one nested CV run. ``std`` is the sample std (ddof=1) over outer folds.

    ``extra`` holds per-fold side figures: logistic ``majority_rate`` (accuracy of always answering the
    training part's commonest class - the chance line); circular ``angular_error_deg`` and
    ``mean_cos``; multi-output ridge ``r2_0``, ``r2_1``, ...
    """

    kind: str
    metric: str
    mean: float
    std: float
    scores: list[float]
    chosen: list[float]
    n: int
    n_groups: int
    n_test: list[int]
    extra: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Numeric figures for a node's metrics: mean, std, n, and the fold mean of every extra."""
        out = {"mean": self.mean, "std": self.std, "n": float(self.n), "n_groups": float(self.n_groups),
               "folds": float(len(self.scores)), "l2_median": float(np.median(self.chosen))}
        out.update({k: float(np.mean(v)) for k, v in self.extra.items()})
        return out

    def to_table(self) -> pa.Table:
        """One row per outer fold: fold, metric, score, chosen l2, n_test, and the extras."""
        cols = {"fold": pa.array(range(len(self.scores)), pa.int64()),
                "metric": [self.metric] * len(self.scores),
                "score": pa.array(self.scores, pa.float64()),
                "l2": pa.array(self.chosen, pa.float64()),
                "n_test": pa.array(self.n_test, pa.int64())}
        cols.update({k: pa.array(v, pa.float64()) for k, v in self.extra.items()})
        return pa.table(cols)


# --------------------------------------------------------------------------------------------------
# Fitting and scoring


def circular_score(theta: np.ndarray, pred: np.ndarray) -> float:
    """Circular skill: ``1 - mean(1 - cos(pred - theta)) / (1 - rho)``; 1 = perfect, ~0 = chance.

    ``1 - cos`` is half the squared distance between the unit vectors of two angles, so this is R^2 on
    the circle. Its baseline ``1 - rho`` is the loss of always answering the mean direction, where rho
    is the mean resultant length of theta, bias-corrected as sqrt(max(0, (n R^2 - 1) / (n - 1))) (the
    unbiased estimate of rho^2, "pairwise phase consistency"). Why corrected: the raw R of n uniform
    angles is ~1/sqrt(n), which puts random guesses at about -R/(1-R) (-0.10 at n = 100); corrected,
    they average -0.04 at n = 100 (-0.025 at n = 200), a small negative bias like R^2's out of sample.
    Unlike mean cos(error), the score stays ~0 at chance when the angles are concentrated (e.g. most
    objects move rightwards). The shuffled control measures the exact floor.
    """
    theta, pred = np.asarray(theta, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    n = theta.size
    if n < 2:
        raise ValueError(f"the circular score needs at least 2 angles, got {n}; use fewer folds or more data")
    r2 = float(np.abs(np.exp(1j * theta).mean())) ** 2
    denom = 1.0 - np.sqrt(max(0.0, (n * r2 - 1) / (n - 1)))
    if denom <= 1e-12:
        raise ValueError("all angles in theta are equal, so the circular score is undefined; "
                         "the target barely varies - check y or use fewer folds")
    return 1.0 - float(np.mean(1 - np.cos(pred - theta))) / denom


def _check(kind: str, x, y, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y)
    groups = np.asarray(groups)
    if np.ndim(x) != 2:
        raise ValueError(f"x must be a (n_examples, d) matrix, got shape {np.shape(x)}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if kind == "ridge":
        if y.ndim not in (1, 2):
            raise ValueError(f"y for a ridge probe must be (n,) or (n, m), got shape {y.shape}")
    elif y.ndim != 1:
        what = "class label" if kind == "logistic" else "angle (radians)"
        raise ValueError(f"y for a {kind} probe must hold one {what} per row (shape (n,)), got shape {y.shape}"
                         + ("; probe each column separately or use kind='ridge'" if y.ndim == 2 else ""))
    x = check_features(x, len(y))
    if groups.shape != (len(x),):
        raise ValueError(f"groups must be one id per row of x (shape ({len(x)},)), got shape {groups.shape}")
    if kind == "logistic":
        if len(np.unique(y)) < 2:
            raise ValueError("y has a single class; a logistic probe needs at least two")
        return x, y, groups
    try:
        y = y.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"a {kind} probe needs numeric y (got dtype {y.dtype}); "
                         "use kind='logistic' for class labels") from None
    bad = np.flatnonzero(~np.isfinite(y.reshape(len(y), -1)).all(axis=1))
    if bad.size:
        raise ValueError(f"y has a NaN/inf value in row {bad[0]}; drop or fix those examples")
    return x, y, groups


def _targets(kind: str, y: np.ndarray) -> np.ndarray:
    """What the linear map is fitted to: ridge -> y as (n, m); circular -> (sin, cos) as in linear.py."""
    if kind == "circular":
        return np.stack([np.sin(y), np.cos(y)], 1)
    return y.reshape(len(y), -1)


def _ridge_path(z: np.ndarray, t: np.ndarray, l2s: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W (d, m), intercept (m,))`` of ``linear._ridge`` for every l2 from one eigendecomposition of the
    centred Gram matrix: Z^T Z (d x d) when n >= d, else the dual Z Z^T (n x n), whichever is smaller.
    l2 = 0 gives the minimum-norm least-squares fit, as lstsq does."""
    zm, tm = z.mean(0), t.mean(0)
    zc, tc = z - zm, t - tm
    dual = zc.shape[0] < zc.shape[1]
    lam, vec = np.linalg.eigh(zc @ zc.T if dual else zc.T @ zc)
    keep = lam > max(lam.max(initial=0.0), 0.0) * max(zc.shape) * np.finfo(float).eps
    proj = vec.T @ (tc if dual else zc.T @ tc)
    out = []
    for l2 in l2s:
        f = np.where(keep, 1.0 / np.where(keep, lam + l2, 1.0), 0.0)
        w = vec @ (f[:, None] * proj)
        if dual:
            w = zc.T @ w
        out.append((w, tm - zm @ w))
    return out


class _Fitter:
    """Fits one kind on rows ``train`` for every l2 and returns predictions on rows ``test``."""

    def __init__(self, cfg: CVConfig, x: np.ndarray, y: np.ndarray):
        self.cfg, self.x, self.y = cfg, x, y
        if cfg.kind == "logistic":
            self.classes, self.yi = np.unique(y, return_inverse=True)
        else:
            self.t = _targets(cfg.kind, y)

    def predict(self, train: np.ndarray, test: np.ndarray, l2s: Sequence[float]) -> list[np.ndarray]:
        """Per l2: predicted class indices (logistic), (n_test, m) values (ridge) or angles (circular)."""
        pcfg = self.cfg.probe_config(0.0)
        mu, sd = _scaler(pcfg, self.x[train])
        z_tr, z_te = (self.x[train] - mu) / sd, (self.x[test] - mu) / sd
        if self.cfg.kind == "logistic":
            preds = []
            for l2 in l2s:
                w, b = _logistic(z_tr, self.yi[train], len(self.classes), pcfg.model_copy(update={"l2": l2}))
                out = z_te @ w.T + b
                preds.append((out[:, 0] > 0).astype(int) if out.shape[1] == 1 else out.argmax(1))
            return preds
        preds = [z_te @ w + b for w, b in _ridge_path(z_tr, self.t[train], l2s)]
        if self.cfg.kind == "circular":
            preds = [np.arctan2(p[:, 0], p[:, 1]) for p in preds]
        return preds

    def loss(self, train: np.ndarray, test: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Per-row losses for inner selection (lower is better), pooled over inner folds."""
        if self.cfg.kind == "logistic":
            return (pred != self.yi[test]).astype(float)
        if self.cfg.kind == "circular":
            return 1 - np.cos(pred - self.y[test])
        var = self.t[train].var(0)
        return (((self.t[test] - pred) ** 2) / np.where(var > 0, var, 1.0)).mean(1)   # scale-free per column

    def score(self, train: np.ndarray, test: np.ndarray, pred: np.ndarray, fold: int) -> tuple[float, dict]:
        """The reported outer-fold score (higher is better) and its side figures."""
        if self.cfg.kind == "logistic":
            counts = np.bincount(self.yi[train], minlength=len(self.classes))
            return (float((pred == self.yi[test]).mean()),
                    {"majority_rate": float((self.yi[test] == counts.argmax()).mean())})
        if self.cfg.kind == "circular":
            theta = self.y[test]
            err = np.angle(np.exp(1j * (pred - theta)))
            return (circular_score(theta, pred),
                    {"angular_error_deg": float(np.degrees(np.abs(err)).mean()),
                     "mean_cos": float(np.cos(err).mean())})
        t = self.t[test]
        sst = ((t - t.mean(0)) ** 2).sum(0)
        if (sst <= 0).any():
            raise ValueError(f"target column {int(np.argmax(sst <= 0))} is constant on outer test fold {fold}, "
                             "so R^2 is undefined there; use fewer folds, more groups, or drop that column")
        r2 = 1 - ((t - pred) ** 2).sum(0) / sst
        extra = {f"r2_{j}": float(v) for j, v in enumerate(r2)} if len(r2) > 1 else {}
        return float(r2.mean()), extra


def _select(fitter: _Fitter, cfg: CVConfig, train: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """The grid value with the lowest pooled inner-fold loss on ``train`` (ties: the larger value)."""
    grid = cfg.grid
    if len(grid) == 1:
        return grid[0]
    n_inner = len(np.unique(groups[train]))
    if n_inner < cfg.inner_folds:
        raise ValueError(f"an outer training part holds {n_inner} groups, fewer than inner_folds="
                         f"{cfg.inner_folds}; lower inner_folds or folds, add groups, or pass a 1-value grid")
    total = np.zeros(len(grid))
    for itr, ite in grouped_folds(groups[train], cfg.inner_folds, seed):
        itr, ite = train[itr], train[ite]
        for i, pred in enumerate(fitter.predict(itr, ite, grid)):
            total[i] += fitter.loss(itr, ite, pred).sum()
    best = total.min()
    ok = np.flatnonzero(total <= best + 1e-9 * max(1.0, abs(best)))
    return grid[int(ok.max())]


def cv_probe(cfg: CVConfig, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> CVResult:
    """Nested grouped K-fold CV of one probe: l2 picked on inner folds, scored on outer test folds."""
    x, y, groups = _check(cfg.kind, x, y, groups)
    folds = grouped_folds(groups, cfg.folds, cfg.seed)
    fitter = _Fitter(cfg, x, y)
    scores, chosen, n_test, extra = [], [], [], {}
    for f, (train, test) in enumerate(folds):
        l2 = _select(fitter, cfg, train, groups, cfg.seed + 1 + f)
        pred = fitter.predict(train, test, [l2])[0]
        s, side = fitter.score(train, test, pred, f)
        scores.append(s)
        chosen.append(l2)
        n_test.append(len(test))
        for k, v in side.items():
            extra.setdefault(k, []).append(v)
    arr = np.asarray(scores)
    return CVResult(kind=cfg.kind, metric=CV_METRICS[cfg.kind], mean=float(arr.mean()),
                    std=float(arr.std(ddof=1)), scores=scores, chosen=chosen, n=len(x),
                    n_groups=len(np.unique(groups)), n_test=n_test, extra=extra)


def permute_by_group(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Labels that carry no information about the rows' features but keep the groups' label structure.

    Whole label blocks move between groups (group g's rows get the labels of group pi(g), pi a seeded
    permutation), then the rows of each group are shuffled among themselves. Labels constant within
    a group stay so. Groups trade only with groups of the same row count, so the labels' multiset is
    kept exactly; the in-group shuffle is what breaks labels that vary inside a group (why both: a
    clip with an impossible twin is a 2-row group [possible, impossible] beside 1-row groups that are
    all possible; resampled across sizes the control holds fewer impossible labels and its accuracy
    rises with the majority rate, and traded between pairs only it equals the real labels). Groups
    whose row count no other group shares trade among themselves, resampled to their length by
    position (row j of n_g takes source row floor(j * n_src / n_g)); a lone such group keeps its
    labels. Identity permutations are redrawn, so with >= 2 groups at least two groups trade labels.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    if groups.shape != (len(y),):
        raise ValueError(f"groups must be one id per row of y (shape ({len(y)},)), got shape {groups.shape}")
    ids, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
    sizes = np.array([len(m) for m in members])
    shared = np.isin(sizes, np.flatnonzero(np.bincount(sizes) >= 2))
    classes = [np.flatnonzero(sizes == n) for n in np.unique(sizes[shared])] + [np.flatnonzero(~shared)]
    rng = _rng(seed, _PERMUTE_STREAM, "seed")
    out = y.copy()
    for pool in classes:
        if len(pool) < 2:
            continue
        perm = rng.permutation(len(pool))
        while (perm == np.arange(len(pool))).all():
            perm = rng.permutation(len(pool))
        for g, src_g in zip(pool, pool[perm]):
            rows, src = members[g], members[src_g]
            out[rows] = y[src[(np.arange(len(rows)) * len(src)) // len(rows)]]
    for rows in members:
        if len(rows) > 1:
            out[rows] = out[rows[rng.permutation(len(rows))]]
    return out


def shuffled_control(cfg: CVConfig, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                     permutation_seed: int | None = None) -> CVResult:
    """``cv_probe`` on labels permuted between groups (``permute_by_group``): the score a probe reaches
    with the same features, folds and grid when the labels carry no information about x.

    The permutation seed defaults to ``cfg.seed + 10_000`` so the control differs from the split seed;
    the folds are the same as the real run's (same groups, same ``cfg.seed``).
    """
    x, y, groups = _check(cfg.kind, x, y, groups)
    seed = cfg.seed + 10_000 if permutation_seed is None else permutation_seed
    return cv_probe(cfg, x, permute_by_group(y, groups, seed), groups)


# --------------------------------------------------------------------------------------------------
# Graph node: one layer, one variable


class LayerProbeConfig(BaseModel):
    """Probe one variable at one layer: nested grouped CV plus shuffled-label controls."""

    model_config = ConfigDict(extra="forbid")
    cv: CVConfig = Field(default_factory=CVConfig, description="the cross-validation of the probe")
    control_repeats: int = Field(1, ge=0, description="label permutations for the control (0: no control); "
                                                      "control_mean averages them")


def probe_layer(cfg: LayerProbeConfig, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict:
    """``{"metrics": {...}, "folds": table}`` for one (layer, variable).

    Metrics: ``mean``/``std`` of the outer-fold score, ``control_mean``/``control_std`` (over all control
    folds), ``selectivity = mean - control_mean``, sizes, the median chosen l2 and the fold means of the
    side figures (e.g. ``majority_rate``, ``angular_error_deg``). The folds table has one row per outer
    fold of the real run (``run="real"``) and of each control (``run="control"``, ``repeat``).
    """
    real = cv_probe(cfg.cv, x, y, groups)
    metrics = real.summary()
    tables = [_tag(real.to_table(), "real", 0)]
    if cfg.control_repeats:
        controls = [shuffled_control(cfg.cv, x, y, groups, permutation_seed=cfg.cv.seed + 10_000 + r)
                    for r in range(cfg.control_repeats)]
        pooled = np.concatenate([c.scores for c in controls])
        metrics["control_mean"] = float(np.mean([c.mean for c in controls]))
        metrics["control_std"] = float(pooled.std(ddof=1))
        metrics["selectivity"] = metrics["mean"] - metrics["control_mean"]
        tables += [_tag(c.to_table(), "control", r) for r, c in enumerate(controls)]
    return {"metrics": metrics, "folds": pa.concat_tables(tables)}


def _tag(table: pa.Table, run: str, repeat: int) -> pa.Table:
    return (table.append_column("run", pa.array([run] * table.num_rows, pa.string()))
            .append_column("repeat", pa.array([repeat] * table.num_rows, pa.int64())))


# --------------------------------------------------------------------------------------------------
# Across depth: emergence layer, table, figure


class EmergenceConfig(BaseModel):
    """Where a score curve over depth rises.

    Baseline b = the score at the first layer, peak p = the maximum. The **emergence layer** is the first
    layer from which the score stays >= b + threshold_frac * (p - b) all the way to the peak layer
    ("sustained", robust to one early noisy spike) or simply the first layer to reach it. No emergence is
    declared when p - b <= min_rise or, if stds are given, p - b <= min_rise_std * max(std_b, std_p).
    """

    model_config = ConfigDict(extra="forbid")
    threshold_frac: float = Field(0.5, gt=0, le=1, description="share of the rise (peak - first layer) a "
                                                               "layer must reach to count as emerged")
    sustained: bool = Field(True, description="require the score to stay above threshold up to the peak "
                                              "(False: the first crossing)")
    min_rise: float = Field(0.0, ge=0, description="peak - baseline must exceed this to declare emergence")
    min_rise_std: float = Field(1.0, ge=0, description="with stds given, peak - baseline must also exceed "
                                                       "this many stds (larger of the two layers')")


def emergence(depth_scores: Sequence[float], cfg: EmergenceConfig | None = None,
              std: Sequence[float] | None = None) -> dict:
    """Peak, emergence layer and largest single-layer jump of a score curve in depth order.

    Returns ``peak_layer``, ``peak_score``, ``baseline``, ``threshold``, ``emerged`` (bool),
    ``emergence_layer`` (int, or None when not emerged), ``jump_layer`` (the layer l whose rise over
    l - 1 is largest; None for one layer) and ``jump`` (that rise). Layers are positions in the list.
    """
    cfg = cfg or EmergenceConfig()
    s = np.asarray(depth_scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"depth_scores must be a non-empty list of per-layer scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"depth_scores has a NaN/inf at layer {int(np.flatnonzero(~np.isfinite(s))[0])}; "
                         "rerun or drop that layer")
    sd = None
    if std is not None:
        sd = np.asarray(std, dtype=np.float64)
        if sd.shape != s.shape:
            raise ValueError(f"std must have one entry per layer ({s.size}), got shape {sd.shape}")
    peak = int(s.argmax())
    base = float(s[0])
    rise = float(s[peak]) - base
    threshold = base + cfg.threshold_frac * rise
    emerged = rise > cfg.min_rise and (sd is None or rise > cfg.min_rise_std * max(sd[0], sd[peak]))
    layer = None
    if emerged:
        above = s[:peak + 1] >= threshold
        if cfg.sustained:
            below = np.flatnonzero(~above)
            layer = int(below[-1] + 1) if below.size else 0
        else:
            layer = int(np.flatnonzero(above)[0])
    jumps = np.diff(s)
    return {"peak_layer": peak, "peak_score": float(s[peak]), "baseline": base, "threshold": float(threshold),
            "emerged": bool(emerged), "emergence_layer": layer,
            "jump_layer": int(jumps.argmax() + 1) if jumps.size else None,
            "jump": float(jumps.max()) if jumps.size else 0.0}


def depth_table(metrics: Mapping[str, Sequence[Mapping[str, float]]],
                sites: Sequence[str] | None = None) -> pa.Table:
    """Long table (variable, layer, site, mean, std[, control_mean, control_std, selectivity]) from
    ``{variable: [probe_layer(...)["metrics"] per layer, in depth order]}``."""
    if not metrics:
        raise ValueError("depth_table got no variables; pass {variable: [metrics per layer]}")
    rows = []
    for var, per_layer in metrics.items():
        if sites is not None and len(sites) != len(per_layer):
            raise ValueError(f"sites has {len(sites)} names but variable {var!r} has {len(per_layer)} layers; "
                             "pass one site name per layer")
        for i, m in enumerate(per_layer):
            rows.append({"variable": str(var), "layer": i, "site": sites[i] if sites is not None else str(i),
                         **{k: float(m[k]) if k in m else float("nan")
                            for k in ("mean", "std", "control_mean", "control_std", "selectivity")}})
    return pa.Table.from_pylist(rows)


def depth_figure(table: pa.Table, cfg: EmergenceConfig | None = None) -> "plt.Figure":
    """Score vs depth per variable with a +-std band; controls dashed; the emergence layer starred.

    ``table`` needs columns variable, layer, mean, std (``depth_table``'s shape); control_mean and
    site are used when present.
    """
    need = {"variable", "layer", "mean", "std"} - set(table.column_names)
    if need:
        raise ValueError(f"table lacks columns {sorted(need)}; build it with depth_table()")
    d = table.to_pydict()
    n_layers = max(d["layer"]) + 1
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n_layers + 2.5), 3.6))
    for i, var in enumerate(dict.fromkeys(d["variable"])):
        rows = sorted((j for j, v in enumerate(d["variable"]) if v == var), key=lambda j: d["layer"][j])
        layers = np.array([d["layer"][j] for j in rows])
        mean = np.array([d["mean"][j] for j in rows], dtype=float)
        std = np.nan_to_num(np.array([d["std"][j] for j in rows], dtype=float))
        color = f"C{i % 10}"
        ax.plot(layers, mean, marker="o", ms=3, color=color, label=var)
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        if "control_mean" in d:
            ctrl = np.array([d["control_mean"][j] for j in rows], dtype=float)
            if np.isfinite(ctrl).any():
                ax.plot(layers, ctrl, ls="--", color=color, alpha=0.8, label=f"{var} (control)")
        em = emergence(mean, cfg, std)
        if em["emerged"]:
            e = em["emergence_layer"]
            ax.axvline(layers[e], color=color, ls=":", lw=1)
            ax.plot([layers[e]], [mean[e]], marker="*", ms=12, color=color, zorder=5)
    if "site" in d:
        labels = {d["layer"][j]: d["site"][j] for j in range(len(d["layer"]))}
        ax.set_xticks(sorted(labels))
        ax.set_xticklabels([labels[k] for k in sorted(labels)], rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("layer (by depth); * = emergence layer")
    ax.set_ylabel("CV score (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
