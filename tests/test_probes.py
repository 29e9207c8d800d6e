"""Linear probes: planted structure is recovered, controls stay at chance, bad inputs are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interpflow.tasks.probes import ProbeConfig, ProbeResult, fit_probe, layer_sweep

torch.set_num_threads(1)


def _planted_binary(n=600, d=16, seed=0):
    """Two Gaussian classes at +-2.5 along a unit direction v, with feature offsets and strong noise in
    directions orthogonal to v: the features are anisotropic (so standardising changes the fit), yet
    v is still an eigenvector of the noise covariance and hence the Bayes-optimal direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    loud = rng.normal(size=(3, d))
    loud -= np.outer(loud @ direction, direction)            # orthogonal to the planted direction
    noise = rng.normal(size=(n, d)) + rng.normal(size=(n, 3)) @ loud * 4
    y = rng.integers(0, 2, n)
    x = noise + np.outer(np.where(y == 1, 2.5, -2.5), direction) + rng.normal(size=d) * 5
    return x, y, direction


def test_logistic_recovers_planted_direction():
    x, y, direction = _planted_binary()
    res = fit_probe(ProbeConfig(kind="logistic", l2=1e-4, test_fraction=0.25, seed=0, standardize=True), x, y)
    assert res.metric == "accuracy" and res.value > 0.95
    assert res.direction.shape == (1, x.shape[1])
    assert float(res.direction[0] @ direction) > 0.9
    assert res.n_train + res.n_test == len(y) and res.classes == [0, 1]
    assert (res.predict(x) == y).mean() > 0.95


def test_logistic_multiclass_one_direction_per_class():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 450)
    x = means[y] + rng.normal(size=(450, 8))
    res = fit_probe(ProbeConfig(kind="logistic", l2=1e-3, test_fraction=0.2, seed=1, standardize=True), x, y)
    assert res.direction.shape == (3, 8) and res.value > 0.95
    assert np.allclose(np.linalg.norm(res.direction, axis=1), 1)


def test_shuffled_labels_give_chance():
    x, y, _ = _planted_binary(seed=2)
    y = np.random.default_rng(3).permutation(y)
    res = fit_probe(ProbeConfig(kind="logistic", l2=1e-2, test_fraction=0.3, seed=0, standardize=True), x, y)
    assert res.value < 0.65


def test_ridge_noiseless_target():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 10)) * rng.uniform(0.5, 3, 10) + 1.0
    w = rng.normal(size=10)
    y = x @ w + 0.7
    res = fit_probe(ProbeConfig(kind="ridge", l2=1e-8, test_fraction=0.2, seed=0, standardize=True), x, y)
    assert res.metric == "r2" and res.value > 0.999
    np.testing.assert_allclose(res.weight[0], w, atol=1e-4)
    np.testing.assert_allclose(res.bias[0], 0.7, atol=1e-4)
    assert float(res.direction[0] @ (w / np.linalg.norm(w))) > 0.9999


def test_circular_probe_reads_angles():
    rng = np.random.default_rng(5)
    theta = rng.uniform(-np.pi, np.pi, 400)
    embed = rng.normal(size=(2, 12))                          # random 2-D embedding of (sin, cos)
    x = np.stack([np.sin(theta), np.cos(theta)], 1) @ embed + 0.01 * rng.normal(size=(400, 12))
    res = fit_probe(ProbeConfig(kind="circular", l2=1e-6, test_fraction=0.25, seed=0, standardize=True), x, theta)
    assert res.metric == "angular_error_deg" and res.value < 5
    assert res.extra["r2"] > 0.99 and res.direction.shape == (2, 12)
    err = np.angle(np.exp(1j * (res.predict(x) - theta)))
    assert np.degrees(np.abs(err)).mean() < 5


def test_layer_sweep_orders_by_depth():
    x, y, _ = _planted_binary(n=200)
    cfg = ProbeConfig(kind="logistic", l2=1e-3, test_fraction=0.25, seed=0, standardize=True)
    base = fit_probe(cfg, x, y)
    names = ["blocks.10.resid_post", "final_norm", "blocks.2.resid_post", "embed", "blocks.3.mlp_out"]
    results = {n: ProbeResult(**{**base.__dict__, "value": i / 10}) for i, n in enumerate(names)}
    table, fig = layer_sweep(results)
    assert table.column_names == ["site", "metric", "value", "n_test"]
    assert table["site"].to_pylist() == ["embed", "blocks.2.resid_post", "blocks.3.mlp_out",
                                         "blocks.10.resid_post", "final_norm"]
    assert table["value"].to_pylist() == [0.3, 0.2, 0.4, 0.0, 0.1]
    lines = fig.axes[0].get_lines()
    assert sum(len(line.get_xdata()) for line in lines) == len(names)
    assert list(lines[0].get_ydata()) == [0.3, 0.2, 0.4, 0.0, 0.1]


@pytest.mark.parametrize("kind,x,y,match", [
    ("logistic", np.zeros((5, 3)), np.array([0, 1, 0, 1]), "x has 5 rows but y has 4"),
    ("logistic", np.ones((6, 3)), np.zeros(6), "single class"),
    ("logistic", np.ones((6, 3)), np.array([0, 0, 0, 0, 0, 1]), "class 1 has 1 example"),
    ("ridge", np.ones((2, 3)), np.zeros(2), "too few to split"),
    ("ridge", np.ones((4, 3)), np.array(["a", "b", "c", "d"]), "kind='logistic'"),
])
def test_bad_inputs(kind, x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_probe(ProbeConfig(kind=kind, l2=1e-3, test_fraction=0.25, seed=0, standardize=True), x, y)


def test_nan_row_named():
    x = np.random.default_rng(0).normal(size=(20, 3))
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        fit_probe(ProbeConfig(kind="ridge"), x, np.arange(20.0))


def test_config_rejects_unknown_and_bad_fields():
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match="l3"):
        ProbeConfig(l3=1.0)


def test_tensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    x, y, _ = _planted_binary(n=200)
    res = fit_probe(ProbeConfig(kind="logistic", l2=1e-3, test_fraction=0.25, seed=0, standardize=True), x, y)
    tensors, meta = res.to_tensors()
    path = tmp_path / "probe.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with safe_open(str(path), "pt") as f:
        stored_meta = f.metadata()
    back = ProbeResult.from_tensors(load_file(str(path)), stored_meta)
    assert (back.kind, back.metric, back.value, back.train_value) == (res.kind, res.metric, res.value,
                                                                      res.train_value)
    assert (back.n_train, back.n_test, back.classes) == (res.n_train, res.n_test, res.classes)
    for name in ("direction", "weight", "bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    with pytest.raises(ValueError, match="missing"):
        ProbeResult.from_tensors({}, {})


def test_test_fraction_zero_fits_on_every_row_and_reports_no_held_out_score():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.01 * rng.standard_normal(40)
    full = fit_probe(ProbeConfig(kind="ridge", l2=0.0, test_fraction=0, standardize=False), x, y)
    assert (full.n_train, full.n_test) == (40, 0) and np.isnan(full.value) and full.train_value > 0.99
    exact = np.linalg.lstsq(np.c_[x, np.ones(40)], y, rcond=None)[0]
    assert np.allclose(full.weight[0], exact[:3], atol=1e-8)          # the fit used every row
    with pytest.raises(ValueError, match="single class"):
        fit_probe(ProbeConfig(kind="logistic", test_fraction=0), x, np.zeros(40))
