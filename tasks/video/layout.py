"""Where each token of a Hugging Face video transformer comes from: which frame, which patch.

Probing, pooling and attention ablations all need to know which token holds which piece of the clip.
The layouts below are read from the embeddings code of transformers (checked by tests on real models):

  * ``videomae``     Conv3d tubelets, no CLS; tokens frame-major: ``t * H * W + p``.
  * ``vivit``        Conv3d tubelets, one CLS first; frame-major: ``1 + t * H * W + p``.
  * ``timesformer``  per-frame Conv2d patches, one CLS first; the time embedding reshapes the tokens
                     patch-major: ``1 + p * T + t``.

``t`` is the token frame (pixel frames // temporal tubelet), ``p = row * W + col`` the spatial patch.
All three fix their position tables to ``num_frames`` and ``image_size`` (TimeSformer's layers also read
both from the config), so clips must match them exactly; :func:`token_grid` says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Order = Literal["tp", "pt"]
SUPPORTED = ("videomae", "vivit", "timesformer")
# Config attributes that only video models carry: a config with one of them is a video model we don't
# know the layout of, rather than a text or image model.
_VIDEO_FIELDS = ("num_frames", "frames_per_clip", "tubelet_size", "video_size")


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of a video transformer: ``prefix`` leading non-patch tokens, then a frames x patches grid."""

    prefix: int
    frames: int        # token frames (pixel frames // temporal tubelet)
    height: int        # patches per column
    width: int         # patches per row
    order: Order = "tp"

    @property
    def patches(self) -> int:
        return self.height * self.width

    @property
    def n_tokens(self) -> int:
        return self.prefix + self.frames * self.patches

    def _grid_index(self) -> np.ndarray:
        return np.arange(self.frames * self.patches)

    def frame_of(self) -> np.ndarray:
        """Token frame of every token (n_tokens,), -1 for prefix tokens."""
        i = self._grid_index()
        t = i // self.patches if self.order == "tp" else i % self.frames
        return np.concatenate([np.full(self.prefix, -1), t])

    def patch_of(self) -> np.ndarray:
        """Spatial patch (row * width + col) of every token (n_tokens,), -1 for prefix tokens."""
        i = self._grid_index()
        p = i % self.patches if self.order == "tp" else i // self.frames
        return np.concatenate([np.full(self.prefix, -1), p])


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"config.{name}={value!r}: expected an int or a (height, width) pair")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def token_grid(config: Any, frames: int | None = None, size: int | None = None) -> TokenGrid:
    """The token layout of a video model for clips of ``frames`` frames of ``size`` x ``size`` pixels.

    ``frames`` and ``size`` default to the config's ``num_frames`` and ``image_size``; values the model
    cannot take raise a ValueError naming the clip setting to change, before any compute.
    """
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if model_type not in SUPPORTED:
        if any(hasattr(config, f) for f in _VIDEO_FIELDS):
            raise ValueError(f"video model type {model_type!r} has no known token layout; supported: "
                             f"{', '.join(SUPPORTED)}")
        raise ValueError(f"model type {model_type!r} is not a video model; give a video encoder such as "
                         f"VideoMAE, ViViT or TimeSformer")
    if model_type == "vivit":
        tubelet = config.tubelet_size
        if len(tubelet) != 3:
            raise ValueError(f"config.tubelet_size={tubelet!r}: ViViT expects [frames, height, width]")
        t_tube, patch = int(tubelet[0]), (int(tubelet[1]), int(tubelet[2]))
    else:
        t_tube = int(getattr(config, "tubelet_size", 1)) if model_type == "videomae" else 1
        patch = _pair(config.patch_size, "patch_size")
    if model_type == "timesformer" and getattr(config, "attention_type", "divided_space_time") == "space_only":
        raise ValueError("TimeSformer with attention_type='space_only' runs each frame as its own sequence; "
                         "use attention_type='divided_space_time' or 'joint_space_time'")

    image = _pair(config.image_size, "image_size")
    num_frames = int(config.num_frames)
    frames = num_frames if frames is None else int(frames)
    if frames % t_tube:
        raise ValueError(f"clips.frames={frames} is not divisible by the model's temporal tubelet "
                         f"({t_tube}); set clips.frames={num_frames}")
    if frames != num_frames:
        raise ValueError(f"clips.frames={frames} but the model takes num_frames={num_frames} frames; "
                         f"set clips.frames={num_frames} (its position embeddings are fixed to that length)")
    if num_frames % t_tube:
        raise ValueError(f"config.num_frames={num_frames} is not divisible by the temporal tubelet ({t_tube}); "
                         f"the last frames would be dropped")
    if image[0] % patch[0] or image[1] % patch[1]:
        raise ValueError(f"config.image_size={config.image_size!r} is not divisible by the patch size {patch}")
    if size is not None:
        size = int(size)
        want = f"set clips.size={image[0]}" if image[0] == image[1] else "use a model with square images"
        if size % patch[0] or size % patch[1]:
            raise ValueError(f"clips.size={size} is not divisible by the model's patch size {patch}; {want}")
        if (size, size) != image:
            raise ValueError(f"clips.size={size} but the model takes image_size={config.image_size!r}; "
                             f"{want} (its position embeddings are fixed to that size)")
    return TokenGrid(prefix=0 if model_type == "videomae" else 1, frames=frames // t_tube,
                     height=image[0] // patch[0], width=image[1] // patch[1],
                     order="pt" if model_type == "timesformer" else "tp")


def pool_tokens(hidden, grid: TokenGrid):
    """Mean over the patch tokens (B, D) and mean over frames per patch (B, patches, D), row-major patches.

    Prefix tokens (CLS) are left out of both: they hold no place in the clip. Works on numpy or torch.
    """
    if hidden.ndim != 3 or hidden.shape[1] != grid.n_tokens:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected (batch, {grid.n_tokens}, dim) "
                         f"for {grid}")
    b, d = hidden.shape[0], hidden.shape[2]
    body = hidden[:, grid.prefix:]
    if grid.order == "tp":
        body = body.reshape(b, grid.frames, grid.patches, d)
        per_patch = body.mean(1) if isinstance(body, np.ndarray) else body.mean(dim=1)
    else:
        body = body.reshape(b, grid.patches, grid.frames, d)
        per_patch = body.mean(2) if isinstance(body, np.ndarray) else body.mean(dim=2)
    pooled = per_patch.mean(1) if isinstance(per_patch, np.ndarray) else per_patch.mean(dim=1)
    return pooled, per_patch


def patch_occupancy(masks, grid: TokenGrid, size: int) -> np.ndarray:
    """Share of token frames in which the object touches each patch: (B, patches) float in [0, 1].

    ``masks`` is (B, T, size, size), nonzero = object. A token frame covers T // grid.frames pixel frames
    (the tubelet) and counts as touched if any of them touches the patch.
    """
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if m.ndim != 4 or m.shape[2:] != (size, size):
        raise ValueError(f"masks has shape {m.shape}; expected (batch, frames, {size}, {size})")
    b, t = m.shape[:2]
    if t % grid.frames or size % grid.height or size % grid.width:
        raise ValueError(f"masks of {t} frames of {size}x{size} px do not tile into {grid.frames} token frames "
                         f"of {grid.height}x{grid.width} patches")
    tube, ph, pw = t // grid.frames, size // grid.height, size // grid.width
    touched = (m != 0).reshape(b, grid.frames, tube, grid.height, ph, grid.width, pw).any(axis=(2, 4, 6))
    return touched.mean(axis=1).reshape(b, grid.patches).astype(np.float32)
