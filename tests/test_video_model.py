"""The embedded tiny video transformer (issue #9): its targets, its schedule, the folder it saves (HF
encoder + pixel statistics + objective heads) and the random-initialisation control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from interpflow.tasks.video.clips import ClipConfig
from interpflow.tasks.video.model import (RandomInitConfig, VideoModelConfig, learning_rate_factor, load_objective,
                                          motion_targets, pixel_stats, random_init, train_video_model)


def test_motion_targets_take_the_short_way_round_the_torus_and_mark_the_ball_patches():
    positions = np.array([[[6.0, 5.0], [7.5, 5.0], [1.0, 6.0]]])                # wraps past x = 8
    masks = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    masks[0, 0, 1, 6] = masks[0, 1, 5, 1] = 1
    next_step, steps, touched = motion_targets(positions, masks, size=8, patch=4, frames=2)
    assert np.allclose(steps[0], [[1.5, 0.0], [1.5, 1.0]])                       # not -6.5
    assert np.allclose(next_step[0], [1.5, 1.0])
    # 8 x 8 masks, patch 4: pixel (1, 6) is patch (0, 1) = 1; pixel (5, 1) is patch (1, 0) = 2
    assert touched[0, 0].tolist() == [False, True, False, False]
    assert touched[0, 1].tolist() == [False, False, True, False]


def test_learning_rate_warms_up_holds_then_decays_to_zero():
    cfg = VideoModelConfig(steps=1000, warmup=100, decay_from=0.75)
    assert learning_rate_factor(cfg, 0) == pytest.approx(0.01)
    assert learning_rate_factor(cfg, 99) == learning_rate_factor(cfg, 700) == 1.0
    assert 0.4 < learning_rate_factor(cfg, 875) < 0.6
    assert learning_rate_factor(cfg, 1000) == pytest.approx(0.0, abs=1e-9)


def test_trained_folder_loads_as_hf_model_with_its_pixel_stats_and_objective(tmp_path):
    clips = ClipConfig(n_clips=50, frames=4, size=16, radius=2.0)
    cfg = VideoModelConfig(layers=1, hidden_size=16, heads=2, intermediate_size=32, patch_size=8, steps=3,
                           batch_size=8, train_clips=100, eval_clips=20)
    model = train_video_model(cfg, clips)
    assert set(model.metrics) >= {"next_step_r2", "token_step_r2", "train_seconds"}
    model.save_pretrained(tmp_path / "m")
    encoder = AutoModel.from_pretrained(tmp_path / "m")
    assert encoder.config.model_type == "videomae" and encoder.config.tubelet_size == 1
    mean, std = pixel_stats(str(tmp_path / "m"))
    assert len(mean) == 3 and 0 < mean[0] < 0.2 and 0 < std[0] < 0.5        # black frames, a small white ball
    assert mean == pytest.approx(model.mean) and std == pytest.approx(model.std)
    heads = load_objective(str(tmp_path / "m"), 16)
    pixels = torch.zeros(2, 4, 3, 16, 16)
    with torch.no_grad():
        hidden = encoder(pixel_values=pixels).last_hidden_state
        clip_step, token_steps = heads(hidden, 4)
        expected = model.objective(model.encoder.eval()(pixel_values=pixels).last_hidden_state, 4)
    assert clip_step.shape == (2, 2) and token_steps.shape == (2, 4, 4, 2)
    assert torch.allclose(clip_step, expected[0], atol=1e-6)
    assert load_objective(str(tmp_path), 16) is None                          # not a folder trained here

    control = random_init(RandomInitConfig(seed=1), str(tmp_path / "m"))["model"]
    control.save_pretrained(tmp_path / "r")
    fresh = AutoModel.from_pretrained(tmp_path / "r")
    assert fresh.config.to_dict()["hidden_size"] == encoder.config.hidden_size
    assert pixel_stats(str(tmp_path / "r")) == (mean, std)                   # same inputs, other weights
    assert not torch.allclose(fresh.embeddings.patch_embeddings.projection.weight,
                              encoder.embeddings.patch_embeddings.projection.weight)


def test_patch_size_must_divide_the_frames():
    with pytest.raises(ValueError, match="patch_size=12 must divide clips.size=32"):
        train_video_model(VideoModelConfig(patch_size=12, steps=1), ClipConfig(n_clips=10))
    with pytest.raises(ValueError, match="multiple of heads"):
        VideoModelConfig(hidden_size=30, heads=4)
