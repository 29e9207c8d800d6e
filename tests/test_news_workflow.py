"""The `news_benchmark` workflow on local Ray (issue #13): a driver killed during video embedding resumes
with only the missing shards; on the stand-in the oracle is perfect, the shuffled file at chance and the
trained retrieval baseline at least 5x chance; a user's predictions files are scored beside them;
per-category tables and bar charts reach MLflow; bad input fails before compute."""

from __future__ import annotations

import json

import pytest
import yaml

from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill, settled

SHARDS = 6
SMALL = {"workflow": "news_benchmark",
         "standin": {"videos_per_category": 20, "frames": 16, "size": 32},
         "video_model": {"layers": 2, "steps": 60, "train_clips": 500, "eval_clips": 20, "batch_size": 32},
         "video": {"batch_size": 16},
         "retrieval": {"steps": 300, "checkpoint_every": 100},
         "keywords": {"steps": 200},
         "evaluate": {"chance_pairs": 1000},
         "num_shards": SHARDS}


def _spec(tmp_path, **changes) -> tuple:
    store = tmp_path / "store"
    spec = tmp_path / "news.yaml"
    data = {**SMALL, **changes, "run": {"store": str(store), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    spec.write_text(yaml.safe_dump(data))
    return spec, store


def _user_predictions(tmp_path) -> str:
    """A user's system that got the captions right and submitted nothing else."""
    from interpflow.tasks.news import layout, standin

    root = tmp_path / "peek"
    standin.StandIn(standin.StandInConfig(**SMALL["standin"])).save_pretrained(str(root))
    rows = layout.load_news(layout.NewsDatasetConfig(), root=str(root))["items"].to_pylist()
    folder = tmp_path / "my-system"
    folder.mkdir()
    (folder / "captioning.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "caption": r["visual_description"]}) + "\n" for r in rows if r["split"] == "test"))
    return str(folder)


@pytest.mark.e2e
def test_killed_embedding_resumes_by_shard_and_the_standin_checks_hold(tmp_path):
    spec, store = _spec(tmp_path, predictions=_user_predictions(tmp_path))

    def mid_embedding() -> bool:
        return bool(list(store.glob("video_embeddings/*/shard-*/_manifest.json"))) and \
            not list(store.glob("video_embeddings/*/_manifest.json"))

    run_then_kill(spec, tmp_path, mid_embedding, timeout=400, poll_s=0.02)
    committed = settled(lambda: len(list(store.glob("video_embeddings/*/shard-*/_manifest.json"))))
    assert 1 <= committed < SHARDS and not list(store.glob("video_embeddings/*/_manifest.json"))
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]

    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, record = resumed_record(store, resumed, run_id)
    run_id, nodes = record["run_id"], record["nodes"]  # the resumed run: the one that finished every node
    shards = nodes["video_embeddings"]["shards"]
    assert (shards["ran"], shards["cached"]) == (SHARDS - committed, committed)
    assert nodes["video_model"]["status"] == "cached" and nodes["standin"]["status"] == "cached"

    import interpflow

    handle = interpflow.open_run(run_id, store=str(store))
    report = handle.metrics("news_report")
    failed = [k for k, v in report.items() if k.startswith("check.") and v != 1.0]
    assert report["ground_truth_ok"] == 1.0, failed
    retrieval = handle.metrics("evaluate.retrieval")
    for direction in ("video_to_text", "text_to_video"):
        assert retrieval[f"baseline.{direction}.r@1"] >= 5 * retrieval[f"chance.{direction}.r@1"]
        assert retrieval[f"oracle.{direction}.median_rank"] == 1
    captioning = handle.metrics("evaluate.captioning")
    assert captioning["user.corpus_bleu"] == pytest.approx(100) and captioning["user.missing"] == 0
    assert not any(k.startswith("user.") for k in handle.metrics("evaluate.paragraph"))   # no file, not scored
    embedded = handle.table("video_embeddings", "embed")
    assert embedded.num_rows == 140 and len(set(embedded.column("id").to_pylist())) == 140

    # per-category tables (CSV) and bar charts are artifacts of each evaluation node's MLflow run
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for task in ("captioning", "paragraph", "keywords", "retrieval"):
        (run,) = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                    f"tags.`interpflow.node` = 'evaluate.{task}'", max_results=1)
        listed = {a.path for folder in ("figures", "tables") for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"figures/figure.png", "tables/scores.csv"} <= listed, listed


def test_bad_input_is_an_error_before_compute(tmp_path):
    from interpflow.tasks.news import layout, standin

    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("news_benchmark", list(overrides), check_store=False)
        return str(err.value)

    root = tmp_path / "copy"
    standin.StandIn(standin.StandInConfig(videos_per_category=2, frames=8)).save_pretrained(str(root))
    rows = [json.loads(line) for line in (root / layout.ANNOTATIONS).read_text().splitlines()]
    rows[0]["category"] = "weather"
    (root / layout.VIDEO_DIR / f"{rows[1]['id']}.mp4").unlink()
    (root / layout.ANNOTATIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = error(f"dataset.path={root}")
    assert "2 problem(s)" in message and "category 'weather'" in message and "not found" in message
    assert "feature_layers [7] are out of range" in error("feature_layers=[0, 7]")
    assert "retrieval.text_field='location'" in error("retrieval.text_field=location")
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "retrieval.jsonl").write_text(json.dumps({"id": "a", "ranking": ["a"]}) + "\n")
    assert "retrieval.jsonl: column(s) ['direction'] missing" in error(f"predictions={preds}")

    result = cli("run", "news_benchmark", "video.size=30", f"run.store={tmp_path / 'store'}",
                 cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "video.size" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "standin").exists()
