"""The embedded video classifier for VTCD: a tiny ``transformers`` ViViT (or VideoMAE) video classifier.

Tokens span 2 frames and the head reads ViViT's CLS token, which no tubelet covers, so what the model
knows of the ball reaches the readout through attention: what VTCD's masking of keys at concept tokens
probes. Two blocks of two heads, so that a planted object is not read redundantly by many heads (each
of which would then matter little on its own). The classifier trains on fresh clips of its own seed,
never on the clips whose concepts are discovered, and is saved as a hub-style folder (weights, config
with the class names, pixel statistics).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.concepts.vtcd_clips import CLASSES, ConceptClipConfig, make_concept_clips
from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import column, pixel_values
from interpflow.tasks.video.model import write_preprocessor

_TRAIN_SEED_OFFSET = 7_000_003


class VideoClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(32, ge=8, description="residual stream width; a multiple of heads")
    layers: int = Field(2, ge=1, le=24, description=(
        "few blocks and heads on purpose: a planted object read by many heads is redundant in each, so no one "
        "concept of one head matters to CRIS (measured: 4 x 4 heads put the best ball concept 20th or lower, "
        "2 x 2 first, on three training seeds)"))
    heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=8)
    patch_size: int = Field(16, ge=1, description=(
        "square patch side, pixels: 16 on the 64-px clips puts the 10-px ball in 1-4 patches per frame, and the "
        "ball's concept ranked first, the square's below, on all 11 classifiers measured; with 8 px the ball spans "
        "4-9 patches and, on 4 of 7, tubelets merged ball and square or a square concept ranked first (README)"))
    architecture: str = Field("vivit", pattern="^(vivit|videomae)$", description=(
        "vivit: the head reads the CLS token, which no tubelet covers; videomae: see readout"))
    tubelet_size: int = Field(2, ge=1, description="frames per token")
    readout: str = Field("first_token", pattern="^(first_token|mean)$", description=(
        "first_token: the head reads one token (a CLS-like readout, as ViViT and TimeSformer do), so what "
        "it knows of the ball comes through attention; mean: the head reads the mean of all tokens, which "
        "lets a tubelet-2 model read motion off the ball's own tokens without attention"))
    train_clips: int = Field(2000, ge=20, le=1_000_000, description="fresh clips (own seed) it trains on")
    eval_clips: int = Field(200, ge=10, le=1_000_000)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0, le=1)
    seed: Seed = 0
    threads: int | None = Field(1, ge=1, description=(
        "torch threads while training (restored after): float sums in another order train another model, and "
        "which mechanism a model learns varies between such near-identical runs (README: seeds); 1 makes a seed "
        "give the same model in a Ray task, an actor or a test; null: torch's default"))

    @model_validator(mode="after")
    def _heads_divide_width(self) -> VideoClassifierConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})")
        return self


def classifier_config(cfg: VideoClassifierConfig, clips: ConceptClipConfig):
    """The HF config: ViViT (its CLS token is the readout, outside every tubelet, as in the video transformers
    VTCD studies) or VideoMAE (no CLS: the readout is the mean of all tokens, or one patch token)."""
    from transformers import VideoMAEConfig, VivitConfig

    if clips.size % cfg.patch_size:
        raise ValueError(f"video_model.patch_size={cfg.patch_size} must divide clips.size={clips.size}")
    names = CLASSES[:clips.classes]
    labels = {"id2label": dict(enumerate(names)), "label2id": {c: i for i, c in enumerate(names)}}
    if cfg.architecture == "vivit":
        return VivitConfig(image_size=clips.size, num_frames=clips.frames, num_channels=clips.channels,
                           tubelet_size=[cfg.tubelet_size, cfg.patch_size, cfg.patch_size],
                           hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                           intermediate_size=cfg.intermediate_size, hidden_act="gelu",
                           architectures=["VivitForVideoClassification"], **labels)
    return VideoMAEConfig(image_size=clips.size, patch_size=cfg.patch_size, num_channels=clips.channels,
                          num_frames=clips.frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.hidden_size,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          intermediate_size=cfg.intermediate_size, use_mean_pooling=cfg.readout == "mean",
                          architectures=["VideoMAEForVideoClassification"], **labels)


class ClassifierFolder:
    """A trained classifier and its pixel statistics, saved like a hub repo."""

    def __init__(self, model, mean: list[float], std: list[float]):
        self.model, self.mean, self.std = model, mean, std

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        write_preprocessor(path, self.mean, self.std, self.model.config.image_size)


def train_video_classifier(cfg: VideoClassifierConfig, clips: ConceptClipConfig) -> dict:
    """Graph node: the trained classifier folder; held-out accuracy as a metric."""
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, clips)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: VideoClassifierConfig, clips: ConceptClipConfig) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoModelForVideoClassification

    started = time.perf_counter()
    config = classifier_config(cfg, clips)
    data = make_concept_clips(clips.model_copy(update={"n_clips": cfg.train_clips + cfg.eval_clips,
                                                       "seed": clips.seed + _TRAIN_SEED_OFFSET + cfg.seed}))
    frames, labels = column(data, "frames"), torch.tensor(column(data, "label"))
    flat = frames.reshape(-1, clips.channels)
    mean = (flat.mean(0) / 255).tolist()
    std = np.maximum(flat.std(0) / 255, 1e-3).tolist()
    torch.manual_seed(cfg.seed)
    model = AutoModelForVideoClassification.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 10)       # linear warmup, then a cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for _ in tqdm(range(cfg.steps), desc="video classifier", mininterval=5, leave=False):
        rows = np.sort(rng.choice(cfg.train_clips, size=cfg.batch_size, replace=False))
        out = model(pixel_values=torch.from_numpy(pixel_values(frames[rows], mean, std)), labels=labels[rows])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    held = np.arange(cfg.train_clips, cfg.train_clips + cfg.eval_clips)
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=torch.from_numpy(pixel_values(frames[held[s:s + 64]], mean, std))).logits
                            for s in range(0, len(held), 64)])
    accuracy = float((logits.argmax(1) == labels[held]).float().mean())
    return {"model": ClassifierFolder(model, mean, std),
            "metrics": {"heldout_accuracy": accuracy, "train_loss": float(out.loss),
                        "train_seconds": time.perf_counter() - started}}
