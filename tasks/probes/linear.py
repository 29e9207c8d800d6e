"""Linear probes on activations: logistic (classes), ridge (scalars) and circular (angles).

A probe answers "is this quantity linearly readable at this site?" Every figure it reports is
held out (a seeded split, stratified by class for logistic probes) so that a high score means
generalisation, not memorisation; the train figure is kept beside it to show overfitting. The
fitted **direction** is expressed in the raw input units even when the fit standardised the
features, so it can be compared with planted directions, SAE atoms or steering vectors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.types import Seed

ProbeKind = Literal["logistic", "ridge", "circular"]
METRICS = {"logistic": "accuracy", "ridge": "r2", "circular": "angular_error_deg"}


class ProbeConfig(BaseModel):
    """How to fit one probe."""

    model_config = ConfigDict(extra="forbid")
    kind: ProbeKind = Field("logistic", description="logistic: class labels -> held-out accuracy; ridge: "
                                                    "scalar target -> held-out R^2; circular: angle in "
                                                    "radians -> held-out mean absolute angular error (deg)")
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the weights (in standardised units when "
                                              "standardize is on); the bias is never penalised")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of examples held out for the "
                                                               "reported metric; 0 fits on every example "
                                                               "and reports no held-out score (nan)")
    seed: Seed = Field(0, description="seed of the train/test split (and nothing else: the fits are "
                                     "deterministic)")
    standardize: bool = Field(True, description="scale features to zero mean and unit variance (train "
                                                "statistics) before fitting; directions are reported in "
                                                "raw units either way")
    max_iter: int = Field(200, ge=1, description="logistic: LBFGS iterations (full batch)")


@dataclass
class ProbeResult:
    """A fitted probe and its held-out score.

    ``weight`` holds one row per output in raw input units (binary logistic: 1 row, the log-odds of
    ``classes[1]``; multiclass: one row per class; ridge: 1 row; circular: rows for sin and cos), so
    ``x @ weight.T + bias`` is the probe's output. ``direction`` is ``weight`` with unit rows.
    """

    kind: str
    metric: str
    value: float
    train_value: float
    direction: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    n_train: int
    n_test: int
    classes: list = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class labels (logistic), scalars (ridge) or angles in radians (circular) for rows x."""
        out = np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias
        if self.kind == "ridge":
            return out[:, 0]
        if self.kind == "circular":
            return np.arctan2(out[:, 0], out[:, 1])
        idx = (out[:, 0] > 0).astype(int) if out.shape[1] == 1 else out.argmax(1)
        return np.asarray(self.classes, dtype=object)[idx]

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for ``safetensors.torch.save_file(tensors, path, metadata=metadata)``."""
        tensors = {"direction": torch.from_numpy(np.ascontiguousarray(self.direction, dtype=np.float64)),
                   "weight": torch.from_numpy(np.ascontiguousarray(self.weight, dtype=np.float64)),
                   "bias": torch.from_numpy(np.ascontiguousarray(self.bias, dtype=np.float64))}
        meta = {"kind": self.kind, "metric": self.metric, "value": repr(float(self.value)),
                "train_value": repr(float(self.train_value)), "n_train": str(self.n_train),
                "n_test": str(self.n_test), "classes": json.dumps([_jsonable(c) for c in self.classes]),
                "extra": json.dumps(self.extra)}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "ProbeResult":
        """Inverse of ``to_tensors`` (e.g. from ``safe_open(path).metadata()`` and ``load_file``)."""
        missing = [k for k in ("direction", "weight", "bias") if k not in tensors]
        missing += [k for k in ("kind", "metric", "value", "train_value", "n_train", "n_test") if k not in metadata]
        if missing:
            raise ValueError(f"not a stored probe: missing {missing}; store it with ProbeResult.to_tensors()")
        return cls(kind=metadata["kind"], metric=metadata["metric"], value=float(metadata["value"]),
                   train_value=float(metadata["train_value"]),
                   direction=tensors["direction"].double().numpy(), weight=tensors["weight"].double().numpy(),
                   bias=tensors["bias"].double().numpy(), n_train=int(metadata["n_train"]),
                   n_test=int(metadata["n_test"]), classes=json.loads(metadata.get("classes", "[]")),
                   extra=json.loads(metadata.get("extra", "{}")))


def _jsonable(c):
    return c.item() if isinstance(c, np.generic) else c


def check_features(x, n_targets: int, target: str = "y") -> np.ndarray:
    """``x`` as a finite float (n_examples, d) matrix with one row per target; the ValueError says
    what is wrong (shape, row count, the first row with NaN/inf)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be a (n_examples, d) matrix, got shape {x.shape}")
    if len(x) != n_targets:
        raise ValueError(f"x has {len(x)} rows but {target} has {n_targets} entries; pass one target per row of x")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"x has NaN/inf values in row {bad[0]} ({bad.size} bad rows in all); "
                         "drop or fix those rows before probing")
    return x


def _check(cfg: ProbeConfig, x, y) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    if np.ndim(x) != 2:
        raise ValueError(f"x must be a (n_examples, d) matrix, got shape {np.shape(x)}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must hold one {'label' if cfg.kind == 'logistic' else 'scalar'} per example "
                         f"(shape (n,)), got shape {y.shape}")
    x = check_features(x, len(y))
    if cfg.kind != "logistic":
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"a {cfg.kind} probe needs numeric y (got dtype {y.dtype}); "
                             "use kind='logistic' for class labels") from None
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise ValueError(f"y has a NaN/inf value at index {bad[0]}; drop or fix those examples")
    return x, y


def _split(cfg: ProbeConfig, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices; stratified by class for logistic probes (every class on both sides)."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.test_fraction == 0:       # fit on everything (e.g. a readout probe scored on other data)
        if cfg.kind == "logistic" and len(np.unique(y)) < 2:
            raise ValueError(f"y has a single class ({_jsonable(y[0])!r}); a logistic probe needs at least two")
        return np.arange(len(y)), np.arange(0)
    if cfg.kind == "logistic":
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        if len(classes) < 2:
            raise ValueError(f"y has a single class ({_jsonable(classes[0])!r}); a logistic probe needs at least two")
        if counts.min() < 2:
            rare = _jsonable(classes[counts.argmin()])
            raise ValueError(f"class {rare!r} has {counts.min()} example; the stratified split needs at least "
                             "2 per class (one to train on, one to test on); collect more or drop the class")
        train, test = [], []
        for c, n_c in enumerate(counts):
            idx = rng.permutation(np.flatnonzero(inverse == c))
            k = int(np.clip(round(n_c * cfg.test_fraction), 1, n_c - 1))
            test.append(idx[:k])
            train.append(idx[k:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    n = len(y)
    k = int(round(n * cfg.test_fraction))
    if k < 1 or n - k < 2:
        raise ValueError(f"{n} examples are too few to split with test_fraction={cfg.test_fraction} "
                         f"({n - k} train, {k} test; need >= 2 train and >= 1 test); add examples or "
                         "change test_fraction")
    idx = rng.permutation(n)
    return np.sort(idx[k:]), np.sort(idx[:k])


def _scaler(cfg: ProbeConfig, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0) if cfg.standardize else np.ones(x.shape[1])
    return mu, np.where(sd > 1e-12, sd, 1.0)   # constant features keep scale 1 instead of dividing by 0


def _ridge(z: np.ndarray, t: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge on centred z (n, d) -> targets t (n, m); unpenalised intercept."""
    tm = t.mean(0)
    d = z.shape[1]
    w = np.linalg.lstsq(z.T @ z + l2 * np.eye(d), z.T @ (t - tm), rcond=None)[0]   # (d, m)
    return w.T, tm


def _r2(t: np.ndarray, pred: np.ndarray) -> float:
    """R^2 over all target columns together (1 - SSE / SST)."""
    sst = ((t - t.mean(0)) ** 2).sum()
    return float(1 - ((t - pred) ** 2).sum() / sst) if sst > 0 else float("nan")


def _logistic(z: np.ndarray, yi: np.ndarray, n_classes: int, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch LBFGS on mean cross-entropy + l2/2 ||W||^2 (binary: a single logit)."""
    zt, yt = torch.from_numpy(z), torch.from_numpy(yi)
    m = 1 if n_classes == 2 else n_classes
    w = torch.zeros(m, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = zt @ w.T + b
        if m == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], yt.double())
        else:
            loss = torch.nn.functional.cross_entropy(logits, yt)
        loss = loss + 0.5 * cfg.l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def fit_probe(cfg: ProbeConfig, x: np.ndarray, y: np.ndarray) -> ProbeResult:
    """Fit ``cfg.kind`` on a seeded train split of (x, y) and score it on the held-out rest."""
    x, y = _check(cfg, x, y)
    train, test = _split(cfg, y)
    mu, sd = _scaler(cfg, x[train])
    z = (x - mu) / sd
    classes: list = []
    extra: dict[str, float] = {}
    if cfg.kind == "logistic":
        cls_arr, yi = np.unique(y, return_inverse=True)
        classes = [_jsonable(c) for c in cls_arr]
        w_z, b_z = _logistic(z[train], yi[train], len(cls_arr), cfg)
    else:
        t = y[:, None] if cfg.kind == "ridge" else np.stack([np.sin(y), np.cos(y)], 1)
        w_z, b_z = _ridge(z[train], t[train], cfg.l2)
    # Undo the scaling: w_z . (x - mu) / sd + b_z = (w_z / sd) . x + (b_z - (w_z / sd) . mu)
    weight = w_z / sd
    bias = b_z - weight @ mu
    direction = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-300)
    out = x @ weight.T + bias

    def score(idx: np.ndarray) -> float:
        if idx.size == 0:
            return float("nan")
        if cfg.kind == "logistic":
            pred = (out[idx, 0] > 0).astype(int) if out.shape[1] == 1 else out[idx].argmax(1)
            return float((pred == yi[idx]).mean())
        if cfg.kind == "ridge":
            return _r2(t[idx], out[idx])
        diff = np.angle(np.exp(1j * (np.arctan2(out[idx, 0], out[idx, 1]) - y[idx])))
        return float(np.degrees(np.abs(diff)).mean())

    if cfg.kind == "circular":
        extra = {"r2": _r2(t[test], out[test]) if test.size else float("nan"), "train_r2": _r2(t[train], out[train])}
    return ProbeResult(kind=cfg.kind, metric=METRICS[cfg.kind], value=score(test), train_value=score(train),
                       direction=direction, weight=weight, bias=bias, n_train=len(train), n_test=len(test),
                       classes=classes, extra=extra)
