"""Geometry of a circular variable's code: is it a ring, and how many dimensions carry it?

Method after "Interpreting Physics in Video World Models" (arXiv 2602.07050), which reads motion
direction as a high-dimensional population code with circular geometry. Two complementary views:

* **ring_geometry**: bin the angle, average the activations per bin, and take the top two principal
  components of the bin means. If the code is a ring, the bins come back as a loop in the same cyclic
  order (up to PCA's arbitrary rotation and reflection), scored by the Fisher & Lee circular
  correlation, a permutation p-value and the count of cyclic-order violations.
* **orthogonal_probe_dimensionality**: iterative nullspace projection (INLP, Ravfogel et al. 2020):
  fit a probe, project its direction(s) out of the activations, refit, until the held-out score is at
  chance. The rank of the removed subspace is how many linear dimensions carried readable information,
  which is larger than 2 when the code is redundant. By default the probes only see the principal
  components above the noise bulk: plain INLP over-counts clean codes, because each imperfectly
  estimated direction leaves part of the signal behind in quiet noise directions.

``planted_ring`` makes activations with a known answer for both, and ``geometry_report`` is the
graph-node wrapper (tables, the ring figure, metrics).
"""

from __future__ import annotations

from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402
from scipy.linalg import subspace_angles  # noqa: E402

from interpflow.tasks.probes.linear import METRICS, ProbeConfig, check_features, fit_probe  # noqa: E402

TWO_PI = 2 * np.pi
# Standard deviation of |wrap(a - b)| in degrees when a - b is uniform on the circle (uniform on [0, 180]).
_UNIFORM_ABS_ERROR_SD_DEG = 180 / np.sqrt(12)


def circular_correlation(theta: np.ndarray, phi: np.ndarray) -> np.ndarray | float:
    """Fisher & Lee (1983) circular-circular correlation of paired angles (radians) along the last axis.

    rho = sum_{i<j} sin(theta_i - theta_j) sin(phi_i - phi_j) / sqrt(sum sin^2(theta_i - theta_j) *
    sum sin^2(phi_i - phi_j)), computed in O(n) by its closed form. It needs no circular means, so it is
    well defined for equally spaced angles (where the Jammalamadaka-SenGupta coefficient, which centres on
    the circular means, is not); it is +1 for phi = theta + c, -1 for phi = c - theta, and NaN when either
    set of angles is degenerate (all equal modulo pi).
    """
    theta, phi = np.asarray(theta, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    n = theta.shape[-1]
    ct, st, cp, sp = np.cos(theta), np.sin(theta), np.cos(phi), np.sin(phi)
    a, b = (ct * cp).sum(-1), (st * sp).sum(-1)
    c, e = (ct * sp).sum(-1), (st * cp).sum(-1)
    den_t = n ** 2 - np.cos(2 * theta).sum(-1) ** 2 - np.sin(2 * theta).sum(-1) ** 2
    den_p = n ** 2 - np.cos(2 * phi).sum(-1) ** 2 - np.sin(2 * phi).sum(-1) ** 2
    den = np.sqrt(np.clip(den_t, 0, None) * np.clip(den_p, 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 1e-9 * n ** 2, 4 * (a * b - c * e) / np.where(den > 0, den, 1), np.nan)
    return float(rho) if np.ndim(rho) == 0 else rho


def _wrap(a: np.ndarray) -> np.ndarray:
    """Angles (radians) to (-pi, pi]."""
    return np.angle(np.exp(1j * np.asarray(a)))


def _check_angles(x, angles) -> tuple[np.ndarray, np.ndarray]:
    angles = np.asarray(angles, dtype=np.float64)
    if np.ndim(x) != 2:
        raise ValueError(f"x must be a (n_examples, d) matrix, got shape {np.shape(x)}")
    if angles.ndim != 1:
        raise ValueError(f"angles must hold one angle (radians) per row of x, shape (n,), got {angles.shape}")
    x = check_features(x, len(angles), "angles")
    bad = np.flatnonzero(~np.isfinite(angles))
    if bad.size:
        raise ValueError(f"angles has a NaN/inf value at index {bad[0]} ({bad.size} in all); "
                         "drop or fix those examples first")
    return x, angles


def ring_geometry(x: np.ndarray, angles: np.ndarray, n_bins: int = 8, permutations: int = 1000,
                  seed: int = 0) -> dict:
    """Does the code of ``angles`` (radians) in ``x`` (n, d) form a ring in its top two dimensions?

    The angles fall into ``n_bins`` equal sectors centred on 2*pi*i/n_bins (so directions sampled at
    those multiples sit mid-bin, never on an edge). The per-bin mean activations are centred and
    projected on their top two principal components; ``pc_angles`` are the bins' polar angles there.
    Because PCA's rotation and handedness are arbitrary, ``circular_correlation`` (Fisher & Lee, signed:
    negative means the ring runs the other way round in the PC axes, ``reflected``) is reported with
    ``aligned_correlation``,
    the best over reflection, max(corr(theta, phi), corr(theta, -phi)), which for this coefficient is
    |corr|. ``p_value`` is the share of ``permutations`` random bin relabellings whose aligned correlation
    reaches the observed one (with few bins, chance alone gives sizeable correlations). The cyclic order
    is checked after the reflection: walking the bins by recovered angle, each bin should be followed
    by the next; ``order_violations`` counts the places where it is not (0 iff the order is preserved).
    """
    x, angles = _check_angles(x, angles)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 3:
        raise ValueError(f"n_bins must be an integer >= 3 (a cycle needs at least 3 points), got {n_bins!r}")
    if x.shape[1] < 2:
        raise ValueError(f"x has {x.shape[1]} feature; a ring needs at least 2 (pass (n, d) activations, d >= 2)")
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0 (0 skips the p-value), got {permutations}")
    width = TWO_PI / n_bins
    bins = np.floor(np.mod(angles + width / 2, TWO_PI) / width).astype(int) % n_bins
    counts = np.bincount(bins, minlength=n_bins)
    if counts.min() == 0:
        empty = int(np.flatnonzero(counts == 0)[0])
        lo, hi = np.degrees((empty - 0.5) * width), np.degrees((empty + 0.5) * width)
        raise ValueError(f"bin {empty} ([{lo:.1f}, {hi:.1f}) degrees) has no examples ({int((counts == 0).sum())} "
                         f"empty bins of n_bins={n_bins}); use fewer n_bins or angles covering the circle "
                         "(angles are in radians)")
    centres = np.arange(n_bins) * width
    means = (np.eye(n_bins)[:, bins] @ x) / counts[:, None]
    centred = means - means.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s ** 2
    explained = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    coords = centred @ vt[:2].T
    phi = np.arctan2(coords[:, 1], coords[:, 0])
    rho = circular_correlation(centres, phi)
    aligned_rho = float(np.nanmax([rho, -rho])) if np.isfinite(rho) else float("nan")
    reflected = bool(np.isfinite(rho) and rho < 0)
    sign = -1.0 if reflected else 1.0
    offset = np.angle(np.exp(1j * (centres - sign * phi)).mean())
    aligned = np.mod(sign * phi + offset, TWO_PI)
    error = np.degrees(np.abs(_wrap(aligned - centres)))
    walk = np.argsort(sign * phi, kind="stable")
    violations = int((np.roll(walk, -1) != (walk + 1) % n_bins).sum()) if np.isfinite(rho) else n_bins
    p_value = float("nan")
    if permutations and np.isfinite(rho):
        rng = np.random.default_rng(seed)
        perm = np.argsort(rng.random((permutations, n_bins)), axis=1)
        null = np.abs(circular_correlation(centres[perm], np.broadcast_to(phi, perm.shape)))
        p_value = float((1 + np.sum(null >= abs(rho) - 1e-12)) / (permutations + 1))
    return {"n_bins": n_bins, "bin_centres": centres, "counts": counts, "bin_means": means,
            "coords": coords, "components": vt[:2], "pc_angles": phi, "aligned_angles": aligned,
            "angle_error_deg": error, "circular_correlation": float(rho), "aligned_correlation": aligned_rho,
            "reflected": reflected, "p_value": p_value, "variance_2pc": float(explained[:2].sum()),
            "explained_variance": explained, "order_preserved": violations == 0,
            "order_violations": violations}


def ring_figure(result: dict) -> "plt.Figure":
    """The bin means in their top-two-PC plane, coloured by true angle (hsv), joined in bin order.

    A ring code draws a closed loop whose colours run round it once; a line or a tangle means the angle
    is not read out as a circle in these two dimensions.
    """
    missing = [k for k in ("coords", "bin_centres", "explained_variance", "aligned_correlation",
                           "order_violations") if k not in result]
    if missing:
        raise ValueError(f"ring_figure needs the dict ring_geometry returns; missing {missing}")
    coords, centres = np.asarray(result["coords"]), np.asarray(result["bin_centres"])
    colours = plt.cm.hsv(centres / TWO_PI)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    loop = np.vstack([coords, coords[:1]])
    ax.plot(loop[:, 0], loop[:, 1], color="0.6", lw=1, zorder=1)
    ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=60, edgecolors="k", linewidths=0.5, zorder=2)
    for (px, py), c in zip(coords, centres):
        ax.annotate(f"{np.degrees(c):.0f}°", (px, py), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ev = np.asarray(result["explained_variance"])
    ax.set_xlabel(f"PC1 of bin means ({100 * ev[0]:.0f}% var)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var)" if len(ev) > 1 else "PC2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"circular corr {result['aligned_correlation']:.2f}, "
                 f"{result['order_violations']} order violations", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap="hsv", norm=plt.Normalize(0, 360))
    fig.colorbar(sm, ax=ax, label="true angle (deg)", fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, smallest first, between the subspaces spanned by the columns of
    ``a`` (d, k1) and ``b`` (d, k2) (orthonormalised first; a 1-D array is one column).

    ``min(rank a, rank b)`` angles: 0 means a shared direction, 90 an orthogonal one. Probe directions
    (``ProbeResult.direction``) are rows, so pass their transpose.
    """
    mats = []
    for name, m in (("a", a), ("b", b)):
        m = np.asarray(m, dtype=np.float64)
        if m.ndim == 1:
            m = m[:, None]
        if m.ndim != 2:
            raise ValueError(f"{name} must be a (d, k) matrix whose columns span the subspace, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"{name} has NaN/inf entries; pass finite spanning vectors")
        if m.size == 0 or np.linalg.matrix_rank(m) == 0:
            raise ValueError(f"{name} spans nothing (shape {m.shape}, rank 0); pass at least one nonzero column")
        mats.append(m)
    if mats[0].shape[0] != mats[1].shape[0]:
        raise ValueError(f"a has d={mats[0].shape[0]} rows but b has d={mats[1].shape[0]}; both must be (d, k) "
                         "with the subspace in the columns (transpose ProbeResult.direction, which is (k, d))")
    return np.sort(np.degrees(subspace_angles(mats[0], mats[1])))


def signal_subspace(x: np.ndarray, pcs: int | Literal["auto"] | None = "auto") -> np.ndarray:
    """Orthonormal columns (d, r) spanning the top-r principal components of ``x`` (n, d).

    ``pcs="auto"`` keeps the components whose singular value clears the Gavish & Donoho (2014) hard
    threshold for unknown noise, omega(beta) * median singular value (beta = min(n, d) / max(n, d)),
    i.e. the spikes above the noise bulk; it assumes most components are noise. An int keeps that many;
    ``None`` keeps all d (the identity).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if pcs is None:
        return np.eye(d)
    if pcs != "auto" and (isinstance(pcs, bool) or not isinstance(pcs, (int, np.integer)) or not 1 <= pcs <= d):
        raise ValueError(f"pcs must be 'auto', None or an integer in [1, d={d}], got {pcs!r}")
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    if pcs == "auto":
        beta = min(n, d) / max(n, d)
        omega = 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43
        r = max(1, int((s > omega * np.median(s)).sum()))
    else:
        r = int(pcs)
    return vt[:r].T


def _chance_and_margin(kind: str, y: np.ndarray, n_test: int, chance: float | None,
                       margin: float | None) -> tuple[float, float]:
    """Chance level and "at chance" margin; the default margin is 3 standard errors of an uninformed
    probe's held-out score on n_test examples."""
    if kind == "logistic":
        _, counts = np.unique(y, return_counts=True)
        p0 = counts.max() / counts.sum()
        default_chance, default_margin = float(p0), 3 * float(np.sqrt(p0 * (1 - p0) / n_test))
    elif kind == "ridge":
        # An uninformed prediction correlates with the target at ~N(0, 1/n_test), and R^2 <= corr^2.
        default_chance, default_margin = 0.0, 9.0 / n_test
    else:
        default_chance, default_margin = 90.0, 3 * _UNIFORM_ABS_ERROR_SD_DEG / np.sqrt(n_test)
    return (default_chance if chance is None else float(chance)), (default_margin if margin is None else float(margin))


def _at_chance(kind: str, value: float, chance: float, margin: float) -> bool:
    if not np.isfinite(value):                          # e.g. R^2 of a constant target
        return True
    return value >= chance - margin if kind == "circular" else value <= chance + margin


def orthogonal_probe_dimensionality(x: np.ndarray, y: np.ndarray,
                                    kind: Literal["circular", "ridge", "logistic"] = "circular",
                                    cfg: ProbeConfig | None = None, chance: float | None = None,
                                    max_dims: int = 32, margin: float | None = None,
                                    pcs: int | Literal["auto"] | None = "auto") -> dict:
    """How many linear dimensions of ``x`` carry ``y``: remove probe directions until the probe is at chance.

    Iterative nullspace projection (INLP). Each round fits ``fit_probe`` on x with the removed subspace
    projected out (orthogonally, from the original x), records the held-out score and, unless it is at
    chance, adds the probe's ``direction`` rows (circular: the sin and cos readouts; ridge: one;
    logistic: one, or one per class, spanning classes - 1 dimensions) to an orthonormal basis.
    ``dims`` is the **rank** of the subspace removed before the first at-chance fit, so a circular
    probe normally adds 2 per round and a row that adds nothing new is not counted.

    Chance (``chance=None``): circular 90 degrees of mean absolute error (uniformly spread angles;
    pass ``chance`` otherwise), ridge R^2 = 0, logistic the majority-class share of ``y``. At chance
    means no better than chance by more than ``margin`` (metric units; lower angular error is better);
    ``margin=None`` is 3 standard errors of an uninformed probe on the test split: circular
    3 * 51.96 / sqrt(n_test) degrees, logistic 3 * sqrt(p0 (1 - p0) / n_test), ridge 9 / n_test (an
    R^2 whose implied correlation is within 3 SE of zero).

    ``pcs`` (why): a decoder fitted on n_train rows carries spurious weight, of relative size about
    sqrt(d / n_train) * residual sd / noise sd, in the low-variance noise directions; projecting it out
    rotates that share of the signal into those quiet directions, where the next probe reads it again,
    so plain INLP (``pcs=None``) over-counts clean codes (a single planted ring in 64-D at noise 0.1,
    n=2000: 6 instead of 2). ``pcs="auto"`` (``signal_subspace``) first restricts x to its principal
    components above the noise bulk, so the count is at most ``pcs_kept``, and kept components that
    carry nothing about y are not counted. ``reached_chance`` is False when ``max_dims`` ran out or a
    probe found no new direction; ``dims`` is then a lower bound.
    """
    if kind not in METRICS:
        raise ValueError(f"kind must be one of {sorted(METRICS)}, got {kind!r}")
    if cfg is None:
        cfg = ProbeConfig(kind=kind)
    elif cfg.kind != kind:
        raise ValueError(f"cfg.kind={cfg.kind!r} but kind={kind!r}; pass a ProbeConfig of the same kind "
                         f"(e.g. cfg.model_copy(update={{'kind': {kind!r}}}))")
    if isinstance(max_dims, bool) or not isinstance(max_dims, (int, np.integer)) or max_dims < 1:
        raise ValueError(f"max_dims must be an integer >= 1, got {max_dims!r}")
    if margin is not None and not margin >= 0:
        raise ValueError(f"margin must be >= 0 in the metric's units (or None for 3 standard errors), got {margin}")
    x = check_features(x, len(y))
    d = x.shape[1]
    keep = signal_subspace(x, pcs)
    if keep.shape[1] < d:
        mu = x.mean(0)
        x = mu + ((x - mu) @ keep) @ keep.T
    basis = np.zeros((d, 0))
    scores: list[float] = []
    removed: list[int] = []
    reached, stop = False, ""
    while True:
        res = fit_probe(cfg, x - (x @ basis) @ basis.T, y)
        if not scores:
            chance_v, margin_v = _chance_and_margin(kind, np.asarray(y), res.n_test, chance, margin)
            n_test = res.n_test
        scores.append(float(res.value))
        removed.append(basis.shape[1])
        if _at_chance(kind, res.value, chance_v, margin_v):
            reached, stop = True, "at chance"
            break
        if basis.shape[1] >= max_dims:
            stop = f"removed max_dims={max_dims} dimensions"
            break
        new = keep @ (keep.T @ res.direction.T) if keep.shape[1] < d else res.direction.T
        for _ in range(2):                               # twice: orthogonal to working precision
            new = new - basis @ (basis.T @ new)
        u, s, _ = np.linalg.svd(new, full_matrices=False)
        u = u[:, s > 1e-6][:, :max_dims - basis.shape[1]]
        if u.shape[1] == 0:
            stop = "the probe found no direction outside the removed subspace"
            break
        basis = np.hstack([basis, u])
    return {"dims": removed[-1], "reached_chance": reached, "stop_reason": stop, "scores": scores,
            "dims_removed": removed, "basis": basis, "metric": METRICS[kind], "kind": kind,
            "chance": chance_v, "margin": margin_v, "n_test": n_test, "pcs_kept": int(keep.shape[1])}


def planted_ring(n: int, d: int = 64, planted_dims: int = 2, redundant_copies: int = 0, noise: float = 0.1,
                 seed: int = 0, copy_noise: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic activations with a known ring: ``(x (n, d), angles (n,) in [0, 2 pi), basis)``.

    Each copy is a ``planted_dims``-D code of the angle (harmonics m = 1..planted_dims/2 of
    (cos m theta, sin m theta) / m; planted_dims=2 is the plain ring) in its own random subspace, all
    subspaces mutually orthogonal; ``basis`` (d, planted_dims * (1 + redundant_copies)) holds their
    orthonormal axes, copy by copy (cos 1, sin 1, cos 2, ...). Copy 0 is the exact code; copy j is copy
    j-1 plus independent N(0, copy_noise^2) noise per coordinate (a chain: each copy a noisier reading
    of the one before). Isotropic N(0, noise^2) noise is added to all d dimensions.

    **Planted count** (what ``orthogonal_probe_dimensionality`` with a circular probe should return):
    2 * (1 + redundant_copies) when copy_noise > 0, and 2 when copy_noise == 0. Exact copies under
    isotropic noise put all the angle's linear information in one plane (along the sums of the copies'
    axes): the best probe pools the copies there, and removing that plane leaves no copy readable. With
    copy_noise > 0 the best probe leans on the cleanest remaining copy, so each copy costs a round; the
    default pcs="auto" sees a copy only while its extra variance clears the noise bulk (copy_noise a few
    times noise, as in the defaults). Harmonics m >= 2 carry no linear information about
    (cos theta, sin theta) for uniform angles: they make the ring higher-dimensional but add nothing to
    the count.
    """
    if planted_dims < 2 or planted_dims % 2:
        raise ValueError(f"planted_dims must be even and >= 2 (pairs of cos/sin harmonics), got {planted_dims}")
    if redundant_copies < 0:
        raise ValueError(f"redundant_copies must be >= 0, got {redundant_copies}")
    total = planted_dims * (1 + redundant_copies)
    if total > d:
        raise ValueError(f"planted_dims * (1 + redundant_copies) = {total} exceeds d={d}; raise d or plant less")
    if n < 1 or noise < 0 or copy_noise < 0:
        raise ValueError(f"need n >= 1, noise >= 0 and copy_noise >= 0 (got n={n}, noise={noise}, "
                         f"copy_noise={copy_noise})")
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, TWO_PI, n)
    m = np.repeat(np.arange(1, planted_dims // 2 + 1), 2)
    code = np.where(np.arange(planted_dims) % 2 == 0, np.cos(m * angles[:, None]), np.sin(m * angles[:, None])) / m
    basis = np.linalg.qr(rng.normal(size=(d, total)))[0]
    x = noise * rng.normal(size=(n, d))
    for j in range(1 + redundant_copies):
        if j:
            code = code + copy_noise * rng.normal(size=code.shape)
        x += code @ basis[:, j * planted_dims:(j + 1) * planted_dims].T
    return x, angles, basis


class GeometryConfig(BaseModel):
    """How to measure a circular variable's representation geometry at one site."""

    model_config = ConfigDict(extra="forbid")
    n_bins: int = Field(8, ge=3, description="equal angle sectors whose mean activations form the ring")
    permutations: int = Field(1000, ge=0, description="random bin relabellings for the ring's p-value "
                                                      "(0 skips it)")
    max_dims: int = Field(32, ge=1, description="stop removing probe directions after this many "
                                                "dimensions (the count is then a lower bound)")
    margin: float | None = Field(None, ge=0, description="degrees of angular error within which the probe "
                                                         "counts as at chance; None: 3 standard errors of an "
                                                         "uninformed probe on the test split")
    pcs: int | Literal["auto"] | None = Field("auto", description="restrict the probes to the top principal "
                                                                  "components first: 'auto' (those above the "
                                                                  "noise bulk), a count, or None for all")
    chance: float | None = Field(None, description="chance angular error in degrees; None: 90 (uniform angles)")
    probe: ProbeConfig = Field(default_factory=lambda: ProbeConfig(kind="circular"),
                               description="the circular probe refitted at each removal step")

    @field_validator("probe", mode="before")
    @classmethod
    def _circular_unless_said(cls, v):
        return {**v, "kind": "circular"} if isinstance(v, dict) and "kind" not in v else v

    @field_validator("probe")
    @classmethod
    def _must_be_circular(cls, v: ProbeConfig) -> ProbeConfig:
        if v.kind != "circular":
            raise ValueError(f"probe.kind must be 'circular' (the report decodes an angle), got {v.kind!r}")
        return v


def geometry_report(cfg: GeometryConfig, x: np.ndarray, angles: np.ndarray) -> dict:
    """Graph node: the ring (per-bin table + figure) and the orthogonal-probe dimensionality of ``angles``.

    Returns ``{"table": per-bin pa.Table, "iterations": per-removal-step pa.Table, "figure": ring
    figure, "metrics": {...}}``; booleans in metrics are 0/1 floats so any tracker can log them.
    """
    ring = ring_geometry(x, angles, n_bins=cfg.n_bins, permutations=cfg.permutations, seed=cfg.probe.seed)
    dim = orthogonal_probe_dimensionality(x, angles, "circular", cfg.probe, chance=cfg.chance,
                                          max_dims=cfg.max_dims, margin=cfg.margin, pcs=cfg.pcs)
    table = pa.table({"bin": pa.array(np.arange(cfg.n_bins), pa.int64()),
                      "centre_deg": pa.array(np.degrees(ring["bin_centres"]), pa.float64()),
                      "count": pa.array(ring["counts"], pa.int64()),
                      "pc1": pa.array(ring["coords"][:, 0], pa.float64()),
                      "pc2": pa.array(ring["coords"][:, 1], pa.float64()),
                      "pc_angle_deg": pa.array(np.degrees(ring["pc_angles"]), pa.float64()),
                      "aligned_angle_deg": pa.array(np.degrees(ring["aligned_angles"]), pa.float64()),
                      "angle_error_deg": pa.array(ring["angle_error_deg"], pa.float64())})
    iterations = pa.table({"dims_removed": pa.array(dim["dims_removed"], pa.int64()),
                           dim["metric"]: pa.array(dim["scores"], pa.float64())})
    x_arr = np.asarray(x)
    metrics = {"circular_correlation": ring["circular_correlation"],
               "aligned_correlation": ring["aligned_correlation"], "ring_p_value": ring["p_value"],
               "variance_2pc": ring["variance_2pc"], "order_preserved": float(ring["order_preserved"]),
               "order_violations": ring["order_violations"], "dimensionality": dim["dims"],
               "pcs_kept": dim["pcs_kept"],
               "reached_chance": float(dim["reached_chance"]), "angular_error_deg": dim["scores"][0],
               "chance_deg": dim["chance"], "margin_deg": dim["margin"],
               "examples": int(x_arr.shape[0]), "width": int(x_arr.shape[1])}
    return {"table": table, "iterations": iterations, "figure": ring_figure(ring), "metrics": metrics}
