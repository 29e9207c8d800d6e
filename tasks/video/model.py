"""A tiny video transformer trained on generated physics clips, saved as a Hugging Face folder.

The encoder is a ``transformers`` VideoMAE with tubelet size 1: a token sees one frame, so any motion
it represents must have come through attention across frames (the premise of the Physics Emergence
Zone study, arXiv 2602.07050). The objective needs motion: every token covering the ball predicts
the ball's displacement to the next frame, and the mean-pooled clip predicts the step to a frame the
model never sees (extrapolation: velocity and acceleration).

Two choices decide whether it learns in minutes on a CPU:
  * pixels are normalised by the training clips' own mean and std (a black frame with a small white
    ball: under the usual mean = std = 0.5 the ball barely moves a pre-LayerNorm token, and neither
    localisation nor motion is learned in thousands of steps);
  * the model trains on fresh clips from its own seed, never on the clips that are later probed.

``VideoModel.save_pretrained`` writes the HF encoder, a ``preprocessor_config.json`` with those
statistics (as VideoMAE's image processor reads them), and the objective heads, so a later node can
measure the model's own objective (e.g. under attention ablations).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from interpflow.tasks.types import Seed
from interpflow.tasks.video.clips import ClipConfig, column, make_clips, pixel_values

OBJECTIVE_FILE = "objective.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
_TRAIN_SEED_OFFSET = 1_000_003      # the model's clips never share a seed with the probed clips


class VideoModelConfig(BaseModel):
    """The embedded tiny video transformer and how it is trained."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, ge=8, description="residual stream width; a multiple of heads")
    layers: int = Field(6, ge=1, le=48, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads per block")
    intermediate_size: int = Field(256, ge=8, description="MLP width")
    patch_size: int = Field(16, ge=1, description="square patch side, pixels (tubelet size is always 1)")
    train_clips: int = Field(20000, ge=100, le=1_000_000, description="fresh clips (own seed) the model trains on")
    eval_clips: int = Field(500, ge=10, le=1_000_000, description="held-out clips for the reported objective")
    steps: int = Field(3000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW peak learning rate")
    warmup: int = Field(100, ge=0, description="linear warmup steps")
    decay_from: float = Field(0.75, ge=0, le=1, description="share of the steps after which the rate decays "
                                                           "(cosine) to 0; until then it stays at lr (motion "
                                                           "is learned only after a plateau of ~1500 steps, "
                                                           "which an early decay would stretch)")
    flow_weight: float = Field(1.0, ge=0, description="weight of the per-token next-step loss")
    seed: Seed = Field(0, description="seeds the model init, its training clips and batch order")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this process, if set")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> VideoModelConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})")
        return self


def videomae_config(cfg: VideoModelConfig, clips: ClipConfig):
    from transformers import VideoMAEConfig

    if clips.size % cfg.patch_size:
        raise ValueError(f"model.patch_size={cfg.patch_size} must divide clips.size={clips.size}")
    return VideoMAEConfig(image_size=clips.size, patch_size=cfg.patch_size, num_channels=clips.channels,
                          num_frames=clips.frames, tubelet_size=1, hidden_size=cfg.hidden_size,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          intermediate_size=cfg.intermediate_size, use_mean_pooling=False,
                          architectures=["VideoMAEModel"])


class Objective(nn.Module):
    """Next-step heads: one on the mean-pooled clip, one on every token (VideoMAE's frame-major order)."""

    def __init__(self, width: int):
        super().__init__()
        self.clip = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2))
        self.token = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2))

    def forward(self, hidden: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) next step of the clip, (B, T, patches, 2) next step of the ball seen by each token."""
        per_frame = hidden.reshape(hidden.shape[0], frames, -1, hidden.shape[-1])
        return self.clip(hidden.mean(1)), self.token(per_frame)


class VideoModel:
    """A trained encoder, its objective heads and its pixel statistics: one folder, like a hub repo."""

    def __init__(self, encoder, objective: Objective, mean: list[float], std: list[float], metrics: dict | None = None):
        self.encoder, self.objective = encoder, objective
        self.mean, self.std = mean, std
        self.metrics = dict(metrics or {})

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path)
        write_preprocessor(path, self.mean, self.std, self.encoder.config.image_size)
        save_file({k: v.contiguous() for k, v in self.objective.state_dict().items()}, str(path / OBJECTIVE_FILE))
        if self.metrics:
            (path / "training_metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True))


def write_preprocessor(path, mean: list[float], std: list[float], size: int,
                       processor: str = "VideoMAEImageProcessor") -> None:
    """The image-processor file a hub repo carries: the pixel statistics the model was trained with."""
    (Path(path) / PREPROCESSOR_FILE).write_text(json.dumps({
        "image_processor_type": processor, "image_mean": mean, "image_std": std,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": False,
        "do_center_crop": False, "size": {"height": size, "width": size}}, indent=2))


def pixel_stats(model_path: str) -> tuple[list[float], list[float]]:
    """The per-channel mean and std a model expects its [0, 1] pixels normalised by: its image
    processor's, when the folder or hub repo has one; else 0.5 and 0.5."""
    local = Path(model_path) / PREPROCESSOR_FILE
    if local.exists():
        saved = json.loads(local.read_text())
        if "image_mean" in saved and "image_std" in saved:
            return list(saved["image_mean"]), list(saved["image_std"])
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_path)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return [0.5], [0.5]


def load_objective(model_path: str, width: int) -> Objective | None:
    """The objective heads saved beside a model trained here; None for any other model."""
    path = Path(model_path) / OBJECTIVE_FILE
    if not path.exists():
        return None
    from safetensors.torch import load_file

    objective = Objective(width)
    objective.load_state_dict(load_file(str(path)))
    return objective.eval()


def motion_targets(positions: np.ndarray, masks: np.ndarray, size: int, patch: int,
                   frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From clips rendered with one frame more than the model sees: the clip's next step (B, 2), every
    frame's step to the next frame (B, T, 2) (wrap-corrected), and which patches the ball touches
    in each seen frame (B, T, patches)."""
    steps = np.diff(positions.astype(np.float64), axis=1)
    steps = (steps + size / 2) % size - size / 2      # a torus step is the short way round
    grid = size // patch
    seen = masks[:, :frames].reshape(len(masks), frames, grid, patch, grid, patch)
    touched = seen.max(axis=(3, 5)).reshape(len(masks), frames, grid * grid) > 0
    return steps[:, frames - 1], steps[:, :frames], touched


def _r2(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    w = torch.ones(target.shape[:-1]) if weight is None else weight
    mean = (target * w[..., None]).sum(dim=tuple(range(target.dim() - 1))) / w.sum()
    resid = (((pred - target) ** 2).sum(-1) * w).sum()
    total = (((target - mean) ** 2).sum(-1) * w).sum()
    return float(1 - resid / total)


def learning_rate_factor(cfg: VideoModelConfig, step: int) -> float:
    """Warmup, then constant, then a cosine decay over the last (1 - decay_from) of the steps."""
    start = cfg.decay_from * cfg.steps
    decay = 1.0 if step < start else 0.5 * (1 + math.cos(math.pi * (step - start) / max(cfg.steps - start, 1)))
    return min(1.0, (step + 1) / max(cfg.warmup, 1)) * decay


def train_video_model(cfg: VideoModelConfig, clips: ClipConfig) -> VideoModel:
    """Train the tiny VideoMAE on ``cfg.train_clips`` fresh clips shaped like ``clips`` (one extra,
    unseen frame each supplies the last target); deterministic for a seed on CPU."""
    from transformers import VideoMAEModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    hf_config = videomae_config(cfg, clips)             # checks the shapes before any clip is made
    source = clips.model_copy(update={"n_clips": cfg.train_clips + cfg.eval_clips, "frames": clips.frames + 1,
                                      "impossible_rate": 0.0, "seed": clips.seed + _TRAIN_SEED_OFFSET + cfg.seed})
    data = make_clips(source)
    frames = column(data, "frames")
    T = clips.frames
    next_step, steps, touched = motion_targets(column(data, "positions"), column(data, "masks"), clips.size,
                                               cfg.patch_size, T)
    scale = max(source.max_speed, 1e-6)
    y_clip = torch.tensor(next_step / scale, dtype=torch.float32)
    # per token: the step to the next *seen* frame (a last-frame token asked for the unseen step as well
    # stalls training: 3000 steps reached next-step R^2 0.36 that way, 0.95 without it)
    y_token = torch.tensor(steps[:, :T - 1] / scale, dtype=torch.float32)
    w_token = torch.tensor(touched[:, :T - 1], dtype=torch.float32)
    seen = frames[:, :T]
    mean = (seen.reshape(-1, clips.channels).mean(0) / 255).tolist()
    std = np.maximum(seen.reshape(-1, clips.channels).std(0) / 255, 1e-3).tolist()

    def pixels(rows) -> torch.Tensor:
        return torch.from_numpy(pixel_values(seen[rows], mean, std))

    torch.manual_seed(cfg.seed)
    encoder = VideoMAEModel(hf_config)
    objective = Objective(cfg.hidden_size)
    params = list(encoder.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_factor(cfg, s))
    rng = np.random.default_rng(cfg.seed)
    n_train = cfg.train_clips

    def losses(rows) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = encoder(pixel_values=pixels(rows)).last_hidden_state
        clip_pred, token_pred = objective(hidden, T)
        clip_loss = ((clip_pred - y_clip[rows]) ** 2).mean()
        w = w_token[rows]
        token_loss = (((token_pred[:, :T - 1] - y_token[rows][:, :, None]) ** 2).mean(-1) * w).sum() / w.sum().clamp(min=1)
        return clip_loss, token_loss

    from tqdm.auto import tqdm

    encoder.train()
    for step in tqdm(range(cfg.steps), desc="video model", mininterval=5, leave=False):
        rows = np.sort(rng.choice(n_train, size=cfg.batch_size, replace=False))
        clip_loss, token_loss = losses(rows)
        loss = clip_loss + cfg.flow_weight * token_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    encoder.eval()
    with torch.no_grad():
        held = np.arange(n_train, n_train + cfg.eval_clips)
        hidden = encoder(pixel_values=pixels(held)).last_hidden_state
        clip_pred, token_pred = objective(hidden, T)
        metrics = {"next_step_r2": _r2(clip_pred, y_clip[held]),
                   "token_step_r2": _r2(token_pred[:, :T - 1], y_token[held][:, :, None].expand_as(token_pred[:, :T - 1]),
                                        w_token[held]),
                   "train_loss": float(loss), "train_seconds": time.perf_counter() - started}
    return VideoModel(encoder, objective.eval(), mean, std, metrics)


def train(cfg: VideoModelConfig, clips: ClipConfig) -> dict:
    """Graph node: the trained model folder, and its held-out objective as node metrics."""
    model = train_video_model(cfg, clips)
    return {"model": model, "metrics": model.metrics}


class RandomInitConfig(BaseModel):
    """The random-initialisation control: the study's model architecture with fresh weights."""

    model_config = ConfigDict(extra="forbid")
    seed: Seed = Field(12345, description="seeds the fresh weights")


class _Reinitialised:
    """A freshly initialised copy of a model that keeps the original's pixel statistics."""

    def __init__(self, model, source: str):
        self.model, self.source = model, source

    def save_pretrained(self, path) -> None:
        import shutil

        path = Path(path)
        self.model.save_pretrained(path)
        if (Path(self.source) / PREPROCESSOR_FILE).exists():
            shutil.copy(Path(self.source) / PREPROCESSOR_FILE, path / PREPROCESSOR_FILE)
        else:
            mean, std = pixel_stats(self.source)
            (path / PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": mean, "image_std": std,
                                                              "image_processor_type": "VideoMAEImageProcessor"}))


def random_init(cfg: RandomInitConfig, model: str) -> dict:
    """Graph node: ``model``'s architecture (its config) with seeded random weights, saved as a folder."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model)
    torch.manual_seed(cfg.seed)
    return {"model": _Reinitialised(AutoModel.from_config(config).eval(), model)}
