"""The `physics_probing` workflow on local Ray (issue #9): a driver killed mid-extraction resumes shard by
shard, a new probe grid re-runs only the probes of that kind and what reads them, any HF video encoder
(a random VideoMAE or ViViT folder) runs the whole study, and bad input fails before compute."""

from __future__ import annotations

import json

import pytest
import yaml

from interpflow.workflows.spec import SpecError, load_spec
from support import cli, resumed_record, run_then_kill, settled

TINY_MODEL = {"layers": 2, "hidden_size": 16, "heads": 2, "intermediate_size": 32, "patch_size": 8, "steps": 5,
              "batch_size": 8, "train_clips": 100, "eval_clips": 20}
SMALL = {"workflow": "physics_probing", "clips": {"n_clips": 120, "frames": 4, "size": 16, "radius": 2.0},
         "video_model": TINY_MODEL, "variables": ["speed", "direction"],
         "probes": {"folds": 3, "inner_folds": 2, "grids": {"ridge": [10.0], "circular": [10.0], "logistic": [1e-3]}},
         "geometry": {"geometry": {"permutations": 20, "max_dims": 4}}, "patches": {"folds": 3, "examples": 2},
         "readout": {"max_eval_clips": 40}, "ablation": {"kinds": ["cross_frame"]},
         "steering": {"dims": [1, 2], "bins": 8}, "num_shards": 4}


def _spec(tmp_path, **changes) -> tuple:
    store = tmp_path / "store"
    spec = tmp_path / "physics.yaml"
    data = {**SMALL, **changes, "run": {"store": str(store), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    spec.write_text(yaml.safe_dump(data))
    return spec, store


def test_killed_extraction_resumes_by_shard_and_a_new_grid_reruns_only_its_probes(tmp_path):
    spec, store = _spec(tmp_path)

    def mid_extraction() -> bool:
        return bool(list(store.glob("activations/*/shard-*/_manifest.json"))) and \
            not list(store.glob("activations/*/_manifest.json"))

    run_then_kill(spec, tmp_path, mid_extraction, timeout=400, poll_s=0.02)
    committed = settled(lambda: len(list(store.glob("activations/*/shard-*/_manifest.json"))))
    assert 1 <= committed < 4 and not list(store.glob("activations/*/_manifest.json"))
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]

    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    resumed_path, record = resumed_record(store, resumed, run_id)
    run_id, nodes = record["run_id"], record["nodes"]  # the resumed run: the one that finished every node
    assert (nodes["activations"]["shards"]["ran"], nodes["activations"]["shards"]["cached"]) == (4 - committed, committed)
    assert nodes["video_model"]["status"] == "cached"
    assert all(n["status"] in ("ran", "cached") for n in nodes.values())

    import interpflow

    handle = interpflow.open_run(run_id, store=str(store))
    sites = ["embed", "blocks.0.resid_post", "blocks.1.resid_post"]
    depth = handle.table("depth", "table").to_pylist()
    assert {(r["variable"], r["site"]) for r in depth} == {(v, s) for v in SMALL["variables"] for s in sites}
    assert all(r["random_mean"] is not None for r in depth)
    pooled = handle.table("activations", "blocks.1.resid_post")
    assert sorted(pooled.column("id").to_pylist()) == list(range(180))      # 120 clips + 60 impossible twins
    assert handle.table("activations", "embed.patches").num_rows == 180 * 4
    ablations = handle.table("ablation_report", "table").to_pylist()
    assert {r["condition"] for r in ablations} == {"cross_frame@0", "cross_frame@1", "cross_frame@all"}
    assert all(abs(r["drop"] - (r["clean_score"] - r["score"])) < 1e-9 for r in ablations)
    assert [r["dims"] for r in handle.table("steering_report", "table").to_pylist()] == [1, 2]
    report = handle.metrics("physics_report")
    assert set(report) >= {"ground_truth_ok", "direction.peak_layer", "direction.emergence_layer"}

    # a new ridge grid: only the ridge probes (speed) and the nodes after them run again
    rerun = cli("run", str(spec), "probes.grids.ridge=[100.0]", "--no-progress", cwd=tmp_path, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (latest,) = [p for p in store.glob("runs/*/record.json") if p not in (record_path, resumed_path)]
    again = json.loads(latest.read_text())["nodes"]
    ran = {name for name, n in again.items() if n["status"] == "ran"}
    assert {"activations", "random_activations", "video_model", "clips", "random_model"}.isdisjoint(ran)
    assert {f"probe.{m}.speed.{i}" for m in ("trained", "random") for i in range(3)} | {"depth"} <= ran
    assert not any(name.startswith("probe.") and ".speed." not in name for name in ran)


def _video_folder(tmp_path, kind: str) -> str:
    from transformers import VideoMAEConfig, VideoMAEModel, VivitConfig, VivitModel

    if kind == "videomae":
        model = VideoMAEModel(VideoMAEConfig(image_size=16, patch_size=8, num_frames=4, tubelet_size=1, hidden_size=16,
                                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    else:
        model = VivitModel(VivitConfig(image_size=16, num_frames=4, tubelet_size=[1, 8, 8], hidden_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    path = tmp_path / kind
    model.save_pretrained(path)
    return str(path)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("kind", ["videomae", "vivit"])
def test_any_hf_video_encoder_runs_the_whole_study(tmp_path, settings, kind):
    import interpflow

    spec = {**SMALL, "model": {"path": _video_folder(tmp_path, kind)}, "random_control": None,
            "variables": ["direction"], "steering": {"dims": [2], "bins": 8}, "num_shards": 2}
    handle = interpflow.run(spec, settings=settings)
    assert handle.ok
    assert "video_model" not in handle.nodes() and "random_model" not in handle.nodes()
    depth = handle.table("depth", "table")
    assert depth.num_rows == 3 and "random_mean" not in depth.column_names
    assert handle.metrics("ablation_report")["cross_frame@all.direction.max_score"] < 0.5
    assert handle.outputs("physics_report", "figure").endswith(".png")


def test_bad_input_is_an_error_before_compute(tmp_path):
    from transformers import GPT2Config, GPT2Model

    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("physics_probing", list(overrides), check_store=False)
        return str(err.value)

    text_model = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(text_model)
    assert "model type 'gpt2' is not a video model" in error(f"model.path={text_model}")
    video = _video_folder(tmp_path, "videomae")                                # takes 4 frames of 16 x 16
    assert "clips.frames=8 but the model takes num_frames=4" in error(f"model.path={video}", "clips.size=16")
    assert "clips.size=32 but the model takes image_size=16" in error(f"model.path={video}", "clips.frames=4")
    assert "variables ['spin'] are not in the clips" in error("variables=[speed, spin]")
    assert "geometry.layer=9 is out of range: the model has layers 0..6" in error("geometry.layer=9")

    result = cli("run", "physics_probing", "patches.layer=-3", f"run.store={tmp_path / 'store'}", cwd=tmp_path,
                 timeout=120)
    assert result.returncode == 2 and "patches.layer=-3" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "clips").exists()
