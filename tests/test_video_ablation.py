"""Attention ablations on tiny randomly initialised VideoMAE and ViViT models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    TimesformerConfig, TimesformerModel, VideoMAEConfig, VideoMAEModel, VivitConfig, VivitModel,
)

from interpflow.tasks.video.ablation import IMPLEMENTATION, attention_modules, ablate, ablation_mask
from interpflow.tasks.video.layout import TokenGrid, token_grid

FRAMES = 4
TINY = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)


def _model(name: str, layers: int, size: int = 16):
    torch.manual_seed(0)
    if name == "videomae":      # tubelet 2: 4 pixel frames -> 2 token frames
        return VideoMAEModel(VideoMAEConfig(image_size=size, patch_size=8, num_frames=FRAMES, tubelet_size=2,
                                            num_hidden_layers=layers, **TINY)).eval()
    return VivitModel(VivitConfig(image_size=size, num_frames=FRAMES, tubelet_size=[1, 8, 8],
                                  num_hidden_layers=layers, **TINY)).eval()


def _clip(size: int = 16, seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(1, FRAMES, 3, size, size)


def _run(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state[0]


def _changed(a, b):
    return (a - b).abs().amax(dim=-1) > 1e-5


def test_masks_by_hand():
    grid = TokenGrid(prefix=1, frames=2, height=1, width=2)       # cls, t0p0, t0p1, t1p0, t1p1
    assert torch.equal(ablation_mask("all", grid), torch.eye(5, dtype=torch.bool))
    cross = ablation_mask("cross_frame", grid).int().tolist()
    assert cross == [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    line = TokenGrid(prefix=0, frames=1, height=1, width=4)
    local = ablation_mask("local", line, window_frames=0, window_patches=1).int().tolist()
    assert local == [[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 1]]


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_no_layers_is_the_plain_forward_and_restores(name):
    model = _model(name, layers=2)
    grid, x = token_grid(model.config), _clip()
    before = model.config._attn_implementation
    plain = _run(model, x)
    with ablate(model, [], "all", grid):
        assert model.config._attn_implementation == IMPLEMENTATION
        torch.testing.assert_close(_run(model, x), plain, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == before
    with ablate(model, [1], "all", grid):                          # only block 1's attention is marked
        marked = [hasattr(m, "_interpflow_ablation_mask") for m in attention_modules(model)]
        assert marked == [False, True]
        assert _changed(_run(model, x), plain).any()
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(model, [0, 1], "cross_frame", grid):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_interpflow_ablation_mask") for m in attention_modules(model))
    torch.testing.assert_close(_run(model, x), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_cross_frame_keeps_frames_apart(name):
    model = _model(name, layers=2)
    grid, x = token_grid(model.config), _clip()
    y = x.clone()
    y[:, FRAMES - 1] += 1.0                                          # last pixel frame -> last token frame
    others = torch.from_numpy(grid.frame_of() != grid.frames - 1)    # other frames, and CLS
    assert _changed(_run(model, x), _run(model, y))[others].any()    # control: attention mixes frames
    with ablate(model, [0, 1], "cross_frame", grid):
        changed = _changed(_run(model, x), _run(model, y))
    assert not changed[others].any() and changed[~others].all()


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_all_keeps_tokens_apart(name):
    model = _model(name, layers=1)
    grid, x = token_grid(model.config), _clip()
    y = x.clone()
    y[:, 0, :, 8:, :8] += 1.0                                        # pixel frame 0, patch row 1, col 0
    token = torch.from_numpy((grid.patch_of() == 2) & (grid.frame_of() == 0))
    assert _changed(_run(model, x), _run(model, y))[~token].any()
    with ablate(model, [0], "all", grid):
        changed = _changed(_run(model, x), _run(model, y))
    assert torch.equal(changed, token)


def test_local_hides_neighbours_only():
    model = _model("vivit", layers=1, size=32)                       # 4 frames x 4 x 4 patches + CLS
    grid, x = token_grid(model.config), _clip(size=32)
    frame, patch = torch.from_numpy(grid.frame_of()), torch.from_numpy(grid.patch_of())
    query = int(((frame == 1) & (patch == 1 * 4 + 1)).nonzero())    # t=1, row 1, col 1

    def poke(t, r, c):
        y = x.clone()
        y[:, t, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
        return y

    near, far = poke(2, 2, 2), poke(1, 3, 3)                         # |d| = 1 in t, row, col; row/col 2 away
    assert _changed(_run(model, x), _run(model, near))[query]        # control: plain attention sees it
    with ablate(model, [0], "local", grid, window_frames=1, window_patches=1):
        base = _run(model, x)
        assert not _changed(base, _run(model, near))[query]
        assert _changed(base, _run(model, far))[query]


def test_bad_inputs():
    model = _model("videomae", layers=2)
    grid = token_grid(model.config)
    with pytest.raises(ValueError, match="kind='bogus'"):
        with ablate(model, [0], "bogus", grid):
            pass
    with pytest.raises(ValueError, match=r"layers=\[0, 2\].*valid block indices are 0..1"):
        with ablate(model, [0, 2], "all", grid):
            pass
    with pytest.raises(ValueError, match="layers=.*-1"):
        with ablate(model, [-1], "all", grid):
            pass
    with pytest.raises(ValueError, match="window_frames=-1"):
        with ablate(model, [0], "local", grid, window_frames=-1):
            pass
    with pytest.raises(ValueError, match="grid=.*token_grid"):
        with ablate(model, [0], "all", TokenGrid(prefix=1, frames=2, height=2, width=2)):
            pass
    torch.manual_seed(0)
    timesformer = TimesformerModel(TimesformerConfig(image_size=16, patch_size=8, num_frames=FRAMES,
                                                     num_hidden_layers=1, **TINY)).eval()
    with pytest.raises(ValueError, match="supports VideoMAE and ViViT.*'timesformer'"):
        with ablate(timesformer, [0], "all", token_grid(timesformer.config)):
            pass
    assert model.config._attn_implementation != IMPLEMENTATION
