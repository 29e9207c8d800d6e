"""The embedded VCC classifier: a tiny ``ViTForImageClassification`` trained on fresh house/cart images.

It trains in seconds on a CPU and is saved like a hub repo (``save_pretrained`` plus a
``preprocessor_config.json`` with the training images' pixel mean and std, which
``tasks.video.model.pixel_stats`` reads for this model and for any HF classifier).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.concepts.vcc_images import CLASSES, ImageConfig, pixel_values, render
from interpflow.tasks.types import Seed

PREPROCESSOR_FILE = "preprocessor_config.json"
_TRAIN_SEED_OFFSET = 7_000_003      # training images never share a seed with the analysed images


class ClassifierConfig(BaseModel):
    """The embedded tiny ViT classifier and its training."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(48, ge=8, description="residual stream width; a multiple of heads")
    layers: int = Field(4, ge=1, le=24, description="transformer blocks")
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(96, ge=8, description="MLP width")
    patch_size: int = Field(4, ge=1, description="square patch side, pixels; must divide images.size")
    train_images: int = Field(1500, ge=50, le=1_000_000, description="fresh images (own seed) the model trains on")
    eval_images: int = Field(400, ge=10, le=1_000_000, description="held-out images for the reported accuracy")
    steps: int = Field(300, ge=1, description="AdamW steps")
    batch_size: int = Field(48, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    seed: Seed = Field(0)
    threads: int | None = Field(1, ge=1, description="torch.set_num_threads while training (1: two threads on a busy "
                                                          "2-core machine were 10x slower per step); null: torch's default")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ClassifierConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})")
        return self


def vit_config(cfg: ClassifierConfig, images: ImageConfig):
    from transformers import ViTConfig

    if images.size % cfg.patch_size:
        raise ValueError(f"classifier.patch_size={cfg.patch_size} must divide images.size={images.size}")
    return ViTConfig(image_size=images.size, patch_size=cfg.patch_size, num_channels=3, hidden_size=cfg.hidden_size,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     intermediate_size=cfg.intermediate_size, num_labels=len(CLASSES),
                     id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                     architectures=["ViTForImageClassification"])


class SavedClassifier:
    """A trained HF classifier and its pixel statistics: one folder, like a hub repo."""

    def __init__(self, model, mean: list[float], std: list[float], metrics: dict | None = None):
        self.model, self.mean, self.std, self.metrics = model, mean, std, dict(metrics or {})

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        size = self.model.config.image_size
        (path / PREPROCESSOR_FILE).write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor", "image_mean": self.mean, "image_std": self.std,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": False,
            "size": {"height": size, "width": size}}, indent=2))
        if self.metrics:
            (path / "training_metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True))


def train_classifier(cfg: ClassifierConfig, images: ImageConfig) -> SavedClassifier:
    """Train the tiny ViT on fresh images shaped like ``images``; deterministic for a seed on CPU."""
    from transformers import ViTForImageClassification

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    hf_config = vit_config(cfg, images)
    n = cfg.train_images + cfg.eval_images
    rng = np.random.default_rng(cfg.seed)
    data = render(images, n, images.seed + _TRAIN_SEED_OFFSET + cfg.seed, labels=rng.integers(0, 2, n))
    train = data["images"][:cfg.train_images]
    mean = (train.reshape(-1, 3).mean(0) / 255).tolist()
    std = np.maximum(train.reshape(-1, 3).std(0) / 255, 1e-3).tolist()
    x = torch.from_numpy(pixel_values(data["images"], mean, std))
    y = torch.from_numpy(data["labels"])
    torch.manual_seed(cfg.seed)
    model = ViTForImageClassification(hf_config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    model.train()
    for _ in range(cfg.steps):
        rows = torch.from_numpy(np.sort(rng.choice(cfg.train_images, size=cfg.batch_size, replace=False)))
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[rows]).logits, y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        held = slice(cfg.train_images, n)
        accuracy = float((model(pixel_values=x[held]).logits.argmax(-1) == y[held]).float().mean())
    metrics = {"heldout_accuracy": accuracy, "train_loss": float(loss.detach()), "train_seconds": time.perf_counter() - started}
    return SavedClassifier(model, mean, std, metrics)


class ClassifierTraining(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classifier: ClassifierConfig
    images: ImageConfig


def train(cfg: ClassifierTraining) -> dict:
    """Graph node: the trained classifier folder, and its held-out accuracy as node metrics."""
    model = train_classifier(cfg.classifier, cfg.images)
    return {"model": model, "metrics": model.metrics}


# --- forward passes and gradients on a loaded classifier (model actors call these) ---------------------

def token_grid(hf_config) -> tuple[int, int]:
    """(rows, cols) of the patch-token grid of a ViT-like image model."""
    size, patch = hf_config.image_size, hf_config.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size[0] // patch[0], size[1] // patch[1]


def patch_tokens(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, D) tokens -> (B, rows, cols, D) patch tokens (prefix tokens such as CLS dropped)."""
    n = grid[0] * grid[1]
    return hidden[:, hidden.shape[1] - n:].reshape(hidden.shape[0], grid[0], grid[1], hidden.shape[-1])


def block_module(loaded, layer: int) -> str:
    return loaded.sites.resolve(f"blocks.{layer}.resid_post").module


def hooked_forward(loaded, pixels: torch.Tensor, layers: list[int], leaf: int | None = None):
    """Run the classifier on ``pixels``; return (logits, {layer: block output (B, T, D)}, leaf tensor).

    With ``leaf``, that block's output is replaced by a detached copy that requires grad, so gradients
    of anything downstream with respect to it can be taken (``torch.autograd.grad(..., leaf)``).
    """
    from interpflow.tasks.sites import _first_tensor, _replace_first_tensor

    modules = dict(loaded.model.named_modules())
    captured: dict[int, torch.Tensor] = {}
    holder: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if layer == leaf:
                tensor = tensor.detach().float().requires_grad_(True)
                holder["leaf"] = tensor
                output = _replace_first_tensor(output, tensor.to(_first_tensor(output).dtype))
            captured[layer] = tensor
            return output
        return hook

    for layer in sorted(set(layers) | ({leaf} if leaf is not None else set())):
        handles.append(modules[block_module(loaded, layer)].register_forward_hook(make_hook(layer)))
    try:
        logits = loaded.model(pixel_values=pixels.to(loaded.device, loaded.model.dtype)).logits
    finally:
        for h in handles:
            h.remove()
    return logits, captured, holder.get("leaf")


def pooled(hidden: torch.Tensor, patches: int) -> torch.Tensor:
    """A layer's pooled representation: the mean over its ``patches`` patch tokens (prefix tokens such as
    CLS excluded: a CAV is a direction of the patch tokens, and it is applied to them alone)."""
    return hidden[:, hidden.shape[1] - patches:].float().mean(1)


def gradient_sums(loaded, pixels: torch.Tensor, lower: int, objective, layers: tuple = (),
                  patches: int | None = None) -> torch.Tensor:
    """d objective / d (block ``lower``'s output), summed over its last ``patches`` tokens (the patch
    tokens; all tokens if None): (B, D). ``objective(logits, captured)`` (blocks ``layers`` captured)
    returns one value per image; the sum is the directional derivative for a shift of every patch token
    along one direction (how a CAV of pooled patch activations acts on a layer)."""
    with torch.enable_grad():
        logits, captured, leaf = hooked_forward(loaded, pixels, list(layers), leaf=lower)
        values = objective(logits, captured)
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    grad = grad if patches is None else grad[:, grad.shape[1] - patches:]
    return grad.sum(1).detach().cpu()
