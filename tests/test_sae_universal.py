"""Universal SAE: one shared code across two models' paired activations. Synthetic "models" share (or
do not share) sparse ground-truth codes z: x1 = z D1 + noise, x2 = 3 * (z D2 + noise), with random
unit-norm dictionaries of different widths. No Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from interpflow.tasks.sae import (
    DivergedError, SAEConfig, SAETrainConfig, SyntheticConfig, UniversalSAE, UniversalSAEConfig, UniversalTrainConfig,
    check_paired, co_firing, cross_r2, make_synthetic, train_sae, train_universal,
)

D1, D2, N_ATOMS, K, N_LATENTS, STEPS = 32, 24, 48, 3, 64, 1500
TRAIN = dict(steps=STEPS, batch_size=256, lr=1e-3, warmup_steps=100, threads=1)
TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def paired(shared: bool, n: int = 20000, seed: int = 0) -> list[torch.Tensor]:
    """Two models' activations of the same n examples. shared: both are linear images of the same
    k-sparse codes (different dictionaries, widths and scales); otherwise model 2's codes are
    independent of model 1's."""
    x1, _, z = make_synthetic(SyntheticConfig(d=D1, n_atoms=N_ATOMS, k=K, n=n, seed=seed))
    x2, d2, _ = make_synthetic(SyntheticConfig(d=D2, n_atoms=N_ATOMS, k=K, n=n, seed=seed + 1))
    if shared:
        x2 = z @ d2 + 0.01 * torch.randn(n, D2, generator=torch.Generator().manual_seed(seed + 2))
    return [x1, 3.0 * x2]


def ucfg(**kw) -> UniversalSAEConfig:
    return UniversalSAEConfig(**{"d_ins": [D1, D2], "n_latents": N_LATENTS, "k": K, "model_names": ["a", "b"], **kw})


def timed(name: str, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    TIMES[name] = time.perf_counter() - t
    return out


@pytest.fixture(scope="module")
def shared_data():
    return paired(shared=True)


@pytest.fixture(scope="module")
def universal(shared_data):
    """The Universal SAE on shared data (about 5 s on one CPU thread)."""
    model, history = timed("universal", train_universal, UniversalTrainConfig(sae=ucfg(), **TRAIN), shared_data)
    return model, history, cross_r2(model, shared_data), co_firing(model, shared_data)


# ------------------------------------------------------------------------------------------ config

def test_config_errors_name_field_and_fix():
    with pytest.raises(ValidationError, match=r"k=64 must be smaller than n_latents=64; lower k or raise n_latents"):
        ucfg(k=64)
    with pytest.raises(ValidationError, match="k=70 must be smaller than n_latents=64"):
        ucfg(k=70)
    with pytest.raises(ValidationError, match="model_names has 3 names but d_ins has 2 widths"):
        ucfg(model_names=["a", "b", "c"])
    with pytest.raises(ValidationError, match=r"model_names=\['a', 'a'\] has duplicates"):
        ucfg(model_names=["a", "a"])
    with pytest.raises(ValidationError, match=r"d_ins\[1\]=0 must be at least 1"):
        ucfg(d_ins=[D1, 0])
    with pytest.raises(ValidationError, match="d_ins"):
        ucfg(d_ins=[])
    with pytest.raises(ValidationError, match="aux_k=65 must be at most n_latents=64"):
        ucfg(aux_k=65)
    with pytest.raises(ValidationError, match="extra"):
        ucfg(n_latent=64)                                       # typo: extra fields are forbidden
    assert ucfg(model_names=None).names == ["model0", "model1"]


# ------------------------------------------------------------------------------------------ inputs

def test_bad_paired_input_names_model_and_row():
    cfg = ucfg()
    x1, x2 = torch.randn(100, D1), torch.randn(100, D2)
    check_paired([x1, x2], cfg)                                 # clean input passes
    with pytest.raises(ValueError, match=r"model 1 \(b\) has 99 rows but model 0 \(a\) has 100; .*paired"):
        check_paired([x1, x2[:99]], cfg)
    with pytest.raises(ValueError, match=r"model 1 \(b\): activation width 31 does not match d_ins\[1\]=24; "
                                         r"set sae.d_ins\[1\]=31"):
        check_paired([x1, torch.randn(100, 31)], cfg)
    with pytest.raises(ValueError, match=r"expected one activation matrix per model \(2: \['a', 'b'\]\), got 1"):
        check_paired([x1], cfg)
    bad = x2.clone()
    bad[42, 3] = float("nan")
    bad[60, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model 1 \(b\): NaN in row 42 \(first non-finite row; 2 of 100 rows"):
        check_paired([x1, bad], cfg)
    train = UniversalTrainConfig(sae=cfg, steps=5, threads=1)
    with pytest.raises(ValueError, match=r"model 1 \(b\): NaN in row 42"):
        train_universal(train, [x1, bad])
    with pytest.raises(ValueError, match=r"model 1 \(b\) has 99 rows"):
        train_universal(train, [x1, x2[:99]])
    huge = [1e20 * x1, x2]                                     # finite, but its square overflows float32
    with pytest.raises(DivergedError, match="diverged at step 0: loss is inf"):
        train_universal(train.model_copy(update={"normalize": "none"}), huge)
    model = UniversalSAE(cfg)
    with pytest.raises(ValueError, match=r"model 0 \(a\): activation width 24 does not match d_ins\[0\]=32"):
        model.encode(x2, "a")
    with pytest.raises(ValueError, match=r"model 1 \(b\) has 99 rows"):
        model.loss([x1, x2[:99]])
    with pytest.raises(ValueError, match="unknown model 'c'"):
        model.encode(x1, "c")


# ------------------------------------------------------------------------------------ the objective

def test_loss_reconstructs_every_model_from_each_source():
    """The loss is the mean over sources of the summed per-target MSE, in normalised units."""
    model = UniversalSAE(ucfg(aux_coeff=0.0))
    model.input_scale.copy_(torch.tensor([0.5, 2.0]))
    xs = [torch.randn(64, D1), torch.randn(64, D2)]
    total, parts = model.loss(xs)
    assert set(parts) == {"mse", "l0"}
    expected = []
    for s in range(2):
        codes = model.encode(xs[s], s)
        expected.append(sum(((model.decode(codes, t) - xs[t]) * model.input_scale[t]).pow(2).mean()
                            for t in range(2)))
    assert torch.allclose(total, torch.stack(expected).mean(), rtol=1e-5)
    one, _ = model.loss(xs, sources=["b"])
    assert torch.allclose(one, expected[1], rtol=1e-5)
    total.backward()                                          # every encoder and decoder gets gradient
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_is_seeded_and_random_sources_train_too(shared_data):
    xs = [x[:2000] for x in shared_data]
    cfg = UniversalTrainConfig(sae=ucfg(), steps=60, lr=3e-3, warmup_steps=10,
                               log_every=20, sources="random", threads=1)
    m1, h1 = train_universal(cfg, xs)
    m2, h2 = train_universal(cfg, xs)
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    for (name, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), name
    assert not m1.training
    m0, _ = train_universal(cfg.model_copy(update={"steps": 1}), xs)      # the same start, one tiny step
    after, before = cross_r2(m1, xs), cross_r2(m0, xs)
    assert after[0, 1] > before[0, 1] + 0.1 and after[1, 0] > before[1, 0] + 0.1
    m3, _ = train_universal(cfg.model_copy(update={"seed": 1}), xs)
    assert not torch.equal(m1.W_dec[0], m3.W_dec[0])


# ------------------------------------------------------------------------------------- constraints

def test_l0_is_exactly_k_and_decoder_rows_unit_norm(universal, shared_data):
    model, history, _, _ = universal
    for s, x in enumerate(shared_data):
        codes = model.encode(x, s)
        assert ((codes > 0).sum(1) == K).all()
        assert (codes >= 0).all()
    assert abs(history[-1]["l0"] - K) < 1e-6
    joint = sum(w.detach().pow(2).sum(1) for w in model.W_dec)      # "joint": unit norm across models
    assert torch.allclose(joint, torch.ones(N_LATENTS), atol=1e-5)
    per = [w.detach().norm(dim=1) for w in model.W_dec]
    assert (per[0] < 0.99).any() and (per[1] < 0.99).any()           # ... not per model
    pm, _ = train_universal(UniversalTrainConfig(sae=ucfg(decoder_norm="per_model"), steps=20, threads=1),
                            [x[:1000] for x in shared_data])
    for w in pm.W_dec:
        assert torch.allclose(w.detach().norm(dim=1), torch.ones(N_LATENTS), atol=1e-5)


def test_input_scale_normalises_each_model(universal, shared_data):
    model = universal[0]
    for m, x in enumerate(shared_data):
        mean_sq = float((x * model.input_scale[m]).pow(2).sum(1).mean())
        assert abs(mean_sq / x.shape[1] - 1) < 0.02, (m, mean_sq)
    assert float(model.input_scale[0] / model.input_scale[1]) > 2.5      # model b is 3x larger


# ------------------------------------------------------------------------------------ the figures

def test_cross_r2_matches_a_direct_computation(universal, shared_data):
    model, _, r2, _ = universal
    xs = [x[:3000] for x in shared_data]
    small_batches = cross_r2(model, xs, batch_size=700)
    with torch.no_grad():
        for s in range(2):
            codes = model.encode(xs[s], s)
            for t in range(2):
                x = xs[t].double().numpy()
                x_hat = model.decode(codes, t).double().numpy()
                direct = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
                assert abs(small_batches[s, t] - direct) < 1e-6
    assert r2.shape == (2, 2)


def test_shared_structure_gives_high_cross_r2_and_self_r2_near_single_model_saes(universal, shared_data):
    _, _, r2, _ = universal
    single = []
    for m, x in enumerate(shared_data):
        cfg = SAETrainConfig(sae=SAEConfig(variant="topk", d_in=x.shape[1], n_latents=N_LATENTS, k=K), **TRAIN)
        model, _ = timed(f"single{m}", train_sae, cfg, x)
        single.append(1 - model.metrics(x)["fvu"])
    print(f"\ncross R2 (rows: source a, b; cols: target a, b):\n{np.round(r2, 4)}\nsingle-model TopK R2: "
          f"{np.round(single, 4)}; self/single: {np.round(np.diag(r2) / np.array(single), 4)}; times: "
          f"{ {k: round(v, 1) for k, v in TIMES.items()} }")
    assert r2[0, 1] > 0.8 and r2[1, 0] > 0.8
    for m in range(2):
        assert r2[m, m] >= 0.8 * single[m], (m, r2[m, m], single[m])
        assert r2[m, m] > 0.85


def test_shared_structure_gives_shared_latents(universal):
    _, _, _, cf = universal
    print(f"\nshared_frac {cf['shared_frac']:.3f}, of alive {cf['shared_of_alive']:.3f}, specific "
          f"{cf['n_specific']}, dead {cf['n_dead']}, cofire {np.round(cf['cofire'], 3).tolist()}")
    assert cf["shared_of_alive"] > 0.75
    assert cf["shared_frac"] > 0.6
    assert cf["cofire"][0, 1] > 0.75 and cf["cofire"][1, 0] > 0.75
    assert cf["n_shared"] + sum(cf["n_specific"].values()) + cf["n_dead"] == N_LATENTS
    assert cf["rate"].shape == (2, N_LATENTS)
    assert np.allclose(cf["rate"].sum(1), K)                     # exactly k latents per row


def test_co_firing_of_identical_encoders_is_total():
    """Two models that are the same model: every latent is shared and every firing co-fires."""
    model = UniversalSAE(UniversalSAEConfig(d_ins=[16, 16], n_latents=32, k=4))
    with torch.no_grad():
        model.W_enc[1].copy_(model.W_enc[0])
    x = torch.randn(3000, 16)
    cf = co_firing(model, [x, x.clone()], min_rate=0.0)
    assert np.allclose(cf["cofire"], 1.0)
    assert cf["n_specific"] == {"model0": 0, "model1": 0}
    assert cf["shared_frac"] == 1 - cf["n_dead"] / 32
    with torch.no_grad():                                    # a different second encoder: not total
        model.W_enc[1].copy_(torch.randn(16, 32))
    assert co_firing(model, [x, x], min_rate=0.0)["cofire"][0, 1] < 0.5


def test_unrelated_models_do_not_transfer():
    """Negative control: model b's codes are independent of model a's, so a's code cannot predict b."""
    xs = paired(shared=False)
    model, _ = timed("unrelated", train_universal, UniversalTrainConfig(sae=ucfg(), **TRAIN), xs)
    r2, cf = cross_r2(model, xs), co_firing(model, xs)
    print(f"\nunrelated: cross R2 {np.round(r2, 4).tolist()}, shared_frac {cf['shared_frac']:.3f}, "
          f"cofire {np.round(cf['cofire'], 3).tolist()}")
    assert r2[0, 1] < 0.3 and r2[1, 0] < 0.3
    # each model still reconstructs itself, though 64 latents now serve 2 x 48 unrelated atoms
    assert r2[0, 0] > 0.7 and r2[1, 1] > 0.7
    assert cf["shared_frac"] < 0.2 and cf["cofire"][0, 1] < 0.1


def test_paired_init_aligns_latents_better_than_random_init(universal, shared_data):
    """Independent random atoms per model let training keep a private copy of each concept per model."""
    cfg = UniversalTrainConfig(sae=ucfg(), init="random", **TRAIN)
    model, _ = timed("random_init", train_universal, cfg, shared_data)
    cf_random, cf_paired = co_firing(model, shared_data), universal[3]
    print(f"\nco-firing a->b: paired init {cf_paired['cofire'][0, 1]:.3f}, random init "
          f"{cf_random['cofire'][0, 1]:.3f}")
    assert cf_paired["cofire"][0, 1] > cf_random["cofire"][0, 1] + 0.2
    assert cf_paired["shared_frac"] > cf_random["shared_frac"] + 0.2


def test_a_saved_folder_loads_back_to_the_same_reconstructions_and_is_refused_where_one_model_is_expected(
        universal, shared_data, tmp_path):
    import json

    from interpflow.tasks.sae.saelens import load_folder, load_universal_folder, save_universal_folder

    model = universal[0]
    folder = save_universal_folder(model, tmp_path / "usae", sites=["blocks.1.resid_post"] * 2)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "interpflow.universal" and cfg["d_ins"] == [D1, D2] and cfg["d_sae"] == N_LATENTS
    assert cfg["metadata"]["model_names"] == ["a", "b"]
    back = load_universal_folder(folder)
    assert np.allclose(cross_r2(back, shared_data), cross_r2(model, shared_data), atol=1e-6)
    from safetensors.torch import load_file

    assert load_file(str(folder / "sparsity.safetensors"))["sparsity"].shape == (2, N_LATENTS)
    with pytest.raises(ValueError, match=r"sae.path: .* is a Universal SAE over 2 models \(a, b\).*load_universal_folder"):
        load_folder(folder)
    cfg["d_ins"] = [D1, 0]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"needs d_ins, a list of positive integers"):
        load_universal_folder(folder)
