"""The `influence` workflow on local Ray (issue #6): a driver killed inside the per-example-gradient
node resumes shard by shard to the same scores, every method is scored against the planted ids,
lineage reaches from the scores back to the model, concept, gradients and data, bad input fails
before compute, and DeepSpeed fine-tuning runs on the same Ray Train workers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill, settled

SMALL = {"workflow": "influence", "planted": {"n_train": 96, "n_probe": 60, "n_query": 8, "n_heldout": 16},
         "lm": {"steps": 100, "n_layer": 2}, "finetune": {"steps": 30, "checkpoint_every": 15}, "num_shards": 6,
         "probe_sites": ["blocks.1.resid_post", "final_norm"],
         "removal": {"methods": ["concept_influence[ekfac]"], "random_seeds": [0]}}
METHODS = {f"{m}[{p}]" for m in ("influence", "concept_influence") for p in ("identity", "diagonal", "ekfac")} | {
    "probe", "probe_cosine", "embedding_cosine", "random"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ancestors(client: MlflowClient, parent_run: str, start: str) -> set[str]:
    """Node names reachable from `start` by following the upstream-key tags of the node runs."""
    runs = client.search_runs([client.get_run(parent_run).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run}'")
    by_name = {r.data.tags["interpflow.node"]: r for r in runs}
    by_key = {r.data.tags["interpflow.key"]: name for name, r in by_name.items()}
    seen, frontier = set(), [start]
    while frontier:
        name = frontier.pop()
        for key in json.loads(by_name[name].data.tags["interpflow.upstream_keys"]).values():
            if by_key[key] not in seen:
                seen.add(by_key[key])
                frontier.append(by_key[key])
    return seen


def test_killed_gradient_node_resumes_missing_shards_to_the_same_scores(tmp_path):
    store = tmp_path / "store"
    spec = tmp_path / "influence.yaml"
    spec.write_text(yaml.safe_dump({**SMALL, "run": {"store": str(store),
                                                     "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))

    def mid_gradients() -> bool:
        return bool(list(store.glob("gradients/*/shard-*/_manifest.json"))) and \
            not list(store.glob("gradients/*/_manifest.json"))

    run_then_kill(spec, tmp_path, mid_gradients, timeout=500, poll_s=0.02)
    settled(lambda: len(list(store.glob("gradients/*/shard-*/_manifest.json"))))
    shards = sorted(store.glob("gradients/*/shard-*/grads.safetensors"))
    committed = {p.parent.name: _sha(p) for p in shards if (p.parent / "_manifest.json").exists()}
    assert 1 <= len(committed) < 6 and not list(store.glob("gradients/*/_manifest.json")), committed
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]

    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, record = resumed_record(store, resumed, run_id)
    run_id = record["run_id"]  # the resumed run: the one that finished every node
    shards_run = record["nodes"]["gradients"]["shards"]
    assert (shards_run["ran"], shards_run["cached"]) == (6 - len(committed), len(committed))
    for name, digest in committed.items():                          # committed shards were not rewritten
        (path,) = store.glob(f"gradients/*/{name}/grads.safetensors")
        assert _sha(path) == digest

    # every shard holds its own contiguous ids, and equals an uninterrupted computation of that shard
    import interpflow
    from safetensors.torch import load_file
    from interpflow.tasks.influence import attribution
    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.workflows.engine.graph import split_ids

    handle = interpflow.open_run(run_id, store=str(store))
    config = load_spec(str(spec)).config
    model_dir = handle.outputs("finetune", "model")
    train = handle.outputs("planted", "train")
    model = load_model(model_dir, ModelConfig())
    stored = []
    for shard in split_ids(list(train["id"]), 6):
        (path,) = store.glob(f"gradients/*/{shard.name}/grads.safetensors")
        tensors = load_file(str(path))
        assert tensors["ids"].tolist() == list(shard.ids)
        fresh = attribution.gradient_shard(config.gradients, shard, model, train)["grads"]
        assert torch.allclose(tensors["grads"], fresh["grads"], atol=1e-6, rtol=1e-5), shard.name
        stored.append(fresh)
    query = handle.outputs("query_gradients")
    rescored = attribution.gradient_scores(
        config.scores.model_copy(update={"gradients": config.gradients}), model_dir, stored, query,
        diagonal=handle.outputs("gradients", "diagonal"), basis=handle.outputs("kfac_basis", "basis"),
        lambdas=handle.outputs("ekfac_lambdas", "lambdas"))["scores"]
    scores = handle.table("gradient_scores", "scores")
    assert scores.column("id").to_pylist() == rescored.column("id").to_pylist()
    assert torch.allclose(torch.tensor(scores.column("score").to_pylist()),
                          torch.tensor(rescored.column("score").to_pylist()), rtol=1e-4, atol=1e-9)

    # every method scored every training example, against the planted ids
    methods = {r["method"]: r for r in handle.table("attribution", "methods").to_pylist()}
    assert set(methods) == METHODS
    assert all(0.0 <= r["auc"] <= 1.0 and r["seconds"] >= 0 for r in methods.values())
    assert methods["probe"]["auc"] > 0.9 and 0.2 < methods["random"]["auc"] < 0.8
    assert methods["concept_influence[ekfac]"]["seconds"] > methods["concept_influence[identity]"]["seconds"]
    report = handle.metrics("influence_report")
    assert set(report) >= {"concept_auc", "auc_ok", "removal_ok", "ground_truth_ok", "drop.random-0",
                           "drop.concept_influence-ekfac"}
    assert handle.metrics("finetune.minus.random-0")["excluded"] == handle.metrics("attribution")["k"] == 5

    # lineage: from the scores back to the fine-tuned model, the concept, the gradient shards and the data
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    nodes = handle.nodes()
    assert {"finetune", "concept.final_norm", "gradients", "planted", "tiny_lm"} <= _ancestors(
        client, handle.mlflow_run_id, "gradient_scores")
    grads_run = client.get_run(nodes["gradients"]["mlflow_run_id"])
    assert grads_run.data.params["input.data.uri"].startswith(str(store / "planted"))
    assert grads_run.data.params["input.model.uri"].startswith(str(store / "finetune"))
    sweep_run = nodes["concept_sweep"]["mlflow_run_id"]
    assert [a.path for a in client.list_artifacts(sweep_run, "figures")] == ["figures/figure.png"]


def _tiny_model(tmp_path) -> str:
    from interpflow.tasks import text_corpus, tiny_lm

    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=100, concept_rate=0.0))
    path = tmp_path / "base"
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=1), corpus).save_pretrained(path)
    return str(path)


def test_bad_input_is_an_error_before_compute(tmp_path):
    from safetensors.torch import save_file

    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("influence", list(overrides), check_store=False)
        return str(err.value)

    message = error("gradients.params=[transformer.h.*.mlp.cfc.weight]")
    assert "matches no parameter" in message and "transformer.h.0.mlp.c_fc.weight" in message
    assert "query set (texts showing the trait) is empty" in error("planted.n_query=0")
    save_file({"direction": torch.ones(32)}, str(tmp_path / "v.safetensors"))
    assert "the direction has 32 entries but site 'final_norm' has width 64" in error(
        f"concept_vector.path={tmp_path / 'v.safetensors'}")
    model = _tiny_model(tmp_path)
    assert "longer than max_length=8 tokens (first: id 0" in error(f"model.path={model}", "gradients.max_length=8")
    assert "removal.methods use preconditioners ['ekfac']" in error("scores.preconditioners=[identity]")

    result = cli("run", "influence", "planted.n_query=0", f"run.store={tmp_path / 'store'}", cwd=tmp_path,
                 timeout=120)
    assert result.returncode == 2 and "planted.n_query=0" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "planted").exists()


@pytest.mark.usefixtures("ray_local")
def test_deepspeed_fine_tuning_matches_ddp_on_ray_train(settings, tmp_path):
    """ZeRO stage 1 on two Ray Train workers (gloo on CPU) learns what DDP on two workers learns."""
    from interpflow.tasks.finetune import FinetuneConfig, finetune
    from interpflow.tasks.influence.planted import PlantedConfig, make_planted
    from interpflow.tasks.models import use_model, ModelRef
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import Graph, node, trained
    from interpflow.workflows.engine.training import Training
    from transformers import AutoModelForCausalLM

    base = node(use_model, ModelRef(path=_tiny_model(tmp_path)), name="base")
    data = node(make_planted, PlantedConfig(n_train=64, n_probe=4, n_query=1, n_heldout=1), name="planted")
    models = {}
    for strategy in ("ddp", "deepspeed"):
        cfg = FinetuneConfig(steps=8, batch_size=8, strategy=strategy, zero_stage=1, num_workers=2,
                             checkpoint_every=4)
        # half a CPU a worker: both trainers fit the 2-CPU cluster at once instead of one after the other
        models[strategy] = trained(finetune, cfg, training=Training(num_workers=2, cpus_per_worker=0.5),
                                   name=f"finetune.{strategy}", model=base, data=data["train"])
    handle = run_graph(Graph(*models.values()), settings, progress=False)
    assert handle.ok, handle.nodes()
    weights = {}
    for strategy in models:
        assert handle.metrics(f"finetune.{strategy}")["world_size"] == 2
        weights[strategy] = AutoModelForCausalLM.from_pretrained(handle.outputs(f"finetune.{strategy}", "model"))
    before = AutoModelForCausalLM.from_pretrained(handle.outputs("base"))
    ddp, ds = dict(weights["ddp"].named_parameters()), dict(weights["deepspeed"].named_parameters())
    moved = max((ddp[k] - p).abs().max().item() for k, p in before.named_parameters())
    assert moved > 1e-3                                               # training changed the weights
    assert max((ddp[k] - ds[k]).abs().max().item() for k in ddp) < 0.05 * moved
