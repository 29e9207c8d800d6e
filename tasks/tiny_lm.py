"""A tiny causal LM and its tokenizer, trained in seconds on a generated corpus.

``train_tiny_lm`` returns a ``Pretrained``: a GPT-2 model and a byte-level BPE tokenizer that save
into one folder, so ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` load it exactly as they would a hub repo. Every workflow
that takes "a model" can therefore use this one by default and any HF id or path in real use.

The tokenizer prepends ``<|endoftext|>`` (bos) to every text it encodes, so training and later use
(activation extraction, generation) see the same sequences; training appends it again as eos.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed

if TYPE_CHECKING:  # torch, transformers and datasets load when a model trains, not when a graph is built
    import datasets
    import torch
    import transformers

BOS = EOS = UNK = "<|endoftext|>"
PAD = "<pad>"
EVAL_EXAMPLES = 256           # fixed sequences on which initial_loss and final_loss are measured


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(512, ge=260, le=65536, description="BPE vocabulary size (bytes + specials + merges)")
    min_frequency: int = Field(1, ge=1, description="a pair must occur this often to be merged")


class TinyLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layer: int = Field(3, ge=1, le=48, description="transformer blocks")
    n_embd: int = Field(64, ge=8, description="residual stream width; a multiple of n_head")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    n_positions: int = Field(64, ge=8, le=8192, description="context length; longer texts are truncated")
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="sequences per step")
    lr: float = Field(3e-3, gt=0, le=1.0, description="AdamW learning rate (linear warmup, cosine decay)")
    seed: Seed = Field(0, description="seeds model init and batch sampling")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this process, if set")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyLMConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class Pretrained:
    """A model and its tokenizer that save into, and load from, one folder (like a hub repo)."""

    def __init__(self, model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase,
                 metrics: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = dict(metrics or {})

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.metrics:
            (path / "training_metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path) -> Pretrained:
        import transformers

        path = Path(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        metrics_file = path / "training_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        return cls(model, tokenizer, metrics)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Pretrained({type(self.model).__name__}, {n:,} params, vocab={len(self.tokenizer)})"


def train_tokenizer(cfg: TokenizerConfig, texts: list[str],
                    model_max_length: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; it prepends bos to every encoded text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE(unk_token=None))     # byte-level: every string is representable
    # A prefix space gives a word the same tokens at the start of a text as in the middle;
    # the decoder strips it again, so decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=[BOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False)


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels, with labels -100 on padding."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over non-padding targets, and the number of targets."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total, int((labels != -100).sum())


def clipped_step(loss: torch.Tensor, params, opt: torch.optim.Optimizer, sched) -> None:
    """One optimizer step on ``loss`` with gradients clipped to norm 1 and the schedule advanced."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _mean_loss(model, seqs: list[list[int]], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean next-token loss over ``seqs``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            s, c = loss_sum(model, pad_batch(seqs[i:i + batch_size], pad_id))
            total, count = total + s.item(), count + c
    return total / max(count, 1)


def gpt2_config(cfg: TinyLMConfig, vocab_size: int, bos: int = 0, eos: int = 0, pad: int = 1) -> transformers.GPT2Config:
    import transformers

    return transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def site_map(cfg: TinyLMConfig):
    """The activation sites the tiny LM will have, known before it is trained (built on `meta`)."""
    import torch
    import transformers

    from interpflow.tasks.sites import SiteMap

    with torch.device("meta"):
        return SiteMap(transformers.GPT2LMHeadModel(gpt2_config(cfg, cfg.tokenizer.vocab_size)))


def train(cfg: TinyLMConfig, corpus: datasets.Dataset) -> dict:
    """Graph node: the trained model folder, and its training losses as node metrics."""
    trained = train_tiny_lm(cfg, corpus)
    return {"model": trained, "metrics": trained.metrics}


def train_tiny_lm(cfg: TinyLMConfig, corpus: datasets.Dataset) -> Pretrained:
    """Train a tokenizer and a small GPT-2 on ``corpus["text"]``; deterministic for a seed on CPU.

    ``result.metrics`` holds ``initial_loss`` and ``final_loss`` (mean next-token loss on the first
    ``EVAL_EXAMPLES`` texts before and after training), the last step's ``train_loss``, and timings.
    """
    import torch
    import transformers

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    texts = list(corpus["text"])
    if not texts:
        raise ValueError("train_tiny_lm got an empty corpus")
    start = time.perf_counter()
    tokenizer = train_tokenizer(cfg.tokenizer, texts, model_max_length=cfg.n_positions)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    # bos is prepended by the tokenizer; eos is appended when there is room.
    encoded = tokenizer(texts, truncation=True, max_length=cfg.n_positions)["input_ids"]
    seqs = [s + [eos] if len(s) < cfg.n_positions else s for s in encoded]

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = transformers.GPT2LMHeadModel(gpt2_config(cfg, len(tokenizer), bos, eos, pad))
    eval_seqs = seqs[:EVAL_EXAMPLES]
    model.eval()
    initial_loss = _mean_loss(model, eval_seqs, pad, cfg.batch_size)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, cfg.steps) / cfg.steps)))
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.steps):
        idx = rng.integers(0, len(seqs), size=cfg.batch_size)
        total, count = loss_sum(model, pad_batch([seqs[i] for i in idx], pad))
        loss = total / max(count, 1)
        clipped_step(loss, model.parameters(), opt, sched)
    model.eval()
    final_loss = _mean_loss(model, eval_seqs, pad, cfg.batch_size)
    metrics = {"initial_loss": initial_loss, "final_loss": final_loss, "train_loss": float(loss.item()),
               "train_seconds": time.perf_counter() - start, "n_params": sum(p.numel() for p in model.parameters()),
               "vocab_size": len(tokenizer)}
    return Pretrained(model, tokenizer, metrics)
