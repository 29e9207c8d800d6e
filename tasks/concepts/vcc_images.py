"""Generated images with a planted part -> whole hierarchy, for the Visual Concept Connectome (VCC).

Two classes of object on a noisy background:

    house = roof (a red triangle) on top of a wall (a yellow square)
    cart  = body (a blue bar) on two wheels (dark discs)

Irrelevant textures (striped squares and dotted squares, in random free places) appear in both
classes with the same distribution, so a classifier has no use for them. Every image comes with its
ground-truth part map (one code per pixel, ``PARTS``), from which the wholes (house = roof | wall,
cart = body | wheel) follow.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.types import Seed

CLASSES = ("house", "cart")
PARTS = ("background", "roof", "wall", "wheel", "body", "texture")     # part-map codes 0..5
WHOLES = {"house": ("roof", "wall"), "cart": ("wheel", "body")}
PART_OF = {part: whole for whole, parts in WHOLES.items() for part in parts}
# ground-truth regions a concept can be labelled with: parts, wholes and the texture
REGIONS = ("roof", "wall", "wheel", "body", "house", "cart", "texture", "background")


class ImageConfig(BaseModel):
    """The generated image set (house vs cart, irrelevant textures in both)."""

    model_config = ConfigDict(extra="forbid")
    n_images: int = Field(120, ge=4, le=1_000_000, description="images analysed (half of each class)")
    size: int = Field(40, ge=24, le=1024, description="square image side, pixels")
    textures: tuple[int, int] = Field((1, 2), description="min and max textures per image (stripes or dots, "
                                                          "same distribution in both classes)")
    texture_size: tuple[int, int] = Field((13, 16), description="min and max texture side, pixels at 40 px (scaled "
                                                               "with size)")
    noise: float = Field(10.0, ge=0, description="std of the background's pixel noise (0..255 scale)")
    seed: Seed = Field(0, description="seeds the whole set")


def _box(canvas, parts, code, colour, y0, y1, x0, x1):
    canvas[y0:y1, x0:x1] = colour
    parts[y0:y1, x0:x1] = code


def _draw_object(rng, canvas, parts, label: str, size: int) -> tuple[int, int, int, int]:
    """Draw a house or a cart at a random place; return its bounding box (y0, y1, x0, x1)."""
    s = size / 40
    jitter = lambda c: np.clip(np.asarray(c) + rng.integers(-25, 26, 3), 0, 255)  # noqa: E731
    yy, xx = np.mgrid[0:size, 0:size]
    if label == "house":
        w = int(round(rng.integers(15, 20) * s))
        wall_h = int(round(rng.integers(11, 15) * s))
        roof_h = int(round(rng.integers(8, 11) * s))
        width, height = w + 6, roof_h + wall_h
        y0 = int(rng.integers(1, size - height - 1))
        x0 = int(rng.integers(1, size - width - 1))
        cx = x0 + width / 2
        # roof: a triangle wider than the wall (eaves), apex at the top
        t = (yy - y0 + 0.5) / roof_h
        roof = (yy >= y0) & (yy < y0 + roof_h) & (np.abs(xx + 0.5 - cx) <= t * width / 2)
        canvas[roof] = jitter((210, 40, 40))
        parts[roof] = PARTS.index("roof")
        wx0 = int(round(cx - w / 2))
        _box(canvas, parts, PARTS.index("wall"), jitter((230, 200, 60)), y0 + roof_h, y0 + height, wx0, wx0 + w)
        return y0, y0 + height, x0, x0 + width
    width = int(round(rng.integers(20, 26) * s))
    body_h = int(round(rng.integers(7, 10) * s))
    r = max(2.0, rng.uniform(3.5, 4.5) * s)
    height = body_h + int(np.ceil(r * 1.6))
    y0 = int(rng.integers(1, size - height - 1))
    x0 = int(rng.integers(1, size - width - 1))
    _box(canvas, parts, PARTS.index("body"), jitter((50, 80, 220)), y0, y0 + body_h, x0, x0 + width)
    colour = jitter((40, 40, 40))
    for wx in (x0 + width * 0.22, x0 + width * 0.78):
        disc = (yy + 0.5 - (y0 + body_h + r * 0.5)) ** 2 + (xx + 0.5 - wx) ** 2 <= r * r
        canvas[disc] = colour
        parts[disc] = PARTS.index("wheel")
    return y0, y0 + height, x0, x0 + width


def _draw_texture(rng, canvas, parts, size: int, taken: np.ndarray, sides: tuple[int, int] = (9, 12)) -> bool:
    """A striped or dotted square in a free place (not over the object or another texture); False when
    no free place was found. The whole square is the texture region of the part map."""
    side = max(6, int(round(rng.integers(sides[0], sides[1] + 1) * size / 40)))
    # taken pixels in each candidate square grown by one pixel (an integral image); pick a free one
    padded = np.pad(taken, 1).astype(np.int32)
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    n = size - side + 1
    w = side + 2
    window = integral[w:w + n, w:w + n] - integral[:n, w:w + n] - integral[w:w + n, :n] + integral[:n, :n]
    free = np.argwhere(window == 0)
    if not len(free):
        return False
    y0, x0 = (int(v) for v in free[rng.integers(len(free))])
    yy, xx = np.mgrid[0:side, 0:side]
    colour = np.clip(np.asarray((30, 210, 80)) + rng.integers(-25, 26, 3), 0, 255)
    if rng.random() < 0.5:
        diagonal = (xx + yy) if rng.random() < 0.5 else (xx - yy + side)
        on = diagonal % 4 < 2                                  # stripes two pixels wide
    else:
        on = (yy % 3 != 0) & (xx % 3 != 0)                     # 2 x 2 dots
    region = canvas[y0:y0 + side, x0:x0 + side]
    region[on] = colour
    parts[y0:y0 + side, x0:x0 + side] = PARTS.index("texture")   # the textured square is the region
    taken[y0:y0 + side, x0:x0 + side] = True
    return True


def render(cfg: ImageConfig, n: int, seed: int, labels: np.ndarray | None = None) -> dict:
    """``n`` images (uint8 N x H x W x 3), their part maps (uint8 N x H x W, codes of ``PARTS``) and
    class labels (0 house, 1 cart; alternating unless given)."""
    rng = np.random.default_rng(seed)
    size = cfg.size
    labels = np.arange(n) % 2 if labels is None else np.asarray(labels)
    images = np.empty((n, size, size, 3), np.uint8)
    part_maps = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        wanted = int(rng.integers(cfg.textures[0], cfg.textures[1] + 1))
        for _attempt in range(100):        # re-place the object until the image's textures fit beside it
            base = rng.integers(110, 150)
            canvas = np.clip(base + rng.normal(0, cfg.noise, (size, size, 3)), 0, 255)
            parts = np.zeros((size, size), np.uint8)
            y0, y1, x0, x1 = _draw_object(rng, canvas, parts, CLASSES[labels[i]], size)
            taken = np.zeros((size, size), bool)
            taken[y0:y1, x0:x1] = True
            if all(_draw_texture(rng, canvas, parts, size, taken, cfg.texture_size) for _ in range(wanted)):
                break
        part_maps[i] = parts
        images[i] = canvas.astype(np.uint8)
    return {"images": images, "parts": part_maps, "labels": labels.astype(np.int64)}


def make_images(cfg: ImageConfig) -> dict:
    """Graph node: the analysed image set with its ground-truth part maps."""
    data = render(cfg, cfg.n_images, cfg.seed)
    share = {f"share.{p}": float((data["parts"] == k).mean()) for k, p in enumerate(PARTS)}
    return {**data, "metrics": {"images": float(cfg.n_images), **share}}


def image_ids(cfg, images, **_) -> list[int]:
    """Stable ids of the analysed images (their row numbers)."""
    return list(range(len(images["labels"])))


def region_masks(parts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks (..., H, W) of every ground-truth region (parts, wholes, texture, background)."""
    masks = {p: parts == k for k, p in enumerate(PARTS)}
    for whole, members in WHOLES.items():
        masks[whole] = np.logical_or.reduce([masks[p] for p in members])
    return {r: masks[r] for r in REGIONS}


def pixel_values(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) normalised by a model's pixel statistics."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
