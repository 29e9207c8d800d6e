"""LoGra projected gradients and streaming scores (issue #32), without Ray: LoGra against brute force
(the full per-example gradient projected by the Kronecker product of the same two matrices), its
seeding, its projected-space curvature against the projected full curvature, its errors before
compute, and streaming top-k / aggregate scores against the dense score matrix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

from interpflow.tasks.influence import (
    CausalLMTask, ConceptTask, PerExampleGrads, PreconditionerConfig, covariance_stats, influence,
    per_example_grad_dict, select_parameters,
)
from interpflow.tasks.influence.kfac import layer_matrices
from interpflow.tasks.influence.logra import LograConfig, LograProjection, fit_projected
from interpflow.tasks.influence.scores import StreamingScores

torch.set_num_threads(1)

PARAMS = ["transformer.h.*.mlp.*", "transformer.h.*.attn.c_attn.weight"]   # Conv1D weights + biases


def tiny_gpt2(dtype=torch.float32, layers: int = 1) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def lm_batch(n: int = 6, t: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ragged batch (pad token 1) whose first 3 tokens are left out of the loss."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (n, t), generator=gen)
    attn = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        attn[i, :t - (3 * i) % 9] = 1
    loss = attn.clone()
    loss[:, :3] = 0
    ids[attn == 0] = 1
    return {"id": torch.arange(10 * seed, 10 * seed + n), "input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_logra_equals_the_full_gradient_projected_by_the_kronecker_product(dtype):
    model = tiny_gpt2(dtype)
    batch = lm_batch()
    selection = select_parameters(model, PARAMS)
    logra = LograProjection(LograConfig(rank_in=8, rank_out=6, seed=3), model, selection)
    got, _ = logra.grads(model, CausalLMTask(), batch)
    full = per_example_grad_dict(model, CausalLMTask(), batch, selection)
    assert got.ids.tolist() == batch["id"].tolist() and got.grads.shape == (6, 3 * 6 * 8) == (6, logra.dim)
    # brute force: vec(G) of every layer (bias as the last input column) times kron(P_out, P_in)
    brute = torch.cat([layer_matrices(layer, full).double().reshape(6, -1) @ logra.kronecker(layer).T
                       for layer in logra.layers], dim=1)
    scale = float(brute.abs().max())
    assert scale > 1e-3
    assert float((got.grads.double() - brute).abs().max()) <= 1e-5 * max(1.0, scale)
    # the concept measurement (stops at its site; a later layer contributes zeros) matches too
    concept = ConceptTask("blocks.0.resid_post", torch.randn(32, generator=torch.Generator().manual_seed(1)))
    q, _ = logra.grads(model, concept, batch, kind="measurement")
    fq = per_example_grad_dict(model, concept, batch, selection, kind="measurement")
    assert float((q.grads.double() - logra.project_full(fq).double()).abs().max()) <= 1e-5 * max(
        1.0, float(q.grads.abs().max()))


def test_logra_matrices_are_seeded_per_layer_and_the_same_in_another_process(gpt2):
    selection = select_parameters(gpt2, PARAMS)
    a = LograProjection(LograConfig(rank_in=4, rank_out=4, seed=7), gpt2, selection)
    b = LograProjection(LograConfig(rank_in=4, rank_out=4, seed=7), gpt2, selection)
    c = LograProjection(LograConfig(rank_in=4, rank_out=4, seed=8), gpt2, selection)
    layer = a.layers[0]
    assert torch.equal(a.p_in(layer), b.p_in(layer)) and not torch.equal(a.p_in(layer), c.p_in(layer))
    assert not torch.equal(a.p_in(a.layers[0]), a.p_in(a.layers[1])[:, :a.layers[0].width])
    # a fresh interpreter (its own hash seed, no transformers import) draws the same matrices
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from interpflow.tasks.influence import select_parameters
        from interpflow.tasks.influence.logra import LograConfig, LograProjection
        m = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5))
        p = LograProjection(LograConfig(rank_in=3, rank_out=2, seed=7), m, select_parameters(m, ["*"]))
        print(*(repr(float(x)) for l in p.layers for x in (p.p_in(l).sum(), p.p_out(l).sum())))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    torch.manual_seed(123)                                          # global RNG state plays no part
    mlp = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5))
    here = LograProjection(LograConfig(rank_in=3, rank_out=2, seed=7), mlp, select_parameters(mlp, ["*"]))
    assert [float(x) for x in out] == [float(x) for l in here.layers for x in (here.p_in(l).sum(), here.p_out(l).sum())]
    # a row's projection does not depend on the batch it came in
    batch = lm_batch()
    whole, _ = a.grads(gpt2, CausalLMTask(), batch)
    half, _ = a.grads(gpt2, CausalLMTask(), {k: v[3:] for k, v in batch.items()})
    assert torch.allclose(whole.grads[3:], half.grads, atol=1e-6, rtol=1e-5)


def test_projected_curvature_is_the_projection_of_the_full_curvature(gpt2):
    selection = select_parameters(gpt2, PARAMS)
    logra = LograProjection(LograConfig(rank_in=8, rank_out=8), gpt2, selection)
    batches = [lm_batch(seed=0), lm_batch(seed=1)]
    full = covariance_stats(gpt2, CausalLMTask(), batches[0], logra.layers) + \
        covariance_stats(gpt2, CausalLMTask(), batches[1], logra.layers)
    parts = [logra.grads(gpt2, CausalLMTask(), b, covariance=True) for b in batches]
    projected = parts[0][1] + parts[1][1]
    assert projected.examples == full.examples == 12
    for layer in logra.layers:
        k = layer.module
        p_in, p_out = logra.p_in(layer), logra.p_out(layer)
        assert projected.a_count[k] == full.a_count[k]
        assert torch.allclose(projected.a_sum[k], p_in @ full.a_sum[k] @ p_in.T, atol=1e-9, rtol=1e-9)
        assert torch.allclose(projected.s_sum[k], p_out @ full.s_sum[k] @ p_out.T, atol=1e-12, rtol=1e-9)
    # every strategy fits and applies in the projected space; EK-FAC is exact on its own fitting data's
    # diagonal in the eigenbasis, so it differs from K-FAC, and both from identity
    grads = PerExampleGrads.concat([g for g, _ in parts])
    q = grads.grads[:2].double()
    applied = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        pre = fit_projected(PreconditionerConfig(strategy=strategy), logra, gpt2, CausalLMTask(), batches)
        applied[strategy] = pre.apply(q)
        assert applied[strategy].shape == q.shape and torch.isfinite(applied[strategy]).all()
    assert torch.equal(applied["identity"], q)
    for a, b in (("kfac", "ekfac"), ("identity", "kfac"), ("diagonal", "ekfac")):
        assert not torch.allclose(applied[a], applied[b], rtol=1e-3), (a, b)


def test_logra_bad_input_is_refused_before_compute_naming_the_field(gpt2):
    selection = select_parameters(gpt2, PARAMS)
    with pytest.raises(ValueError, match=r"gradients\.logra\.rank_in=40 is larger than the input width 32 of layer 'transformer\.h\.0\.attn\.c_attn'"):
        LograProjection(LograConfig(rank_in=40, rank_out=4), gpt2, selection)
    with pytest.raises(ValueError, match=r"gradients\.logra\.rank_out=200 is larger than the output width"):
        LograProjection(LograConfig(rank_in=4, rank_out=200), gpt2, selection)
    with pytest.raises(ValueError, match=r"gradients\.method=logra projects .* selects transformer\.wte\.weight \(Embedding\); narrow gradients\.params"):
        LograProjection(LograConfig(), gpt2, select_parameters(gpt2, ["transformer.wte.weight"]))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"logra.*0\.weight \(Conv2d\)"):
        LograProjection(LograConfig(), conv, select_parameters(conv, ["*"]))
    with pytest.raises(ValueError, match=r"matches no parameter.*Closest names: transformer\.h\.0\.mlp\.c_fc\.weight"):
        select_parameters(gpt2, ["transformer.h.*.mlp.cfc.weight"])
    with pytest.raises(ValueError, match="query set is empty"):
        influence(torch.zeros(0, 4), PerExampleGrads(torch.arange(3), torch.zeros(3, 4)))


def test_streaming_scores_keep_each_querys_extremes_and_the_mean_without_the_matrix():
    gen = torch.Generator().manual_seed(0)
    n, m, p, k = 50, 5, 12, 4
    g = torch.randn(n, p, generator=gen)
    ids = torch.randperm(n, generator=gen) + 1000
    q = torch.randn(m, p, generator=gen, dtype=torch.float64)
    dense = -(g.double() @ q.T)                                        # the reference matrix (n, m)
    acc = StreamingScores(q, k=k, method="influence[identity]")
    for part in (slice(30, 50), slice(0, 7), slice(7, 30)):     # uneven shards, out of order
        acc.add(PerExampleGrads(ids[part], g[part]))
    table = acc.table()
    assert table.column("id").to_pylist() == sorted(ids.tolist())
    order = torch.argsort(ids)
    assert torch.allclose(torch.tensor(table.column("score").to_pylist(), dtype=torch.float64),
                          dense.mean(dim=1)[order], atol=1e-12)
    # the aggregate equals influence of the mean query, and influence takes shards without concat
    streamed = influence(q, [PerExampleGrads(ids[:20], g[:20]), PerExampleGrads(ids[20:], g[20:])])
    assert torch.allclose(torch.tensor(streamed.column("score").to_pylist(), dtype=torch.float64),
                          dense.mean(dim=1), atol=1e-12)
    ext = acc.extremes().to_pylist()
    for j in range(m):
        for side, largest in (("top", True), ("bottom", False)):
            rows = sorted((r for r in ext if r["query"] == j and r["side"] == side), key=lambda r: r["rank"])
            want = torch.topk(dense[:, j], k, largest=largest)
            assert [r["id"] for r in rows] == ids[want.indices].tolist()
            assert torch.allclose(torch.tensor([r["score"] for r in rows], dtype=torch.float64), want.values)
    # memory: what the accumulator holds is O(m k + n), not n x m
    assert acc.top[0].shape == (m, k) and sum(t.numel() for t in acc._mean) == n


def test_true_fisher_labels_are_sampled_per_example_id_outside_vmap_and_change_the_curvature(gpt2):
    from interpflow.tasks.influence.task import sample_labels

    batch = lm_batch(n=6)
    sampled = sample_labels(gpt2, batch, seed=4)
    again = sample_labels(gpt2, {k: v[2:] for k, v in batch.items()}, seed=4)     # another split, same ids
    assert torch.equal(sampled["labels"][2:], again["labels"])
    assert not torch.equal(sample_labels(gpt2, batch, seed=5)["labels"], sampled["labels"])
    real = batch["attention_mask"].bool()
    assert (sampled["labels"][:, 1:][real[:, 1:]] != batch["input_ids"][:, 1:][real[:, 1:]]).float().mean() > 0.5
    task = CausalLMTask()
    assert not torch.allclose(task.train_loss(gpt2, sampled), task.train_loss(gpt2, batch))
    selection = select_parameters(gpt2, PARAMS)
    # the sampled-label loss goes through vmap like any task input, and LoGra agrees with it there too
    logra = LograProjection(LograConfig(rank_in=4, rank_out=4), gpt2, selection)
    got, true_cov = logra.grads(gpt2, task, sampled, covariance=True)
    assert float((got.grads - logra.project_full(per_example_grad_dict(gpt2, task, sampled, selection))).abs().max()) < 1e-5
    _, emp_cov = logra.grads(gpt2, task, batch, covariance=True)
    k = logra.layers[0].module
    assert torch.equal(true_cov.a_sum[k], emp_cov.a_sum[k])          # same inputs: A is the same
    assert not torch.allclose(true_cov.s_sum[k], emp_cov.s_sum[k], rtol=1e-2)


def test_gradient_method_config_names_the_field():
    from pydantic import ValidationError

    from interpflow.tasks.influence.attribution import GradientsConfig
    from interpflow.tasks.influence.projection import ProjectionConfig

    assert GradientsConfig().method == "full" and GradientsConfig().projection is None
    assert GradientsConfig(projection=ProjectionConfig(dim=8)).method == "dense_projection"
    assert GradientsConfig(method="dense_projection").projection == ProjectionConfig()
    with pytest.raises(ValidationError, match="gradients.method=full but gradients.projection is set"):
        GradientsConfig(method="full", projection=ProjectionConfig(dim=8))
    with pytest.raises(ValidationError, match="drop gradients.projection"):
        GradientsConfig(method="logra", projection=ProjectionConfig(dim=8))
    with pytest.raises(ValidationError, match="fisher"):
        GradientsConfig(fisher="sampled")
