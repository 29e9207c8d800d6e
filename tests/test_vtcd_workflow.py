"""The `vtcd` workflow on local Ray (issue #10): a driver killed during the CRIS draws resumes with only the
missing draw shards and the same importance as an uninterrupted computation; any HF video classifier (a
random VideoMAE from a local folder) runs end to end; bad input fails before compute."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill, settled

TINY_MODEL = {"layers": 2, "hidden_size": 16, "heads": 2, "intermediate_size": 32, "patch_size": 8, "steps": 10,
              "batch_size": 8, "train_clips": 40, "eval_clips": 10}
SMALL = {"workflow": "vtcd", "clips": {"n_clips": 24, "size": 32},
         "video_model": TINY_MODEL, "tubelets": {"layers": [1]}, "concepts": {"max_concepts": 3},
         "cris": {"draws": 32, "draws_per_pass": 2}, "cris_shards": 8,
         "curves": {"points": 3, "random_orders": 1, "prune_counts": [1, 2]}}


def _spec(tmp_path, **changes) -> tuple:
    store = tmp_path / "store"
    spec = tmp_path / "vtcd.yaml"
    data = {**SMALL, **changes, "run": {"store": str(store), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    spec.write_text(yaml.safe_dump(data))
    return spec, store


@pytest.mark.e2e
def test_killed_cris_resumes_only_missing_draw_shards_to_the_same_importance(tmp_path):
    spec, store = _spec(tmp_path)

    def mid_draws() -> bool:
        return bool(list(store.glob("cris/*/shard-*/_manifest.json"))) and not list(store.glob("cris/*/_manifest.json"))

    run_then_kill(spec, tmp_path, mid_draws, timeout=400, poll_s=0.02)
    committed = settled(lambda: len(list(store.glob("cris/*/shard-*/_manifest.json"))))
    assert 1 <= committed < 8 and not list(store.glob("cris/*/_manifest.json"))
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]

    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, record = resumed_record(store, resumed, run_id)  # a resume is a new run naming its origin
    nodes = record["nodes"]
    assert (nodes["cris"]["shards"]["ran"], nodes["cris"]["shards"]["cached"]) == (8 - committed, committed)
    assert nodes["video_classifier"]["status"] == "cached" and nodes["tubelets"]["status"] == "cached"
    assert all(n["status"] in ("ran", "cached") for n in nodes.values())

    import interpflow
    from interpflow.tasks.concepts import cris
    from interpflow.tasks.concepts.classifier import load_classifier
    from interpflow.tasks.concepts.vtcd_clips import ConceptClipConfig, make_concept_clips
    from interpflow.tasks.models import ModelConfig

    handle = interpflow.open_run(run_id, store=str(store))
    pairs = [(1, 0), (1, 1)]
    members = {f"members.{l}.{h}": handle.table(f"concepts.{l}.{h}", "members") for l, h in pairs}
    concepts = {f"concepts.{l}.{h}": handle.table(f"concepts.{l}.{h}", "concepts") for l, h in pairs}
    stored = handle.table("importance", "importance").to_pylist()
    assert len(stored) == sum(t.num_rows for t in concepts.values()) >= 2
    assert sorted(r["rank"] for r in stored) == list(range(1, len(stored) + 1))

    # the same draws computed in one uninterrupted pass, in this process, from the stored concepts and model
    model = load_classifier(ModelConfig(), handle.outputs("video_classifier", "model"))
    data = make_concept_clips(ConceptClipConfig(n_clips=24, size=32))
    config = cris.CrisConfig(draws=32, draws_per_pass=5)
    whole = cris.cris_shard(config, SimpleNamespace(ids=tuple(range(32))), model, data, **members)
    again = {r["concept_id"]: r["importance"] for r in cris.importance_scores(whole["draws"], concepts).to_pylist()}
    assert np.allclose([r["importance"] for r in stored], [again[r["concept_id"]] for r in stored], atol=1e-6)

    report = handle.metrics("vtcd_report")
    assert {"auc.most_first", "auc.least_first", "auc.random", "ground_truth_ok", "check.ball_in_top"} <= set(report)
    pruning = handle.table("checks", "pruning").to_pylist()
    assert sorted(r["condition"] for r in pruning) == sorted(f"{o}@{n}" for o in ("least", "most", "random")
                                                             for n in (1, 2))


def _random_videomae(tmp_path, **config) -> str:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    settings = dict(image_size=32, patch_size=8, num_channels=3, num_frames=8, tubelet_size=2, hidden_size=16,
                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2)
    settings.update(config)
    path = tmp_path / f"videomae-{len(list(tmp_path.glob('videomae-*')))}"
    VideoMAEForVideoClassification(VideoMAEConfig(**settings)).save_pretrained(path)
    return str(path)


@pytest.mark.e2e
def test_a_random_hf_videomae_from_a_folder_runs_end_to_end(tmp_path):
    model = _random_videomae(tmp_path)
    spec, store = _spec(tmp_path, model={"path": model}, tubelets={"layers": [0], "feature": "values"},
                        cris_shards=2)
    result = cli("run", str(spec), "--no-progress", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record_path,) = store.glob("runs/*/record.json")
    record = json.loads(record_path.read_text())
    assert "video_classifier" not in record["nodes"] and record["nodes"]["model"]["status"] == "ran"
    assert {n for n in record["nodes"] if n.startswith("concepts.")} == {"concepts.0.0", "concepts.0.1"}

    import interpflow

    handle = interpflow.open_run(record["run_id"], store=str(store))
    importance = handle.table("importance", "importance").to_pylist()
    assert importance and {r["layer"] for r in importance} == {0}
    curves = handle.table("checks", "curves").to_pylist()
    assert {r["order"] for r in curves} == {"most", "least", "random.0"}
    assert all(r["removed"] == 0 for r in curves if r["fraction"] == 0)
    for name in ("curves_figure", "heads_figure", "tubelets_figure", "figure"):
        node = "importance" if name == "figure" else "vtcd_report"
        assert len(list((store / node).glob(f"*/{name}.png"))) == 1, name


def test_bad_input_is_an_error_before_compute(tmp_path):
    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("vtcd", list(overrides), check_store=False)
        return str(err.value)

    assert "tubelets.heads has [4] out of range: the model has heads 0..1" in error("tubelets.heads=[4]")
    assert "tubelets.layers has [9] out of range: the model has blocks 0..1" in error("tubelets.layers=[0, 9]")
    assert "only 3 videos of the target class" in error("clips.n_clips=10", "concepts.max_concepts=8")
    small = _random_videomae(tmp_path, image_size=16)
    assert "clips.size=64 but the model takes image_size=16" in error(f"model.path={small}")
    assert "tubelets.target_class=3 but the model has 3 classes (0..2)" in error("tubelets.target_class=3")

    from transformers import TimesformerConfig, TimesformerForVideoClassification

    fused = tmp_path / "timesformer"                                        # fuses q, k, v in one qkv
    TimesformerForVideoClassification(TimesformerConfig(image_size=32, patch_size=8, num_frames=8, hidden_size=16,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32)).save_pretrained(fused)
    assert "tubelets.feature: feature 'keys': block 0 of TimesformerForVideoClassification has no separate 'key'" \
        in error(f"model.path={fused}", "clips.size=32")

    result = cli("run", "vtcd", "tubelets.heads=[7]", f"run.store={tmp_path / 'store'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "tubelets.heads" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "clips").exists()
