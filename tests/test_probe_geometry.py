"""Ring geometry and orthogonal-probe dimensionality: planted rings come back with their angle order and
their planted count, noise does not look like a ring, and bad inputs are named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from interpflow.tasks.probes import (GeometryConfig, ProbeConfig, circular_correlation, geometry_report,
                                     orthogonal_probe_dimensionality, planted_ring, principal_angles,
                                     ring_figure, ring_geometry)

torch.set_num_threads(1)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_planted_ring_recovered_with_its_count(k):
    """The issue's must-show: a ring in a random 2-D subspace of 64-D, noise 0.1, k redundant copies
    (each a noisier reading of the one before): the bins come back in order, the PC plane is the
    planted one, and removing probe directions until chance removes 2 * (1 + k) dimensions."""
    x, angles, basis = planted_ring(2000, d=64, redundant_copies=k, noise=0.1, copy_noise=0.5, seed=k)
    ring = ring_geometry(x, angles, n_bins=8)
    assert ring["aligned_correlation"] >= 0.95
    assert ring["order_preserved"] and ring["order_violations"] == 0
    assert ring["p_value"] < 0.01 and ring["variance_2pc"] > 0.95
    assert ring["coords"].shape == (8, 2) and ring["angle_error_deg"].max() < 10
    # The class means' plane is the pooled direction of the copies: cos and sin axes summed over copies.
    pooled = np.stack([basis[:, 0::2].sum(1), basis[:, 1::2].sum(1)], 1)
    assert principal_angles(ring["components"].T, pooled).max() < 5

    dim = orthogonal_probe_dimensionality(x, angles, "circular", ProbeConfig(kind="circular"))
    assert dim["reached_chance"] and dim["stop_reason"] == "at chance"
    assert abs(dim["dims"] - 2 * (1 + k)) <= 1
    assert dim["scores"][0] < 10 and dim["scores"][-1] >= dim["chance"] - dim["margin"]
    assert dim["dims_removed"][0] == 0 and dim["basis"].shape == (64, dim["dims"])
    np.testing.assert_allclose(dim["basis"].T @ dim["basis"], np.eye(dim["dims"]), atol=1e-8)
    # Everything removed lies in the planted subspace.
    assert principal_angles(dim["basis"], basis).max() < 10


def test_exact_copies_pool_into_one_plane():
    """With copy_noise=0 the copies are one signal along the sums of their axes: count 2, whatever k."""
    x, angles, _ = planted_ring(2000, redundant_copies=2, copy_noise=0.0, seed=7)
    assert orthogonal_probe_dimensionality(x, angles, "circular")["dims"] == 2


def test_plain_inlp_overcounts_a_clean_ring():
    """Why pcs='auto' is the default: without it the estimation error of each removed direction leaves
    readable signal behind in the quiet noise directions, and a single ring counts as more than 2."""
    x, angles, _ = planted_ring(2000, seed=0)
    plain = orthogonal_probe_dimensionality(x, angles, "circular", pcs=None)
    assert plain["dims"] > 2 and plain["scores"][1] < 60
    assert orthogonal_probe_dimensionality(x, angles, "circular")["dims"] == 2


def test_components_without_information_are_not_counted():
    """Harmonics (planted_dims=4) and loud nuisance directions pass the PCA step but carry nothing
    linear about (cos, sin): the count stays 2 while more components are kept."""
    x, angles, basis = planted_ring(2000, planted_dims=4, seed=3)
    ring = ring_geometry(x, angles)
    assert ring["aligned_correlation"] >= 0.95 and ring["variance_2pc"] < 0.9
    dim = orthogonal_probe_dimensionality(x, angles, "circular")
    assert dim["pcs_kept"] == 4 and dim["dims"] == 2

    rng = np.random.default_rng(5)
    x, angles, basis = planted_ring(2000, seed=4)
    nuisance = np.linalg.qr((np.eye(64) - basis @ basis.T) @ rng.normal(size=(64, 3)))[0]
    x = x + (rng.normal(size=(2000, 3)) * [2.0, 1.5, 1.0]) @ nuisance.T
    dim = orthogonal_probe_dimensionality(x, angles, "circular")
    assert dim["pcs_kept"] == 5 and dim["dims"] == 2


def test_ridge_and_logistic_counts():
    rng = np.random.default_rng(1)
    n, d = 1200, 32
    v = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    target = rng.normal(size=n)
    x = 0.3 * rng.normal(size=(n, d)) + np.outer(target, v[:, 0])
    ridge = orthogonal_probe_dimensionality(x, target, "ridge")
    assert ridge["dims"] == 1 and ridge["scores"][0] > 0.8 and ridge["chance"] == 0.0
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(3, d))[labels] + 0.5 * rng.normal(size=(n, d))
    logistic = orthogonal_probe_dimensionality(x, labels, "logistic")
    # Three class means span 2 dimensions; the softmax rows sum to zero, so 3 rows add rank 2.
    assert logistic["dims"] == 2 and logistic["scores"][0] > 0.95
    assert logistic["chance"] == pytest.approx(np.bincount(labels).max() / n)


def test_max_dims_makes_a_lower_bound():
    x, angles, _ = planted_ring(1000, redundant_copies=2, seed=2)
    dim = orthogonal_probe_dimensionality(x, angles, "circular", max_dims=3)
    assert not dim["reached_chance"] and dim["dims"] == 3 and "max_dims" in dim["stop_reason"]


def test_pure_noise_is_not_a_ring():
    """8 bin means of noise in 64-D: the aligned correlation is small on average and the permutation
    p-value is not small. (With 8 bins, noise alone exceeds 0.6 in ~1% of draws: read p_value.)"""
    rng = np.random.default_rng(0)
    corr, p = [], []
    for seed in range(10):
        ring = ring_geometry(rng.normal(size=(800, 64)), rng.uniform(0, 2 * np.pi, 800), permutations=200, seed=seed)
        corr.append(ring["aligned_correlation"])
        p.append(ring["p_value"])
    assert np.median(corr) < 0.4 and np.mean(np.array(p) < 0.05) <= 0.3
    x, angles, _ = planted_ring(800, seed=1)
    assert ring_geometry(x, angles, permutations=200)["p_value"] < 0.01


def test_circular_correlation_properties():
    rng = np.random.default_rng(2)
    theta = rng.uniform(0, 2 * np.pi, 50)
    phi = rng.uniform(0, 2 * np.pi, 50)
    assert circular_correlation(theta, theta + 1.3) == pytest.approx(1.0)
    assert circular_correlation(theta, 0.4 - theta) == pytest.approx(-1.0)
    # The closed form equals the pairwise definition.
    i, j = np.triu_indices(50, 1)
    a, b = np.sin(theta[i] - theta[j]), np.sin(phi[i] - phi[j])
    assert circular_correlation(theta, phi) == pytest.approx((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    # Equally spaced angles (where mean-centred coefficients are undefined) are fine; degenerate ones are NaN.
    grid = np.arange(8) * np.pi / 4
    assert circular_correlation(grid, -grid) == pytest.approx(-1.0)
    assert np.isnan(circular_correlation(grid, np.zeros(8)))


@pytest.mark.parametrize("handedness", [1, -1])
def test_discrete_directions_sit_mid_bin_and_either_handedness_aligns(handedness):
    """Angles exactly on the 8 bin centres (discrete motion directions) each land in their own bin; a
    ring of either handedness aligns after the reflection the PCA axes call for."""
    rng = np.random.default_rng(3)
    angles = np.repeat(np.arange(8) * np.pi / 4, 50)
    plane = np.linalg.qr(rng.normal(size=(16, 2)))[0]
    x = np.stack([np.cos(angles), handedness * np.sin(angles)], 1) @ plane.T + 0.05 * rng.normal(size=(400, 16))
    ring = ring_geometry(x, angles, n_bins=8)
    assert list(ring["counts"]) == [50] * 8
    assert ring["reflected"] == (ring["circular_correlation"] < 0)
    assert ring["aligned_correlation"] > 0.99 and ring["order_violations"] == 0
    assert ring["angle_error_deg"].max() < 5


@pytest.mark.parametrize("order,violations,min_corr,max_corr", [
    ([0, 3, 6, 1, 4, 7, 2, 5], 8, 0.0, 0.3),       # a star: a perfect circle, but not the angle's ring
    ([1, 0, 2, 3, 4, 5, 6, 7], 3, 0.8, 0.9),       # two neighbours swapped: high correlation, order broken
])
def test_scrambled_order_is_detected(order, violations, min_corr, max_corr):
    rng = np.random.default_rng(4)
    angles = rng.uniform(0, 2 * np.pi, 1600)
    bins = np.floor(np.mod(angles + np.pi / 8, 2 * np.pi) / (np.pi / 4)).astype(int) % 8
    slot = np.array(order)[bins] * np.pi / 4
    plane = np.linalg.qr(rng.normal(size=(16, 2)))[0]
    x = np.stack([np.cos(slot), np.sin(slot)], 1) @ plane.T + 0.05 * rng.normal(size=(1600, 16))
    ring = ring_geometry(x, angles, n_bins=8)
    assert not ring["order_preserved"] and ring["order_violations"] == violations
    assert min_corr <= ring["aligned_correlation"] <= max_corr


def test_principal_angles():
    rng = np.random.default_rng(5)
    q = np.linalg.qr(rng.normal(size=(20, 6)))[0]
    a = q[:, :3] @ rng.normal(size=(3, 3))                     # same span as q[:, :3], not orthonormal
    np.testing.assert_allclose(principal_angles(a, q[:, :3]), 0, atol=1e-5)
    np.testing.assert_allclose(principal_angles(q[:, :3], q[:, 3:]), 90, atol=1e-6)
    mixed = np.stack([q[:, 0], np.cos(0.5) * q[:, 1] + np.sin(0.5) * q[:, 4]], 1)
    np.testing.assert_allclose(principal_angles(mixed, q[:, :2]), [0, np.degrees(0.5)], atol=1e-6)
    assert principal_angles(q[:, 0], q[:, :2]).shape == (1,)
    with pytest.raises(ValueError, match="a has d=20 rows but b has d=6"):
        principal_angles(q, q.T)
    with pytest.raises(ValueError, match="b spans nothing"):
        principal_angles(q, np.zeros((20, 2)))


def test_ring_figure_draws_the_loop():
    x, angles, _ = planted_ring(800, seed=6)
    fig = ring_figure(ring_geometry(x, angles, n_bins=12))
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 12
    assert len(ax.get_lines()[0].get_xdata()) == 13                # closed: back to the first bin
    colours = ax.collections[0].get_facecolors()
    assert len({tuple(np.round(c, 3)) for c in colours}) == 12
    with pytest.raises(ValueError, match="ring_geometry"):
        ring_figure({"coords": np.zeros((3, 2))})


def test_geometry_report_node():
    x, angles, _ = planted_ring(1500, redundant_copies=1, seed=8)
    out = geometry_report(GeometryConfig(n_bins=6, permutations=100), x, angles)
    assert isinstance(out["table"], pa.Table) and out["table"].num_rows == 6
    assert out["table"].column_names[:3] == ["bin", "centre_deg", "count"]
    assert sum(out["table"]["count"].to_pylist()) == 1500
    assert out["iterations"].column_names == ["dims_removed", "angular_error_deg"]
    m = out["metrics"]
    assert m["dimensionality"] == 4 and m["reached_chance"] == 1.0 and m["aligned_correlation"] > 0.95
    assert all(isinstance(v, (int, float)) for v in m.values())
    assert out["figure"].axes


def test_config_defaults_and_errors():
    assert GeometryConfig(probe={"l2": 0.1}).probe.kind == "circular"
    assert GeometryConfig(pcs=4).pcs == 4 and GeometryConfig(pcs=None).pcs is None
    with pytest.raises(ValueError, match="probe.kind must be 'circular'"):
        GeometryConfig(probe={"kind": "ridge"})
    with pytest.raises(ValueError, match="n_bins"):
        GeometryConfig(n_bins=2)
    with pytest.raises(ValueError, match="nbins"):
        GeometryConfig(nbins=8)


@pytest.mark.parametrize("call,match", [
    (lambda x, a: ring_geometry(x, a[:-1]), "x has 200 rows but angles has 199"),
    (lambda x, a: ring_geometry(x, a, n_bins=2), "n_bins must be an integer >= 3"),
    (lambda x, a: ring_geometry(x, np.where(np.arange(200) == 5, np.nan, a)), "angles has a NaN/inf value at index 5"),
    (lambda x, a: ring_geometry(np.where(np.arange(200)[:, None] == 9, np.nan, x), a), "x has NaN/inf values in row 9"),
    (lambda x, a: ring_geometry(x, a * 0.1), "bin 2 .* has no examples"),
    (lambda x, a: ring_geometry(x[:, :1], a), "at least 2"),
    (lambda x, a: orthogonal_probe_dimensionality(x, a[:-1]), "x has 200 rows but y has 199"),
    (lambda x, a: orthogonal_probe_dimensionality(np.where(np.arange(200)[:, None] == 3, np.inf, x), a),
     "row 3"),
    (lambda x, a: orthogonal_probe_dimensionality(x, a, "circular", ProbeConfig(kind="ridge")),
     "cfg.kind='ridge' but kind='circular'"),
    (lambda x, a: orthogonal_probe_dimensionality(x, a, max_dims=0), "max_dims"),
    (lambda x, a: orthogonal_probe_dimensionality(x, a, pcs=100), "pcs must be"),
    (lambda x, a: planted_ring(10, d=4, redundant_copies=2), "exceeds d=4"),
    (lambda x, a: planted_ring(10, planted_dims=3), "planted_dims must be even"),
])
def test_bad_inputs_are_named(call, match):
    x, angles, _ = planted_ring(200, d=8, seed=0)
    with pytest.raises(ValueError, match=match):
        call(x, angles)
