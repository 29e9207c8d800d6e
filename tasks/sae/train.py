"""A plain, deterministic training loop for any SAE variant (the Ray Train node wraps the same step).

Schedule: Adam, learning rate warmed up linearly over ``warmup_steps``, constant, then decayed
linearly to zero over the last ``decay_frac`` of the steps; gradients clipped to ``grad_clip`` (global
L2 norm); ``model.constrain_()`` after every optimiser step (unit-norm atoms for free dictionaries,
the Lambda projection for RA-SAE, nothing for A-SAE).

Input normalisation (``normalize="scale"``): one scalar s = sqrt(d_in / mean_rows ||x||^2), estimated
on the initialisation rows, stored in ``model.input_scale``; the model multiplies inputs by s before
encoding and divides reconstructions by s, so the trained model takes and returns raw activations.
No centring: ``b_dec`` (the pre-encoder bias) learns the offset.

Divergence: a non-finite loss or gradient norm raises ``DivergedError`` naming the step; it is raised
before the optimiser step, so the model still holds the last good parameters.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import SAEConfig, SparseAutoencoder, check_input, make_sae



class Schedule(BaseModel):
    """The optimisation schedule every SAE trainer shares (``lr_at`` reads it)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(2000, ge=1, description="optimiser steps (fewer if a batch stream ends first)")
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak Adam learning rate")
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    decay_frac: float = Field(0.2, ge=0, le=1, description="final fraction of steps decayed linearly to 0")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient L2 norm; None = no clipping")


class OneSeed(BaseModel):
    """A training config whose one seed is its model config's ``sae.seed``: the initial weights, the
    archetypal k-means, the init-row sample and the batch order all follow it. Two seeds (one for the
    weights, one for the data order) let a user who set "the seed" train every run from the same
    dictionary, which inflates seed stability; so ``seed`` here is only a way to write ``sae.seed``:
    given, it is written into ``sae`` (``SAETrainConfig(seed=3)``, ``cfg.model_copy(update={"seed": 3})``,
    ``fit.train.seed=3`` on the command line), and read back as ``cfg.seed``."""

    @model_validator(mode="before")
    @classmethod
    def _seed_into_sae(cls, data):
        if isinstance(data, dict) and "seed" in data:
            data = dict(data)
            seed = data.pop("seed")
            sae = data.get("sae")
            if isinstance(sae, BaseModel):
                sae = sae.model_dump()
            elif sae is None:
                sae = {}
            elif not isinstance(sae, dict):
                return data                               # pydantic reports the bad `sae`
            data["sae"] = {**sae, "seed": seed}
        return data

    @property
    def seed(self) -> int:
        """The run's one seed (= ``sae.seed``)."""
        return self.sae.seed

    def model_copy(self, *, update: dict | None = None, deep: bool = False):
        if update and "seed" in update:
            update = dict(update)
            seed = update.pop("seed")
            sae = update.get("sae", self.sae)
            update["sae"] = type(sae).model_validate({**sae.model_dump(), "seed": seed})
        return super().model_copy(update=update, deep=deep)


class SAETrainConfig(OneSeed, Schedule):
    sae: SAEConfig = Field(default_factory=SAEConfig)
    batch_size: int = Field(256, ge=1, description="rows per step when x is a tensor")
    normalize: Literal["scale", "none"] = Field("scale", description="scale: E||x||^2 = d_in; none: raw")
    init_rows: int = Field(16384, ge=1, description="rows used for input scale and data-dependent init")
    log_every: int = Field(100, ge=1, description="history record every this many steps (and the last)")
    device: str = Field("cpu", description="torch device the model trains on")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while training (restored "
                                                        "after); 1 is fastest for small SAEs on CPU")

    @model_validator(mode="after")
    def _check(self) -> SAETrainConfig:
        if self.sae.variant in ("archetypal", "relaxed_archetypal") and self.init_rows < self.sae.n_candidates:
            raise ValueError(f"init_rows={self.init_rows} must be at least sae.n_candidates="
                             f"{self.sae.n_candidates} (k-means needs that many points); raise init_rows")
        return self


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or gradient at ``step`` (the model holds the state before it)."""

    def __init__(self, step: int, what: str, last_finite_loss: float | None):
        self.step, self.what, self.last_finite_loss = step, what, last_finite_loss
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.4g}"
        super().__init__(f"SAE training diverged at step {step}: {what} (last finite loss {last}); "
                         f"lower lr, raise warmup_steps or set grad_clip")


def lr_at(cfg: Schedule, step: int) -> float:
    """Learning rate for 0-based ``step``: warmup, constant, linear decay to 0."""
    f = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_start = cfg.steps * (1 - cfg.decay_frac)
    if cfg.decay_frac > 0 and step >= decay_start:
        f *= max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return cfg.lr * f


def _tensor_batches(x: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    n = x.shape[0]
    b = min(batch_size, n)
    while True:                                    # epochs; the last partial batch of each is dropped
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield x[perm[i:i + b]]


def _as_tensor(b) -> torch.Tensor:
    return torch.from_numpy(b) if isinstance(b, np.ndarray) else b


def train_sae(cfg: SAETrainConfig, x: torch.Tensor | Iterable[torch.Tensor], *,
              model: SparseAutoencoder | None = None,
              on_log: Callable[[int, SparseAutoencoder, dict], None] | None = None,
              fresh: bool = True) -> tuple[SparseAutoencoder, list[dict]]:
    """Train ``make_sae(cfg.sae)`` (or ``model``) on rows x; return (model in eval mode, history).

    x is a (rows, d_in) tensor (shuffled each epoch, ``cfg.batch_size`` rows a step) or an iterable
    of (rows, d_in) batches used as given, each checked for width and NaN/Inf with its row index in
    the stream. The first ``init_rows`` rows (sampled from a tensor; the first batches of a stream,
    which are then trained on too) set the input scale and the data-dependent initialisation.
    history: one dict per ``log_every`` steps and the last: step, lr, loss, the loss parts (mse,
    penalties, l0 of the batch), grad_norm, dead_frac (latents silent for dead_steps), seconds.
    ``on_log(step, model, record)`` is called with each record (for logging/checkpointing hooks).
    ``model`` (built from ``cfg.sae``) trains an existing model: with ``fresh=True`` it is initialised
    from the data like a new one; with ``fresh=False`` its input scale and weights are kept (a new
    optimiser and schedule start from step 0: this is not a checkpoint resume).
    """
    if model is not None and model.cfg != cfg.sae:
        raise ValueError("train_sae: model was built from a different SAEConfig than cfg.sae; "
                         "pass the model's own config as cfg.sae")
    if model is None and not fresh:
        raise ValueError("train_sae: fresh=False needs a model to continue training")
    if cfg.threads is None:
        return _train(cfg, x, model, on_log, fresh)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, x, model, on_log, fresh)
    finally:
        torch.set_num_threads(before)


class SAETrainer:
    """An SAE with its optimiser and step counter: what one training step changes and what a
    checkpoint holds. ``train_sae`` drives it over a tensor or a stream; the Ray Train node drives
    the same object, so both run the same numerics.

        trainer = SAETrainer(cfg)
        trainer.initialise(init_rows)        # input scale + data-dependent init (fresh runs only)
        record = trainer.step(batch)         # one optimiser step; raises DivergedError
        tensors = trainer.state()            # model + optimiser + step, safetensors-ready
        trainer.load_state(tensors)          # resume exactly where state() was taken
    """

    def __init__(self, cfg: SAETrainConfig, model: SparseAutoencoder | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = (model or make_sae(cfg.sae)).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.model.param_groups(cfg.lr), lr=cfg.lr)
        self.steps_done = 0
        self.last_loss: float | None = None

    @torch.no_grad()
    def initialise(self, init_x: torch.Tensor) -> None:
        """Set the input scale from raw rows and run the variant's data-dependent initialisation."""
        cfg, model = self.cfg, self.model
        init_x = init_x.to(self.device, torch.float32)
        if cfg.normalize == "scale":
            mean_sq = float(init_x.pow(2).sum(1).mean())
            if not mean_sq > 0:
                raise ValueError("train_sae: the initialisation rows are all zero; cannot normalise inputs")
            model.input_scale.fill_(math.sqrt(cfg.sae.d_in / mean_sq))
        model.init_from_data_(init_x)
        model.constrain_()

    def step(self, xb: torch.Tensor, sync_gradients: Callable[[list], None] | None = None) -> dict:
        """One optimiser step on raw rows ``xb``; returns the step's record (loss parts, lr, grad norm).

        ``sync_gradients(params)`` runs between backward and clipping (data-parallel averaging).
        Raises ``DivergedError`` before the update if the loss or gradient norm is not finite.
        """
        cfg, model, step = self.cfg, self.model, self.steps_done
        model.train()
        xb = xb.to(self.device, torch.float32, non_blocking=True)
        lr = lr_at(cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        total, parts = model.loss(xb)
        loss_value = float(total.detach())
        if not math.isfinite(loss_value):
            raise DivergedError(step, f"loss is {loss_value}", self.last_loss)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if sync_gradients is not None:
            sync_gradients(self.params)
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params
                                                                     if p.grad is not None])))
        if not math.isfinite(grad_norm):
            raise DivergedError(step, f"gradient norm is {grad_norm}", self.last_loss)
        self.opt.step()
        model.constrain_()
        self.last_loss = loss_value
        self.steps_done += 1
        return {"step": step, "lr": lr, "loss": loss_value, **{name: float(v) for name, v in parts.items()},
                "grad_norm": grad_norm}

    def state(self) -> dict[str, torch.Tensor]:
        """Model parameters and buffers (``model.*``), Adam moments (``optim.<param>.<name>``) and the
        step counter, as a flat dict of tensors (safetensors holds it; nothing is pickled)."""
        out = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        for index, values in self.opt.state_dict()["state"].items():
            for name, value in values.items():
                out[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().clone()
        out["steps_done"] = torch.tensor(self.steps_done)
        if self.last_loss is not None:
            out["last_loss"] = torch.tensor(self.last_loss, dtype=torch.float64)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state()`` returned (from this config's model)."""
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.model.to(self.device)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value.to(self.device) if value.ndim else value
        self.opt.load_state_dict({"state": per_param, "param_groups": self.opt.state_dict()["param_groups"]})
        self.steps_done = int(state["steps_done"])
        self.last_loss = float(state["last_loss"]) if "last_loss" in state else None


def _train(cfg: SAETrainConfig, x, model: SparseAutoencoder | None, on_log,
           fresh: bool) -> tuple[SparseAutoencoder, list[dict]]:
    scfg = cfg.sae
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = not isinstance(x, (torch.Tensor, np.ndarray))

    if stream:
        it = iter(x)
        buffered, n_buf = [], 0
        for b in it:
            b = _as_tensor(b)
            check_input(b, scfg.d_in, row_offset=n_buf, where=f"batch {len(buffered)}")
            buffered.append(b)
            n_buf += b.shape[0]
            if n_buf >= cfg.init_rows:
                break
        if not buffered:
            raise ValueError("train_sae: the batch stream is empty")
        init_x = torch.cat(buffered)[:cfg.init_rows]
        batches: Iterator[torch.Tensor] = itertools.chain(buffered, (_as_tensor(b) for b in it))
    else:
        x = _as_tensor(x)
        check_input(x, scfg.d_in)
        init_x = x[torch.randperm(x.shape[0], generator=gen)[:cfg.init_rows]]
        batches = _tensor_batches(x, cfg.batch_size, gen)

    trainer = SAETrainer(cfg, model)
    model = trainer.model
    if fresh:
        trainer.initialise(init_x)
    history: list[dict] = []
    rows_seen = 0
    t0 = time.perf_counter()
    record: dict | None = None

    def _log(rec: dict) -> None:
        rec.update(dead_frac=float(model.dead_mask().float().mean()), seconds=time.perf_counter() - t0)
        history.append(rec)
        if on_log is not None:
            on_log(rec["step"], model, rec)

    for step, xb in enumerate(batches):
        if step >= cfg.steps:
            break
        if stream and step >= len(buffered):
            check_input(xb, scfg.d_in, row_offset=rows_seen, where=f"batch {step}")
        rows_seen += xb.shape[0]
        record = trainer.step(xb)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            _log(record)
    if record is not None and (not history or history[-1]["step"] != record["step"]):
        _log(record)                                     # a stream that ended early: log its last step
    model.eval()
    return model, history
