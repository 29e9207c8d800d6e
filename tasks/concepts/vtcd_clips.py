"""Clips with planted ground truth for video concept discovery (VTCD).

A white ball moves across a black torus (positions wrap, the start is uniform over the frame) while a
static distractor square of another colour sits somewhere in the frame. The label is the ball's
horizontal direction (0 = left, 1 = right), drawn within ``max_angle`` of the horizontal, or 2 = still
(the ball at rest; ``classes=3``, the default), so the only cue is motion: no single frame tells the
classes apart, and the square says nothing about the label. The still class is there so that no
moving class is what the model answers when it sees nothing: with left and right alone, a classifier
can learn "left, or else right", and then nothing removed from a right-moving video lowers p(right).
Every clip stores the ball's mask per frame and the square's mask, so a discovered concept can be
checked against the object it covers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import BALL_COLOUR, disc_coverage, distractor_colour, fixed_array

CLASSES = ("left", "right", "still")


class ConceptClipConfig(BaseModel):
    """The planted clips; defaults: 480 clips of 8 x 64 x 64 x 3, a third of each class."""

    model_config = ConfigDict(extra="forbid")
    n_clips: int = Field(480, ge=4, le=200_000, description="clips, the classes in turn (left, right[, still])")
    classes: int = Field(3, ge=2, le=3, description="2: left and right; 3: also still (the ball at rest), so that "
                                                     "seeing no motion has a class of its own")
    frames: int = Field(8, ge=2, le=64)
    size: int = Field(64, ge=16, le=256, description="frame side, pixels")
    channels: int = Field(3, ge=1, le=4)
    radius: float = Field(5.0, gt=0, description="ball radius, pixels")
    min_speed: float = Field(2.5, gt=0, description="px/frame")
    max_speed: float = Field(4.0, gt=0, description="px/frame")
    max_angle: float = Field(30.0, ge=0, lt=90, description="largest angle of the motion from the horizontal, deg")
    square: int = Field(14, ge=2, description="side of the static distractor square, pixels")
    square_intensity: float = Field(0.35, gt=0, le=1, description="brightness of the square's colour (the ball is "
                                                                  "white): a visible, irrelevant distractor")
    seed: Seed = 0

    @model_validator(mode="after")
    def _fits(self) -> ConceptClipConfig:
        if self.min_speed > self.max_speed:
            raise ValueError(f"min_speed={self.min_speed} exceeds max_speed={self.max_speed}")
        if self.square >= self.size // 2 or self.radius >= self.size / 4:
            raise ValueError(f"square={self.square} and radius={self.radius} must stay small against size={self.size} "
                             "(square < size/2, radius < size/4)")
        return self


def _features(cfg: ConceptClipConfig) -> datasets.Features:
    T, L = cfg.frames, cfg.size
    return datasets.Features({
        "id": datasets.Value("int64"), "label": datasets.Value("int64"),
        "frames": datasets.Array4D((T, L, L, cfg.channels), "uint8"),
        "ball": datasets.Array3D((T, L, L), "uint8"), "square": datasets.Array2D((L, L), "uint8")})


def make_concept_clips(cfg: ConceptClipConfig) -> datasets.Dataset:
    """Columns: id, label (0 left, 1 right, 2 still), frames (T, H, W, C) uint8, ball (T, H, W) and square (H, W)
    masks (1 = object). Read arrays with ``tasks.video.clips.column``."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed))
    n, T, L = cfg.n_clips, cfg.frames, cfg.size
    label = np.arange(n) % cfg.classes
    angle = np.deg2rad(rng.uniform(-cfg.max_angle, cfg.max_angle, n)) + np.where(label == 1, 0.0, np.pi)
    speed = np.where(label == 2, 0.0, rng.uniform(cfg.min_speed, cfg.max_speed, n))
    start = rng.uniform(0, L, (n, 2))
    t = np.arange(T)[None, :, None]
    velocity = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=1)[:, None, :]
    centres = np.mod(start[:, None, :] + velocity * t, L).astype(np.float32)          # (n, T, 2)
    corner = rng.integers(0, L - cfg.square + 1, (n, 2))
    square = np.zeros((n, L, L), dtype=np.uint8)
    for i, (x, y) in enumerate(corner):
        square[i, y:y + cfg.square, x:x + cfg.square] = 1
    cover = disc_coverage(centres, L, cfg.radius, wrap=True)                            # (n, T, L, L)
    frames = np.empty((n, T, L, L, cfg.channels), dtype=np.uint8)
    for k, colour in enumerate(cfg.square_intensity * distractor_colour(cfg.channels)):   # ball over the square
        under = square[:, None].astype(np.float32) * np.float32(255.0 * colour)
        frames[..., k] = np.rint(under + cover * (np.float32(255.0 * BALL_COLOUR) - under))
    features = _features(cfg)
    table = {"id": pa.array(np.arange(n, dtype=np.int64)), "label": pa.array(label.astype(np.int64)),
             "frames": fixed_array(frames, features["frames"]),
             "ball": fixed_array((cover >= 0.5).astype(np.uint8), features["ball"]),
             "square": fixed_array(square, features["square"])}
    fingerprint = hashlib.sha256(Path(__file__).read_bytes() + cfg.model_dump_json().encode()).hexdigest()[:16]
    return datasets.Dataset(pa.table(table), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)
