"""The `tamper` workflow on local Ray (issue #11): a driver killed mid-sweep resumes without re-running
finished trials and picks the same best trial as an uninterrupted run; any HF causal LM (a random GPT-2
folder) runs defense -> attack sweep -> evaluation for every defense in the registry, with a child MLflow
run per trial; bad input fails before compute."""

from __future__ import annotations

import json

import pytest
import yaml

from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill, settled

WORLD = {"aligned_dialogues": 1000, "eval_prompts": 12, "attack_examples": 100, "countries": 8}
TRIALS = 3
SWEEP_SPEC = {
    "workflow": "tamper", "world": WORLD,
    "lm": {"n_layer": 2, "n_embd": 64, "n_positions": 128, "steps": 80},
    "defenses": [],
    "attacks": [{"name": "embedding_attack", "trials": TRIALS, "config": {"steps": 8, "prompts": 4},
                 "search_space": {"lr": {"kind": "loguniform", "low": 0.01, "high": 0.3}}}],
    "safety": {"max_tokens": 20}, "sweep": {"concurrent_trials": 1, "seed": 3},
}


def _spec(tmp_path, name: str, data: dict) -> tuple:
    store = tmp_path / name
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({**data, "run": {"store": str(store),
                                                    "tracking_uri": f"sqlite:///{tmp_path / (name + '.db')}"}}))
    return spec, store


def _trials(store) -> list[dict]:
    import pyarrow.parquet as pq

    (path,) = store.glob("sweep.aligned.embedding_attack/*/trials.parquet")
    return pq.read_table(path).to_pylist()


@pytest.mark.e2e
def test_a_killed_sweep_resumes_without_rerunning_finished_trials_and_finds_the_same_best(tmp_path):
    spec, store = _spec(tmp_path, "killed", SWEEP_SPEC)
    committed_trials = "/.nodes/sweep.aligned.embedding_attack/*/trials/*/_manifest.json"

    def mid_sweep() -> bool:
        return len(list(store.glob(committed_trials[1:]))) >= 1 and \
            not list(store.glob("sweep.aligned.embedding_attack/*/_manifest.json"))

    run_then_kill(spec, tmp_path, mid_sweep, timeout=500, poll_s=0.05)
    done = settled(lambda: len(list(store.glob(committed_trials[1:]))))
    assert 1 <= done < TRIALS and not list(store.glob("sweep.aligned.embedding_attack/*/_manifest.json"))
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]
    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    nodes = resumed_record(store, resumed, run_id)[1]["nodes"]
    assert nodes["aligned_model"]["status"] == "cached"
    interrupted = _trials(store)
    assert sum(t["cached"] for t in interrupted) == done                  # finished trials were not run again
    assert sum(not t["cached"] for t in interrupted) == TRIALS - done
    assert len(list(store.glob(committed_trials[1:]))) == TRIALS

    fresh_spec, fresh_store = _spec(tmp_path, "fresh", SWEEP_SPEC)
    fresh = cli("run", str(fresh_spec), "--no-progress", cwd=tmp_path, timeout=900)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    uninterrupted = _trials(fresh_store)
    assert not any(t["cached"] for t in uninterrupted)

    def best(rows):
        top = max(rows, key=lambda t: (t["objective"], t["harm"]))
        return top["values"], top["harm"], top["utility"]

    assert best(interrupted) == best(uninterrupted)
    assert [t["values"] for t in interrupted] == [t["values"] for t in uninterrupted]

    # a new judge re-scores the stored replies: the trials are new, their attacks and inference are not
    rejudged = cli("run", str(fresh_spec), "judge.compliance_markers=[step one]", "--no-progress", cwd=tmp_path,
                   timeout=900)
    assert rejudged.returncode == 0, rejudged.stdout[-3000:] + rejudged.stderr[-3000:]
    import pyarrow.parquet as pq

    (latest,) = [p for p in fresh_store.glob("sweep.aligned.embedding_attack/*/trials.parquet")
                 if pq.read_table(p).column("trial").to_pylist() != [t["trial"] for t in uninterrupted]]
    again = pq.read_table(latest).to_pylist()
    assert [t["values"] for t in again] == [t["values"] for t in uninterrupted]
    assert all(t["inference_cached"] and not t["cached"] for t in again)


def _random_gpt2(tmp_path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    from interpflow.tasks.tamper.world import WorldConfig, make_aligned_corpus
    from interpflow.tasks.tiny_lm import TokenizerConfig, train_tokenizer

    texts = list(make_aligned_corpus(WorldConfig(**WORLD))["text"])
    tok = train_tokenizer(TokenizerConfig(), texts, model_max_length=128)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path / "random-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.e2e
def test_any_causal_lm_runs_every_defense_through_a_one_trial_sweep(tmp_path):
    data = {"workflow": "tamper", "world": WORLD, "model": {"path": _random_gpt2(tmp_path)},
            "defenses": [{"name": n, "config": {"steps": 2, "examples": 8, "batch_size": 4}}
                         for n in ("triplet", "safety_neurons", "repnoise")],
            "attacks": [{"name": "refusal_ablation", "trials": 1, "config": {"prompts": 8}},
                        {"name": "full_finetune", "trials": 1,             # DDP over 2 Ray Train workers
                         "config": {"finetune": {"steps": 2, "batch_size": 4, "num_workers": 2}}}],
            "safety": {"max_tokens": 8}, "utility": {"max_questions": 4}, "sweep": {"concurrent_trials": 2}}
    spec, store = _spec(tmp_path, "hf", data)
    result = cli("run", str(spec), "--no-progress", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    import interpflow

    (record_path,) = store.glob("runs/*/record.json")
    handle = interpflow.open_run(json.loads(record_path.read_text())["run_id"], store=str(store))
    report = handle.metrics("tamper_report")
    for model in ("aligned", "triplet", "safety_neurons", "repnoise"):
        assert 0 <= report[f"baseline.{model}.utility"] <= 1
        assert f"worst.{model}.harm" in report or f"cell.{model}.refusal_ablation.harm" not in report
    heat = handle.table("tamper_report", "heatmap").to_pylist()
    assert {r["model"] for r in heat} == {"aligned", "triplet", "safety_neurons", "repnoise"}
    assert "check.baseline_refuses" not in report                          # checks are for the embedded model

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'hf.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    trials = client.search_runs(experiments, "tags.`interpflow.node` = 'sweep.repnoise.refusal_ablation.trial'")
    assert len(trials) == 1 and trials[0].data.tags["interpflow.checkpoint_uri"].startswith(str(store))
    (ddp,) = handle.table("sweep.aligned.full_finetune", "trials").to_pylist()
    assert ddp["status"] == "ok", ddp["error"]
    (ddp_run,) = client.search_runs(experiments, "tags.`interpflow.node` = 'sweep.aligned.full_finetune.trial'")
    assert ddp_run.data.metrics["attack.world_size"] == 2
    assert trials[0].data.metrics["utility"] == pytest.approx(
        handle.table("sweep.repnoise.refusal_ablation", "trials").to_pylist()[0]["utility"])


def test_bad_input_is_an_error_before_compute(tmp_path):
    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("tamper", list(overrides), check_store=False)
        return str(err.value)

    assert "unknown attack 'gcg'; the registry has: benign_finetune" in error("attacks=[{name: gcg}]")
    assert "unknown defense 'tar'; the registry has: repnoise" in error("defenses=[{name: tar}]")
    assert "['finetune.learning_rate'] name no config field" in error(
        "attacks=[{name: lora_finetune, search_space: {finetune.learning_rate: {kind: uniform, low: 0.1, high: 1}}}]")
    assert "epsilon=1.5 is outside [0, 1]" in error("aggregate.epsilon=1.5")
    assert "judge.url" in error("judge.kind=endpoint", "judge.url=http://127.0.0.1:9/v1", "judge.timeout_s=2")
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "A"}) + "\n")
    assert "lacks column(s) ['options']" in error(f"utility.source={bad}")
    assert "layer 7 is out of range" in error(
        "attacks=[{name: latent_attack, search_space: {layer: {kind: int, low: 0, high: 7}}}]")
