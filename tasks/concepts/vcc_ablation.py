"""Class edges by ablation: does the classifier *use* a top-layer concept for a class?

TCAV (the paper's class edge) measures sensitivity: whether moving the top layer's patch tokens along
a concept's CAV raises the class logit. On a two-class model a direction that makes patches less
house-like makes the image more cart-like, so a texture direction can be "significant" for cart in a
model that ignores textures (README, vcc). Ablation asks about use instead: in each image of the class
that holds the concept, mean-fill the pixels of the concept's segments and measure how far the class's
centred logit drops; the null is the same patch mask shifted (cyclically) to places that do not
overlap it, so a concept counts only when removing it hurts more than removing as much elsewhere.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.vcc_images import pixel_values
from interpflow.tasks.concepts.vcc_model import hooked_forward
from interpflow.tasks.types import Seed

ABLATION_SCHEMA = pa.schema([("image", pa.int64()), ("label", pa.int64()), ("concept", pa.string()),
                             ("logit", pa.float64()), ("drop", pa.float64()), ("null_drop", pa.float64())])


class AblationConfig(BaseModel):
    """How the class edges' ablations are drawn."""

    model_config = ConfigDict(extra="forbid")
    null_draws: int = Field(4, ge=1, description="shifted copies of each concept mask averaged into the null")
    classes: int = Field(2, ge=1, description="class logits 0..classes-1 (set by the workflow)")
    batch_size: int = Field(64, ge=1)
    seed: Seed = 0


def shifted_masks(mask: np.ndarray, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` cyclic shifts of a patch-grid mask that do not overlap it (the least-overlapping shifts
    when none is free): the same shape and number of patches, elsewhere in the image."""
    rows, cols = mask.shape
    shifts = [(dy, dx) for dy in range(rows) for dx in range(cols) if dy or dx]
    overlap = np.asarray([(np.roll(mask, s, (0, 1)) & mask).sum() for s in shifts])
    candidates = [s for s, o in zip(shifts, overlap) if o == overlap.min()]
    picks = rng.choice(len(candidates), size=draws, replace=len(candidates) < draws)
    return [np.roll(mask, candidates[i], (0, 1)) for i in picks]


def concept_masks(segments, concepts) -> dict[int, dict[str, np.ndarray]]:
    """Per image, per kept concept: the union of the concept's segment masks (patch grid)."""
    masks = np.asarray(segments["masks"]).astype(bool)
    table = concepts["assignments"]
    out: dict[int, dict[str, np.ndarray]] = {}
    for s, image, concept in zip(table.column("segment").to_pylist(), table.column("image").to_pylist(),
                                 table.column("concept").to_pylist()):
        if concept:
            per_image = out.setdefault(int(image), {})
            per_image[concept] = per_image.get(concept, np.zeros(masks.shape[1:], bool)) | masks[s]
    return out


def _centred_logits(model, pixels: torch.Tensor, classes: int, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(pixels), batch_size):
        with torch.no_grad():
            logits, _, _ = hooked_forward(model, pixels[start:start + batch_size], [])
        logits = logits.float()[:, :classes]
        out.append((logits - logits.mean(-1, keepdim=True)).cpu().numpy())
    return np.concatenate(out)


def class_ablations(cfg: AblationConfig, shard, model, images, segments, concepts) -> dict:
    """For each image of the shard and each top-layer concept in it: the image's own class's centred
    logit (``logit``), its drop when the concept's pixels are mean-filled (``drop``), and the mean drop
    over ``null_draws`` shifted copies of the same mask (``null_drop``)."""
    from interpflow.tasks.concepts.vcc_segments import _pixel_stats, mean_colour, pixel_mask

    mean, std = _pixel_stats(model)
    pictures = images["images"]
    size, fill = pictures.shape[1], mean_colour(pictures)
    labels = np.asarray(images["labels"])
    by_image = concept_masks(segments, concepts)
    rows = []
    for image in np.asarray(shard.ids, np.int64):
        present = by_image.get(int(image), {})
        if not present:
            continue
        rng = np.random.default_rng([cfg.seed, int(image)])       # one stream per image: shards resume alike
        variants, owners = [pictures[image]], []
        for concept, mask in sorted(present.items()):
            for j, m in enumerate([mask, *shifted_masks(mask, cfg.null_draws, rng)]):
                filled = pictures[image].copy()
                filled[pixel_mask(m, size)] = fill
                variants.append(filled)
                owners.append((concept, j == 0))
        logits = _centred_logits(model, torch.from_numpy(pixel_values(np.stack(variants), mean, std)),
                                 cfg.classes, cfg.batch_size)
        label = int(labels[image])
        drops = logits[0, label] - logits[1:, label]
        for concept in sorted(present):
            own = [d for (c, real), d in zip(owners, drops) if c == concept and real]
            null = [d for (c, real), d in zip(owners, drops) if c == concept and not real]
            rows.append({"image": int(image), "label": label, "concept": concept,
                         "logit": float(logits[0, label]), "drop": float(own[0]),
                         "null_drop": float(np.mean(null))})
    return {"drops": pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA)}


def ablation_test(drop: np.ndarray, null_drop: np.ndarray) -> tuple[float, float]:
    """(effect, p): the mean extra drop (concept minus null, logits) and the one-sided paired t-test's p
    that it is above zero. No variance at all counts only if the effect is positive."""
    from scipy import stats

    d = np.asarray(drop, float) - np.asarray(null_drop, float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), 1.0
    if d.std() == 0:
        return float(d.mean()), 0.0 if d.mean() > 0 else 1.0
    p = float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)
    return float(d.mean()), (1.0 if np.isnan(p) else p)
