"""Grouped nested CV of probes: no group leaks across a split, planted signals score high while
group-permuted controls stay at chance, and the emergence layer of a planted depth curve is found."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from interpflow.tasks.probes import (CVConfig, EmergenceConfig, LayerProbeConfig, circular_score, cv_probe,
                                     depth_figure, depth_table, emergence, grouped_folds, permute_by_group,
                                     probe_layer, shuffled_control)
from interpflow.tasks.probes.crossval import _ridge_path
from interpflow.tasks.probes.linear import _ridge

torch.set_num_threads(1)


def _groups(n_groups=60, per=8):
    return np.repeat(np.arange(n_groups), per)


def test_grouped_folds_keep_groups_whole_and_balanced():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, 47)
    groups = np.repeat(rng.permutation(1000)[:47], sizes)          # arbitrary ids, uneven sizes
    folds = grouped_folds(groups, 5, seed=3)
    assert len(folds) == 5
    seen = np.zeros(len(groups), int)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
        seen[test] += 1
    assert (seen == 1).all()                                       # every row tested exactly once
    n_test = [len(t) for _, t in folds]
    assert max(n_test) - min(n_test) <= sizes.max()
    again = grouped_folds(groups, 5, seed=3)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    other = grouped_folds(groups, 5, seed=4)
    assert any(len(a[1]) != len(b[1]) or (a[1] != b[1]).any() for a, b in zip(folds, other))


def test_ridge_path_matches_linear_closed_form():
    rng = np.random.default_rng(1)
    for n, d in [(40, 7), (12, 30)]:                               # primal and dual (n < d) branches
        z = rng.normal(size=(n, d))
        z -= z.mean(0)
        t = rng.normal(size=(n, 2))
        for l2, (w, b) in zip([0.0, 0.5, 300.0], _ridge_path(z, t, [0.0, 0.5, 300.0])):
            w_ref, b_ref = _ridge(z, t, l2)
            np.testing.assert_allclose(w, w_ref.T, atol=1e-8)
            np.testing.assert_allclose(b, b_ref, atol=1e-8)


def test_planted_ridge_scores_high_and_control_is_chance():
    rng = np.random.default_rng(2)
    groups = _groups()
    x = rng.normal(size=(len(groups), 20))
    y = x @ rng.normal(size=20) + rng.normal(size=len(groups))
    cfg = CVConfig(kind="ridge")
    real = cv_probe(cfg, x, y, groups)
    ctrl = shuffled_control(cfg, x, y, groups)
    assert real.metric == "r2" and real.mean > 0.85 and len(real.scores) == 5
    assert all(c in cfg.grid for c in real.chosen) and real.n == len(x) and real.n_groups == 60
    assert abs(ctrl.mean) < 0.1
    # multi-output targets: R^2 averaged over columns, each reported
    y2 = np.stack([y, x @ rng.normal(size=20) * 10 + rng.normal(size=len(groups))], 1)
    multi = cv_probe(cfg, x, y2, groups)
    assert multi.mean > 0.9 and set(multi.extra) == {"r2_0", "r2_1"}
    np.testing.assert_allclose(multi.scores, (np.array(multi.extra["r2_0"]) + multi.extra["r2_1"]) / 2)


def test_planted_logistic_and_control_at_majority_rate():
    rng = np.random.default_rng(3)
    groups = _groups(40, 6)
    x = rng.normal(size=(len(groups), 10))
    y = (x[:, 0] + 0.3 * rng.normal(size=len(groups)) > 0.3).astype(int)   # imbalanced classes
    cfg = CVConfig(kind="logistic", grid=[1e-3, 1e-1, 10.0], max_iter=100)
    real = cv_probe(cfg, x, y, groups)
    ctrl = shuffled_control(cfg, x, y, groups)
    assert real.metric == "accuracy" and real.mean > 0.85
    majority = float(np.mean(ctrl.extra["majority_rate"]))
    assert majority > 0.55 and abs(ctrl.mean - majority) < 0.1


def test_group_leakage_inflates_ungrouped_cv():
    """Label constant within a group, features = a random group embedding: a row split lets the probe
    look labels up by embedding; a grouped split has nothing to generalise from."""
    rng = np.random.default_rng(4)
    n_groups, per, d = 40, 8, 64
    groups = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=(n_groups, d))[groups] + 0.3 * rng.normal(size=(len(groups), d))
    y = rng.normal(size=n_groups)[groups]
    cfg = CVConfig(kind="ridge")
    ungrouped = cv_probe(cfg, x, y, np.arange(len(groups)))        # every row its own group = plain KFold
    grouped = cv_probe(cfg, x, y, groups)
    assert ungrouped.mean > 0.7 and grouped.mean < 0.1

    # the same with class labels; chance is not simply 0.5 here (the intercept learns the training
    # part's majority, which with group-level labels is the test fold's minority), so compare with the gap
    rng = np.random.default_rng(10)
    g = np.repeat(np.arange(60), 3)
    labels = rng.permutation(np.arange(60) % 2)[g]
    x = rng.normal(size=(60, 64))[g] + 0.3 * rng.normal(size=(len(g), 64))
    lcfg = CVConfig(kind="logistic", grid=[1e-2], max_iter=100)
    acc_rows = cv_probe(lcfg, x, labels, np.arange(len(g))).mean
    acc_groups = cv_probe(lcfg, x, labels, g).mean
    assert acc_rows > 0.75 and acc_groups < 0.65 and acc_rows - acc_groups > 0.25


def test_circular_recovers_planted_angle_and_scores_zero_on_random():
    rng = np.random.default_rng(5)
    groups = _groups()
    theta = rng.uniform(-np.pi, np.pi, len(groups))
    x = np.stack([np.sin(theta), np.cos(theta)], 1) @ rng.normal(size=(2, 16)) + 0.05 * rng.normal(
        size=(len(groups), 16))
    cfg = CVConfig(kind="circular")
    real = cv_probe(cfg, x, theta, groups)
    assert real.metric == "circular_score" and real.mean > 0.9
    assert np.mean(real.extra["angular_error_deg"]) < 10
    # chance: angles unrelated to x. Fold scores at chance swing by ~1/sqrt(n_test) together (they share
    # the sample's resultant), so use more rows here to make the check tight
    big = _groups(250, 8)
    xb = rng.normal(size=(len(big), 16))
    rand = cv_probe(cfg, xb, rng.uniform(-np.pi, np.pi, len(big)), big)
    assert abs(rand.mean) < 0.1 and np.mean(rand.extra["angular_error_deg"]) > 80
    # relative to the mean direction, so concentrated angles don't inflate chance (mean cos(err) would)
    conc = 0.4 * rng.normal(size=len(groups))                     # mostly "rightwards"
    res = cv_probe(cfg, x, conc, groups)
    assert abs(res.mean) < 0.1 and np.mean(res.extra["mean_cos"]) > 0.8


def test_circular_score_anchors():
    theta = np.linspace(-3, 3, 50)
    assert circular_score(theta, theta) == pytest.approx(1.0)
    assert circular_score(theta + 2 * np.pi, theta) == pytest.approx(1.0)    # angles wrap
    conc = 0.5 * np.linspace(-1, 1, 200)                                   # concentrated around 0
    assert circular_score(conc, np.zeros(200)) == pytest.approx(0.0, abs=0.01)   # the mean direction
    # random guesses on uniform angles: ~0 with the bias-corrected baseline (~-0.04 at n = 100), where
    # the raw resultant length would give ~-R/(1-R) = -0.10
    rng = np.random.default_rng(11)
    pairs = [(rng.uniform(-np.pi, np.pi, 100), rng.uniform(-np.pi, np.pi, 100)) for _ in range(500)]
    guesses = np.mean([circular_score(t, p) for t, p in pairs])
    raw = np.mean([1 - np.mean(1 - np.cos(p - t)) / (1 - abs(np.exp(1j * t).mean())) for t, p in pairs])
    assert -0.06 < guesses < 0.01 and raw < -0.08


def test_grid_prefers_strong_regularisation_for_noisy_duplicates():
    rng = np.random.default_rng(6)
    n = 400
    groups = np.arange(n) // 5
    s = rng.normal(size=n)
    noisy = s[:, None] + 3 * rng.normal(size=(n, 60))             # 60 noisy copies of one signal
    clean = rng.normal(size=(n, 5))
    cfg = CVConfig(kind="ridge")
    picked_noisy = cv_probe(cfg, noisy, s + 0.3 * rng.normal(size=n), groups).chosen
    picked_clean = cv_probe(cfg, clean, clean @ rng.normal(size=5) + 0.01 * rng.normal(size=n), groups).chosen
    assert min(picked_noisy) >= 10 and max(picked_clean) <= 1


def test_permute_by_group_moves_whole_blocks():
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(12), rng.integers(2, 6, 12))
    per_group = rng.normal(size=12)
    y = per_group[groups]
    out = permute_by_group(y, groups, seed=0)
    for g in range(12):
        assert np.unique(out[groups == g]).size == 1               # still constant within each group
    assert set(np.unique(out)) <= set(per_group) and not np.array_equal(out, y)
    assert np.array_equal(permute_by_group(y, groups, seed=0), out)
    assert not np.array_equal(permute_by_group(np.array([1, 2]), np.array([0, 1]), seed=0), [1, 2])


def test_permuted_labels_keep_their_multiset_when_group_sizes_differ():
    # a clip with an impossible twin is a 2-row group [1, 0]; other clips are 1-row groups [1]
    groups = np.r_[np.arange(300), np.arange(100)]
    y = np.r_[np.ones(300, int), np.zeros(100, int)]
    out = permute_by_group(y, groups, seed=3)
    assert sorted(out) == sorted(y) and not np.array_equal(out, y)   # the majority rate is unchanged
    for g in range(100):                                              # twins stay a (possible, impossible) pair
        assert sorted(out[groups == g]) == [0, 1]


def test_emergence_rule():
    curve = [0.10, 0.12, 0.11, 0.13, 0.60, 0.80, 0.85, 0.70, 0.50]
    em = emergence(curve)
    assert (em["peak_layer"], em["emergence_layer"], em["jump_layer"]) == (6, 4, 4)
    assert em["emerged"] and em["threshold"] == pytest.approx(0.10 + 0.5 * 0.75)
    spike = [0.1, 0.6, 0.1, 0.12, 0.7, 0.9]
    assert emergence(spike)["emergence_layer"] == 4
    assert emergence(spike, EmergenceConfig(sustained=False))["emergence_layer"] == 1
    flat = emergence([0.5, 0.45, 0.5, 0.4])
    assert not flat["emerged"] and flat["emergence_layer"] is None
    assert not emergence(curve, std=[0.8] * len(curve))["emerged"]  # a rise inside the noise is no emergence
    assert emergence([0.3])["jump_layer"] is None


def test_probe_layer_across_depth_finds_planted_layer(tmp_path):
    """Eight 'layers': the target is unreadable below layer 4 and readable from it on."""
    rng = np.random.default_rng(8)
    groups = _groups(40, 6)
    n, d = len(groups), 12
    y = rng.normal(size=n)
    cfg = LayerProbeConfig(cv=CVConfig(kind="ridge", grid=[1.0, 100.0]), control_repeats=2)
    per_layer = []
    for layer in range(8):
        gain = 0.0 if layer < 4 else 2.0
        x = rng.normal(size=(n, d))
        x[:, 0] += gain * y
        out = probe_layer(cfg, x, y, groups)
        per_layer.append(out["metrics"])
        folds = out["folds"]
        assert isinstance(folds, pa.Table) and folds.num_rows == 5 * 3
        assert sorted(set(folds["run"].to_pylist())) == ["control", "real"]
    m = per_layer[-1]
    assert m["selectivity"] == pytest.approx(m["mean"] - m["control_mean"])
    assert all(isinstance(v, float) for v in m.values())
    means = [p["mean"] for p in per_layer]
    assert max(means[:4]) < 0.1 and min(means[4:]) > 0.6
    em = emergence(means, std=[p["std"] for p in per_layer])
    assert em["emerged"] and em["emergence_layer"] == 4 and em["jump_layer"] == 4

    table = depth_table({"speed": per_layer}, sites=[f"blocks.{i}" for i in range(8)])
    assert table.column_names == ["variable", "layer", "site", "mean", "std", "control_mean", "control_std",
                                  "selectivity"]
    fig = depth_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"blocks.{i}" for i in range(8)]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), [p["control_mean"] for p in per_layer])
    star = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [4]
    fig.savefig(tmp_path / "depth.png")


@pytest.mark.parametrize("call,match", [
    (lambda: grouped_folds(np.arange(4), 5, 0), "4 distinct ids but k=5"),
    (lambda: grouped_folds(np.arange(10), 1, 0), "k must be"),
    (lambda: grouped_folds(np.zeros((3, 2)), 2, 0), "groups must be one id per row"),
    (lambda: cv_probe(CVConfig(kind="ridge"), np.zeros((10, 2)), np.zeros(9), np.arange(10)), "x has 10 rows"),
    (lambda: cv_probe(CVConfig(kind="ridge"), np.zeros((10, 2)), np.zeros(10), np.arange(9)), "groups must"),
    (lambda: cv_probe(CVConfig(kind="circular"), np.zeros((10, 2)), np.zeros((10, 2)), np.arange(10)),
     "kind='ridge'"),
    (lambda: cv_probe(CVConfig(kind="logistic"), np.zeros((10, 2)), np.ones(10), np.arange(10)), "single class"),
    (lambda: cv_probe(CVConfig(kind="ridge"), np.full((10, 2), np.nan), np.zeros(10), np.arange(10)), "row 0"),
    (lambda: cv_probe(CVConfig(kind="ridge", folds=5, inner_folds=5), np.random.default_rng(0).normal(size=(12, 2)),
                      np.arange(12.0), np.arange(12) // 2), "inner_folds=5"),
    (lambda: CVConfig(grid=[]), "grid"),
    (lambda: CVConfig(grid=[-1.0]), "grid"),
    (lambda: CVConfig(folds=1), "folds"),
    (lambda: CVConfig(kind="ridge", l3=1), "l3"),
    (lambda: EmergenceConfig(threshold_frac=0), "threshold_frac"),
    (lambda: emergence([]), "depth_scores"),
    (lambda: emergence([0.1, 0.2], std=[0.1]), "std must have one entry per layer"),
    (lambda: depth_figure(pa.table({"layer": [0]})), "build it with depth_table"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_config_names_its_grid_and_hands_l2_to_fit_probe():
    cfg = CVConfig(kind="ridge", grid=[10.0, 1.0, 1.0])
    assert cfg.grid == [1.0, 10.0]
    assert CVConfig(kind="logistic").model_dump()["grid"] == CVConfig(kind="logistic").grid != CVConfig(
        kind="ridge").grid
    pc = cfg.probe_config(10.0)
    assert (pc.kind, pc.l2, pc.seed) == ("ridge", 10.0, cfg.seed)
