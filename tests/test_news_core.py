"""The news benchmark's pieces without Ray (issue #13): the layout loader and its per-problem messages,
the stand-in's ground truth, frame sampling and PyAV decoding, predictions files, and scoring of the
oracle and shuffled systems."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from interpflow.tasks.news import evaluate, layout, predictions, standin

SMALL = standin.StandInConfig(videos_per_category=4, frames=8, size=32)


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    standin.StandIn(SMALL).save_pretrained(str(root))
    return root


def _clone(copy_root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(copy_root, target)
    return target


def _rows(root) -> list[dict]:
    return [json.loads(line) for line in (root / layout.ANNOTATIONS).read_text().splitlines()]


def _write_rows(root, rows) -> None:
    (root / layout.ANNOTATIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_standin_is_in_the_layout_and_its_pixels_carry_the_annotations(copy_root):
    loaded = layout.load_news(layout.NewsDatasetConfig(), root=str(copy_root))
    items = loaded["items"].to_pylist()
    assert loaded["report"]["skipped"] == 0 and len(items) == 7 * 4
    assert {r["category"] for r in items} == set(layout.CATEGORIES)
    assert sum(r["split"] == "test" for r in items) == 7          # a quarter of each category
    for row in items[::5]:
        assert row["n_frames"] == SMALL.frames
        frames = layout.decode_frames(row["video_path"], list(range(SMALL.frames)))
        assert frames.shape == (SMALL.frames, 32, 32, 3)
        # the most common pixel is the location's background tint; the brightest is the category's colour
        pixels = frames.reshape(-1, 3).astype(int)
        values, counts = np.unique(pixels // 8, axis=0, return_counts=True)
        background = values[counts.argmax()] * 8
        assert np.abs(background - np.asarray(standin.LOCATIONS[row["location"]])).max() <= 8
        colour = standin.CATEGORY_LOOK[row["category"]][0]
        assert colour in row["visual_description"] and row["category"] in row["keywords"]
        assert row["location"] in row["title"] and row["location"].lower() in row["keywords"]


def test_sampling_policies_pick_the_stated_frames():
    uniform = layout.SamplingConfig(policy="uniform", clip_frames=4)
    assert layout.sample_clips(16, uniform) == [[2, 6, 10, 14]]
    segments = layout.SamplingConfig(policy="segments", clip_frames=4, max_segments=3)
    assert layout.sample_clips(16, segments) == [[0, 1, 2, 3], [6, 7, 8, 9], [12, 13, 14, 15]]
    strided = layout.SamplingConfig(policy="segments", clip_frames=4, stride=2, max_segments=8)
    assert layout.sample_clips(16, strided) == [[0, 2, 4, 6], [9, 11, 13, 15]]
    assert layout.sample_clips(3, segments) == [[0, 1, 2, 2]]      # shorter than a clip: the last frame repeats
    long = layout.sample_clips(1000, segments)
    assert len(long) == 3 and long[-1][-1] == 999                 # clips stay bounded however long the video


def test_decoding_returns_the_requested_frames_in_order(tmp_path):
    frames = np.stack([np.full((16, 16, 3), 12 * t, np.uint8) for t in range(20)])
    path = tmp_path / "ramp.mp4"
    layout.write_video(path, frames, fps=10)
    assert layout.frame_count(path) == 20
    decoded = layout.decode_frames(path, [7, 0, 19, 7])
    assert np.abs(decoded.reshape(4, -1).mean(1) - np.asarray([84, 0, 228, 84])).max() < 3
    assert layout.decode_frames(path, [3], size=8).shape == (1, 8, 8, 3)


def test_a_malformed_copy_gets_one_message_per_problem(copy_root, tmp_path):
    root = _clone(copy_root, tmp_path)
    rows = _rows(root)
    (root / layout.VIDEO_DIR / f"{rows[2]['id']}.mp4").unlink()
    rows[5]["category"] = "weather"
    rows[9]["id"] = rows[8]["id"]
    _write_rows(root, rows)
    with pytest.raises(layout.NewsLayoutError) as err:
        layout.load_news(layout.NewsDatasetConfig(), root=str(root))
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 problem(s)") and len(lines) == 4
    assert any(f"id {rows[2]['id']!r}" in line and "video file videos/" in line and "not found" in line
               for line in lines)
    assert any("category 'weather' is not one of disaster" in line for line in lines)
    assert any(f"id {rows[8]['id']!r} appears 2 times (rows 9, 10)" in line for line in lines)

    skipped = layout.load_news(layout.NewsDatasetConfig(on_problem="skip"), root=str(root))
    report = skipped["report"]
    assert report["skipped_by_reason"] == {"missing_video": 1, "unknown_category": 1, "duplicate_id": 1}
    assert report["skipped"] == 4 and report["kept"] == len(rows) - 4       # both rows of the duplicate id
    assert skipped["items"].num_rows == report["kept"] and skipped["metrics"]["skipped"] == 4


def test_a_missing_column_is_named_and_csv_keywords_split_on_semicolons(copy_root, tmp_path):
    root = _clone(copy_root, tmp_path)
    rows = _rows(root)
    (root / layout.ANNOTATIONS).unlink()
    table = pa.Table.from_pylist([{**r, "keywords": ";".join(r["keywords"])} for r in rows])
    pacsv.write_csv(table.drop_columns(["location"]), root / "annotations.csv")
    with pytest.raises(layout.NewsLayoutError, match="annotations.csv: column 'location' is missing"):
        layout.load_news(layout.NewsDatasetConfig(), root=str(root))
    pacsv.write_csv(table, root / "annotations.csv")
    items = layout.load_news(layout.NewsDatasetConfig(), root=str(root))["items"]
    assert items.column("keywords").to_pylist()[0] == rows[0]["keywords"]


def test_predictions_files_are_read_checked_and_aligned(copy_root, tmp_path):
    items = layout.load_news(layout.NewsDatasetConfig(), root=str(copy_root))["items"]
    truth = predictions.oracle(items)
    folder = tmp_path / "preds"
    folder.mkdir()
    rows = truth["captioning"].to_pylist()
    (folder / "captioning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:] + [
        {"id": "not-a-test-id", "caption": "x"}]))
    read = predictions.read_folder(str(folder))
    assert set(read) == {"captioning"}
    ids = [r["id"] for r in rows]
    aligned, counts = predictions.align(read["captioning"], "captioning", ids)
    assert aligned[0] == "" and aligned[1:] == [r["caption"] for r in rows[1:]]
    assert counts == {"missing": 1, "unknown": 1}
    (folder / "keywords.jsonl").write_text(json.dumps({"id": ids[0], "words": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"keywords.jsonl: column\(s\) \['keywords'\] missing"):
        predictions.read_folder(str(folder))


def test_oracle_scores_perfectly_and_shuffled_at_chance_on_every_task(copy_root):
    items = layout.load_news(layout.NewsDatasetConfig(), root=str(copy_root))["items"]
    systems = {"oracle": predictions.oracle(items), "shuffled": predictions.shuffled(items, seed=1)}
    perm = np.asarray([r["id"] for r in systems["shuffled"]["captioning"].to_pylist()])
    assert len(perm) == 7
    scores = {}
    for task in predictions.TASKS:
        out = evaluate.evaluate_task(evaluate.EvaluateConfig(task=task, chance_pairs=500), items,
                                     **{name: files[task] for name, files in systems.items()})
        scores[task] = out["metrics"]
        table = out["scores"]
        assert set(table.column("system").to_pylist()) == {"oracle", "shuffled"}
        assert set(table.column("category").to_pylist()) == {"all", *layout.CATEGORIES}
        assert (table.schema.metadata or {}).get(b"interpflow.report_table") == b"1"
    report = evaluate.news_report(evaluate.NewsReportConfig(), **scores)
    checks = report["checks"]
    assert {k for k, v in checks.items() if not v} == set(), checks
    assert scores["captioning"]["shuffled.corpus_bleu"] < 60 < scores["captioning"]["oracle.corpus_bleu"]
    assert scores["keywords"]["shuffled.f1"] < 0.5
    # a system that ranks the truth last everywhere fails the oracle check
    worst = {"oracle": predictions.oracle(items)["retrieval"]}
    rows = worst["oracle"].to_pylist()
    worst["oracle"] = pa.Table.from_pylist([{**r, "ranking": r["ranking"][1:] + r["ranking"][:1]} for r in rows])
    bad = evaluate.evaluate_task(evaluate.EvaluateConfig(task="retrieval"), items, **worst)["metrics"]
    assert bad["oracle.video_to_text.median_rank"] == 7 and bad["oracle.video_to_text.r@1"] == 0
    assert not evaluate.news_report(evaluate.NewsReportConfig(), retrieval=bad)["checks"]["retrieval.oracle_perfect"]


def test_dual_encoder_resumes_exactly_from_its_checkpoint_and_learns_the_pairing():
    import torch

    from interpflow.tasks.news import baselines
    from interpflow.workflows.engine.training import LocalTrainContext

    rng = np.random.default_rng(0)
    n, ids = 60, [f"v{i}" for i in range(60)]
    latent = rng.normal(size=(n, 6)).astype(np.float32)
    video = latent @ rng.normal(size=(6, 12)).astype(np.float32) + 0.05 * rng.normal(size=(n, 12)).astype(np.float32)
    text = latent @ rng.normal(size=(6, 10)).astype(np.float32)
    items = pa.table({"id": ids, "split": ["train"] * 40 + ["test"] * 20,
                      "visual_description": ["x"] * n, "story_description": ["x"] * n, "title": ["x"] * n})
    videos = {"embed": pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(video.ravel()), 12)})}
    texts = pa.table({"id": ids, "visual_description": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), 10)})
    cfg = baselines.DualEncoderConfig(steps=120, batch_size=16, checkpoint_every=50, dim=8, hidden=32)

    whole = baselines.train_dual_encoder(cfg, LocalTrainContext(), texts, items, **videos)
    first = LocalTrainContext()
    baselines.train_dual_encoder(cfg.model_copy(update={"steps": 50}), first, texts, items, **videos)
    resumed = baselines.train_dual_encoder(cfg, LocalTrainContext(resume_from=first.checkpoints[-1]), texts, items,
                                           **videos)
    assert resumed["metrics"]["resumed_from_step"] == 50
    for name, value in whole["weights"].items():
        assert torch.allclose(value, resumed["weights"][name], atol=1e-6), name
    ranking = baselines.retrieval_predictions(cfg, whole["weights"], texts, items, **videos)["retrieval"].to_pylist()
    hits = np.mean([r["ranking"][0] == r["id"] for r in ranking])
    assert hits >= 5 / 20                                                     # 5x chance on held-out pairs
