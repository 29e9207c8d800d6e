"""A generated stand-in for a ReutersViLNews copy, in the same on-disk layout, with exact ground truth.

Every video shows 1-3 squares moving over a tinted background. What is visible fixes every annotation:
the category sets the squares' colour and their direction of motion, the location sets the background
tint, and the count and speed (slow or fast) are drawn per video. The title, visual description,
story paragraph and keywords are written from those variables by templates, so a system that sees the
variables can in principle produce every text exactly, and one that sees nothing scores at chance.

Layout written (see ``tasks.news.layout``): ``<root>/annotations.jsonl`` and ``<root>/videos/<id>.mp4``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.news.layout import ANNOTATIONS, CATEGORIES, VIDEO_DIR, write_video
from interpflow.tasks.types import Seed

# category: (square colour name, RGB, motion verb, keyword for the motion, unit direction (dx, dy))
CATEGORY_LOOK = {
    "disaster": ("red", (230, 40, 40), "fall", "falling", (0.0, 1.0)),
    "finance": ("green", (40, 210, 60), "rise", "rising", (0.0, -1.0)),
    "entertainment": ("magenta", (220, 50, 220), "drift right", "drifting", (1.0, 0.0)),
    "health": ("cyan", (40, 210, 220), "drift left", "sliding", (-1.0, 0.0)),
    "politics": ("blue", (50, 70, 240), "sink diagonally", "sinking", (0.7071, 0.7071)),
    "sports": ("yellow", (230, 220, 40), "climb diagonally", "climbing", (-0.7071, -0.7071)),
    "miscellaneous": ("white", (235, 235, 235), "wander", "wandering", (0.7071, -0.7071)),
}
# made-up places, each with its background tint (dark, so every square stands out)
LOCATIONS = {"Velmora": (60, 20, 20), "Quenport": (20, 60, 20), "Astrid Bay": (20, 20, 70),
             "Oskarth": (60, 60, 20), "Lumeria": (20, 55, 60), "Dravik": (55, 20, 55)}
SPEEDS = {"slow": 0.6, "fast": 1.5}          # px per frame
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SQUARE = 5                                   # px side


class StandInConfig(BaseModel):
    """The generated copy; the defaults are the small embedded case (280 videos of 16 frames, 32 x 32)."""

    model_config = ConfigDict(extra="forbid")
    videos_per_category: int = Field(40, ge=2, le=10_000, description="videos in each of the seven categories")
    frames: int = Field(16, ge=2, le=10_000, description="frames per video")
    size: int = Field(32, ge=16, le=512, description="frame height and width, pixels (even: H.264 needs it)")
    fps: int = Field(8, ge=1, le=120, description="frames per second written into the container")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of each category in the test split")
    seed: Seed = Field(0, description="seed for numpy.random.default_rng")


def _texts(category: str, location: str, count: int, speed: str) -> dict:
    colour, _, verb, motion, _ = CATEGORY_LOOK[category]
    n = COUNT_WORDS[count]
    noun = "square" if count == 1 else "squares"
    verb_n = verb if count > 1 else verb.split()[0] + "s" + verb[len(verb.split()[0]):]
    pace = "slowly" if speed == "slow" else "quickly"
    return {
        "title": f"{location} {category} report: {n} {colour} {noun} {verb_n} {pace}",
        "visual_description": f"{n.capitalize()} {colour} {noun} {verb_n} {pace} across a {location} backdrop.",
        "story_description": (f"A {category} story from {location}. On screen, {n} {colour} {noun} {verb_n} "
                              f"{pace}, tracked from the first frame to the last. Reporters in {location} "
                              f"filed it as {category} news."),
        "keywords": [category, location.lower(), colour, motion, speed],
        "location": location,
    }


def _frames(rng, category: str, location: str, count: int, speed: str, cfg: StandInConfig) -> np.ndarray:
    _, rgb, _, _, (dx, dy) = CATEGORY_LOOK[category]
    video = np.empty((cfg.frames, cfg.size, cfg.size, 3), dtype=np.uint8)
    video[:] = np.asarray(LOCATIONS[location], dtype=np.uint8)
    start = rng.uniform(0, cfg.size, size=(count, 2))
    step = SPEEDS[speed] * np.asarray([dx, dy])
    for t in range(cfg.frames):
        for x, y in np.floor(start + t * step).astype(int) % cfg.size:
            rows = np.arange(y, y + SQUARE) % cfg.size         # wrap-around world: never leaves the frame
            cols = np.arange(x, x + SQUARE) % cfg.size
            video[t][np.ix_(rows, cols)] = rgb
    return video


def annotations(cfg: StandInConfig) -> list[dict]:
    """The stand-in's annotation rows (without writing anything): ids ``news-00000``, ... by category."""
    rng = np.random.default_rng([cfg.seed, 0])
    rows = []
    n_test = max(1, round(cfg.videos_per_category * cfg.test_fraction))
    for c, category in enumerate(CATEGORIES):
        for i in range(cfg.videos_per_category):
            location = list(LOCATIONS)[int(rng.integers(len(LOCATIONS)))]
            count, speed = int(rng.integers(1, 4)), list(SPEEDS)[int(rng.integers(2))]
            rows.append({"id": f"news-{len(rows):05d}", "category": category,
                         **_texts(category, location, count, speed),
                         "split": "test" if i < n_test else "train", "count": count, "speed": speed})
    return rows


class StandIn:
    """The stand-in as a node output: `save_pretrained(dir)` writes the documented layout there."""

    def __init__(self, cfg: StandInConfig):
        self.cfg = cfg

    def save_pretrained(self, root: str) -> None:
        root_path = Path(root)
        (root_path / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
        rows = annotations(self.cfg)
        for index, row in enumerate(rows):
            rng = np.random.default_rng([self.cfg.seed, 1, index])
            frames = _frames(rng, row["category"], row["location"], row["count"], row["speed"], self.cfg)
            write_video(root_path / VIDEO_DIR / f"{row['id']}.mp4", frames, self.cfg.fps)
        with open(root_path / ANNOTATIONS, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def make_standin(cfg: StandInConfig) -> dict:
    """Graph node: the generated copy (a folder in the documented layout) and its size."""
    return {"root": StandIn(cfg), "metrics": {"videos": 7 * cfg.videos_per_category, "frames": cfg.frames}}
