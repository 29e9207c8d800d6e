"""Fine-tuning a causal LM on a text dataset: a training node for Ray Train (``workflows.engine.trained``).

Two strategies, chosen in config:

- ``ddp`` (default): ``train.prepare`` wraps the model in DistributedDataParallel when the node has
  several workers; every rank takes its share of each global batch and DDP averages the gradients.
- ``deepspeed``: ``deepspeed.initialize`` over the process group Ray Train has set up (gloo on CPU,
  NCCL on GPUs), ZeRO stage from ``zero_stage``. DeepSpeed owns the optimizer step.

The batch of step ``s`` is a function of ``(seed, s)`` only, so a node killed mid-run that resumes
from its last checkpoint (weights, AdamW moments for ddp, and the step) sees exactly the batches the
uninterrupted run would have. The result is the fine-tuned model and its tokenizer in one folder
(``save_pretrained``), loadable like a hub repo.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.tiny_lm import Pretrained, clipped_step, loss_sum, pad_batch
from interpflow.tasks.types import Seed

TooLong = Literal["truncate", "error"]


class LoraSettings(BaseModel):
    """Low-rank adapters (``peft``) trained in place of the full weights, merged into them on save."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator (the update is alpha / r * B A)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="module names adapted (None: peft's default for "
                                                                "the architecture, e.g. c_attn for GPT-2)")


class FinetuneConfig(BaseModel):
    """One fine-tuning run: optimisation, data columns, checkpointing and the distribution strategy."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(150, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per step, over all workers")
    lr: float = Field(2e-3, gt=0, le=1.0, description="AdamW learning rate (linear warmup, cosine decay)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    seed: Seed = Field(0, description="seeds the batch order (a function of seed and step)")
    max_length: int | None = Field(None, ge=2, description="token limit; default the model's maximum")
    too_long: TooLong = Field("truncate", description="longer texts: keep the first max_length tokens "
                                                      "(counted in the metrics), or fail before training")
    text_column: str = "text"
    id_column: str = "id"
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (resume points)")
    method: Literal["full", "lora"] = Field("full", description="train every weight, or LoRA adapters (merged "
                                                                "into the weights when the model is saved)")
    lora: LoraSettings = LoraSettings()
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="ddp, or deepspeed with ZeRO zero_stage")
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage 0-2 (strategy=deepspeed); stage 3 "
                                                       "partitions the weights themselves, which saving does not gather")
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = Field(False, description="one GPU per worker")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> FinetuneConfig:
        if self.strategy == "deepspeed" and self.batch_size % self.num_workers:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of num_workers={self.num_workers} "
                             "for strategy=deepspeed (its global batch is micro-batch x workers)")
        return self


def encode(tokenizer, texts: list[str], max_length: int, too_long: TooLong, ids: list | None = None,
           what: str = "training") -> tuple[list[list[int]], int]:
    """Token ids per text (bos added by the tokenizer, eos appended when there is room), and how many
    were truncated. With ``too_long="error"`` any text over ``max_length`` tokens is a ValueError
    that names the first offending id."""
    full = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    over = [k for k, seq in enumerate(full) if len(seq) > max_length]
    if over and too_long == "error":
        first = ids[over[0]] if ids is not None else over[0]
        raise ValueError(f"{len(over)} {what} example(s) are longer than max_length={max_length} tokens "
                         f"(first: id {first}, {len(full[over[0]])} tokens); shorten them, raise max_length "
                         f"(up to the model's maximum), or set too_long=truncate to keep the first "
                         f"{max_length} tokens of each")
    eos = tokenizer.eos_token_id
    seqs = [seq[:max_length] for seq in full]
    seqs = [s + [eos] if eos is not None and len(s) < max_length else s for s in seqs]
    return seqs, len(over)


def model_max_length(config, tokenizer, requested: int | None) -> int:
    """The smaller of the requested limit and what the model (its config's positions) and tokenizer accept."""
    limits = [getattr(config, k, None) for k in ("n_positions", "max_position_embeddings")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limit = min([int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000] or [1 << 20])
    if requested is not None and requested > limit:
        raise ValueError(f"max_length={requested} exceeds the model's maximum of {limit} tokens; "
                         f"set max_length <= {limit}")
    return min(requested or limit, limit)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The global batch of one step: a function of (seed, step) only, so resumes replay it exactly."""
    return np.random.default_rng([seed, step]).integers(0, n, size=batch_size)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))


def _adam_state(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in named.items():
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in st:
                out[f"adam.{k}.{name}"] = torch.as_tensor(st[k]).detach().clone()
    return out


def _load_adam_state(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], state: dict) -> None:
    for name, p in named.items():
        if f"adam.exp_avg.{name}" in state:
            opt.state[p] = {k: state[f"adam.{k}.{name}"].to(p.device).clone()
                            for k in ("exp_avg", "exp_avg_sq", "step") if f"adam.{k}.{name}" in state}


def finetune(cfg: FinetuneConfig, train, model: str, data, exclude: list | None = None) -> dict[str, Any]:
    """Graph node: fine-tune the model at ``model`` (a folder or hub id) on ``data[text_column]``,
    leaving out the ids in ``exclude`` (e.g. the top-k examples of an attribution method).

    ``train`` is the engine's training context (``RayTrainContext`` on Ray Train,
    ``LocalTrainContext`` in-process). Returns ``{"model": Pretrained, "metrics": {...}}``.
    """
    import transformers

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model)
    for column in (cfg.text_column, cfg.id_column):
        if column not in data.column_names:
            raise ValueError(f"finetune: the dataset has no column {column!r} (columns: {data.column_names}); "
                             f"set text_column / id_column")
    dropped = {int(i) for i in (exclude or [])}
    ids = [int(i) for i in data[cfg.id_column]]
    keep = [k for k, i in enumerate(ids) if i not in dropped]
    if not keep:
        raise ValueError(f"finetune: every one of the {len(ids)} examples is excluded; nothing to train on")
    all_texts = list(data[cfg.text_column])
    texts = [all_texts[k] for k in keep]
    limit = model_max_length(lm.config, tokenizer, cfg.max_length)
    seqs, truncated = encode(tokenizer, texts, limit, cfg.too_long, [ids[k] for k in keep])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if cfg.method == "lora":
        lm = with_lora(lm, cfg.lora)
    named = {k: p for k, p in lm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = train.restore()
    start = 0
    if state is not None:
        lm.load_state_dict({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}, strict=False)
        _load_adam_state(opt, named, state)
        start = int(state["step"])
    if cfg.strategy == "deepspeed":
        engine, step_fn = _deepspeed_engine(cfg, lm, opt, train, start)
        module = engine.module
    else:
        engine = train.prepare(lm)
        module = lm
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + start, cfg))

        def step_fn(loss: torch.Tensor) -> None:
            clipped_step(loss, list(named.values()), opt, sched)
    module.train()
    device = next(module.parameters()).device
    rank, world = train.rank, train.world_size
    loss = torch.tensor(float("nan"))
    for step in range(start, cfg.steps):
        idx = batch_indices(cfg.seed, step, len(seqs), cfg.batch_size)[rank::world]
        batch = {k: v.to(device) for k, v in pad_batch([seqs[i] for i in idx], pad).items()}
        total, count = loss_sum(engine, batch)
        loss = total / max(count, 1)
        step_fn(loss)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # parameters, not state_dict: tied weights (embeddings / LM head) appear once
            snapshot = {f"param.{k}": v.detach() for k, v in module.named_parameters() if v.requires_grad}
            if cfg.strategy == "ddp":
                snapshot.update(_adam_state(opt, named))
            train.report(done, {"train_loss": float(loss.detach())}, state=snapshot)
    module.eval()
    metrics = {"train_loss": float(loss.detach()), "examples": len(seqs), "excluded": len(ids) - len(keep),
               "truncated": truncated, "steps": cfg.steps, "resumed_from_step": start,
               "world_size": world, "train_s": time.perf_counter() - started}
    if cfg.method == "lora":
        metrics["trainable_params"] = sum(p.numel() for p in named.values())
        module = module.merge_and_unload()     # a plain model: loads with from_pretrained, no peft needed
    return {"model": Pretrained(module.cpu(), tokenizer, metrics), "metrics": metrics}


def with_lora(lm, cfg: LoraSettings):
    """``lm`` with LoRA adapters on ``cfg.target_modules``; only the adapters require gradients."""
    import peft

    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(lm, config)
    except ValueError as exc:
        raise ValueError(f"finetune.lora: {exc}") from None


def _deepspeed_engine(cfg: FinetuneConfig, lm, opt, train, start: int):
    """A DeepSpeed engine over the existing process group, and the step function that drives it."""
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
        raise ValueError("strategy=deepspeed needs the deepspeed package (pip install deepspeed)") from exc
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("strategy=deepspeed runs on Ray Train (a process group per node); in-process "
                         "runs use strategy=ddp")
    ds_config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": max(1, cfg.batch_size // train.world_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + start, cfg))
    engine, _, _, _ = deepspeed.initialize(model=lm, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                           dist_init_required=False)

    def step_fn(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    return engine, step_fn
