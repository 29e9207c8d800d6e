"""The persuasion workflow on local Ray (issue #12): a small study end to end against its planted checks,
the endpoint evaluator against the project's Ray Serve endpoint, and a killed driver resumed.

The three tests share one store (in file order), so the tiny LM and the persona vectors are computed once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import interpflow
from interpflow.workflows.engine import RunSettings
from support import cli, resumed_record, run_then_kill, settled

KEY = "sk-persuasion-test-evaluator"
os.environ["PERSUASION_KEY"] = KEY      # Ray workers inherit it when the local cluster starts

SMALL = {
    "workflow": "persuasion",
    # the LM trains first and alone: let it use both cores. 400 steps, not the default 800, were most of
    # the test's time; at 400 every planted check still passes (measured: halves cosine 0.95, base rate 0,
    # steered c8 rate 0.75, random directions 0, SFT held-out gain 1.0)
    "lm": {"threads": 2, "steps": 400},
    "steering": {"coefficients": [4, 8], "traits": ["persuasive"], "random_seeds": [0]},
    "sft": {"conditions": [{"name": "benign_persuasion", "categories": ["benign_opinion", "benign_factual"]}],
            "seeds": [0], "finetune": {"steps": 30}},        # held-out gain 1.0 at 30 steps as at 60
    "ape": {"statements_per_category": 4},
    "persona": {"n_questions": 6},
    "report": {"n_boot": 300},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("persuasion")


def _settings(root: Path) -> RunSettings:
    return RunSettings(store=str(root / "store"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False)


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_local")
class TestOnLocalRay:
    def test_small_study_passes_the_planted_checks(self, shared):
        handle = interpflow.run(SMALL, settings=_settings(shared), progress=False)
        assert handle.ok
        checks = handle.metrics("persuasion_report")
        for name in ("halves_cosine_ok", "steering_monotone_ok", "random_flat_ok", "sft_transfer_ok",
                     "ground_truth_ok"):
            assert checks[name] == 1.0, (name, checks)
        assert checks["persona.persuasive.L2.halves_cosine"] >= 0.9
        assert checks["steer.persuasive.L2.c8.neutral.attempt_rate"] >= checks["base.neutral.attempt_rate"] + 0.5
        rates = handle.table("persuasion_report", "attempt_rates").to_pylist()
        assert {r["evaluator"] for r in rates} == {"marker classifier (planted phrases)"}
        assert {r["category"] for r in rates} >= {"all", "controversial", "harmful"}
        run = handle.nodes()["persuasion_report"]["mlflow_run_id"]
        figures = {a.path for a in MlflowClient(_settings(shared).tracking_uri).list_artifacts(run, "figures")}
        assert figures == {"figures/attempt_vs_coef.png", "figures/coherence.png"}

    def test_endpoint_evaluator_rates_through_ray_serve(self, shared):
        """Only the evaluation re-runs (the conversations are cached); the tiny LM behind Serve answers
        the rubric with words, so most ratings are unparseable: each is re-asked once and counted."""
        from interpflow.actors import serve as chat_serve

        model = interpflow.open_run(_latest_run(shared), store=str(shared / "store")).outputs("tiny_lm")
        url = chat_serve.start(str(model), port=8767, api_key_env="PERSUASION_KEY", served_name="tiny")
        try:
            spec = {**SMALL, "steering": {"coefficients": [4], "traits": ["persuasive"], "random_seeds": []},
                    "sft": {"conditions": []},
                    "evaluator": {"kind": "endpoint", "url": url, "model": "tiny", "api_key_env": "PERSUASION_KEY",
                                  "reasks": 1, "max_tokens": 4}}
            handle = interpflow.run(spec, settings=_settings(shared), progress=False)
        finally:
            chat_serve.stop()
        assert handle.ok
        nodes = handle.nodes()
        assert nodes["conversations.base"]["status"] == "cached" and nodes["evaluated.base"]["status"] == "ran"
        metrics = handle.metrics("evaluated.base")
        turns = 2 * metrics["conversations"]
        assert turns <= metrics["ratings_asked"] <= 2 * turns
        assert 0 < metrics["unparseable"] <= metrics["ratings_asked"]
        report = handle.metrics("persuasion_report")
        assert "ground_truth_ok" not in report       # the planted checks hold only for the marker evaluator
        rates = handle.table("persuasion_report", "attempt_rates").to_pylist()
        assert {r["evaluator"] for r in rates} == {"LLM evaluator (tiny)"}

    def test_killed_driver_resumes_only_the_missing_conversations(self, shared):
        store = shared / "store"
        spec = {**SMALL, "ape": {"statements_per_category": 8, "seed": 1}, "num_shards": 8,
                "steering": {"coefficients": [4, 8], "traits": ["persuasive"], "random_seeds": []},
                "sft": {"conditions": []},
                "run": {"store": str(store), "tracking_uri": f"sqlite:///{shared / 'mlflow.db'}"}}
        path = shared / "resume.yaml"
        path.write_text(yaml.safe_dump(spec))
        records_before = set(store.glob("runs/*/record.json"))
        earlier = set(store.glob("conversations.*/*/shard-*/_manifest.json"))   # the first test's (ape.seed 0)

        def committed() -> int:
            return len(set(store.glob("conversations.*/*/shard-*/_manifest.json")) - earlier)

        run_then_kill(path, shared, lambda: committed() >= 2, timeout=300)
        before = settled(committed)
        assert 2 <= before < 24, "the kill should land mid-evaluation (3 conditions x 8 shards)"
        (record,) = set(store.glob("runs/*/record.json")) - records_before
        run_id = json.loads(record.read_text())["run_id"]
        resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=shared, timeout=400)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        nodes = resumed_record(store, resumed, run_id)[1]["nodes"]
        shards = [nodes[n]["shards"] for n in nodes if n.startswith("conversations.")]
        assert sum(s["ran"] for s in shards) == 24 - before and sum(s["cached"] for s in shards) == before
        assert committed() == 24
        assert all(nodes[n]["status"] in ("cached", "ran") for n in nodes)


def _latest_run(root: Path) -> str:
    records = sorted((root / "store").glob("runs/*/record.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(records[-1].read_text())["run_id"]
