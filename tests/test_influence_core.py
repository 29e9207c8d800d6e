"""Training-data attribution core (issue #6): per-example gradients under torch.func against an
autograd loop, the seeded projection, parameter selection errors, K-FAC/EK-FAC against exact curvature,
influence against exact inverse-Hessian influence and leave-one-out retraining, and the concept
measurement against a hook-free projection and finite differences. No Ray."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import safetensors.torch
import torch
import transformers
from scipy.stats import spearmanr
from torch import nn

from interpflow.tasks.influence import (
    CausalLMTask, ConceptTask, CovarianceStats, DiagonalStats, GradConfig, KroneckerBasis, KroneckerStats,
    LambdaStats, LogisticConfig, LogisticTask, ParamSelection, PerExampleGrads, PreconditionerConfig, ProjectionConfig,
    RandomProjection, Task, auc, classical_influence, compute_grads, concept_influence, covariance_stats,
    eigendecompose, embedding_similarity, exact_hessian, exact_influence, fit, fit_on_batches, influence,
    kronecker_layers, lambda_stats, leave_one_out, logistic_hessian, loop_per_example_grads, make_logistic_problem,
    per_example_grad_dict, per_example_grads, precision_at_k, probe_scores, random_scores, select_parameters,
    spearman_table, sum_stats,
)
from interpflow.tasks.influence.kfac import scatter_layer
from interpflow.tasks.sites import SiteMap, capture

torch.set_num_threads(1)

SITE = "blocks.0.resid_post"
GPT2_PARAMS = ["transformer.h.*.mlp.*", "transformer.h.*.attn.c_attn.weight", "transformer.wte.weight"]


def tiny_gpt2(dtype=torch.float32) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def lm_batch(n: int = 6, t: int = 16, seed: int = 0, left: bool = False) -> dict[str, torch.Tensor]:
    """Token batch with ragged lengths padded with token 1 (right, or left), and a loss mask that skips
    each example's 3-token 'prompt'."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (n, t), generator=gen)
    lengths = [t - (3 * i) % 9 for i in range(n)]
    attn = torch.zeros(n, t, dtype=torch.long)
    loss = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        span = slice(t - length, t) if left else slice(0, length)
        attn[i, span] = 1
        loss[i, span] = 1
        loss[i, span.start:span.start + 3] = 0
    ids[attn == 0] = 1
    return {"id": torch.arange(100 + 10 * seed, 100 + 10 * seed + n), "input_ids": ids,
            "attention_mask": attn, "loss_mask": loss}


def scores_of(table: pa.Table) -> torch.Tensor:
    return torch.tensor(table.column("score").to_pylist(), dtype=torch.float64)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def direction():
    return torch.randn(32, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- (a) vmap == per-example autograd loop

@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_vmap_grads_equal_autograd_loop_on_gpt2(gpt2, direction, left):
    selection = select_parameters(gpt2, GPT2_PARAMS)
    batch = lm_batch(left=left)
    gpt2.train()                                     # dropout on: grads must still be computed in eval mode
    diffs = {}
    for name, task, kind in [("loss", CausalLMTask(), "train_loss"),
                             ("concept", ConceptTask(SITE, direction), "measurement")]:
        fast = per_example_grad_dict(gpt2, task, batch, selection, kind=kind)
        slow = loop_per_example_grads(gpt2, task, batch, selection, kind=kind)
        diffs[name] = max_diff(fast, slow)
        assert all(float(v.abs().max()) > 0 for v in fast.values()), f"{name}: a selected parameter got no gradient"
    print(f"\nGPT-2 ({'left' if left else 'right'} padding) max |vmap - loop|: {diffs}")
    assert max(diffs.values()) <= 1e-5
    assert gpt2.training and gpt2.config._attn_implementation == "sdpa"     # modes restored
    gpt2.eval()


def test_padding_does_not_change_an_examples_gradient(gpt2):
    """A right-padded example's gradient equals the gradient of the same example without padding."""
    selection = select_parameters(gpt2, GPT2_PARAMS)
    batch = lm_batch()
    padded = per_example_grad_dict(gpt2, CausalLMTask(), batch, selection)
    for i in (1, 2, 5):
        length = int(batch["attention_mask"][i].sum())
        assert length < 16
        alone = {k: v[i:i + 1, :length] for k, v in batch.items() if k != "id"}
        single = per_example_grad_dict(gpt2, CausalLMTask(), {**alone, "id": batch["id"][i:i + 1]}, selection)
        assert max_diff({k: v[i] for k, v in padded.items()}, {k: v[0] for k, v in single.items()}) <= 1e-5


def test_vmap_grads_equal_autograd_loop_on_mlp():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    class Classify(Task):
        def train_loss(self, model, batch):
            return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    batch = {"id": torch.arange(9), "x": torch.randn(9, 6), "y": torch.randint(0, 4, (9,))}
    selection = select_parameters(mlp, ["0.*", "2.weight"])
    fast = per_example_grad_dict(mlp, Classify(), batch, selection, chunk_size=4)
    slow = loop_per_example_grads(mlp, Classify(), batch, selection)
    print(f"\nMLP max |vmap - loop|: {max_diff(fast, slow):.2e}")
    assert max_diff(fast, slow) <= 1e-5
    out = per_example_grads(mlp, Classify(), batch, selection)
    assert out.grads.dtype == torch.float32 and out.grads.shape == (9, selection.numel)
    assert torch.equal(out.ids, batch["id"])


def test_batch_errors_name_the_key(gpt2):
    selection = select_parameters(gpt2, ["transformer.h.0.mlp.c_fc.weight"])
    batch = lm_batch()
    with pytest.raises(ValueError, match="no 'id' key"):
        per_example_grads(gpt2, CausalLMTask(), {k: v for k, v in batch.items() if k != "id"}, selection)
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] must be a tensor with 6 rows"):
        per_example_grads(gpt2, CausalLMTask(), {**batch, "loss_mask": batch["loss_mask"][:3]}, selection)
    with pytest.raises(ValueError, match="has width 32 but the direction has 7 entries"):
        per_example_grads(gpt2, ConceptTask(SITE, torch.ones(7)), batch, selection, kind="measurement")


# ---------------------------------------------------------------------------- (b) the seeded projection

PROJ_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    from interpflow.tasks.influence import ParamSelection, ProjectionConfig, RandomProjection
    sel = ParamSelection(("a.weight", "b.bias"), ((40, 30), (70000,)))
    proj = RandomProjection(ProjectionConfig(dim=16, seed=7), sel)
    g = torch.randn(5, sel.numel, generator=torch.Generator().manual_seed(3))
    digest = hashlib.sha256()
    for name in sel.names:
        digest.update(proj.matrix(name).numpy().tobytes())
    digest.update(proj.project_flat(g).numpy().tobytes())
    print(digest.hexdigest())
""")


def test_projection_is_seeded_and_the_same_across_splits_orders_and_processes():
    sel = ParamSelection(("a.weight", "b.bias"), ((40, 30), (70000,)))       # b.bias spans two chunks
    cfg = ProjectionConfig(dim=16, seed=7)
    proj, again = RandomProjection(cfg, sel), RandomProjection(cfg, sel)
    g = torch.randn(5, sel.numel, generator=torch.Generator().manual_seed(3))
    whole = proj.project_flat(g)
    # another instance, rows split in two batches and presented in reverse order
    parts = [again.project_flat(g[3:]), again.project_flat(g[:3])]
    assert torch.equal(torch.cat([parts[1], parts[0]]), whole)
    assert torch.equal(again.project_flat(g[[4, 0, 2]]), whole[[4, 0, 2]])
    other_seed = RandomProjection(ProjectionConfig(dim=16, seed=8), sel)
    assert not torch.equal(other_seed.matrix("a.weight"), proj.matrix("a.weight"))
    # another process (fresh interpreter, fresh generator state) computes the same bytes
    digest = hashlib.sha256()
    for name in sel.names:
        digest.update(proj.matrix(name).numpy().tobytes())
    digest.update(whole.numpy().tobytes())
    out = subprocess.run([sys.executable, "-c", PROJ_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest.hexdigest()
    # Johnson-Lindenstrauss scale: E||P g||^2 = ||g||^2
    wide = RandomProjection(ProjectionConfig(dim=512, seed=0), sel).project_flat(g)
    ratio = wide.pow(2).sum(1) / g.pow(2).sum(1)
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio


def test_projected_grads_do_not_depend_on_batch_split(gpt2):
    cfg = GradConfig(params=["transformer.h.*.mlp.c_fc.weight"], projection=ProjectionConfig(dim=32, seed=1))
    batch = lm_batch(n=6)
    whole = compute_grads(cfg, gpt2, CausalLMTask(), batch)
    order = [5, 2, 0]
    part = compute_grads(cfg, gpt2, CausalLMTask(), {k: v[order] for k, v in batch.items()})
    assert whole.grads.shape == (6, 32) and whole.grads.dtype == torch.float32
    assert torch.equal(part.ids, batch["id"][order])
    torch.testing.assert_close(part.grads, whole.grads[order], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- (c) parameter selection errors

def test_pattern_matching_nothing_lists_the_closest_names(gpt2):
    with pytest.raises(ValueError) as err:
        select_parameters(gpt2, ["transformer.h.*.mlp.c_fc.weight", "transformer.h.*.mlp.cfc.weight"])
    message = str(err.value)
    assert "'transformer.h.*.mlp.cfc.weight' matches no parameter of GPT2LMHeadModel" in message
    assert message.index("Closest names: transformer.h.0.mlp.c_fc.weight") < message.index("pick names from")
    assert "fix the pattern" in message
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_parameters(gpt2, ["re:transformer.h.(0"])
    sel = select_parameters(gpt2, [r"re:transformer\.h\.0\.mlp\.c_(fc|proj)\.weight"])
    assert sel.names == ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight")


def test_kfac_rejects_parameters_outside_linear_layers(gpt2):
    sel = select_parameters(gpt2, ["transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.bias"])
    with pytest.raises(ValueError, match=r"ln_1.weight \(LayerNorm\).*c_fc.bias \(bias without its weight\)"
                                         r".*strategy=diagonal"):
        kronecker_layers(gpt2, sel)


# ----------------------------------------------------------------------------- (d) K-FAC and EK-FAC

class Regression(Task):
    def train_loss(self, model, batch):
        return 0.5 * (model(batch["x"]) - batch["t"]).pow(2).sum(-1)


def empirical_fisher(model, task, batch, selection) -> torch.Tensor:
    g = selection.flatten(per_example_grad_dict(model, task, batch, selection)).double()
    return g.T @ g / g.shape[0]


def test_kfac_and_ekfac_are_exact_when_inputs_and_output_gradients_are_independent():
    """A linear layer (weight + bias, MSE loss) on a product design: every input x_a paired with every
    residual r_b. Then the empirical Fisher is exactly S (x) A, so K-FAC and EK-FAC reproduce it (to
    float64 rounding) and, with damping 0, invert it."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    inputs = torch.randn(6, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    residuals = torch.randn(5, 3, dtype=torch.float64)
    x, r = inputs.repeat_interleave(5, dim=0), residuals.repeat(6, 1)
    with torch.no_grad():
        batch = {"id": torch.arange(30), "x": x, "t": layer(x) - r}
    selection = select_parameters(layer, ["*"])
    fisher = empirical_fisher(layer, Regression(), batch, selection)
    v = torch.randn(4, selection.numel, dtype=torch.float64)
    for strategy in ("kfac", "ekfac"):
        pre = fit_on_batches(PreconditionerConfig(strategy=strategy, absolute_damping=0.0), layer, Regression(),
                             [batch], selection)
        rel = float((pre.dense() - fisher).norm() / fisher.norm())
        inv = float((pre.apply(v @ fisher) - v).norm() / v.norm())
        print(f"\n{strategy}: ||approx - F|| / ||F|| = {rel:.1e}, ||P^-1 F v - v|| / ||v|| = {inv:.1e}")
        assert rel < 1e-10 and inv < 1e-8


def test_ekfac_approaches_the_exact_fisher_inverse_and_never_fits_worse_than_kfac():
    """Linear regression at its least-squares optimum, Gaussian inputs with unequal scales and correlated
    noise independent of x: F = S (x) A holds in expectation, so with n = 4000 and damping 0 the inverse-
    Fisher-vector products of K-FAC/EK-FAC are close to the exact ones (diagonal is far off). With
    heteroscedastic noise K-FAC is biased, and EK-FAC (the best diagonal in K-FAC's eigenbasis) fits F at
    least as well in Frobenius norm, as it must."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    layer = nn.Linear(4, 3).double()
    selection = select_parameters(layer, ["*"])
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0, 0], [0.5, 1, 0], [0, 0.3, 0.5]], dtype=torch.float64).T
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    report = {}
    for case, eps in [("iid", noise), ("hetero", noise * (1 + x[:, :1].abs()))]:
        t = x @ w.T + eps
        solution = torch.linalg.lstsq(design, t).solution
        with torch.no_grad():
            layer.weight.copy_(solution[:4].T)
            layer.bias.copy_(solution[4])
        batch = {"id": torch.arange(n), "x": x, "t": t}
        fisher = empirical_fisher(layer, Regression(), batch, selection)
        v = torch.randn(16, selection.numel, generator=gen, dtype=torch.float64)
        exact = torch.linalg.solve(fisher, v.T).T
        for strategy in ("diagonal", "kfac", "ekfac"):
            pre = fit_on_batches(PreconditionerConfig(strategy=strategy, absolute_damping=0.0), layer, Regression(),
                                 [batch], selection)
            report[case, strategy, "inverse"] = float((pre.apply(v) - exact).norm() / exact.norm())
            if strategy != "diagonal":
                report[case, strategy, "frobenius"] = float((pre.dense() - fisher).norm() / fisher.norm())
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in report.items()))
    assert report["iid", "kfac", "inverse"] < 0.15 and report["iid", "ekfac", "inverse"] < 0.1
    assert report["iid", "diagonal", "inverse"] > 0.3
    for case in ("iid", "hetero"):
        assert report[case, "ekfac", "frobenius"] <= report[case, "kfac", "frobenius"] + 1e-12


def roundtrip(stats, load):
    """Through safetensors bytes, as a shard's statistics travel through the store."""
    return load(safetensors.torch.load(safetensors.torch.save(stats.to_tensors())))


def test_ekfac_on_gpt2_conv1d_with_padding_and_shards_summed(gpt2):
    """GPT-2 Conv1D (weight stored transposed) with its bias, padded sequences: statistics summed over two
    shards equal those of the whole batch, survive a safetensors round trip, and EK-FAC's eigenvalues are the
    diagonal of the exact empirical Fisher in the Kronecker eigenbasis (so its Frobenius fit beats K-FAC's)."""
    selection = select_parameters(gpt2, ["transformer.h.0.attn.c_proj.*"])
    layers = kronecker_layers(gpt2, selection)
    assert [(l.d_in, l.d_out, l.transposed, l.bias is not None) for l in layers] == [(32, 32, True, True)]
    task, batch = CausalLMTask(), lm_batch(n=8)
    halves = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]
    whole = covariance_stats(gpt2, task, batch, layers)
    summed = roundtrip(sum_stats(covariance_stats(gpt2, task, h, layers) for h in halves), CovarianceStats.from_tensors)
    key = layers[0].module
    assert whole.a_count[key] == float(batch["attention_mask"].sum()) == summed.a_count[key]
    torch.testing.assert_close(summed.a_sum[key], whole.a_sum[key])
    torch.testing.assert_close(summed.s_sum[key], whole.s_sum[key])
    basis = roundtrip(eigendecompose(whole, layers), lambda t: KroneckerBasis.from_tensors(t, layers))
    grads = [per_example_grads(gpt2, task, h, selection).grads for h in halves]
    lambdas = roundtrip(sum_stats(lambda_stats(basis, g, selection) for g in grads), LambdaStats.from_tensors)
    torch.testing.assert_close(lambdas.sum_sq[key], lambda_stats(basis, torch.cat(grads), selection).sum_sq[key])
    diag = roundtrip(sum_stats(DiagonalStats.of(g) for g in grads), DiagonalStats.from_tensors)
    torch.testing.assert_close(diag.sum_sq, DiagonalStats.of(torch.cat(grads)).sum_sq)

    g = torch.cat(grads).double()
    fisher = g.T @ g / g.shape[0]
    cfg = PreconditionerConfig(strategy="ekfac", absolute_damping=0.0)
    ekfac = fit(cfg, KroneckerStats(selection, basis, lambdas))
    kfac = fit(cfg.model_copy(update={"strategy": "kfac"}), KroneckerStats(selection, basis))
    err = {p.strategy: float((p.dense() - fisher).norm() / fisher.norm()) for p in (kfac, ekfac)}
    print(f"\nGPT-2 attn.c_proj Frobenius error vs empirical Fisher: {err}")
    assert err["ekfac"] <= err["kfac"]
    # EK-FAC's eigenvalues are diag(Q^T F Q) for the Kronecker eigenvectors q_s q_a^T written in the flat
    # layout (Conv1D transposed, bias as the last input column): checks the layout end to end
    qs, qa = basis.qs[key], basis.qa[key]
    mats = torch.einsum("ao,bi->oiab", qs, qa).reshape(-1, qs.shape[0], qa.shape[0])
    flat = {}
    scatter_layer(layers[0], mats, flat)
    q = selection.flatten(flat)                                                # (out * width, p)
    torch.testing.assert_close(torch.einsum("kp,pq,kq->k", q, fisher, q), ekfac.eigenvalues[key].reshape(-1))


# ------------------------------------------------------------------- (e) exact influence and Spearman

def test_influence_against_exact_hessian_and_leave_one_out():
    problem = make_logistic_problem(LogisticConfig(n=200, d=12, seed=0))
    model, task, cfg = problem.model, LogisticTask(), problem.cfg
    selection = select_parameters(model, ["*"])
    hessian = exact_hessian(model, task, problem.train, selection)
    assert float((hessian - logistic_hessian(problem)).abs().max()) < 1e-12      # autograd == closed form
    train = per_example_grads(model, task, problem.train, selection)
    query = per_example_grads(model, task, problem.query, selection, kind="measurement").grads
    exact = exact_influence(hessian, query, train.grads, cfg.l2)
    picked = list(range(0, cfg.n, 5))
    loo = leave_one_out(problem, picked)
    rho_loo = float(spearmanr(exact[picked], loo).statistic)
    candidates = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        pre = fit_on_batches(PreconditionerConfig(strategy=strategy, absolute_damping=cfg.l2), model, task,
                             [problem.train], selection)
        candidates[strategy] = scores_of(classical_influence(query, train, pre))
    table = spearman_table(exact, candidates)
    print(f"\nexact damped solve vs leave-one-out retraining ({len(picked)} points): Spearman {rho_loo:.4f}")
    print("Spearman vs exact damped influence:", {r["method"]: round(r["spearman"], 4) for r in table.to_pylist()})
    assert rho_loo >= 0.9
    rho = dict(zip(table.column("method").to_pylist(), table.column("spearman").to_pylist()))
    assert rho["ekfac"] >= 0.9 and rho["kfac"] >= 0.9 and rho["ekfac"] >= rho["identity"]


# -------------------------------------------------------------------------- (f) the concept measurement

def test_concept_measurement_equals_the_manual_projection(gpt2, direction):
    batch = lm_batch()
    task = ConceptTask(SITE, direction)
    gpt2.eval()
    with torch.no_grad():
        measured = task.measurement(gpt2, batch)
    site = SiteMap(gpt2).resolve(SITE)
    h = capture(gpt2, [site], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[SITE]
    mask = batch["loss_mask"].double()
    manual = ((h.double() @ direction.double()) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(measured.double(), manual, rtol=1e-5, atol=1e-6)
    # the probe score of a training example is the same quantity (Concept Influence's first-order proxy)
    table = probe_scores(h, batch["loss_mask"], direction, batch["id"], normalize="none")
    torch.testing.assert_close(scores_of(table), manual)


def test_concept_influence_predicts_a_gradient_step_by_finite_differences(direction):
    """Training on example i with a small step (theta - eta g_i) changes the query's concept measurement
    by eta * score_i to first order (identity preconditioner): checks the vmapped concept gradient, the
    hook under torch.func, and the sign convention (positive = pushes the query along v)."""
    model = tiny_gpt2(torch.float64)
    selection = select_parameters(model, ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight"])
    train_batch, query_batch = lm_batch(n=8, seed=1), lm_batch(n=3, seed=2)
    concept = ConceptTask(SITE, direction.double())
    train = per_example_grads(model, CausalLMTask(), train_batch, selection)
    query = per_example_grads(model, concept, query_batch, selection, kind="measurement").grads
    scores = scores_of(concept_influence(query, train, None))

    def f() -> float:
        with torch.no_grad():
            return float(concept.measurement(model, query_batch).mean())

    eta, base = 1e-4, f()
    params = dict(model.named_parameters())
    steps = selection.unflatten(train.grads.double())
    delta = []
    for i in range(8):
        with torch.no_grad():
            for name in selection.names:
                params[name] -= eta * steps[name][i]
            delta.append((f() - base) / eta)
            for name in selection.names:
                params[name] += eta * steps[name][i]
    delta = torch.tensor(delta, dtype=torch.float64)
    print(f"\nfinite-difference vs concept influence: {np.round(delta.numpy(), 4)} vs {np.round(scores.numpy(), 4)}")
    assert float(spearmanr(delta, scores).statistic) > 0.95
    torch.testing.assert_close(delta, scores, rtol=2e-2, atol=2e-2 * float(scores.abs().max()))


def test_projected_influence_tracks_unprojected_influence(gpt2, direction):
    selection = select_parameters(gpt2, ["transformer.h.0.mlp.c_fc.weight"])
    projection = RandomProjection(ProjectionConfig(dim=1024, seed=0), selection)
    train_batch = lm_batch(n=12, seed=3)
    full = per_example_grads(gpt2, CausalLMTask(), train_batch, selection)
    small = per_example_grads(gpt2, CausalLMTask(), train_batch, selection, projection=projection)
    query = per_example_grads(gpt2, ConceptTask(SITE, direction), lm_batch(n=2, seed=4), selection,
                              kind="measurement").grads
    exact = scores_of(concept_influence(query, full))
    approx = scores_of(concept_influence(query, small, projection=projection))
    # Johnson-Lindenstrauss: the error of each projected dot product is ~ ||q|| ||g_i|| / sqrt(dim)
    scale = query.double().mean(0).norm() * full.grads.double().norm(dim=1) / 1024 ** 0.5
    worst = float(((approx - exact).abs() / scale).max())
    print(f"\nprojected vs exact concept influence: max error / JL scale = {worst:.2f}, "
          f"Spearman {spearmanr(exact, approx).statistic:.3f}")
    assert bool(((approx - exact).abs() <= 4 * scale).all())
    with pytest.raises(ValueError, match="pass projection= when only the training gradients were projected"):
        influence(query, small)
    with pytest.raises(ValueError, match="needs unprojected per-example gradients"):
        fit_on_batches(PreconditionerConfig(strategy="ekfac"), gpt2, CausalLMTask(), [train_batch], selection
                       ).apply(small.grads)


# --------------------------------------------------------------------------------- tables and metrics

def test_score_tables_and_ranking_metrics():
    ids = torch.arange(10, 20)
    planted = [10, 11, 12]
    table = influence(torch.ones(1, 1), PerExampleGrads(ids, -torch.arange(10.0, 0, -1)[:, None]))
    assert table.schema == pa.schema([("id", pa.int64()), ("score", pa.float64()), ("method", pa.string())])
    assert table.column("score").to_pylist() == [float(s) for s in range(10, 0, -1)]
    assert auc(table, planted) == 1.0 and precision_at_k(table, planted, 3) == 1.0
    assert precision_at_k(table, planted, 5) == 0.6
    reverse = pa.table({"id": ids.numpy(), "score": np.arange(10.0), "method": ["x"] * 10})
    assert auc(reverse, planted) == 0.0
    ties = pa.table({"id": ids.numpy(), "score": np.zeros(10), "method": ["x"] * 10})
    assert auc(ties, planted) == 0.5
    assert random_scores(ids, seed=3).equals(random_scores(ids, seed=3))
    assert not random_scores(ids, seed=3).equals(random_scores(ids, seed=4))
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auc(table, [99])
    with pytest.raises(ValueError, match="k=11 must be between 1"):
        precision_at_k(table, planted, 11)


def test_probe_variants_and_embedding_similarity():
    gen = torch.Generator().manual_seed(0)
    v = torch.tensor([3.0, 0.0, 0.0, 0.0])
    acts = torch.randn(6, 5, 4, generator=gen)
    acts[:2, :, 0] += 4.0                                    # examples 0, 1 express the concept
    mask = torch.ones(6, 5)
    mask[:, 4] = 0
    ids = torch.arange(6)
    unit = probe_scores(acts, mask, v, ids)
    assert unit.column("method")[0].as_py() == "probe" and auc(unit, [0, 1]) == 1.0
    raw = probe_scores(acts, mask, v, ids, normalize="none").column("score").to_numpy()
    np.testing.assert_allclose(raw, 3 * unit.column("score").to_numpy())
    expected = (acts[..., 0] * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(unit.column("score").to_numpy(), expected.double().numpy(), rtol=1e-6)
    cosine = probe_scores(acts, mask, v, ids, normalize="cosine").column("score").to_numpy()
    assert np.all(np.abs(cosine) <= 1)
    diff = probe_scores(acts, mask, v, ids, reference_acts=acts, reference_mask=mask)
    assert diff.column("method")[0].as_py() == "probe_difference"
    np.testing.assert_allclose(diff.column("score").to_numpy(), 0.0, atol=1e-12)
    flipped = probe_scores(acts, mask, v, ids, sign=-1)
    assert auc(flipped, [0, 1]) == 0.0
    sim = embedding_similarity(acts, mask, acts[:2], mask[:2], ids)
    assert sim.column("method")[0].as_py() == "embedding_cosine" and auc(sim, [0, 1]) == 1.0
    with pytest.raises(ValueError, match="have no unmasked token"):
        probe_scores(acts, torch.zeros(6, 5), v, ids)
