"""Sparse autoencoder core (issue #5): each variant's defining property, bad-input errors, the training
loop, and identifiability on synthetic data with a known dictionary. No Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.optimize import linprog

from interpflow.tasks.sae.base import TOPK_FAMILY
from interpflow.tasks.sae import (
    VARIANTS, ArchetypalSAE, BatchTopKSAE, DivergedError, JumpReLUSAE, RelaxedArchetypalSAE, SAEConfig,
    SAETrainConfig, SyntheticConfig, Variant, check_input, fit_candidates, lr_at, make_sae, make_synthetic,
    matched_cosine, pairwise_stability, recovery_report, train_sae,
)

FREE_DICTIONARY = ["relu", "topk", "batchtopk", "jumprelu"]
ARCHETYPAL = ["archetypal", "relaxed_archetypal"]

# the identifiability benchmark: settings shared by the table and the TopK threshold test
SYNTH = SyntheticConfig(d=32, n_atoms=48, k=3, n=20000, noise_std=0.01, seed=0)
BENCH_SAE = dict(d_in=32, n_latents=96, l1_coeff=0.03, l0_coeff=0.01, n_candidates=256, seed=0)   # k=3: topk family
BENCH_TRAIN = dict(steps=2000, batch_size=256, lr=1e-3, warmup_steps=100, threads=1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)                    # the tests' own random inputs; models seed themselves


def small(variant: str, **kw) -> SAEConfig:
    k = {"k": 4} if variant in TOPK_FAMILY else {}              # relu and jumprelu refuse k
    return SAEConfig(**{"variant": variant, "d_in": 16, "n_latents": 64, **k, "n_candidates": 32, **kw})


def ready(variant: str, x: torch.Tensor | None = None, **kw):
    """A small untrained model, with candidates fitted for the archetypal variants."""
    model = make_sae(small(variant, **kw))
    model.init_from_data_(x if x is not None else torch.randn(256, 16, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(SYNTH)


@pytest.fixture(scope="module")
def trained(synthetic):
    """Every variant trained on the identifiability data (about 20 s on one CPU thread)."""
    x, _, _ = synthetic
    out = {}
    for variant in VARIANTS:
        k = {"k": 3} if variant in TOPK_FAMILY else {}
        cfg = SAETrainConfig(sae=SAEConfig(variant=variant, **BENCH_SAE, **k), **BENCH_TRAIN)
        out[variant] = train_sae(cfg, x)
    return out


# ------------------------------------------------------------------------------------------ config

def test_every_variant_name_is_buildable():
    for name in Variant.__args__:
        assert make_sae(small(name)).variant == name
    assert set(Variant.__args__) == set(VARIANTS)
    assert isinstance(make_sae(small("batchtopk")), BatchTopKSAE)
    assert isinstance(make_sae(small("jumprelu")), JumpReLUSAE)
    assert isinstance(make_sae(small("relaxed_archetypal")), ArchetypalSAE)    # RA-SAE extends A-SAE
    assert issubclass(RelaxedArchetypalSAE, VARIANTS["topk"])                  # ... with the TopK encoder


def test_config_errors_name_field_and_fix():
    with pytest.raises(ValidationError, match=r"k=64 must be smaller than n_latents=64; lower k or raise n_latents"):
        SAEConfig(variant="topk", n_latents=64, k=64)
    with pytest.raises(ValidationError, match="k=80 must be smaller than n_latents=64"):
        SAEConfig(variant="relaxed_archetypal", n_latents=64, k=80)
    # k would be accepted and ignored by the penalty variants (a sweep over k trains one model n times)
    with pytest.raises(ValidationError, match=r"k=4 does not apply to variant='jumprelu'.*set by l0_coeff; remove k"):
        SAEConfig(variant="jumprelu", k=4)
    with pytest.raises(ValidationError, match=r"k=64 does not apply to variant='relu'.*set by l1_coeff"):
        SAEConfig(variant="relu", n_latents=64, k=64)
    assert SAEConfig(variant="jumprelu").k is None and SAEConfig(variant="topk").k == 8
    again = SAEConfig(variant="jumprelu", l0_coeff=0.3)
    assert SAEConfig(**again.model_dump()) == again             # a stored config loads back
    with pytest.raises(ValidationError, match="aux_k=100 must be at most n_latents=64"):
        SAEConfig(variant="topk", n_latents=64, aux_k=100)
    with pytest.raises(ValidationError, match="extra"):
        SAEConfig(variant="topk", n_latent=64)                  # typo: extra fields are forbidden
    with pytest.raises(ValidationError, match="variant"):
        SAEConfig(variant="gated")
    with pytest.raises(ValidationError, match="init_rows=16 must be at least sae.n_candidates=32"):
        SAETrainConfig(sae=small("archetypal"), init_rows=16)


def test_one_seed_decides_weights_kmeans_and_batch_order():
    """`SAETrainConfig.seed` and `SAEConfig.seed` are one seed: setting either gives the same run, so
    seeds 1 and 2 start from different dictionaries (else seed stability is inflated)."""
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(9))
    for variant in ("topk", "archetypal"):
        by_train = SAETrainConfig(sae=small(variant), seed=1, steps=8, batch_size=50, init_rows=100, threads=1)
        by_sae = SAETrainConfig(sae=small(variant, seed=1), steps=8, batch_size=50, init_rows=100, threads=1)
        assert by_train == by_sae and by_train.seed == by_train.sae.seed == 1
        other = by_train.model_copy(update={"seed": 2})
        assert other.sae.seed == 2 and other.seed == 2                    # model_copy routes it too
        one, _ = train_sae(by_train, x)
        same, _ = train_sae(by_sae, x)
        two, _ = train_sae(other, x)
        assert torch.equal(one.dictionary(), same.dictionary())
        assert not torch.allclose(one.dictionary(), two.dictionary())
        start_1, start_2 = make_sae(by_train.sae), make_sae(other.sae)   # the initial weights differ too
        if variant == "archetypal":
            start_1.init_from_data_(x)
            start_2.init_from_data_(x)
        assert not torch.allclose(start_1.dictionary(), start_2.dictionary())
    assert "seed" not in SAETrainConfig().model_dump()                    # stored once, in sae


# ------------------------------------------------------------------------------------------ inputs

def test_bad_input_width_nan_inf():
    model = make_sae(SAEConfig(variant="topk", d_in=64, n_latents=128, k=4))
    with pytest.raises(ValueError, match="activation width 48 does not match d_in=64"):
        model.encode(torch.randn(5, 48))
    with pytest.raises(ValueError, match="activation width 48 does not match d_in=64"):
        model.loss(torch.randn(5, 48))
    with pytest.raises(ValueError, match="2-D"):
        check_input(torch.randn(64), 64)
    x = torch.randn(10, 64)
    x[7, 3] = float("nan")
    x[9, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in row 7 \(first non-finite row; 2 of 10 rows"):
        check_input(x, 64)
    with pytest.raises(ValueError, match="shard 3: NaN in row 107"):
        check_input(x, 64, row_offset=100, where="shard 3")
    y = torch.randn(10, 64)
    y[2, 5] = float("inf")
    with pytest.raises(ValueError, match="Inf in row 2"):
        model.metrics(y)
    check_input(torch.randn(10, 64), 64)                       # clean input passes


def test_training_rejects_bad_rows_with_stream_position():
    cfg = SAETrainConfig(sae=small("topk"), steps=10, init_rows=64, threads=1)
    batches = [torch.randn(32, 16) for _ in range(6)]
    batches[4][5, 2] = float("inf")                           # row 4 * 32 + 5 = 133 of the stream
    with pytest.raises(ValueError, match="batch 4: Inf in row 133"):
        train_sae(cfg, iter(batches))
    with pytest.raises(ValueError, match="activation width 17 does not match d_in=16"):
        train_sae(cfg, torch.randn(100, 17))
    tensor = torch.randn(100, 16)
    tensor[42] = float("nan")
    with pytest.raises(ValueError, match="NaN in row 42"):
        train_sae(cfg, tensor)


# -------------------------------------------------------------------------------- defining properties

@pytest.mark.parametrize("variant", ["topk", "archetypal", "relaxed_archetypal"])
def test_topk_l0_is_exactly_k(variant):
    model = ready(variant)
    x = torch.randn(512, 16) + 0.5
    for mode in ("train", "eval"):
        getattr(model, mode)()
        codes = model.encode(x)
        assert ((codes > 0).sum(1) == 4).all()
        assert (codes >= 0).all()


def test_batchtopk_l0_is_k_per_batch_in_training_and_about_k_at_inference():
    model = ready("batchtopk")
    model.train()
    with pytest.raises(RuntimeError, match="threshold is not estimated yet"):
        model.eval().encode(torch.randn(8, 16))
    model.train()
    gen = torch.Generator().manual_seed(3)
    for batch in (32, 100, 257):
        codes = model.encode(torch.randn(batch, 16, generator=gen))
        assert int((codes > 0).sum()) == 4 * batch           # exactly k * batch across the batch
        per_row = (codes > 0).sum(1)
        assert per_row.min() < per_row.max()                  # ... spread unevenly over rows
    assert float(model.threshold) > 0                         # running estimate of the cut-off
    x = torch.randn(4096, 16, generator=gen)
    model.estimate_threshold_(x)
    model.eval()
    l0 = float((model.encode(torch.randn(4096, 16, generator=gen)) > 0).sum(1).float().mean())
    assert abs(l0 - 4) < 0.4, l0


def test_jumprelu_threshold_receives_gradient():
    model = ready("jumprelu", jumprelu_bandwidth=0.1, jumprelu_init_threshold=0.1)
    x = torch.randn(512, 16)
    total, parts = model.loss(x)
    assert set(parts) == {"mse", "l0_penalty", "l0"}
    total.backward()
    g = model.log_threshold.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g != 0).float().mean() > 0.5                      # most thresholds get a signal
    # the L0 penalty alone pushes thresholds up (fewer active latents): negative gradient on log theta
    model.zero_grad()
    _, codes, aux = model(x)
    model.penalties(codes, aux)["l0_penalty"].backward()
    assert (model.log_threshold.grad <= 0).all() and (model.log_threshold.grad < 0).any()
    # forward is exactly pre * [pre > theta]
    pre = model.pre_activations(x)
    expected = pre * (pre > model.threshold)
    assert torch.equal(model.activation(pre), expected)


def _in_convex_hull(points: np.ndarray, q: np.ndarray) -> bool:
    """Is q a convex combination of the rows of points? (LP feasibility, independent of the model)"""
    n = points.shape[0]
    res = linprog(np.zeros(n), A_eq=np.vstack([points.T, np.ones((1, n))]), b_eq=np.append(q, 1.0),
                  bounds=[(0, None)] * n, method="highs")
    return res.status == 0


def test_archetypal_atoms_are_convex_combinations_of_candidates():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(600, 16, generator=gen) ** 3             # skewed, non-centred data
    cfg = SAETrainConfig(sae=small("archetypal"), steps=30, batch_size=64, lr=1e-2, threads=1)
    model, _ = train_sae(cfg, x)
    w = model.weights().detach()
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(64), atol=1e-5)
    c = model.candidates.double().numpy()
    d = model.dictionary().detach().double()
    assert torch.allclose(d, w.double() @ model.candidates.double(), atol=1e-5)
    for i in range(0, 64, 8):
        assert _in_convex_hull(c, d[i].numpy())
    # the checker itself can say no: a point far outside the candidates
    assert not _in_convex_hull(c, 3 * c.max(0) + 1)
    assert not model.atoms_unit_norm
    with pytest.raises(NotImplementedError, match="constrain_"):
        model.normalize_decoder_()


def test_archetypal_needs_candidates_first():
    model = make_sae(small("archetypal"))
    with pytest.raises(RuntimeError, match=r"no candidate points yet; call init_from_data_"):
        model.encode(torch.randn(4, 16))


def test_relaxed_archetypal_relaxation_bounded_by_delta():
    model = ready("relaxed_archetypal", delta=0.3)
    with torch.no_grad():
        model.relaxation.copy_(torch.randn(64, 16) * torch.linspace(0, 1, 64)[:, None])
    inside = model.relaxation.norm(dim=1) <= 0.3
    before = model.relaxation.detach().clone()
    model.constrain_()
    norms = model.relaxation.norm(dim=1)
    assert (norms <= 0.3 + 1e-6).all()
    assert torch.equal(model.relaxation[inside], before[inside])            # untouched inside the ball
    assert torch.allclose(norms[~inside], torch.full_like(norms[~inside], 0.3), atol=1e-6)   # projected
    # atoms = convex combination + relaxation
    assert torch.allclose(model.dictionary(), model.weights() @ model.candidates + model.relaxation)


def test_relaxed_archetypal_stays_within_delta_while_training():
    cfg = SAETrainConfig(sae=small("relaxed_archetypal", delta=0.05), steps=60, batch_size=64, lr=3e-2,
                         threads=1)
    model, _ = train_sae(cfg, torch.randn(800, 16, generator=torch.Generator().manual_seed(2)))
    norms = model.relaxation.norm(dim=1)
    assert (norms <= 0.05 + 1e-6).all() and norms.max() > 0.04   # it moved, up to the bound


@pytest.mark.parametrize("variant", FREE_DICTIONARY)
def test_decoder_atoms_unit_norm(variant):
    model = ready(variant)
    assert model.atoms_unit_norm
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(64, 1) * 5 + 0.1)
    assert not torch.allclose(model.dictionary().norm(dim=1), torch.ones(64), atol=1e-3)
    model.normalize_decoder_()
    assert torch.allclose(model.dictionary().norm(dim=1), torch.ones(64), atol=1e-5)
    cfg = SAETrainConfig(sae=small(variant), steps=40, batch_size=64, lr=1e-2, threads=1)
    trained, _ = train_sae(cfg, torch.randn(500, 16))
    assert torch.allclose(trained.dictionary().norm(dim=1), torch.ones(64), atol=1e-5)


def test_topk_auxk_gives_dead_latents_gradient():
    model = ready("topk", dead_steps=1)
    model.train()
    x = torch.randn(8, 16)
    model.loss(x)                           # one step: 8 rows x k=4 fire at most 32 of 64; the rest are dead
    dead = model.dead_mask()
    assert dead.any()
    model.zero_grad()
    total, parts = model.loss(x)
    assert float(parts["auxk_penalty"]) > 0
    total.backward()
    assert model.W_enc.grad[:, dead].abs().sum() > 0           # dead encoders learn again


# ----------------------------------------------------------------------------------- base behaviour

def test_input_scale_is_undone_by_decode_and_training_is_scale_free():
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(4)) + 1.0
    cfg = SAETrainConfig(sae=small("topk"), steps=50, batch_size=100, threads=1)
    a, _ = train_sae(cfg, x)
    b, _ = train_sae(cfg, x * 100.0)
    assert math.isclose(float(a.input_scale), 100 * float(b.input_scale), rel_tol=1e-4)
    assert torch.allclose(a.dictionary(), b.dictionary(), atol=1e-3)
    assert math.isclose(a.metrics(x)["fvu"], b.metrics(x * 100)["fvu"], rel_tol=1e-3)
    # decode(encode(x)) is in raw units: its error scales with the data
    assert math.isclose(b.metrics(x * 100)["mse"], 1e4 * a.metrics(x)["mse"], rel_tol=1e-2)
    # pre-encoder bias: b_dec is subtracted before encoding
    with torch.no_grad():
        a.b_dec.copy_(torch.randn(16))
    xs = x[:5] * a.input_scale
    assert torch.allclose(a.pre_activations(xs), (xs - a.b_dec) @ a.W_enc + a.b_enc)


def test_training_is_deterministic_and_logs_history():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(6))
    cfg = SAETrainConfig(sae=small("batchtopk"), steps=120, batch_size=128, log_every=50, threads=1)
    a, hist = train_sae(cfg, x)
    b, _ = train_sae(cfg, x)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.threshold, b.threshold)
    assert [r["step"] for r in hist] == [0, 50, 100, 119]
    assert {"loss", "mse", "auxk_penalty", "l0", "lr", "grad_norm", "dead_frac"} <= set(hist[-1])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert not a.training                                      # returned in eval mode


def test_continue_training_keeps_scale_and_counts():
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(8)) * 7
    cfg = SAETrainConfig(sae=small("jumprelu"), steps=30, batch_size=100, threads=1)
    model, _ = train_sae(cfg, x)
    scale, w = float(model.input_scale), model.W_dec.detach().clone()
    again, _ = train_sae(cfg, x * 3, model=model, fresh=False)
    assert again is model and float(model.input_scale) == scale        # not re-normalised on new data
    assert int(model.rows_seen) == 2 * 30 * 100 and not torch.equal(model.W_dec, w)
    with pytest.raises(ValueError, match="different SAEConfig"):
        train_sae(cfg.model_copy(update={"sae": small("jumprelu", l0_coeff=0.5)}), x, model=model)


def test_lr_schedule_warmup_then_decay():
    cfg = SAETrainConfig(steps=1000, lr=1e-3, warmup_steps=100, decay_frac=0.2)
    assert lr_at(cfg, 0) == pytest.approx(1e-5)
    assert lr_at(cfg, 99) == pytest.approx(1e-3)
    assert lr_at(cfg, 500) == pytest.approx(1e-3)
    assert lr_at(cfg, 900) == pytest.approx(5e-4)
    assert lr_at(cfg, 999) == pytest.approx(5e-6)


def test_divergence_raises_naming_step_and_keeps_last_good_weights():
    model = make_sae(small("topk"))
    real_loss = model.loss
    calls = {"n": 0}
    snapshot = {}

    def loss(x):
        total, parts = real_loss(x)
        calls["n"] += 1
        if calls["n"] == 4:                                    # step 3 goes non-finite
            snapshot["W_dec"] = model.W_dec.detach().clone()
            return total * float("nan"), parts
        return total, parts

    model.loss = loss
    cfg = SAETrainConfig(sae=small("topk"), steps=20, batch_size=50, threads=1)
    with pytest.raises(DivergedError, match=r"diverged at step 3: loss is nan \(last finite loss [0-9.]+\)") as err:
        train_sae(cfg, torch.randn(400, 16), model=model)
    assert err.value.step == 3 and err.value.last_finite_loss is not None
    assert torch.equal(model.W_dec, snapshot["W_dec"])         # no step was taken on the bad loss


def test_metrics_definitions():
    model = ready("topk")
    x = torch.randn(300, 16)
    m = model.metrics(x, batch_size=64)
    with torch.no_grad():
        x_hat, codes, _ = model.eval()(x)
    err = (x_hat - x).pow(2)
    assert m["mse"] == pytest.approx(float(err.mean()), rel=1e-4)
    assert m["fvu"] == pytest.approx(float(err.sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert m["l0"] == pytest.approx(4.0)
    fired = (codes > 0).float().mean(0)
    assert m["dead_frac"] == pytest.approx(float((fired == 0).float().mean()))
    assert m["dense_frac"] == pytest.approx(float((fired > 0.1).float().mean()))
    counts = torch.zeros(64, dtype=torch.long)
    counts[:16] = 50
    m2 = model.metrics(x, firing_counts=counts, n_rows=100)
    assert m2["dead_frac"] == pytest.approx(0.75) and m2["dense_frac"] == pytest.approx(0.25)


# --------------------------------------------------------------------------------- synthetic, metrics

def test_synthetic_data_has_known_structure():
    cfg = SyntheticConfig(d=8, n_atoms=12, k=2, n=500, noise_std=0.0, seed=3)
    x, d, codes = make_synthetic(cfg)
    assert x.shape == (500, 8) and d.shape == (12, 8) and codes.shape == (500, 12)
    assert torch.allclose(d.norm(dim=1), torch.ones(12))
    assert ((codes > 0).sum(1) == 2).all() and (codes >= 0).all()
    assert torch.allclose(x, codes @ d, atol=1e-6)
    x2, _, _ = make_synthetic(cfg)
    assert torch.equal(x, x2)
    assert not torch.equal(x, make_synthetic(cfg.model_copy(update={"seed": 4}))[0])
    with pytest.raises(ValidationError, match="k=13 must be at most n_atoms=12"):
        SyntheticConfig(n_atoms=12, k=13)


def test_matched_cosine_is_permutation_invariant_and_signed():
    true = torch.randn(10, 6)
    perm = torch.randperm(10)
    learned = torch.cat([true[perm] * 3.0, torch.randn(5, 6)])      # rescaled, shuffled, plus extras
    mean, per = matched_cosine(learned, true)
    assert mean == pytest.approx(1.0) and per.shape == (10,)
    # signed cosine: a flipped atom is not a recovery (|cosine| would score these 1.0)
    assert matched_cosine(-true[:1], true[:1])[0] == pytest.approx(-1.0)
    q = torch.linalg.qr(torch.randn(6, 6)).Q.T                      # orthonormal atoms
    assert matched_cosine(-q, q)[0] == pytest.approx(0.0, abs=1e-6)
    noisy = true + 0.3 * torch.randn(10, 6)
    stab, mat = pairwise_stability([true, true[perm], noisy])
    assert mat.shape == (3, 3) and np.allclose(mat, mat.T) and np.allclose(np.diag(mat), 1)
    assert mat[0, 1] == pytest.approx(1.0) and 0.5 < mat[0, 2] < 0.999
    assert stab == pytest.approx((mat[0, 1] + mat[0, 2] + mat[1, 2]) / 3)


def test_fit_candidates_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 4, generator=gen) * 10
    x = centres.repeat_interleave(200, 0) + 0.1 * torch.randn(1000, 4, generator=gen)
    c = fit_candidates(x, 5, seed=0)
    assert matched_cosine(c - x.mean(0), centres - x.mean(0))[0] > 0.99
    assert torch.cdist(c, centres).min(1).values.max() < 0.1
    assert torch.equal(c, fit_candidates(x, 5, seed=0))
    with pytest.raises(ValueError, match="1000 rows cannot give n_candidates=2000"):
        fit_candidates(x, 2000)


# ---------------------------------------------------------------------------------- identifiability

def test_topk_recovers_the_known_dictionary(trained, synthetic):
    x, true_dict, _ = synthetic
    model, _ = trained["topk"]
    mean, per_atom = matched_cosine(model.dictionary(), true_dict)
    assert mean >= 0.9, mean
    assert model.metrics(x)["l0"] == pytest.approx(3.0)


def test_variant_table_on_synthetic_data(trained, synthetic):
    x, true_dict, _ = synthetic
    rows = {v: recovery_report(model, x, true_dict) for v, (model, _) in trained.items()}
    print(f"\nidentifiability: d={SYNTH.d} n_atoms={SYNTH.n_atoms} k={SYNTH.k} n={SYNTH.n} "
          f"noise={SYNTH.noise_std}; SAE n_latents={BENCH_SAE['n_latents']}, {BENCH_TRAIN['steps']} steps")
    print(f"{'variant':<20}{'matched cos':>12}{'min cos':>9}{'>0.9':>7}{'FVU':>8}{'L0':>7}{'dead':>7}")
    for v, r in rows.items():
        print(f"{v:<20}{r['matched_cosine']:>12.3f}{r['min_matched_cosine']:>9.3f}{r['recovered_frac']:>7.2f}"
              f"{r['fvu']:>8.4f}{r['l0']:>7.2f}{r['dead_frac']:>7.2f}")
    for v, r in rows.items():
        assert r["matched_cosine"] > 0.85, (v, r)
        assert r["fvu"] < 0.2, (v, r)
    for v in ("topk", "archetypal", "relaxed_archetypal"):
        assert rows[v]["l0"] == pytest.approx(3.0)
    assert rows["batchtopk"]["l0"] == pytest.approx(3.0, abs=0.3)        # the inference threshold
    assert rows["jumprelu"]["l0"] < 4.5 and rows["relu"]["l0"] < 10         # the penalties bite
    ra = trained["relaxed_archetypal"][0]
    assert (ra.relaxation.norm(dim=1) <= ra.cfg.delta + 1e-6).all()
