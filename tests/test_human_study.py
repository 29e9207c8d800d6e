"""The human-study workflow on local Ray (issue #7): planted effects through the whole graph, the local
model and Ray Serve endpoint backends, a flaky endpoint, a revoked key, kill and resume, input errors,
and no secret anywhere it could leak to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import interpflow
from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill
from support_endpoint import FlakyServer

SECRET = "sk-interpflow-test-4c1d9e-NEVER-LOG-ME"
# Workers read keys from their environment, which a local Ray inherits when it starts: set them first.
KEYS = ("STUDY_KEY", "FLAKY_KEY", "REVOKED_KEY", "SLOW_KEY")
os.environ.update({name: SECRET for name in KEYS})


def study(n_per_arm: int = 20, persuader: dict | None = None, participant: dict | None = None, **top) -> dict:
    """A human_study spec: the bundled arms with every persuader replaced by `persuader` (when given)."""
    base = yaml.safe_load((Path(interpflow.__file__).parent / "workflows/specs/human_study.yaml").read_text())
    spec = {"workflow": "human_study", "study": {**base["study"], "n_per_arm": n_per_arm, **(participant or {})},
            "analysis": {"n_boot": 300}, "num_shards": 4, **top}
    if persuader:
        for arm in spec["study"]["arms"]:
            for role in ("persuader", "corrective"):
                if arm.get(role):
                    arm[role] = {**arm[role], **persuader}
    return spec


def _shard_manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in store.glob("conversations/*/shard-*/_manifest.json")]


@pytest.mark.usefixtures("ray_local")
class TestOnLocalRay:
    def test_rule_backend_recovers_the_planted_effects(self, settings):
        handle = interpflow.run(study(n_per_arm=150), settings=settings, progress=False)
        assert handle.ok
        metrics = handle.metrics("analysis")
        for arm, planted in (("debunk", -10), ("bunk", 10), ("control", 0), ("bunk_corrected", 10)):
            assert metrics[f"{arm}.ci_low"] <= planted <= metrics[f"{arm}.ci_high"], arm
        assert metrics["bunk_corrected.reversal_ci_low"] <= 1.0 <= metrics["bunk_corrected.reversal_ci_high"]
        truth = handle.metrics("ground_truth")
        assert truth["ground_truth_ok"] == 1.0 and truth["effects_checked"] == 7   # 4 changes + 3 corrective
        results = handle.table("conversations", "results")
        ids = results.column("participant").to_pylist()
        assert len(ids) == len(set(ids)) == 4 * 150
        client = MlflowClient(settings.tracking_uri)
        run = handle.nodes()["analysis"]["mlflow_run_id"]
        assert {a.path for a in client.list_artifacts(run, "figures")} == {"figures/pre_post.png",
                                                                           "figures/change_hist.png"}

    def test_local_model_backend_runs_a_small_study(self, settings):
        spec = study(n_per_arm=2, persuader={"backend": "local", "max_tokens": 8},
                     participant={"participant_backend": "local", "participant_max_tokens": 6, "turns": 1,
                                  "rating_reasks": 1},
                     lm={"steps": 30, "n_layer": 1}, corpus={"n_examples": 200})
        handle = interpflow.run(spec, settings=settings, progress=False)
        assert handle.ok
        rows = handle.table("conversations", "results").to_pylist()
        assert len(rows) == 8
        for row in rows:
            persuader_text = [t["text"] for t in row["transcript"] if t["speaker"] == "persuader"]
            assert persuader_text and row["completion_tokens"] > 0 and row["model_calls"] >= 2
        conversations = handle.metrics("conversations")
        assert conversations["model_calls"] > 0 and conversations["unparseable"] >= 0
        assert handle.nodes()["analysis"]["status"] == "ran"

    def test_endpoint_backend_against_ray_serve_and_no_secret_leaks(self, settings, tmp_path, monkeypatch, capfd):
        from interpflow.actors import serve as chat_serve
        from interpflow.tasks import text_corpus, tiny_lm

        model_dir = tmp_path / "tiny"
        tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=30, n_layer=1, threads=1),
                              text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=200))).save_pretrained(model_dir)
        url = chat_serve.start(str(model_dir), port=8765, api_key_env="STUDY_KEY", served_name="tiny")
        try:
            spec = study(n_per_arm=2, persuader={"backend": "endpoint", "url": url, "model": "tiny",
                                                 "api_key_env": "STUDY_KEY", "max_tokens": 8},
                         participant={"turns": 1})
            handle = interpflow.run(spec, settings=settings, progress=False)
        finally:
            chat_serve.stop()
        assert handle.ok
        rows = handle.table("conversations", "results").to_pylist()
        assert len(rows) == 8 and all(r["model_calls"] >= 1 and r["completion_tokens"] > 0 for r in rows)

        out, err = capfd.readouterr()
        assert SECRET not in out + err
        store = Path(settings.store)
        for path in [*store.rglob("*"), Path(settings.tracking_uri.removeprefix("sqlite:///"))]:
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
        client = MlflowClient(settings.tracking_uri)
        for run in client.search_runs([client.get_experiment_by_name("interpflow").experiment_id]):
            assert SECRET not in json.dumps({**run.data.params, **run.data.tags})

    def test_flaky_endpoint_completes_with_retries(self, settings, monkeypatch):
        with FlakyServer(p500=0.25, p429=0.25, seed=3, key=SECRET) as server:
            spec = study(n_per_arm=5, persuader={"backend": "endpoint", "url": server.url, "model": "stub",
                                                 "api_key_env": "FLAKY_KEY"}, max_retries=8)
            handle = interpflow.run(spec, settings=settings, progress=False)
        assert handle.ok
        rows = handle.table("conversations", "results").to_pylist()
        calls, attempts = sum(r["model_calls"] for r in rows), sum(r["attempts"] for r in rows)
        assert len(rows) == 20 and attempts > calls      # some calls needed retries, all completed
        assert len(server.requests) == attempts

    def test_revoked_key_stops_the_node_clearly_and_keeps_committed_shards(self, settings, monkeypatch):
        spec = study(n_per_arm=6, persuader={"backend": "endpoint", "url": "", "model": "stub",
                                             "api_key_env": "REVOKED_KEY"}, num_shards=6, concurrency=1)
        with FlakyServer(key=SECRET, revoke_after=45) as server:   # ~90 requests in all, 2 shards at a time
            for arm in spec["study"]["arms"]:
                for role in ("persuader", "corrective"):
                    if arm.get(role):
                        arm[role]["url"] = server.url
            handle = interpflow.run(spec, settings=settings, progress=False)
        assert not handle.ok
        state = handle.nodes()["conversations"]
        assert "401" in state["error"] and "REVOKED_KEY" in state["error"] and SECRET not in state["error"]
        committed = _shard_manifests(Path(settings.store))
        assert 0 < len(committed) < 6 and state["shards"]["ran"] == len(committed)
        with FlakyServer(key=SECRET) as server:       # a new key server; the committed shards stay as they are
            for arm in spec["study"]["arms"]:
                for role in ("persuader", "corrective"):
                    if arm.get(role):
                        arm[role]["url"] = server.url
            handle = interpflow.run(spec, settings=settings, progress=False)
        # the URL is part of the config, so this is a new key: the point here is the failed run kept its shards
        assert handle.ok and len(_shard_manifests(Path(settings.store))) >= 6


def test_driver_killed_mid_study_resumes_only_missing_participants(tmp_path, monkeypatch):
    store = tmp_path / "store"
    with FlakyServer(key=SECRET, delay_s=0.15) as server:
        spec = study(n_per_arm=8, persuader={"backend": "endpoint", "url": server.url, "model": "stub",
                                             "api_key_env": "SLOW_KEY"}, num_shards=8, concurrency=1,
                     participant={"turns": 2})
        spec["run"] = {"store": str(store), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(spec))
        run_then_kill(path, tmp_path, lambda: len(_shard_manifests(store)) >= 2, timeout=300)
        time.sleep(5)     # shards already running in the orphaned cluster may still commit; let them
        before = {m["shard"]["index"] for m in _shard_manifests(store)}
        assert 2 <= len(before) < 8, "the kill should land mid-study"
        (record,) = [json.loads(p.read_text()) for p in store.glob("runs/*/record.json")]
        resumed = cli("resume", record["run_id"], "--store", str(store), "--no-progress", cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, after = resumed_record(store, resumed, record["run_id"])
    shards = after["nodes"]["conversations"]["shards"]
    assert shards["ran"] == 8 - len(before) and shards["cached"] == len(before)
    import pyarrow.dataset as pads

    files = [str(p) for p in store.glob("conversations/*/shard-*/results.parquet")]
    ids = pads.dataset(files).to_table(columns=["participant"]).column("participant").to_pylist()
    assert len(ids) == len(set(ids)) == 32
    for path in store.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("override, message", [
    ("study.arms.0.persuader.system_prompt=''", "persuader has no system_prompt"),
    ("study.n_per_arm=0", "n_per_arm"),
    ("study.belief.lo=150", "bounds are inverted"),
    ("study.population.trust_in_ai.weights=[0.5,0.2,0.2]", "trust_in_ai: weights sum to 0.9, not 1"),
    ("study.participant_backend=oracle", "participant_backend"),
])
def test_bad_input_is_an_error_before_compute(override, message):
    spec = study()
    path, _, value = override.partition("=")
    keys = path.split(".")
    target = spec
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    target[keys[-1]] = yaml.safe_load(value)
    with pytest.raises(SpecError, match=message):
        load_spec(spec, check_store=False)


def test_unset_key_variable_is_an_error_before_compute(monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    spec = study(persuader={"backend": "endpoint", "url": "http://127.0.0.1:9/v1", "api_key_env": "NOT_SET_KEY"})
    with pytest.raises(SpecError, match="NOT_SET_KEY is not set"):
        load_spec(spec, check_store=False)


def test_serve_command_answers_chat_completions_until_stopped(tmp_path):
    """`interpflow serve MODEL`: a real OpenAI-compatible server in its own process, stopped by SIGTERM."""
    from interpflow.tasks import text_corpus, tiny_lm
    from interpflow.tasks.study.chat import EndpointChat

    model_dir = tmp_path / "tiny"
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=20, n_layer=1, threads=1),
                          text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=100))).save_pretrained(model_dir)
    server = subprocess.Popen([sys.executable, "-m", "interpflow.workflows.cli", "serve", str(model_dir), "--port",
                               "8766"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, text = time.time() + 180, ""
        while time.time() < deadline and server.poll() is None:
            text += server.stdout.readline()
            if "Ctrl-C stops" in text.replace("\n", " "):     # the ready line (rich may wrap it)
                break
        assert "http://127.0.0.1:8766/v1" in text.replace("\n", ""), text
        reply = EndpointChat("http://127.0.0.1:8766/v1", "tiny").chat(
            [{"role": "user", "content": "Hello."}], max_tokens=5, temperature=0)
        assert reply.completion_tokens > 0 and isinstance(reply.text, str)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode is not None
