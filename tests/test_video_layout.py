"""Token layout of video transformers, checked against tiny randomly initialised HF models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig, GPT2Config, TimesformerConfig, TimesformerModel, VideoMAEConfig, VideoMAEModel, ViTConfig,
    VivitConfig, VivitModel, VJEPA2Config,
)

from interpflow.tasks.video.layout import TokenGrid, patch_occupancy, pool_tokens, token_grid

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
FRAMES, SIZE = 4, 32


def _videomae():
    return VideoMAEConfig(image_size=SIZE, patch_size=16, num_frames=FRAMES, tubelet_size=2, **TINY)


def _vivit():
    return VivitConfig(image_size=SIZE, num_frames=FRAMES, tubelet_size=[1, 16, 16], **TINY)


def _timesformer():
    return TimesformerConfig(image_size=SIZE, patch_size=16, num_frames=FRAMES, **TINY)


MODELS = {"videomae": (_videomae, VideoMAEModel, lambda m, x: m.embeddings(x, None)),
          "vivit": (_vivit, VivitModel, lambda m, x: m.embeddings(x)),
          "timesformer": (_timesformer, TimesformerModel, lambda m, x: m.embeddings(x))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
    make_config, cls, embed = MODELS[request.param]
    torch.manual_seed(0)
    config = make_config()
    return request.param, config, cls(config).eval(), embed


def test_grids_from_configs():
    assert token_grid(_videomae()) == TokenGrid(prefix=0, frames=2, height=2, width=2, order="tp")
    assert token_grid(_vivit()) == TokenGrid(prefix=1, frames=4, height=2, width=2, order="tp")
    assert token_grid(_timesformer(), frames=FRAMES, size=SIZE) == TokenGrid(1, 4, 2, 2, "pt")
    grid = TokenGrid(prefix=1, frames=2, height=1, width=3, order="pt")
    assert grid.n_tokens == 7 and grid.patches == 3
    assert grid.frame_of().tolist() == [-1, 0, 1, 0, 1, 0, 1]
    assert grid.patch_of().tolist() == [-1, 0, 0, 1, 1, 2, 2]
    tp = TokenGrid(prefix=0, frames=2, height=1, width=3)
    assert tp.frame_of().tolist() == [0, 0, 0, 1, 1, 1] and tp.patch_of().tolist() == [0, 1, 2, 0, 1, 2]


def test_hidden_state_length_and_token_origin(built):
    """Perturbing one pixel frame / one patch changes exactly the embedding tokens frame_of / patch_of name."""
    name, config, model, embed = built
    grid = token_grid(config)
    torch.manual_seed(1)
    x = torch.randn(1, FRAMES, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        assert all(h.shape[1] == grid.n_tokens for h in out.hidden_states), name
        base = embed(model, x)
        tube = FRAMES // grid.frames
        for f in range(FRAMES):
            y = x.clone()
            y[:, f] += 1.0
            changed = (embed(model, y) - base).abs().amax(dim=(0, 2)) > 1e-6
            assert np.array_equal(changed.numpy(), grid.frame_of() == f // tube), (name, f)
        ph, pw = SIZE // grid.height, SIZE // grid.width
        for p in range(grid.patches):
            r, c = divmod(p, grid.width)
            y = x.clone()
            y[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] += 1.0
            changed = (embed(model, y) - base).abs().amax(dim=(0, 2)) > 1e-6
            assert np.array_equal(changed.numpy(), grid.patch_of() == p), (name, p)


def test_pool_tokens_by_hand():
    grid = TokenGrid(prefix=1, frames=2, height=1, width=2, order="tp")   # tokens: cls, (t0 p0, t0 p1, t1 p0, t1 p1)
    hidden = np.array([[[100.0], [1.0], [2.0], [3.0], [6.0]]])
    pooled, per_patch = pool_tokens(hidden, grid)
    assert pooled.shape == (1, 1) and per_patch.shape == (1, 2, 1)
    np.testing.assert_allclose(per_patch[0, :, 0], [2.0, 4.0])
    np.testing.assert_allclose(pooled[0], [3.0])
    pt = TokenGrid(prefix=1, frames=2, height=1, width=2, order="pt")     # cls, (p0 t0, p0 t1, p1 t0, p1 t1)
    pooled, per_patch = pool_tokens(torch.tensor(hidden).repeat(2, 1, 1), pt)
    assert isinstance(per_patch, torch.Tensor) and per_patch.shape == (2, 2, 1)
    np.testing.assert_allclose(per_patch[1, :, 0].numpy(), [1.5, 4.5])
    np.testing.assert_allclose(pooled[:, 0].numpy(), [3.0, 3.0])
    with pytest.raises(ValueError, match="expected"):
        pool_tokens(hidden[:, :4], grid)


def test_patch_occupancy_by_hand():
    grid = TokenGrid(prefix=0, frames=2, height=2, width=2)              # 4 pixel frames -> tubelet 2
    masks = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    masks[0, 0, 0, 0] = 1          # token frame 0, patch 0
    masks[0, 3, 1, 1] = 1          # token frame 1, patch 0 again: patch 0 touched in both token frames
    masks[0, 1, 3, 3] = 1          # token frame 0, patch 3
    masks[0, 0, 3, 3] = 1          # same token frame: still counts once
    occ = patch_occupancy(masks, grid, size=4)
    assert occ.shape == (1, 4) and occ.dtype == np.float32
    np.testing.assert_allclose(occ[0], [1.0, 0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="expected"):
        patch_occupancy(masks, grid, size=8)


@pytest.mark.parametrize("config, match", [
    (GPT2Config(), "model type 'gpt2' is not a video model; give a video encoder"),
    (BertConfig(), "model type 'bert' is not a video model"),
    (ViTConfig(), "model type 'vit' is not a video model"),
    (VJEPA2Config(), "video model type 'vjepa2' has no known token layout; supported: videomae"),
    (TimesformerConfig(attention_type="space_only"), "attention_type='space_only'"),
])
def test_not_a_supported_video_model(config, match):
    with pytest.raises(ValueError, match=match):
        token_grid(config)


@pytest.mark.parametrize("make_config, frames, size, match", [
    (_videomae, 8, None, "clips.frames=8 but the model takes num_frames=4 frames; set clips.frames=4"),
    (_videomae, 3, None, r"clips.frames=3 is not divisible by the model's temporal tubelet \(2\)"),
    (_vivit, 2, None, "clips.frames=2 but the model takes num_frames=4"),
    (_timesformer, 8, None, "clips.frames=8"),
    (_videomae, None, 64, "clips.size=64 but the model takes image_size=32.*set clips.size=32"),
    (_vivit, None, 24, "clips.size=24 is not divisible by the model's patch size"),
    (_timesformer, None, 20, "clips.size=20"),
])
def test_clips_the_model_cannot_take(make_config, frames, size, match):
    with pytest.raises(ValueError, match=match):
        token_grid(make_config(), frames=frames, size=size)
