"""Generated physics clips: exact ground truth, balance, physics, impossible twins, round trip."""

from __future__ import annotations

import time

import datasets
import numpy as np
import pytest
from pydantic import ValidationError

from interpflow.tasks.video import (
    VARIABLES, ClipConfig, clip_ids, column, make_clips, pixel_values, targets,
)

ARRAYS = ("positions", "frames", "masks")


@pytest.fixture(scope="module")
def default_clips():
    cfg = ClipConfig()
    start = time.perf_counter()
    data = make_clips(cfg)
    print(f"\nmake_clips(ClipConfig()) [{cfg.n_clips} clips, {cfg.frames}x{cfg.size}x{cfg.size}x{cfg.channels}]: "
          f"{time.perf_counter() - start:.2f} s")
    return cfg, data


def _wrapped(d, size):
    return np.mod(d + size / 2, size) - size / 2


def _all_columns(data):
    return {name: column(data, name) for name in data.column_names}


def test_default_shapes_and_timing(default_clips):
    cfg, data = default_clips
    assert len(data) == cfg.n_clips
    assert column(data, "id").tolist() == list(range(cfg.n_clips))
    assert column(data, "frames").shape == (cfg.n_clips, 8, 32, 32, 3)
    assert column(data, "frames").dtype == np.uint8
    assert column(data, "masks").shape == (cfg.n_clips, 8, 32, 32)
    assert column(data, "positions").shape == (cfg.n_clips, 8, 2)
    assert column(data, "positions").dtype == np.float32
    assert (column(data, "possible") == 1).all() and (column(data, "violation_frame") == -1).all()


def test_deterministic_for_a_seed_and_different_across_seeds():
    cfg = ClipConfig(n_clips=150, world="walls", impossible_rate=0.4, distractors=2)
    a, b = _all_columns(make_clips(cfg)), _all_columns(make_clips(cfg))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    c = _all_columns(make_clips(cfg.model_copy(update={"seed": 1})))
    assert not np.array_equal(a["frames"], c["frames"])
    assert not np.allclose(a["speed"], c["speed"])


def test_originals_do_not_depend_on_twins_or_distractors():
    base = make_clips(ClipConfig(n_clips=100))
    more = make_clips(ClipConfig(n_clips=100, impossible_rate=0.5, distractors=3))
    assert len(more) == 150
    for name in ("positions", "speed", "direction", "accel"):
        np.testing.assert_array_equal(column(base, name), column(more, name)[:100], err_msg=name)


@pytest.mark.parametrize("world", ["wrap", "walls"])
def test_mask_centroid_matches_positions(world):
    cfg = ClipConfig(n_clips=400, world=world, impossible_rate=0.5)
    data = make_clips(cfg)
    visible = column(data, "violation") != "pass_through"        # that twin leaves the frame on purpose
    masks, pos = column(data, "masks")[visible], column(data, "positions")[visible]
    centre = np.arange(cfg.size) + 0.5
    dx = centre - pos[..., 0:1]                                   # (n, T, W) pixel centre minus ball centre
    dy = centre - pos[..., 1:2]
    if world == "wrap":                                           # a disc drawn across a border
        dx, dy = _wrapped(dx, cfg.size), _wrapped(dy, cfg.size)
    count = masks.sum(axis=(2, 3))
    assert count.min() > 0
    mx = (masks * dx[:, :, None, :]).sum(axis=(2, 3)) / count
    my = (masks * dy[:, :, :, None]).sum(axis=(2, 3)) / count
    assert np.abs(mx).max() < 0.5 and np.abs(my).max() < 0.5
    if world == "wrap":   # the wrapped case must actually be exercised
        assert ((pos < cfg.radius) | (pos > cfg.size - cfg.radius)).any()
    # coverage is whole on every frame: nothing is cut off at a border (drawn wrapped, or kept inside)
    ink = column(data, "frames")[visible][..., 0].astype(np.float64).sum(axis=(2, 3)) / 255
    area = np.pi * cfg.radius ** 2
    assert np.abs(ink / area - 1).max() < 0.05


def test_wrap_is_position_balanced_and_fills_ranges(default_clips):
    cfg, data = default_clips
    x0, y0, direction, speed = (column(data, n) for n in ("x0", "y0", "direction", "speed"))
    for pos in (x0, y0):
        for f in (np.cos(direction), np.sin(direction), speed):
            assert abs(np.corrcoef(pos, f)[0, 1]) < 0.1
    assert x0.min() < 0.5 and x0.max() > cfg.size - 0.5 and y0.min() < 0.5 and y0.max() > cfg.size - 0.5
    assert speed.min() >= cfg.min_speed and speed.max() <= cfg.max_speed
    assert speed.min() < cfg.min_speed + 0.05 and speed.max() > cfg.max_speed - 0.05
    assert direction.min() >= -np.pi and direction.max() < np.pi
    counts, _ = np.histogram(direction, bins=8, range=(-np.pi, np.pi))
    assert counts.min() > 0.7 * len(direction) / 8
    np.testing.assert_allclose(np.hypot(column(data, "vx"), column(data, "vy")), speed, rtol=1e-12)
    np.testing.assert_allclose(np.arctan2(column(data, "vy"), column(data, "vx")), direction, atol=1e-12)
    accel = column(data, "accel")
    assert 0.4 < (accel > 0).mean() < 0.6
    assert accel.max() <= cfg.max_accel and accel[accel > 0].min() >= cfg.max_accel / 4


def _walls_inside(cfg: ClipConfig):
    """Clips of a walls world, their positions, and the centre's bounds, checked never to be left."""
    data = make_clips(cfg)
    pos = column(data, "positions").astype(np.float64)
    lo, hi = cfg.radius, cfg.size - cfg.radius
    assert pos.min() >= lo - 1e-5 and pos.max() <= hi + 1e-5
    return data, pos, lo, hi


def test_walls_keep_the_ball_inside_and_bounce_elastically():
    cfg = ClipConfig(n_clips=500, world="walls", frames=16, accel_rate=0.0)
    data, pos, lo, hi = _walls_inside(cfg)
    # without acceleration the exact answer is the straight line folded into [lo, hi]
    t = np.arange(cfg.frames)[None, :, None]
    free = np.stack([column(data, "x0"), column(data, "y0")], 1)[:, None] + \
        np.stack([column(data, "vx"), column(data, "vy")], 1)[:, None] * t
    w = hi - lo
    folded = np.mod(free - lo, 2 * w)
    folded = lo + np.where(folded > w, 2 * w - folded, folded)
    assert (free != folded).any(axis=(1, 2)).mean() > 0.5        # most clips bounce at least once
    np.testing.assert_allclose(pos, folded, atol=1e-4)


def test_walls_with_acceleration_stay_inside_and_follow_the_parabola_between_bounces():
    cfg = ClipConfig(n_clips=500, world="walls", frames=12, accel_rate=1.0)
    data, pos, lo, hi = _walls_inside(cfg)
    acc = np.stack([column(data, "ax"), column(data, "ay")], 1)[:, None]
    second = pos[:, 2:] - 2 * pos[:, 1:-1] + pos[:, :-2]
    # a frame step moves at most max_speed + max_accel * frames; farther than that from a wall, no bounce
    reach = cfg.max_speed + cfg.max_accel * cfg.frames
    away = np.minimum(pos - lo, hi - pos) > reach
    clear = away[:, 2:] & away[:, 1:-1] & away[:, :-2]
    assert clear.sum() > 500
    np.testing.assert_allclose(np.broadcast_to(acc, second.shape)[clear], second[clear], atol=1e-4)


def test_wrap_acceleration_is_the_second_difference():
    cfg = ClipConfig(n_clips=500, accel_rate=0.7, max_accel=0.5, frames=10)
    data = make_clips(cfg)
    pos = column(data, "positions").astype(np.float64)
    acc = np.stack([column(data, "ax"), column(data, "ay")], 1)[:, None]
    vel = np.stack([column(data, "vx"), column(data, "vy")], 1)[:, None]
    second = _wrapped(pos[:, 2:] - 2 * pos[:, 1:-1] + pos[:, :-2], cfg.size)
    np.testing.assert_allclose(second, np.broadcast_to(acc, second.shape), atol=1e-4)
    np.testing.assert_allclose(_wrapped(pos[:, 1:2] - pos[:, :1], cfg.size), vel + acc / 2, atol=1e-4)
    assert (column(data, "accel") == 0).any() and (column(data, "accel") > 0).any()
    np.testing.assert_allclose(np.hypot(acc[:, 0, 0], acc[:, 0, 1]), column(data, "accel"), atol=1e-12)


@pytest.mark.parametrize("world", ["wrap", "walls"])
def test_impossible_twins_break_physics_only_from_their_violation_frame(world):
    cfg = ClipConfig(n_clips=300, world=world, impossible_rate=1.0, distractors=1)
    data = make_clips(cfg)
    n, L = cfg.n_clips, cfg.size
    cols = _all_columns(data)
    assert len(data) == 2 * n and cols["id"].tolist() == list(range(2 * n))
    assert (cols["possible"][:n] == 1).all() and (cols["possible"][n:] == 0).all()
    assert (cols["violation"][:n] == "").all() and (cols["violation_frame"][:n] == -1).all()
    scene = cols["scene"]
    np.testing.assert_array_equal(scene[:n], np.arange(n))
    np.testing.assert_array_equal(np.sort(scene[n:]), np.arange(n))   # rate 1: every scene has one twin
    kinds = set(cols["violation"][n:].tolist())
    assert kinds == ({"teleport", "speed_change", "pass_through"} if world == "walls"
                     else {"teleport", "speed_change"})
    for k in range(n, 2 * n):
        orig, vf, kind = scene[k], cols["violation_frame"][k], cols["violation"][k]
        assert 2 <= vf <= cfg.frames - 1
        for name in ("speed", "direction", "x0", "ax"):
            assert cols[name][k] == cols[name][orig]
        for name in ARRAYS:
            np.testing.assert_array_equal(cols[name][k][:vf], cols[name][orig][:vf], err_msg=f"{name} {kind}")
        step = cols["positions"][k][vf] - cols["positions"][orig][vf]
        if world == "wrap":
            step = _wrapped(step, L)
        assert np.hypot(*step) > 0.1, kind
        assert not np.array_equal(cols["masks"][k][vf], cols["masks"][orig][vf]), kind
        if kind == "teleport":
            assert np.hypot(*step) >= L / 4 - 1e-4
        if kind == "pass_through":   # out through a wall: the centre leaves the box the walls allow
            out = cols["positions"][k][vf:]
            assert ((out < cfg.radius - 1e-3) | (out > L - cfg.radius + 1e-3)).any()
        if kind == "speed_change" and world == "wrap":   # no bounce: the step is scaled by 2-3
            acc = np.array([cols["ax"][k], cols["ay"][k]])
            before = cols["positions"][orig][vf - 1].astype(np.float64)
            twin = _wrapped(cols["positions"][k][vf] - before, L) - acc / 2
            plain = _wrapped(cols["positions"][orig][vf] - before, L) - acc / 2
            assert 2 - 1e-3 <= np.hypot(*twin) / np.hypot(*plain) <= 3 + 1e-3


def test_distractors_have_another_colour_and_masks_only_the_ball():
    cfg = ClipConfig(n_clips=50, distractors=3)
    data = make_clips(cfg)
    frames, masks = column(data, "frames"), column(data, "masks")
    ball = masks == 1
    assert (frames[ball].min(axis=-1) >= 128).all()               # the ball is white on top
    red = (frames[..., 0] > 0) & (frames[..., 1] < frames[..., 0])
    assert red.any() and not (red & ball & (frames[..., 1] == 255)).any()
    # distractors are static: pixels the ball's soft edge never reaches are the same in every frame
    centre = np.arange(cfg.size) + 0.5
    pos = column(data, "positions")
    dx = _wrapped(centre - pos[..., 0:1], cfg.size)[:, :, None, :]
    dy = _wrapped(centre - pos[..., 1:2], cfg.size)[:, :, :, None]
    far = (np.hypot(dx, dy) > cfg.radius + 0.5).all(axis=1)                 # (n, H, W)
    still = (frames == frames[:, :1]).all(axis=(1, 4))
    assert still[far].all()
    assert (far & red[:, 0]).sum() > 100                                    # and they are there to see


def test_round_trip_through_disk(tmp_path):
    cfg = ClipConfig(n_clips=40, impossible_rate=0.5, distractors=1)
    data = make_clips(cfg)
    data.save_to_disk(str(tmp_path / "clips"))
    back = datasets.load_from_disk(str(tmp_path / "clips"))
    assert back.features == data.features
    for name in data.column_names:
        np.testing.assert_array_equal(column(back, name), column(data, name), err_msg=name)
    row = back.with_format("numpy")[3]
    assert row["frames"].shape == (cfg.frames, cfg.size, cfg.size, cfg.channels)
    np.testing.assert_array_equal(row["frames"], column(data, "frames")[3])
    whole = back.with_format("numpy")["frames"][:]
    assert whole.shape == (len(data), cfg.frames, cfg.size, cfg.size, cfg.channels)
    np.testing.assert_array_equal(whole, column(data, "frames"))
    picked = back.select([5, 2])                                    # column() honours select's indices
    np.testing.assert_array_equal(column(picked, "masks"), column(data, "masks")[[5, 2]])


@pytest.mark.parametrize("bad, field", [
    ({"frames": 1}, "frames"), ({"size": 4}, "size"), ({"min_speed": 2.0, "max_speed": 1.0}, "min_speed"),
    ({"radius": 8.0}, "radius"), ({"world": "sphere"}, "world"), ({"accel_rate": 1.5}, "accel_rate"),
    ({"frames": 2, "impossible_rate": 0.5}, "impossible_rate"), ({"n_clip": 5}, "n_clip"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        ClipConfig(**bad)
    assert field in str(err.value)


def test_targets_ids_and_pixel_values():
    cfg = ClipConfig(n_clips=30, impossible_rate=0.5)
    data = make_clips(cfg)
    n = len(data)
    shapes = {"scalar": (n,), "angle": (n,), "class": (n,), "vector2": (n, 2)}
    for name, kind in VARIABLES.items():
        assert targets(data, name).shape == shapes[kind], name
    np.testing.assert_array_equal(targets(data, "velocity")[:, 1], column(data, "vy"))
    assert set(targets(data, "possible").tolist()) == {0, 1}
    with pytest.raises(ValueError, match="known variables.*direction"):
        targets(data, "colour")
    assert clip_ids(None, data) == list(range(n))

    frames = column(data, "frames")
    px = pixel_values(frames[0])
    assert px.shape == (cfg.frames, cfg.channels, cfg.size, cfg.size) and px.dtype == np.float32
    assert px.min() == -1.0 and px.max() == 1.0
    np.testing.assert_allclose(px[2, 1], frames[0, 2, :, :, 1] / 127.5 - 1, atol=1e-6)
    assert pixel_values(frames[:4]).shape == (4, cfg.frames, cfg.channels, cfg.size, cfg.size)
    np.testing.assert_array_equal(pixel_values(frames[0].astype(np.int64)), px)   # datasets' numpy format
    with pytest.raises(ValueError, match="frames"):
        pixel_values(frames[0] / 255.0)
