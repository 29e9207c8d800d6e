"""Generated physics clips with exact ground truth, for probing video models.

Method reference: "Interpreting Physics in Video World Models" (arXiv 2602.07050): probe a video
model's activations for the speed, direction and acceleration of a moving ball, and compare possible
clips with impossible twins. The clips here make every one of those quantities known exactly.

One white ball (anti-aliased disc) moves over a black square frame, optionally over static
distractor discs of another colour. Each clip draws an initial speed uniformly in
[min_speed, max_speed], a direction uniformly in angle on [-pi, pi), and, for a fraction
``accel_rate`` of clips, a constant acceleration (magnitude uniform in
[max_accel / 4, max_accel], so an accelerating clip visibly accelerates; direction uniform).

Coordinates are pixels: x to the right (columns), y downwards (rows); the pixel in row i, column j
covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). Angles are measured in these image
coordinates. Worlds:
  * ``wrap``  a torus: positions wrap around and the disc is drawn across borders. The initial
    position is uniform over the frame and independent of the velocity, so where the ball is says
    nothing about where it goes (the position-balanced setting a probe needs).
  * ``walls`` the ball's centre stays in [radius, size - radius] and bounces elastically off the
    borders (exact event-driven integration, also under acceleration), so the disc never leaves
    the frame.

Ground truth per clip (``speed``, ``direction``, ``vx``, ``vy`` are the *initial* velocity):
``positions[t] = p0 + v t + a t^2 / 2`` (mod size under ``wrap``), hence the second difference of
positions is exactly (ax, ay) wherever no bounce happens. ``accel_direction`` is 0 where accel is 0.

Impossible twins (``impossible_rate > 0``): a twin repeats its original's scene (same ``scene`` id,
same distractors, same ground-truth columns, identical frames before ``violation_frame``) and breaks
physics once at ``violation_frame`` (>= 2):
  * ``teleport``      the ball jumps to a uniform random place at least size/4 away, then moves on;
  * ``speed_change``  the velocity is multiplied by 2-3 with no acceleration to explain it;
  * ``pass_through``  (``walls`` only) the ball passes through the wall it was about to bounce off.
Twins follow all originals, so the first ``n_clips`` rows do not depend on ``impossible_rate`` or
``distractors`` (separate random streams).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed

World = Literal["wrap", "walls"]
VIOLATIONS = ("teleport", "speed_change", "pass_through")
VARIABLES = {"speed": "scalar", "accel": "scalar", "velocity": "vector2", "acceleration": "vector2",
             "direction": "angle", "possible": "class"}
SCALAR_COLUMNS = ("x0", "y0", "vx", "vy", "speed", "direction", "ax", "ay", "accel", "accel_direction")
BALL_COLOUR = 1.0                 # white in every channel
_MIN_ACCEL_FRACTION = 0.25        # nonzero accelerations are at least this share of max_accel
_MIN_JUMP = 0.5                   # px: a violation moves the ball at least this far at its frame
_MAX_BOUNCES_PER_FRAME = 64       # ends a Zeno run of ever-shorter bounces (measure-zero starts)
_CHUNK = 256                      # clips rendered at once: bounds memory to ~10 MB of float32 per array


class ClipConfig(BaseModel):
    """What clips to generate; the defaults are the small embedded case (2000 clips, 8 x 32 x 32 x 3)."""

    model_config = ConfigDict(extra="forbid")
    n_clips: int = Field(2000, ge=1, le=1_000_000, description="number of (possible) clips, i.e. scenes")
    frames: int = Field(8, ge=2, le=256, description="frames per clip")
    size: int = Field(32, ge=8, le=512, description="frame height and width, pixels (square frames)")
    radius: float = Field(2.5, gt=0, description="ball radius, pixels; must be < size / 4")
    channels: int = Field(3, ge=1, le=4, description="colour channels of the frames")
    min_speed: float = Field(0.8, ge=0, description="lowest initial speed, px/frame")
    max_speed: float = Field(3.0, ge=0, description="highest initial speed, px/frame")
    accel_rate: float = Field(0.5, ge=0, le=1, description="fraction of clips with a nonzero constant "
                                                           "acceleration")
    max_accel: float = Field(0.3, ge=0, description="largest acceleration magnitude, px/frame^2")
    distractors: int = Field(0, ge=0, le=32, description="static distractor discs of another colour "
                                                         "(the ball passes over them)")
    world: World = Field("wrap", description="wrap: torus, position balanced; walls: elastic bounces "
                                             "off the borders")
    impossible_rate: float = Field(0.0, ge=0, le=1, description="fraction of clips that get an "
                                                                "impossible twin (appended after them)")
    seed: Seed = Field(0, description="seed for numpy.random.SeedSequence")

    @model_validator(mode="after")
    def _consistent(self) -> ClipConfig:
        if self.min_speed > self.max_speed:
            raise ValueError(f"min_speed ({self.min_speed}) must be <= max_speed ({self.max_speed}); "
                             f"raise max_speed or lower min_speed")
        if self.radius >= self.size / 4:
            raise ValueError(f"radius ({self.radius}) must be < size / 4 ({self.size / 4}); "
                             f"lower radius or raise size")
        if self.impossible_rate > 0 and self.frames < 3:
            raise ValueError(f"impossible_rate > 0 needs frames >= 3 (a violation happens at frame >= 2), "
                             f"got frames={self.frames}; raise frames or set impossible_rate=0")
        return self


# ----------------------------------------------------------------------------------------- physics

def _walls_step(x, v, a, tau, lo: float, hi: float):
    """Advance 1-D motions by time ``tau`` between walls lo and hi with exact elastic bounces.

    Each pass finds the earliest wall contact (a root of x + v s + a s^2 / 2 = wall with the velocity
    pointing out of the box), moves there and reverses the velocity; a pass with no contact in the
    remaining time finishes the step.
    """
    x, v, tau = x.copy(), v.copy(), tau.copy()
    for _ in range(_MAX_BOUNCES_PER_FRAME):
        live = tau > 0
        if not live.any():
            break
        best = np.full(x.shape, np.inf)
        wall = np.zeros(x.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            for w, outward in ((lo, -1.0), (hi, 1.0)):
                c = x - w
                disc = v * v - 2.0 * a * c
                q = -0.5 * (v + np.copysign(np.sqrt(np.maximum(disc, 0.0)), v))
                for s in (q / (0.5 * a), c / q):          # numerically stable pair of roots
                    ok = (live & (disc >= 0) & np.isfinite(s) & (s >= 0) & (s <= tau)
                          & (outward * (v + a * s) > 0) & (s < best))
                    best = np.where(ok, s, best)
                    wall = np.where(ok, w, wall)
        hit = np.isfinite(best)
        free = live & ~hit
        x = np.where(free, x + v * tau + 0.5 * a * tau * tau, x)
        v = np.where(free, v + a * tau, v)
        tau = np.where(free, 0.0, tau)
        s = np.where(hit, best, 0.0)
        x = np.where(hit, wall, x)
        v = np.where(hit, -(v + a * s), v)
        tau = tau - s
    else:  # a Zeno run (ball resting on a wall under acceleration): finish freely and clamp below
        x = x + v * tau + 0.5 * a * tau * tau
        v = v + a * tau
    return np.clip(x, lo, hi), v


def _trajectory(p, v, a, steps: int, cfg: ClipConfig, walls: bool):
    """Positions and velocities (m, steps + 1, 2) from states p, v (m, 2) under acceleration a (m, 2)."""
    if not walls:
        t = np.arange(steps + 1, dtype=np.float64)[None, :, None]
        pos = p[:, None] + v[:, None] * t + 0.5 * a[:, None] * t * t
        if cfg.world == "wrap":
            pos = np.mod(pos, cfg.size)
        return pos, v[:, None] + a[:, None] * t
    lo, hi = cfg.radius, cfg.size - cfg.radius
    pos = np.empty((len(p), steps + 1, 2))
    vel = np.empty_like(pos)
    x, u, acc = p.ravel().copy(), v.ravel().copy(), a.ravel()
    pos[:, 0], vel[:, 0] = p, v
    for k in range(1, steps + 1):
        x, u = _walls_step(x, u, acc, np.ones_like(x), lo, hi)
        pos[:, k], vel[:, k] = x.reshape(-1, 2), u.reshape(-1, 2)
    return pos, vel


def _uniform_positions(rng, n: int, cfg: ClipConfig) -> np.ndarray:
    """Uniform ball centres: anywhere on the torus, or inside the box under walls."""
    if cfg.world == "wrap":
        return rng.uniform(0.0, cfg.size, size=(n, 2))
    return rng.uniform(cfg.radius, cfg.size - cfg.radius, size=(n, 2))


def _distance(p, q, cfg: ClipConfig) -> np.ndarray:
    d = p - q
    if cfg.world == "wrap":
        d = np.mod(d + cfg.size / 2, cfg.size) - cfg.size / 2
    return np.hypot(d[..., 0], d[..., 1])


def _twins(rng, cfg: ClipConfig, pos, vel, acc):
    """Pick the clips that get an impossible twin and build the twins' trajectories.

    Returns (scenes, twin positions (m, T, 2), kind names, violation frames). All random draws are
    made for every twin whatever its kind, so the stream is consumed the same way for any outcome.
    """
    n, T = pos.shape[:2]
    m = int(round(cfg.impossible_rate * n))
    scenes = np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    u_kind = rng.random(m)
    t_jump = rng.integers(2, T, size=m)
    factor = rng.uniform(2.0, 3.0, size=m)
    speed_score = rng.random((m, T))
    dest = _uniform_positions(rng, m, cfg)
    p, v, a = pos[scenes], vel[scenes], acc[scenes]
    idx = np.arange(m)
    for _ in range(1000):  # resample destinations too close to where the ball would have been
        near = _distance(dest, p[idx, t_jump], cfg) < cfg.size / 4
        if not near.any():
            break
        dest[near] = _uniform_positions(rng, int(near.sum()), cfg)
    walls = cfg.world == "walls"

    # teleport: at frame t the ball is elsewhere, then moves on with the velocity it had
    tele = p.copy()
    for t in np.unique(t_jump):
        sel = t_jump == t
        tele[sel, t:] = _trajectory(dest[sel], v[sel, t], a[sel], T - 1 - t, cfg, walls)[0]

    # speed_change: the velocity at frame t-1 is scaled, so frame t is already off; t is drawn among
    # frames whose velocity is large enough for the change to show
    fast = np.hypot(v[..., 0], v[..., 1]) >= _MIN_JUMP                        # (m, T): speed at frame k
    can_speed = np.zeros((m, T), dtype=bool)
    can_speed[:, 2:] = fast[:, 1:-1]                                          # violation t needs frame t-1
    t_speed = np.argmax(np.where(can_speed, speed_score, -1.0), axis=1)
    sped = p.copy()
    for t in np.unique(t_speed[can_speed.any(axis=1)]):
        sel = can_speed.any(axis=1) & (t_speed == t)
        sped[sel, t - 1:] = _trajectory(p[sel, t - 1], factor[sel, None] * v[sel, t - 1], a[sel],
                                        T - t, cfg, walls)[0]

    # pass_through: from frame 1 on there are no walls, so the first bounce after frame 1 never happens
    through = p.copy()
    if walls and m:
        through[:, 1:] = _trajectory(p[:, 1], v[:, 1], a, T - 2, cfg, walls=False)[0]
    # first frame off the walled path (beyond rounding: the free path is computed in closed form), and
    # the frames before it copied bit for bit
    t_through = np.argmax(np.abs(through - p).max(axis=2) > 1e-6, axis=1)
    through = np.where(np.arange(T)[None, :, None] < t_through[:, None, None], p, through)

    # A kind is usable when the ball is visibly elsewhere at its frame (a bounce just before the frame
    # can shrink a speed change or a pass-through to a fraction of a pixel); teleport always is.
    def visible(twin, t):
        return (t >= 2) & (_distance(twin[idx, t], p[idx, t], cfg) >= _MIN_JUMP)

    eligible = np.stack([np.ones(m, dtype=bool), visible(sped, t_speed), visible(through, t_through)],
                        axis=1)                                               # VIOLATIONS order
    rank = np.floor(u_kind * eligible.sum(axis=1)).astype(np.int64)               # pick the rank-th eligible
    kind = np.argmax(np.cumsum(eligible, axis=1) > rank[:, None], axis=1)
    choice = kind[:, None, None]
    twin = np.where(choice == 0, tele, np.where(choice == 1, sped, through))
    frame = np.choose(kind, [t_jump, t_speed, t_through]).astype(np.int64)
    return scenes, twin, np.array(VIOLATIONS)[kind], frame


# --------------------------------------------------------------------------------------- rendering

def disc_coverage(centres, size: int, radius: float, wrap: bool) -> np.ndarray:
    """Soft disc coverage in [0, 1], shape (..., size, size), for centres (..., 2).

    Coverage is clip(radius + 0.5 - d, 0, 1) with d the distance from the pixel centre (a one-pixel
    linear edge), so coverage >= 0.5 exactly where d <= radius.
    """
    c = np.arange(size, dtype=np.float32) + 0.5
    dx = c - centres[..., 0:1].astype(np.float32)
    dy = c - centres[..., 1:2].astype(np.float32)
    if wrap:
        half = size / 2
        dx = np.mod(dx + half, size) - half
        dy = np.mod(dy + half, size) - half
    d = np.sqrt(dy[..., :, None] ** 2 + dx[..., None, :] ** 2)
    return np.clip(np.float32(radius + 0.5) - d, 0.0, 1.0)


def distractor_colour(channels: int) -> np.ndarray:
    """Reddish where there is colour, mid grey in one channel: never the ball's white."""
    if channels == 1:
        return np.array([0.5], dtype=np.float32)
    return np.array([1.0] + [0.3] * (channels - 1), dtype=np.float32)


def _render(positions, distractor_pos, cfg: ClipConfig):
    """uint8 frames (n, T, H, W, C) and ball masks (n, T, H, W) for positions (n, T, 2)."""
    n, T = positions.shape[:2]
    L, C = cfg.size, cfg.channels
    frames = np.empty((n, T, L, L, C), dtype=np.uint8)
    masks = np.empty((n, T, L, L), dtype=np.uint8)
    wrap = cfg.world == "wrap"
    dcol = distractor_colour(C)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        cov = disc_coverage(positions[s:e], cfg.size, cfg.radius, wrap)                # (c, T, L, L)
        masks[s:e] = cov >= 0.5
        if not distractor_pos.shape[1]:                                        # grey levels, one pass
            frames[s:e] = np.rint(cov * np.float32(255.0 * BALL_COLOUR)).astype(np.uint8)[..., None]
            continue
        under = disc_coverage(distractor_pos[s:e], cfg.size, cfg.radius, wrap).max(axis=1)[:, None]  # (c, 1, L, L)
        for k, colour in enumerate(dcol):        # ball over distractor: u + cov * (ball - u), per channel
            u = under * np.float32(255.0 * colour)
            frames[s:e, ..., k] = np.rint(u + cov * (np.float32(255.0 * BALL_COLOUR) - u))
    return frames, masks


# ----------------------------------------------------------------------------------------- dataset

def _features(cfg: ClipConfig) -> datasets.Features:
    T, L = cfg.frames, cfg.size
    cols = {"id": datasets.Value("int64"), "scene": datasets.Value("int64"),
            "possible": datasets.Value("int64"), "violation": datasets.Value("string"),
            "violation_frame": datasets.Value("int64")}
    cols.update({name: datasets.Value("float64") for name in SCALAR_COLUMNS})
    cols["positions"] = datasets.Array2D((T, 2), "float32")
    cols["frames"] = datasets.Array4D((T, L, L, cfg.channels), "uint8")
    cols["masks"] = datasets.Array3D((T, L, L), "uint8")
    return datasets.Features(cols)


def fixed_array(values: np.ndarray, feature) -> pa.ChunkedArray:
    """A datasets ArrayND column built from contiguous numpy blocks (no per-row Python objects).

    Chunks keep every chunk's innermost offsets inside int32 (the storage is list<...>, not large_list).
    """
    per_row = int(np.prod(values.shape[1:]))
    rows = max(1, (2**31 - 1) // max(per_row, 1))
    chunks = []
    for s in range(0, max(len(values), 1), rows):
        flat = pa.array(np.ascontiguousarray(values[s:s + rows]).reshape(-1))
        for dim in reversed(values.shape[1:]):
            offsets = pa.array(np.arange(len(flat) // dim + 1, dtype=np.int32) * np.int32(dim))
            flat = pa.ListArray.from_arrays(offsets, flat)
        chunks.append(pa.ExtensionArray.from_storage(feature(), flat))
    return pa.chunked_array(chunks)


def make_clips(cfg: ClipConfig) -> datasets.Dataset:
    """``n_clips`` clips (plus impossible twins) with frames, masks and exact ground truth.

    Columns: id, scene, possible, violation, violation_frame, the scalars in ``SCALAR_COLUMNS``,
    positions (T, 2) float32, frames (T, H, W, C) uint8, masks (T, H, W) uint8. Read arrays with
    ``column(data, name)``: datasets' numpy format widens uint8 to int64.
    """
    scene_ss, twin_ss, distractor_ss = np.random.SeedSequence(cfg.seed).spawn(3)
    rng = np.random.default_rng(scene_ss)
    n, T = cfg.n_clips, cfg.frames
    p0 = _uniform_positions(rng, n, cfg)
    speed = rng.uniform(cfg.min_speed, cfg.max_speed, size=n)
    direction = rng.uniform(-np.pi, np.pi, size=n)
    accelerating = rng.random(n) < cfg.accel_rate
    accel = np.where(accelerating, rng.uniform(_MIN_ACCEL_FRACTION, 1.0, size=n) * cfg.max_accel, 0.0)
    accel_direction = np.where(accel > 0, rng.uniform(-np.pi, np.pi, size=n), 0.0)
    v0 = np.stack([speed * np.cos(direction), speed * np.sin(direction)], axis=1)
    a = np.stack([accel * np.cos(accel_direction), accel * np.sin(accel_direction)], axis=1)
    pos, vel = _trajectory(p0, v0, a, T - 1, cfg, walls=cfg.world == "walls")

    scenes, twin_pos, kinds, vframes = _twins(np.random.default_rng(twin_ss), cfg, pos, vel, a)
    m = len(scenes)
    rows = np.concatenate([np.arange(n, dtype=np.int64), scenes])              # scene of every row
    positions = np.concatenate([pos, twin_pos]).astype(np.float32)             # drawn exactly as stored
    distractor_pos = _uniform_positions(np.random.default_rng(distractor_ss), n * cfg.distractors, cfg)
    distractor_pos = distractor_pos.reshape(n, cfg.distractors, 2)[rows]
    frames, masks = _render(positions, distractor_pos, cfg)

    scalars = {"x0": p0[:, 0], "y0": p0[:, 1], "vx": v0[:, 0], "vy": v0[:, 1], "speed": speed,
               "direction": direction, "ax": a[:, 0], "ay": a[:, 1], "accel": accel,
               "accel_direction": accel_direction}
    features = _features(cfg)
    table = {"id": pa.array(np.arange(n + m, dtype=np.int64)), "scene": pa.array(rows),
             "possible": pa.array(np.r_[np.ones(n, np.int64), np.zeros(m, np.int64)]),
             "violation": pa.array([""] * n + kinds.tolist(), pa.string()),
             "violation_frame": pa.array(np.r_[np.full(n, -1, np.int64), vframes])}
    table.update({name: pa.array(np.asarray(values, dtype=np.float64)[rows]) for name, values in scalars.items()})
    for name, values in (("positions", positions), ("frames", frames), ("masks", masks)):
        table[name] = fixed_array(values, features[name])
    # A fingerprint from the config and this module's source: datasets would otherwise hash the whole
    # in-memory table (pickling every frame), which costs more than generating it.
    fingerprint = hashlib.sha256(Path(__file__).read_bytes() + cfg.model_dump_json().encode()).hexdigest()[:16]
    return datasets.Dataset(pa.table(table), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------ access

def column(data, name: str) -> np.ndarray:
    """One column as numpy in its stored dtype (frames stay uint8), for a Dataset, Arrow table or dict.

    datasets' ``with_format("numpy")`` widens every integer column to int64 (8x the memory for frames);
    this reads the Arrow storage instead, honouring a Dataset's select/shuffle indices.
    """
    if isinstance(data, datasets.Dataset):
        if name not in data.column_names:
            raise KeyError(f"the dataset has no column '{name}'; its columns are {sorted(data.column_names)}")
        values = data.with_format("arrow")[name]
    elif isinstance(data, pa.Table):
        values = data.column(name)
    else:
        return np.asarray(data[name])
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values.type, pa.ExtensionType):
        return values.to_numpy()
    return values.to_numpy(zero_copy_only=False)


def targets(data, variable: str) -> np.ndarray:
    """The probe target for a name in ``VARIABLES``: (n,) for scalar, angle and class; (n, 2) for vector2."""
    if variable not in VARIABLES:
        raise ValueError(f"unknown variable '{variable}'; known variables are {sorted(VARIABLES)}")
    if variable == "velocity":
        return np.stack([column(data, "vx"), column(data, "vy")], axis=1)
    if variable == "acceleration":
        return np.stack([column(data, "ax"), column(data, "ay")], axis=1)
    return column(data, variable)


def clip_ids(cfg, data, **_) -> list[int]:
    """Stable shard ids: the id column in dataset order."""
    return column(data, "id").tolist()


def pixel_values(frames: np.ndarray, mean=0.5, std=0.5) -> np.ndarray:
    """uint8 frames (..., T, H, W, C) -> float32 (..., T, C, H, W) scaled to [0, 1] then normalised.

    The layout and normalisation a video transformer (e.g. VideoMAE) takes as ``pixel_values``;
    ``mean`` and ``std`` are a number or one value per channel.
    """
    frames = np.asarray(frames)
    if frames.ndim < 4:
        raise ValueError(f"frames: expected (..., T, H, W, C), got shape {frames.shape}")
    if not np.issubdtype(frames.dtype, np.integer):
        raise ValueError(f"frames: expected integer pixel values in [0, 255] (uint8 as make_clips writes "
                         f"them), got dtype {frames.dtype}; pass the raw frames, not already-scaled ones")
    x = frames.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
