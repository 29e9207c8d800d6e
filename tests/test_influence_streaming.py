"""The influence workflow's LoGra path and a user's own model and data (issue #32), in process without
Ray: sharded LoGra gradients, projected covariances and EK-FAC eigenvalues reduce to the scores the
single-process path gives; the workflow takes a training set of the user's own without fine-tuning,
derives probe sites from the model's depth, and refuses a model folder without tokenizer files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.influence import PreconditionerConfig, attribution, influence, planted
from interpflow.tasks.influence.logra import fit_projected
from interpflow.tasks.influence.task import CausalLMTask
from interpflow.tasks.models import ModelConfig, load_model
from interpflow.workflows.engine.graph import split_ids

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=120, concept_rate=0.0, max_words=12))
    path = tmp_path_factory.mktemp("lm") / "base"
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=10, n_layer=2, n_positions=128), corpus).save_pretrained(path)
    return str(path)


def test_sharded_logra_statistics_reduce_to_the_single_process_scores(lm):
    data = planted.make_planted(planted.PlantedConfig(n_train=24, n_probe=4, n_query=3, n_heldout=1))
    cfg = attribution.GradientsConfig(method="logra", logra={"rank_in": 4, "rank_out": 6}, batch_size=5)
    loaded = load_model(lm, ModelConfig())
    shards = [attribution.gradient_shard(cfg, s, loaded, data["train"]) for s in split_ids(list(data["train"]["id"]), 3)]
    assert all(s["grads"]["grads"].shape[1] == 2 * 4 * 6 for s in shards)         # c_fc of 2 blocks, 6 x 4 each
    basis = attribution.kfac_basis(cfg, lm, [s["covariance"] for s in shards])["basis"]
    lambdas = attribution.logra_lambdas(cfg, lm, [s["grads"] for s in shards], basis)["lambdas"]
    query = attribution.query_gradients(attribution.QueryConfig(gradients=cfg, site="blocks.1.resid_post"), lm,
                                        data["query"], data["query"], {"direction": torch.randn(64)})
    assert query["classical_each"].shape == (3, 48) and query["classical"].shape == (1, 48)
    out = attribution.gradient_scores(attribution.ScoreConfig(gradients=cfg, preconditioners=["identity", "ekfac"],
                                                              top_k=2),
                                      lm, [s["grads"] for s in shards], query, diagonal=[s["diagonal"] for s in shards],
                                      basis=basis, lambdas=lambdas)   # one node's dict, as the engine passes it
    scores, extremes = out["scores"], out["extremes"]
    assert extremes.num_rows == 2 * 2 * 2 * 3 * 2          # methods x strategies x sides x queries x k
    # the single-process path: every batch in one process, EK-FAC fitted on them, scored with influence()
    logra = attribution.logra_projection(cfg, loaded)
    batches = list(attribution._batches(cfg, loaded, data["train"], list(data["train"]["id"])))
    pre = fit_projected(PreconditionerConfig(strategy="ekfac"), logra, loaded.model, CausalLMTask(), batches)
    train = [logra.grads(loaded.model, CausalLMTask(), b)[0] for b in batches]
    want = influence(query["classical_each"], train, pre)
    rows = {(r["method"], r["id"]): r["score"] for r in scores.to_pylist()}
    w = torch.tensor(want.column("score").to_pylist(), dtype=torch.float64)
    g = torch.tensor([rows[("influence[ekfac]", i)] for i in want.column("id").to_pylist()], dtype=torch.float64)
    assert float(w.abs().max()) > 0
    assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))


def test_users_own_data_without_fine_tuning_depth_sites_and_tokenizer_files(lm, tmp_path):
    from interpflow.workflows.influence import InfluenceStudy, influence_graph, probe_sites, validate

    train = planted.make_planted(planted.PlantedConfig(n_train=12, n_probe=4, n_query=2, n_heldout=1))["train"]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": i + 500, "text": t}) + "\n" for i, t in enumerate(train["text"])))
    cfg = InfluenceStudy.model_validate({"model": {"path": lm}, "train_data": {"path": str(path)}, "fine_tune": False,
                                         "gradients": {"method": "logra", "logra": {"rank_in": 4, "rank_out": 4}}})
    validate(cfg)
    assert probe_sites(cfg) == ["embed", "blocks.0.resid_post", "blocks.1.resid_post", "final_norm"]
    graph = influence_graph(cfg)
    names = {n.name for n in graph}
    assert {"train_data", "gradients", "gradient_scores"} <= names
    assert not {"finetune", "attribution", "influence_report", "covariance"} & names   # no labels, no fine-tune
    model_in = graph["gradients"].inputs["model"]
    assert getattr(model_in, "node", model_in).name == "model"                   # the given model itself

    bare = tmp_path / "no-tokenizer"
    shutil.copytree(lm, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special_tokens*"))
    with pytest.raises(ValueError, match=r"model.path=.*no-tokenizer' has no tokenizer files"):
        validate(cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(bare)})}))
    path.write_text("")
    with pytest.raises(ValueError, match="train_data"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"concept.site='blocks.3.resid_post' is not a site of this 2-block model"):
        probe_sites(InfluenceStudy.model_validate({"lm": {"n_layer": 2}, "concept": {"site": "blocks.3.resid_post"}}))
