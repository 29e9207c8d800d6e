"""The pieces of the influence workflow, without Ray: the planted data, fine-tuning and its exact
resume, concept directions, token-row regrouping, method evaluation and removal choices (issue #6)."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.finetune import FinetuneConfig, finetune
from interpflow.tasks.influence import attribution, benchmark, planted
from interpflow.tasks.influence.concept import ConceptConfig, fit_concept, read_direction
from interpflow.tasks.influence.scores import score_table
from interpflow.workflows.engine.training import LocalTrainContext


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory):
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=300, concept_rate=0.0, max_words=12))
    path = tmp_path_factory.mktemp("lm") / "base"
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=60, n_layer=2, n_positions=128), corpus).save_pretrained(path)
    return str(path)


def test_planted_sets_are_disjoint_exact_and_carry_the_trait_where_labelled():
    cfg = planted.PlantedConfig(n_train=200, planted_fraction=0.05, n_probe=40, n_query=6, n_heldout=10, seed=3)
    data = planted.make_planted(cfg)
    train = data["train"]
    assert len(planted.planted_ids(train)) == 10 == cfg.n_planted
    dialect = set(planted.DIALECT.values())
    for name in ("train", "probe", "query", "heldout"):
        for text, label in zip(data[name]["text"], data[name]["label"]):
            assert bool(dialect & set(text.split())) == bool(label), (name, text)
    probe = data["probe"]                                                # minimal pairs: each trait text is a
    plain = {t for t, y in zip(probe["text"], probe["label"]) if not y}  # benign probe text in the dialect
    traits = [t for t, y in zip(probe["text"], probe["label"]) if y]
    assert len(traits) == cfg.n_probe // 2 == len(plain)
    assert set(traits) <= set(planted.with_trait(list(plain)))
    ids = [set(data[n]["id"]) for n in ("train", "probe", "query", "heldout")]
    assert sum(map(len, ids)) == len(set().union(*ids))                # no id means two things
    again = planted.make_planted(cfg)
    assert again["train"]["text"] == train["text"]                       # seeded
    other = planted.make_planted(cfg.model_copy(update={"seed": 4}))
    assert planted.planted_ids(other["train"]) != planted.planted_ids(train)


def test_finetune_resumes_exactly_and_leaves_out_excluded_ids(base_lm):
    data = planted.make_planted(planted.PlantedConfig(n_train=80, n_probe=4, n_query=1, n_heldout=1))["train"]
    cfg = FinetuneConfig(steps=12, batch_size=8, checkpoint_every=4)
    whole = LocalTrainContext()
    uninterrupted = finetune(cfg, whole, base_lm, data)
    assert [c["step"] for c in whole.checkpoints] == [4, 8, 12]
    resumed = finetune(cfg, LocalTrainContext(resume_from=whole.checkpoints[0]), base_lm, data)
    assert resumed["metrics"]["resumed_from_step"] == 4
    a, b = uninterrupted["model"].model.state_dict(), resumed["model"].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                     # same batches, same AdamW moments

    fewer = finetune(cfg, LocalTrainContext(), base_lm, data, exclude=list(range(40)))
    assert fewer["metrics"]["examples"] == 40 and fewer["metrics"]["excluded"] == 40
    with pytest.raises(ValueError, match="every one of the 80 examples is excluded"):
        finetune(cfg, LocalTrainContext(), base_lm, data, exclude=list(range(80)))


def test_lora_trains_only_adapters_resumes_exactly_and_merges_into_a_plain_model(base_lm):
    import transformers

    data = planted.make_planted(planted.PlantedConfig(n_train=80, n_probe=4, n_query=1, n_heldout=1))["train"]
    cfg = FinetuneConfig(steps=12, batch_size=8, checkpoint_every=4, method="lora", lr=1e-2,
                         lora={"r": 4, "target_modules": ["c_attn"]})
    whole = LocalTrainContext()
    tuned = finetune(cfg, whole, base_lm, data)
    assert all(k.startswith("param.") and "lora_" in k for k in whole.checkpoints[0] if k.startswith("param."))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_lm).state_dict()
    merged = tuned["model"].model.state_dict()
    assert set(merged) == set(base)                                      # merged: no adapter left
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("attn.c_attn.weight") for k in changed)
    assert tuned["metrics"]["trainable_params"] == 2 * 4 * (64 + 3 * 64)      # r x (in + out) in each of 2 blocks
    resumed = finetune(cfg, LocalTrainContext(resume_from=whole.checkpoints[0]), base_lm, data)
    again = resumed["model"].model.state_dict()
    assert all(torch.allclose(merged[k], again[k], atol=1e-6) for k in merged)
    with pytest.raises(ValueError, match="finetune.lora"):
        finetune(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": ["nope"]})}),
                 LocalTrainContext(), base_lm, data)


def test_too_long_training_text_is_an_error_naming_the_id_or_is_truncated_and_counted(base_lm):
    data = planted.make_planted(planted.PlantedConfig(n_train=20, n_probe=4, n_query=1, n_heldout=1))["train"]
    strict = FinetuneConfig(steps=1, batch_size=2, max_length=6, too_long="error")
    with pytest.raises(ValueError, match=r"longer than max_length=6 tokens \(first: id 0,"):
        finetune(strict, LocalTrainContext(), base_lm, data)
    out = finetune(strict.model_copy(update={"too_long": "truncate"}), LocalTrainContext(), base_lm, data)
    assert out["metrics"]["truncated"] == 20
    with pytest.raises(ValueError, match="exceeds the model's maximum of 128 tokens"):
        finetune(strict.model_copy(update={"max_length": 4096}), LocalTrainContext(), base_lm, data)


def test_concept_direction_points_from_label_0_to_1_and_user_vectors_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros(8)
    truth[2] = 1.0
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    x = rng.normal(size=(100, 8)) + 3 * y[:, None] * truth
    rows = pads.dataset(pa.table({"id": np.arange(100), "position": np.zeros(100, np.int32),
                                  "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), 8)}))
    data = {"id": list(range(100)), "label": y.tolist()}
    for kind in ("mean_difference", "probe"):
        out = fit_concept(ConceptConfig(direction=kind), rows, datasets.Dataset.from_dict(data))
        v = out["direction"]["direction"].numpy()
        assert abs(np.linalg.norm(v) - 1) < 1e-9 and v[2] > 0.9, kind
        assert out["metrics"]["probe_accuracy"] > 0.9
        card = out["card"]  # the open card beside the direction (#30): kind, site in both spellings, norm, fit
        assert card["kind"] == "probe_direction" and card["fitted"]["method"] == kind
        assert card["vectors"]["direction"] == {"site": "final_norm", "transformer_lens": "ln_final.hook_normalized",
                                                "norm": pytest.approx(1.0), "d": 8}
    from safetensors.torch import save_file

    save_file({"direction": torch.zeros(8)}, str(tmp_path / "zero.safetensors"))
    with pytest.raises(ValueError, match="zero or has NaN"):
        read_direction(str(tmp_path / "zero.safetensors"))
    with pytest.raises(ValueError, match="cannot read"):
        read_direction(str(tmp_path / "missing.safetensors"))


def test_token_rows_regroup_into_padded_examples_in_position_order():
    ids = np.array([7, 3, 7, 3, 3])
    positions = np.array([1, 2, 0, 0, 1], np.int32)
    vectors = np.arange(10, dtype=np.float32).reshape(5, 2)
    table = pa.table({"id": ids, "position": positions,
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 2)})
    unique, acts, mask = attribution.padded_by_id(table)
    assert unique.tolist() == [3, 7]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert acts[0, :, 0].tolist() == [6.0, 8.0, 2.0]                  # id 3 at positions 0, 1, 2
    assert acts[1, :2, 0].tolist() == [4.0, 0.0]                      # id 7 at positions 0, 1


def test_evaluation_ranks_methods_and_removal_takes_top_k_or_seeded_random():
    train = {"id": list(range(20)), "label": [1] * 3 + [0] * 17}
    ids = np.arange(20)
    perfect = score_table(ids, -ids.astype(float), "concept_influence[ekfac]")      # planted 0,1,2 first
    backwards = score_table(ids, ids.astype(float), "probe")
    out = benchmark.evaluate_methods(benchmark.EvaluateConfig(), train, perfect, backwards,
                                     gradients=[{"compute_s": 2.0}, {"compute_s": 1.0}],
                                     query_gradients={"compute_s": 0.5},
                                     gradient_scores={"score_s.ekfac": 0.25}, covariance=[{"compute_s": 1.0}],
                                     kfac_basis={"compute_s": 0.1}, ekfac_lambdas=[{"compute_s": 1.0}],
                                     train_activations=[{"compute_s": 0.2}], concept={"compute_s": 0.05},
                                     activation_scores={"probe_score_s": 0.01})
    rows = {r["method"]: r for r in out["methods"].to_pylist()}
    assert rows["concept_influence[ekfac]"]["auc"] == 1.0 and rows["probe"]["auc"] == 0.0
    assert rows["concept_influence[ekfac]"]["precision_at_k"] == 1.0 and out["rankings"]["k"] == 3
    assert rows["concept_influence[ekfac]"]["seconds"] == pytest.approx(3 + 0.5 + 0.25 + 1.1 + 1.0)
    assert rows["probe"]["seconds"] == pytest.approx(0.26)
    rankings = out["rankings"]
    assert benchmark.removal_ids(benchmark.RemovalChoice(method="concept_influence[ekfac]"), rankings) == [0, 1, 2]
    first = benchmark.removal_ids(benchmark.RemovalChoice(method="random", seed=0), rankings)
    assert len(set(first)) == 3 and first == benchmark.removal_ids(benchmark.RemovalChoice(method="random"), rankings)
    assert first != benchmark.removal_ids(benchmark.RemovalChoice(method="random", seed=1), rankings)
    with pytest.raises(ValueError, match="'nope' was not scored"):
        benchmark.removal_ids(benchmark.RemovalChoice(method="nope"), rankings)
