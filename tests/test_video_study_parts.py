"""The parts of the Physics Emergence Zone study (issue #9) one by one: video activation extraction on a
tiny random VideoMAE, layerwise probes and the depth report, the direction code's geometry and its
per-patch map on planted activations, readout probes, attention ablations and steering on the tiny
model, and the one-page report's ground-truth checks."""

from __future__ import annotations

import json

import datasets
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEModel

from interpflow.tasks.activations import _to_storage
from interpflow.tasks.models import ModelConfig, load_model
from interpflow.tasks.probes.geometry import planted_ring
from interpflow.tasks.video.clips import ClipConfig, column, make_clips, targets
from interpflow.tasks.video.extract import (VideoExtractConfig, aligned, extract_clips_shard, read_patches,
                                            read_pooled, residual_sites)
from interpflow.tasks.video.interventions import (AblationConfig, ReadoutConfig, SteeringConfig, ablation_conditions,
                                                  ablation_report, ablation_shard, readout_angle, readout_probes,
                                                  readout_score, steering_report, steering_shard,
                                                  steering_subspace)
from interpflow.tasks.video.layout import TokenGrid, patch_occupancy
from interpflow.tasks.video.model import Objective, VideoModel
from interpflow.tasks.video.probing import DepthConfig, ProbeGrid, VariableProbe, depth_report, probe_variable
from interpflow.tasks.video.report import ReportConfig, physics_report
from interpflow.tasks.video.zone import (DirectionGeometryConfig, PatchDecodingConfig, direction_geometry,
                                         patch_decoding, zone_layer)
from interpflow.workflows.engine.graph import Shard

torch.set_num_threads(1)

SITES = residual_sites(2)                     # embed, blocks.0.resid_post, blocks.1.resid_post
MEAN, STD = [0.1, 0.2, 0.3], [0.3, 0.4, 0.5]  # deliberately not the 0.5 / 0.5 fallback


def _pooled_table(ids, x) -> pa.Table:
    """A pooled activation table as the extractor writes it: (id, vector float32)."""
    return pa.table({"id": np.asarray(ids, np.int64),
                     "vector": _to_storage(torch.from_numpy(np.asarray(x, np.float32)), "float32")}
                    ).replace_schema_metadata({"dtype": "float32"})


def _patch_table(ids, x, grid: str) -> pa.Table:
    """A per-patch table: (id, patch, vector) rows, x (clips, patches, D)."""
    n, p, d = x.shape
    return pa.table({"id": np.repeat(np.asarray(ids, np.int64), p),
                     "patch": np.tile(np.arange(p, dtype=np.int32), n),
                     "vector": _to_storage(torch.from_numpy(x.reshape(n * p, d).astype(np.float32)), "float32")}
                    ).replace_schema_metadata({"dtype": "float32", "patches": str(p), "grid": grid})


def _shuffled(table: pa.Table, seed: int) -> pa.Table:
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- the tiny random VideoMAE

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised 2-block VideoMAE (16x16 px, 8 px patches, 4 frames, tubelet 1: a 2x2 patch
    grid) saved with save_pretrained beside its pixel statistics and objective heads, loaded the way a
    model actor loads it."""
    path = tmp_path_factory.mktemp("tiny_videomae")
    torch.manual_seed(0)
    encoder = VideoMAEModel(VideoMAEConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32, image_size=16, patch_size=8, num_frames=4,
                                           tubelet_size=1, initializer_range=0.3)).eval()
    VideoModel(encoder, Objective(16), MEAN, STD).save_pretrained(path)
    assert json.loads((path / "preprocessor_config.json").read_text())["image_mean"] == MEAN
    return load_model(str(path), ModelConfig(device="cpu"))


def _normalised(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, C) -> (B, T, C, H, W), scaled to [0, 1] and normalised by the saved statistics."""
    x = (frames.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))


def test_extract_clips_shard_matches_the_models_hidden_states(tiny):
    data = make_clips(ClipConfig(n_clips=12, frames=4, size=16, radius=2.0))
    shard = Shard(index=1, count=3, ids=(7, 2, 9, 4, 0))
    cfg = VideoExtractConfig(sites=SITES, batch_size=2)
    out = extract_clips_shard(cfg, shard, tiny, data)

    assert set(out) == set(SITES) | {s + ".patches" for s in SITES} | {"metrics"}
    assert out["metrics"]["clips"] == 5 and out["metrics"]["tokens_per_clip"] == 16
    for site in SITES:
        pooled, patches = out[site], out[site + ".patches"]
        assert pooled.column("id").to_pylist() == list(shard.ids)            # the shard's order, not sorted
        assert pooled.column("vector").type.list_size == 16
        assert patches.num_rows == 5 * 4
        assert patches.column("id").to_pylist() == [i for i in shard.ids for _ in range(4)]
        assert patches.column("patch").to_pylist() == [0, 1, 2, 3] * 5
        assert patches.schema.metadata[b"grid"] == b"2x2" and patches.schema.metadata[b"patches"] == b"4"

    # The model's own hidden states on the same clips, pixels normalised by the saved statistics.
    rows = data.select(list(shard.ids))
    with torch.no_grad():
        hidden = tiny.model(pixel_values=_normalised(column(rows, "frames")), output_hidden_states=True).hidden_states
    assert len(hidden) == 3
    for site, h in zip(SITES, hidden):                   # hidden_states[0] = embeddings, [i + 1] = block i
        h = h.numpy()                                    # (5, 16 tokens frame-major, 16)
        _, x = read_pooled(out[site])
        expected = h[np.argsort(shard.ids)]
        np.testing.assert_allclose(x, expected.mean(1), rtol=1e-4, atol=1e-5)
        ids, xp, grid = read_patches(out[site + ".patches"])
        assert grid == (2, 2) and xp.shape == (5, 4, 16)
        np.testing.assert_allclose(xp, expected.reshape(5, 4, 4, 16).mean(1), rtol=1e-4, atol=1e-5)

    # read_pooled / read_patches return clips in id order whatever the row order of the table.
    ids, x = read_pooled(out["blocks.1.resid_post"])
    assert ids.tolist() == sorted(shard.ids) and x.shape == (5, 16)
    np.testing.assert_allclose(x, hidden[-1].numpy()[np.argsort(shard.ids)].mean(1), rtol=1e-4, atol=1e-5)
    ids_p, xp, grid = read_patches(_shuffled(out["embed.patches"], 0))
    assert ids_p.tolist() == sorted(shard.ids) and grid == (2, 2)
    np.testing.assert_allclose(xp.mean(1), read_pooled(out["embed"])[1], rtol=1e-5, atol=1e-6)
    assert aligned(data, ids).tolist() == sorted(shard.ids)
    with pytest.raises(ValueError, match="dataset lacks"):
        aligned(data, np.array([3, 99]))


# ------------------------------------------------------------------------------------- layer probes

@pytest.fixture(scope="module")
def clips1000():
    # 1000 scenes, not 300: at 300 a noise probe's CV circular score sits near -0.15 on these clips (the
    # outer test folds' mean direction points away from the training part's, and a probe that reads
    # nothing answers near that mean), while the shuffled control sits near 0; see the closing notes.
    return make_clips(ClipConfig(n_clips=1000, impossible_rate=0.3, frames=4, size=16, radius=2.0))


def _store(table: pa.Table, path) -> pads.Dataset:
    pq.write_table(table, path / "part-0.parquet")
    return pads.dataset(str(path), format="parquet")


def test_probe_variable_finds_planted_codes_and_not_noise(clips1000, tmp_path):
    ids = column(clips1000, "id")
    theta, speed = column(clips1000, "direction"), column(clips1000, "speed")
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(ids), 6))
    planted = np.column_stack([np.cos(theta), np.sin(theta), 0.2 * noise])
    grid = ProbeGrid(folds=5, inner_folds=3)

    (tmp_path / "dir").mkdir()
    acts = _store(_shuffled(_pooled_table(ids, planted), 1), tmp_path / "dir")
    res = probe_variable(VariableProbe(variable="direction", probe=grid.for_variable("direction")), acts, clips1000)
    m = res["metrics"]
    assert m["mean"] >= 0.9 and abs(m["control_mean"]) < 0.1
    assert res["folds"].num_rows == 2 * 5                           # real folds and one control's folds

    pure = probe_variable(VariableProbe(variable="direction", probe=grid.for_variable("direction")),
                          _pooled_table(ids, noise), clips1000)["metrics"]
    assert abs(pure["mean"]) < 0.1

    fast = np.column_stack([speed + 0.05 * noise[:, 0], noise[:, 1:]])
    r2 = probe_variable(VariableProbe(variable="speed", probe=grid.for_variable("speed")),
                        _shuffled(_pooled_table(ids, fast), 2), clips1000)["metrics"]
    assert r2["mean"] >= 0.9 and abs(r2["control_mean"]) < 0.1
    assert grid.for_variable("possible").cv.kind == "logistic"
    with pytest.raises(ValueError, match="unknown variable"):
        grid.for_variable("colour")


# ------------------------------------------------------------------------------------- depth report

DEPTH_SITES = ["embed", "blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]


def _metrics(prefix: str, curves: dict[str, list[float]], control: float = 0.01) -> dict:
    return {f"{prefix}.{var}.{i}": {"mean": s, "std": 0.02, "control_mean": control}
            for var, scores in curves.items() for i, s in enumerate(scores)}


def test_depth_report_names_emergence_peak_and_checks():
    cfg = DepthConfig(sites=DEPTH_SITES, variables=["speed", "direction"])
    trained = _metrics("trained", {"speed": [0.2, 0.5, 0.7, 0.8], "direction": [0.0, 0.0, 0.9, 0.9]})
    random = _metrics("random", {"speed": [0.1, 0.1, 0.12, 0.1], "direction": [0.0, 0.01, 0.0, 0.02]})
    out = depth_report(cfg, **trained, **random)
    s = out["metrics"]
    assert s["direction.emergence_layer"] == 2 and s["direction.peak_layer"] == 2
    assert s["direction.peak_score"] == pytest.approx(0.9)
    assert s["direction.chance_at_embed"] == 1.0 and s["direction.decoded"] == 1.0
    assert s["direction.control_at_chance"] == 1.0
    assert s["speed.peak_layer"] == 3 and s["speed.embed_score"] == pytest.approx(0.2)
    assert s["direction.random_peak_score"] == pytest.approx(0.02)
    table = out["table"]
    assert table.num_rows == 2 * 4 and "random_mean" in table.column_names
    direction = [r for r in table.to_pylist() if r["variable"] == "direction"]
    assert [r["site"] for r in direction] == DEPTH_SITES
    assert [r["mean"] for r in direction] == [0.0, 0.0, 0.9, 0.9]
    assert [r["random_mean"] for r in direction] == [0.0, 0.01, 0.0, 0.02]
    assert {r["kind"] for r in direction} == {"circular"}
    assert isinstance(out["figure"], plt.Figure)

    # Without the random-init control, and with direction readable at the embedding output and a leaky control.
    leaky = _metrics("trained", {"speed": [0.2, 0.5, 0.7, 0.8], "direction": [0.3, 0.3, 0.3, 0.3]}, control=0.2)
    s2 = depth_report(cfg, **leaky)
    assert "random_mean" not in s2["table"].column_names and "direction.random_peak_score" not in s2["metrics"]
    assert s2["metrics"]["direction.emergence_layer"] == -1
    assert s2["metrics"]["direction.chance_at_embed"] == 0.0 and s2["metrics"]["direction.decoded"] == 0.0
    assert s2["metrics"]["direction.control_at_chance"] == 0.0


# ------------------------------------------------------------------------------------------ the zone

def test_zone_layer_prefers_config_then_emergence_then_peak():
    assert zone_layer({"direction.emergence_layer": 2, "direction.peak_layer": 3}, 1) == 1
    assert zone_layer({"direction.emergence_layer": 2, "direction.peak_layer": 3}, None) == 2
    assert zone_layer({"direction.emergence_layer": -1, "direction.peak_layer": 3}, None) == 3


@pytest.mark.parametrize("k", [0, 1])
def test_direction_geometry_recovers_a_planted_ring(k):
    """Issue #9 must-show 2 on activations with a known answer: the ring comes back and the
    orthogonal-probe count is the planted 2 * (1 + k); the possible/impossible probe's plane, planted
    orthogonal to the ring, is reported far from direction's."""
    n = 2000
    x, angles, basis = planted_ring(n, d=64, redundant_copies=k, noise=0.1, copy_noise=0.5, seed=k)
    rng = np.random.default_rng(10 + k)
    possible = rng.integers(0, 2, n)
    u = rng.normal(size=64)
    u -= basis @ (basis.T @ u)
    x = x + np.outer(2.0 * possible - 1.0, u / np.linalg.norm(u))          # possible lives off the ring
    ids = 1000 + rng.permutation(n)                                          # ids unrelated to row order
    order = np.argsort(ids)
    data = datasets.Dataset.from_dict({"id": ids[order], "scene": np.arange(n), "direction": angles[order],
                                       "possible": possible[order]})
    cfg = DirectionGeometryConfig(sites=["embed"], variables=["direction"], layer=0)
    out = direction_geometry(cfg, {}, data, embed=_pooled_table(ids, x))
    m = out["metrics"]
    assert m["layer"] == 0
    assert m["aligned_correlation"] >= 0.95 and m["order_violations"] == 0
    assert abs(m["dimensionality"] - 2 * (1 + k)) <= 1
    b = out["basis"]
    assert b.shape == (64, m["dimensionality"])
    np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-8)
    assert m["direction_vs_possible_angle_deg"] > 75
    with pytest.raises(ValueError, match="out of range"):
        direction_geometry(cfg.model_copy(update={"layer": 1}), {}, data, embed=_pooled_table(ids, x))


def test_steering_subspace_is_the_planted_ring_at_the_zone_layer():
    n = 1500
    x, angles, planted = planted_ring(n, d=32, redundant_copies=1, noise=0.1, seed=3)
    ids = np.arange(n)
    data = datasets.Dataset.from_dict({"id": ids, "scene": ids, "direction": angles})
    noise = np.random.default_rng(0).normal(size=(n, 32))
    acts = {"embed": _pooled_table(ids, noise), "blocks.0.resid_post": _pooled_table(ids, x)}
    cfg = SteeringConfig(sites=list(acts), variables=["direction"])
    out = steering_subspace(cfg, {"direction.emergence_layer": 1, "direction.peak_layer": 1}, data, **acts)
    assert out["metrics"]["layer"] == 1 and abs(out["metrics"]["dims"] - 4) <= 1
    b = out["basis"]                                   # spans the planted copies, not the noise around them
    assert np.linalg.norm(planted.T @ b[:, :2], axis=0).min() > 0.9
    assert steering_subspace(cfg.model_copy(update={"layer": 0}), {}, data, **acts)["metrics"]["layer"] == 0
    with pytest.raises(ValueError, match="steering.layer=2 is out of range"):
        steering_subspace(cfg.model_copy(update={"layer": 2}), {}, data, **acts)


def test_patch_decoding_follows_the_ball():
    """Direction planted only in the patches the ball covers at the zone layer, nowhere at the embedding
    output: the zone map's skill tracks occupancy and every embedding patch is at chance."""
    data = make_clips(ClipConfig(n_clips=1500, frames=4, size=16, radius=2.0, seed=3))
    ids, theta = column(data, "id"), column(data, "direction")
    grid = TokenGrid(prefix=0, frames=4, height=2, width=2)
    occupancy = patch_occupancy(column(data, "masks"), grid, 16)                  # (clips, 4)
    rng = np.random.default_rng(0)
    code = np.stack([np.cos(theta), np.sin(theta)], 1)
    zone = rng.normal(size=(len(ids), 4, 6))
    zone[:, :, :2] += 3.0 * occupancy[:, :, None] * code[:, None, :]
    embed = rng.normal(size=(len(ids), 4, 6))
    patches = {"embed.patches": _shuffled(_patch_table(ids, embed, "2x2"), 1),
               "blocks.0.resid_post.patches": _shuffled(_patch_table(ids, zone, "2x2"), 2)}
    cfg = PatchDecodingConfig(sites=["embed", "blocks.0.resid_post"], variables=["direction"], examples=2)
    out = patch_decoding(cfg, {"direction.emergence_layer": 1, "direction.peak_layer": 1}, data, **patches)
    m = out["metrics"]
    assert m["layer"] == 1
    assert m["occupancy_correlation"] > 0.3
    assert m["skill_where_ball"] > m["skill_where_no_ball"] + 0.3
    assert m["embed.max_patch_score"] <= 0.05 and m["zone.max_patch_score"] > 0.3
    assert out["maps"].shape == (2, 4)
    table = out["table"]
    assert table.num_rows == len(ids) * 4
    np.testing.assert_allclose(np.asarray(table.column("occupancy")), occupancy.ravel())


# ------------------------------------------------------------------ readout, ablations and steering

@pytest.fixture(scope="module")
def study(tiny):
    """80 scenes with impossible twins (two 'possible' classes), their activations at every residual
    site of the tiny model, and the readout probes fitted on them."""
    data = make_clips(ClipConfig(n_clips=80, frames=4, size=16, radius=2.0, impossible_rate=0.5, seed=1))
    ids = tuple(column(data, "id").tolist())
    acts = extract_clips_shard(VideoExtractConfig(sites=SITES, per_patch=False), Shard(0, 1, ids), tiny, data)
    variables = ["speed", "direction", "possible"]
    readout = readout_probes(ReadoutConfig(sites=SITES, variables=variables), data,
                             **{s: acts[s] for s in SITES})
    return {"data": data, "acts": acts, "variables": variables, "readout": readout}


def test_readout_probes_hold_out_whole_scenes(study):
    data, readout = study["data"], study["readout"]["readout"]
    eval_ids = readout["eval_ids"]
    assert 5 <= len(eval_ids) < data.num_rows
    scenes, all_ids = column(data, "scene"), column(data, "id")
    evaluated = np.isin(all_ids, eval_ids)
    assert set(scenes[evaluated].tolist()).isdisjoint(scenes[~evaluated].tolist())   # twins stay together
    assert set(readout["probes"]) == {f"{s}|{v}" for s in SITES for v in study["variables"]}
    # The clean scores are the probes' scores on the stored activations of the evaluation clips.
    for site in SITES:
        ids, x = read_pooled(study["acts"][site])
        test = np.isin(ids, eval_ids)
        rows = data.select(aligned(data, ids[test]))
        for var in study["variables"]:
            score = readout_score(readout["probes"][f"{site}|{var}"], x[test], targets(rows, var))
            assert study["readout"]["metrics"][f"clean.{site}|{var}"] == pytest.approx(score, abs=1e-12)


def test_readout_probes_on_a_small_study(tiny):
    data = make_clips(ClipConfig(n_clips=40, frames=4, size=16, radius=2.0, impossible_rate=0.5, seed=1))
    ids = tuple(column(data, "id").tolist())
    acts = extract_clips_shard(VideoExtractConfig(sites=SITES, per_patch=False), Shard(0, 1, ids), tiny, data)
    out = readout_probes(ReadoutConfig(sites=SITES, variables=["speed", "direction", "possible"]), data,
                         **{s: acts[s] for s in SITES})
    assert len(out["readout"]["probes"]) == 9 and len(out["readout"]["eval_ids"]) >= 10


def test_ablation_conditions_and_unknown_kind():
    cfg = AblationConfig(sites=SITES, variables=["direction"], n_blocks=2)
    assert ablation_conditions(cfg) == ["none", "all@0", "all@1", "cross_frame@0", "cross_frame@1", "local@0",
                                        "local@1", "cross_frame@all"]
    with pytest.raises(ValueError, match="unknown"):
        ablation_conditions(cfg.model_copy(update={"kinds": ["all", "sideways"]}))
    with pytest.raises(ValueError, match="unknown"):
        ablation_conditions(cfg.model_copy(update={"every_layer": ["sideways"]}))


def test_ablation_shard_and_report(tiny, study):
    data, variables = study["data"], study["variables"]
    cfg = AblationConfig(sites=SITES, variables=variables, n_blocks=2, kinds=["all", "cross_frame"],
                         every_layer=["cross_frame"], batch_size=8)
    conditions = ablation_conditions(cfg)
    assert conditions == ["none", "all@0", "all@1", "cross_frame@0", "cross_frame@1", "cross_frame@all"]
    shards = [Shard(0, 2, tuple(conditions[:3])), Shard(1, 2, tuple(conditions[3:]))]
    tables = [ablation_shard(cfg, s, tiny, data, study["readout"]["readout"])["scores"] for s in shards]
    scores = pa.concat_tables(tables)
    assert scores.num_rows == len(conditions) * len(SITES) * len(variables)
    rows = scores.to_pylist()
    assert {(r["condition"], r["site"], r["variable"]) for r in rows} == {
        (c, s, v) for c in conditions for s in SITES for v in variables}
    score = {(r["condition"], r["site"], r["variable"]): r["score"] for r in rows}
    clean = study["readout"]["metrics"]
    for s in SITES:
        for v in variables:
            assert score[("none", s, v)] == pytest.approx(clean[f"clean.{s}|{v}"], abs=1e-5)
            # attention comes after the embedding: no ablation changes what the embed readout sees
            for c in conditions:
                assert score[(c, "embed", v)] == pytest.approx(score[("none", "embed", v)], abs=1e-5)
            # ablating block 1 leaves block 0's output alone
            assert score[("all@1", "blocks.0.resid_post", v)] == pytest.approx(
                score[("none", "blocks.0.resid_post", v)], abs=1e-5)
    changed = [abs(score[("all@0", s, v)] - score[("none", s, v)]) for s in SITES[1:] for v in variables]
    assert max(changed) > 1e-3
    assert {r["kind"] for r in rows if r["condition"] == "none"} == {"none"}
    assert {r["ablated"] for r in rows if r["condition"] == "cross_frame@all"} == {"all"}
    assert all(np.isfinite(r["objective_r2"]) for r in rows)          # the saved objective heads are scored
    objective = {r["condition"]: r["objective_r2"] for r in rows}
    assert objective["all@0"] != pytest.approx(objective["none"], abs=1e-4)

    out = ablation_report(cfg, scores)
    table = out["table"].to_pylist()
    assert len(table) == (len(conditions) - 1) * len(SITES) * len(variables)
    for r in table:
        assert r["clean_score"] == score[("none", r["site"], r["variable"])]
        assert r["drop"] == pytest.approx(r["clean_score"] - r["score"], abs=1e-12)
    m = out["metrics"]
    for v in variables:
        best_clean = max(score[("none", s, v)] for s in SITES)
        assert m[f"all@0.{v}.drop"] == pytest.approx(best_clean - max(score[("all@0", s, v)] for s in SITES))
    assert m["cross_frame@all.direction.max_score"] == pytest.approx(
        max(score[("cross_frame@all", s, "direction")] for s in SITES))
    assert "clean_objective_r2" in m and isinstance(out["figure"], plt.Figure)


def test_ablation_shard_on_a_bfloat16_model(tiny, study):
    half = load_model(tiny.source, ModelConfig(device="cpu", dtype="bfloat16"))
    cfg = AblationConfig(sites=SITES, variables=study["variables"], n_blocks=2)
    scores = ablation_shard(cfg, Shard(0, 1, ("none",)), half, study["data"], study["readout"]["readout"])["scores"]
    assert scores.num_rows == len(SITES) * len(study["variables"])
    clean = study["readout"]["metrics"]
    for r in scores.to_pylist():
        assert r["score"] == pytest.approx(clean[f"clean.{r['site']}|{r['variable']}"], abs=0.1)


def _hand_steered_rotation(tiny, study, cfg: SteeringConfig, layer: int, basis: np.ndarray) -> float:
    """Mean rotation (deg) of the last-layer readout when every token at residual site ``layer`` (0: the
    input of block 0, i + 1: the output of block i) is shifted, inside ``basis``, from the clip's
    direction-class mean to the mean of its direction rotated by ``cfg.rotate_deg``."""
    data, readout = study["data"], study["readout"]["readout"]
    ids, x = read_pooled(study["acts"][SITES[layer]])
    theta = column(data.select(aligned(data, ids)), "direction")
    width = 2 * np.pi / cfg.bins
    which = np.floor((theta + np.pi) / width).astype(int) % cfg.bins
    means = np.stack([x[which == b].mean(0) if (which == b).any() else x.mean(0) for b in range(cfg.bins)])
    rows = data.select(aligned(data, np.asarray(readout["eval_ids"])))
    t = column(rows, "direction")
    src = np.floor((t + np.pi) / width).astype(int) % cfg.bins
    dst = np.floor((t + np.radians(cfg.rotate_deg) + np.pi) / width).astype(int) % cfg.bins
    delta = torch.from_numpy(((means[dst] - means[src]) @ basis) @ basis.T).float()
    block = tiny.model.encoder.layer[0 if layer == 0 else layer - 1]
    pixels = _normalised(column(rows, "frames"))

    def last_angle(steer: bool) -> np.ndarray:
        def pre(mod, args, kwargs):
            return (args[0] + delta[:, None, :], *args[1:]), kwargs

        def post(mod, args, output):
            return (output[0] + delta[:, None, :], *output[1:]) if isinstance(output, tuple) else output + delta[:, None, :]

        handle = None
        if steer:
            handle = (block.register_forward_pre_hook(pre, with_kwargs=True) if layer == 0
                      else block.register_forward_hook(post))
        try:
            with torch.no_grad():
                last = tiny.model(pixel_values=pixels).last_hidden_state      # no final norm: block 1's output
        finally:
            if handle is not None:
                handle.remove()
        return readout_angle(readout["probes"][f"{SITES[-1]}|direction"], last.mean(1).numpy())

    rotation = np.angle(np.exp(1j * (last_angle(True) - last_angle(False))))
    return float(np.degrees(np.angle(np.exp(1j * rotation).mean())))


def test_steering_shard_and_report(tiny, study):
    cfg = SteeringConfig(sites=SITES, variables=study["variables"], dims=[4, 1, 2], bins=8, batch_size=8)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 2)))[0]
    acts = {s: study["acts"][s] for s in SITES}
    rotation = steering_shard(cfg, Shard(0, 1, (1, 2, 4)), tiny, study["data"], study["readout"]["readout"],
                              {"layer": 1}, basis, **acts)["rotation"]
    rows = rotation.to_pylist()
    assert [r["dims"] for r in rows] == [1, 2, 4] and [r["dims_used"] for r in rows] == [1, 2, 2]
    for r in rows:
        assert np.isfinite(r["probe_rotation_deg"]) and np.isfinite(r["head_rotation_deg"])
        assert 0 <= r["probe_rotation_abs_deg"] <= 180 and r["shift_norm"] > 0
    # k = 4 is capped to the basis' 2 columns: the very same steering as k = 2; a 1-D shift is shorter.
    assert rows[2]["probe_rotation_deg"] == rows[1]["probe_rotation_deg"]
    assert rows[2]["shift_norm"] == rows[1]["shift_norm"] and rows[0]["shift_norm"] < rows[1]["shift_norm"]
    # What the shard reports is the rotation of a hand-made shift at the output of block 0 ...
    assert rows[1]["probe_rotation_deg"] == pytest.approx(_hand_steered_rotation(tiny, study, cfg, 1, basis),
                                                          abs=1e-3)
    # ... and, steering the last block (the very site the readout reads), at the output of block 1.
    last = steering_shard(cfg, Shard(0, 1, (2,)), tiny, study["data"], study["readout"]["readout"],
                          {"layer": 2}, basis, **acts)["rotation"].to_pylist()[0]
    assert last["probe_rotation_deg"] == pytest.approx(_hand_steered_rotation(tiny, study, cfg, 2, basis), abs=1e-3)
    assert abs(last["probe_rotation_deg"]) > 1e-3

    out = steering_report(cfg, rotation)
    assert out["table"].num_rows == 3 and isinstance(out["figure"], plt.Figure)
    assert out["metrics"]["k1.probe_rotation_deg"] == rows[0]["probe_rotation_deg"]
    assert out["metrics"]["k2.probe_rotation_deg"] == rows[1]["probe_rotation_deg"]
    assert set(out["metrics"]) == {"k1.probe_rotation_deg", "k2.probe_rotation_deg", "k1.head_rotation_deg",
                                   "k2.head_rotation_deg"}


def test_steering_at_the_embedding_output_shifts_the_input_of_block_0(tiny, study):
    cfg = SteeringConfig(sites=SITES, variables=study["variables"], dims=[2], bins=8, batch_size=8)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 2)))[0]
    acts = {s: study["acts"][s] for s in SITES}
    row = steering_shard(cfg, Shard(0, 1, (2,)), tiny, study["data"], study["readout"]["readout"],
                         {"layer": 0}, basis, **acts)["rotation"].to_pylist()[0]
    assert row["probe_rotation_deg"] == pytest.approx(_hand_steered_rotation(tiny, study, cfg, 0, basis), abs=1e-3)


# ------------------------------------------------------------------------------------------ report

def _report_inputs(**changes) -> dict:
    inputs = {
        "depth": {"direction.chance_at_embed": 1.0, "direction.decoded": 1.0, "direction.control_at_chance": 1.0,
                  "direction.peak_layer": 2, "direction.emergence_layer": 1, "direction.peak_score": 0.9,
                  "direction.embed_score": 0.0, "speed.peak_layer": 3, "speed.emergence_layer": -1},
        "geometry": {"layer": 1, "circular_correlation": 0.98, "dimensionality": 4},
        "patches": {"embed.max_patch_score": 0.01, "zone.max_patch_score": 0.6, "occupancy_correlation": 0.5},
        "ablation": {"cross_frame@all.direction.max_score": 0.02},
        "steering": {"k1.probe_rotation_deg": 30.0, "k2.probe_rotation_deg": 85.0},
    }
    for key, value in changes.items():
        part, _, name = key.partition(":")
        if value is None:
            inputs[part].pop(name)
        else:
            inputs[part][name] = value
    return inputs


def test_physics_report_ground_truth_checks():
    cfg = ReportConfig(sites=DEPTH_SITES, variables=["speed", "direction"])
    good = physics_report(cfg, **_report_inputs())
    assert good["metrics"]["ground_truth_ok"] == 1.0
    assert len(good["summary"]["checks"]) == 6
    checks = [k for k in good["metrics"] if k.startswith("check.")]
    assert len(checks) == 6 and "check.cross_frame_ablation_chance" in checks
    assert [good["metrics"][k] for k in checks] == [1.0] * 6
    assert good["metrics"]["direction.peak_layer"] == 2 and good["metrics"]["direction.emergence_layer"] == 1
    assert any("2: 85" in line for line in good["summary"]["lines"])
    assert isinstance(good["figure"], plt.Figure)

    for change in ({"patches:occupancy_correlation": 0.05}, {"patches:embed.max_patch_score": 0.2},
                   {"ablation:cross_frame@all.direction.max_score": 0.5}, {"depth:direction.decoded": 0.0}):
        bad = physics_report(cfg, **_report_inputs(**change))
        assert bad["metrics"]["ground_truth_ok"] == 0.0, change
        assert sum(bad["metrics"][k] for k in checks) == 5.0, change
    # A check a run cannot show (no cross-frame@all ablation) is left out, not failed.
    partial = physics_report(cfg, **_report_inputs(**{"ablation:cross_frame@all.direction.max_score": None}))
    assert partial["metrics"]["ground_truth_ok"] == 1.0 and len(partial["summary"]["checks"]) == 5
