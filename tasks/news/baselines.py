"""The benchmark's baselines, each writing the same predictions files an external system would.

* **Dual encoder** (retrieval): frozen video embeddings (a model actor's) and frozen sentence embeddings,
  each mapped by a small trained head into a shared space, trained with the symmetric InfoNCE loss of
  CLIP on the train split (a Ray Train node: ``train`` is the engine's training context).
* **Nearest-neighbour captions and paragraphs**: for each test video, the training text that the dual
  encoder ranks first; its caption and story are the predictions.
* **Keyword classifier**: a multi-label classifier (an MLP with one sigmoid output per keyword of the
  train split's vocabulary) on video embeddings; a test video gets every keyword at or above
  ``threshold`` (at least ``min_keywords``).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.news.embed import read_embeddings, text_vectors
from interpflow.tasks.news.layout import TEXT_FIELDS
from interpflow.tasks.types import Seed


def split_ids(items: pa.Table, split: str) -> list[str]:
    return [i for i, s in zip(items.column("id").to_pylist(), items.column("split").to_pylist()) if s == split]


def video_features(videos: dict, ids: list[str]) -> np.ndarray:
    """The concatenated embeddings of ``ids`` at every given site (a dict site -> stored table)."""
    return np.concatenate([read_embeddings(videos[site], ids) for site in sorted(videos)], axis=1)


class DualEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text_field: str = Field("visual_description", description="the text a video is retrieved with")
    dim: int = Field(64, ge=2, description="shared embedding width")
    hidden: int = Field(256, ge=2, description="hidden width of the video head (an MLP; the text head is linear)")
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=2, description="pairs per InfoNCE batch (the other pairs are the negatives)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the InfoNCE logits")
    checkpoint_every: int = Field(200, ge=1)
    seed: Seed = 0

    def model_post_init(self, _):
        if self.text_field not in TEXT_FIELDS or self.text_field == "location":
            raise ValueError(f"retrieval.text_field={self.text_field!r}: choose title, visual_description or "
                             f"story_description")


class DualEncoder(torch.nn.Module):
    def __init__(self, video_dim: int, text_dim: int, cfg: DualEncoderConfig):
        super().__init__()
        self.video = torch.nn.Sequential(torch.nn.Linear(video_dim, cfg.hidden), torch.nn.GELU(),
                                         torch.nn.Linear(cfg.hidden, cfg.dim))
        self.text = torch.nn.Linear(text_dim, cfg.dim)
        self.register_buffer("video_mean", torch.zeros(video_dim))
        self.register_buffer("video_std", torch.ones(video_dim))

    def embed_video(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.video((x - self.video_mean) / self.video_std), dim=-1)

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text(t), dim=-1)


def _adam_state(opt, named) -> dict:
    out = {}
    for name, p in named.items():
        st = opt.state.get(p)
        if st:
            out[f"adam.{name}.m"], out[f"adam.{name}.v"] = st["exp_avg"], st["exp_avg_sq"]
    return out


def train_dual_encoder(cfg: DualEncoderConfig, train, texts: pa.Table, items: pa.Table, **videos) -> dict:
    """Training node: the dual encoder's weights (and the video normalisation) on the train split;
    ``videos`` are the stored video embeddings by site (concatenated)."""
    started = time.perf_counter()
    ids = split_ids(items, "train")
    if len(ids) < 2:
        raise ValueError(f"the train split has {len(ids)} video(s); the dual encoder needs at least 2")
    x = torch.from_numpy(video_features(videos, ids))
    t = torch.from_numpy(text_vectors(texts, cfg.text_field, ids))
    torch.manual_seed(cfg.seed)
    model = DualEncoder(x.shape[1], t.shape[1], cfg)
    model.video_mean.copy_(x.mean(0))
    model.video_std.copy_(x.std(0).clamp(min=1e-6))
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, state = 0, train.restore()
    if state is not None:
        model.load_state_dict({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")})
        start = int(state["step"])
        for name, p in named.items():
            if f"adam.{name}.m" in state:
                opt.state[p] = {"step": torch.tensor(float(start)), "exp_avg": state[f"adam.{name}.m"].clone(),
                                "exp_avg_sq": state[f"adam.{name}.v"].clone()}
    # the heads are tiny: gradients are averaged across workers by hand (no DDP wrapper around two heads)
    device = train.device
    model, x, t = model.to(device), x.to(device), t.to(device)
    batch = min(cfg.batch_size, len(ids))
    loss = torch.tensor(float("nan"))
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.as_tensor(rng.choice(len(ids), size=batch, replace=False))[train.rank::train.world_size]
        v, w = model.embed_video(x[idx]), model.embed_text(t[idx])
        logits = v @ w.T / cfg.temperature
        target = torch.arange(len(idx), device=device)
        loss = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        train.sync_gradients(named.values())
        opt.step()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            snapshot = {f"param.{k}": v.detach() for k, v in model.state_dict().items()}
            train.report(step + 1, {"train_loss": float(loss.detach())}, state={**snapshot, **_adam_state(opt, named)})
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "metrics": {"train_loss": float(loss.detach()), "train_pairs": len(ids),
                                            "resumed_from_step": start, "train_s": time.perf_counter() - started}}


def load_dual_encoder(weights: dict, cfg: DualEncoderConfig) -> DualEncoder:
    model = DualEncoder(weights["video_mean"].shape[0], weights["text.weight"].shape[1], cfg)
    model.load_state_dict(weights)
    return model.eval()


def retrieval_predictions(cfg: DualEncoderConfig, weights: dict, texts: pa.Table, items: pa.Table,
                          **videos) -> dict:
    """Node: the dual encoder's predictions files on the test split: rankings both ways (retrieval), and
    the caption and story of each test video's top-ranked training text (nearest-neighbour generation)."""
    model = load_dual_encoder(weights, cfg)
    test, train_ids = split_ids(items, "test"), split_ids(items, "train")
    with torch.no_grad():
        v = model.embed_video(torch.from_numpy(video_features(videos, test)))
        w = model.embed_text(torch.from_numpy(text_vectors(texts, cfg.text_field, test)))
        pool = model.embed_text(torch.from_numpy(text_vectors(texts, cfg.text_field, train_ids)))
    sim = (v @ w.T).numpy()
    rows = []
    for direction, matrix in (("video_to_text", sim), ("text_to_video", sim.T)):
        order = np.argsort(-matrix, axis=1, kind="stable")
        rows += [{"id": test[q], "direction": direction, "ranking": [test[c] for c in order[q]]}
                 for q in range(len(test))]
    nearest = (v @ pool.T).argmax(1).numpy()
    by_id = {i: r for i, r in zip(items.column("id").to_pylist(), items.to_pylist())}
    neighbours = [by_id[train_ids[n]] for n in nearest]
    return {
        "retrieval": pa.Table.from_pylist(rows),
        "captioning": pa.table({"id": test, "caption": [n["visual_description"] for n in neighbours]}),
        "paragraph": pa.table({"id": test, "paragraph": [n["story_description"] for n in neighbours]}),
    }


class KeywordClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_count: int = Field(2, ge=1, description="keywords seen fewer times in the train split are not predicted")
    threshold: float = Field(0.5, gt=0, lt=1, description="predict a keyword at this probability or above")
    min_keywords: int = Field(1, ge=0, description="always predict at least this many (the most probable)")
    hidden: int = Field(256, ge=0, description="hidden width of the classifier (0: linear, i.e. logistic regression)")
    steps: int = Field(500, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: Seed = 0


def keyword_predictions(cfg: KeywordClassifierConfig, items: pa.Table, **videos) -> dict:
    """Node: a multi-label classifier on video embeddings; the test split's keywords file."""
    from interpflow.tasks.news.metrics import normalise_keyword

    train_ids, test = split_ids(items, "train"), split_ids(items, "test")
    keywords = dict(zip(items.column("id").to_pylist(), items.column("keywords").to_pylist()))
    counts: dict[str, int] = {}
    for i in train_ids:
        for k in {normalise_keyword(k) for k in keywords[i]}:
            counts[k] = counts.get(k, 0) + 1
    vocab = sorted(k for k, c in counts.items() if c >= cfg.min_count)
    if not vocab:
        raise ValueError(f"no keyword occurs {cfg.min_count}+ times in the train split; lower keywords.min_count")
    x = torch.from_numpy(video_features(videos, train_ids))
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    y = torch.zeros(len(train_ids), len(vocab))
    column = {k: j for j, k in enumerate(vocab)}
    for r, i in enumerate(train_ids):
        for k in keywords[i]:
            if normalise_keyword(k) in column:
                y[r, column[normalise_keyword(k)]] = 1
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], len(vocab)) if cfg.hidden == 0 else torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], cfg.hidden), torch.nn.GELU(), torch.nn.Linear(cfg.hidden, len(vocab)))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    z = (x - mean) / std
    for _ in range(cfg.steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        prob = torch.sigmoid(head((torch.from_numpy(video_features(videos, test)) - mean) / std)).numpy()
    predicted = []
    for p in prob:
        order = np.argsort(-p, kind="stable")
        chosen = [j for j in order if p[j] >= cfg.threshold] or list(order[:cfg.min_keywords])
        predicted.append([vocab[j] for j in chosen])
    return {"keywords": pa.table({"id": test, "keywords": predicted}),
            "metrics": {"vocabulary": len(vocab), "train_loss": float(loss.detach())}}
