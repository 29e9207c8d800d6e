"""The SAE training node: stream stored activations through ``SAETrainer`` with checkpoints.

``fit(cfg, train, activations)`` is a plain function run by the engine under Ray Train (``train`` is
the engine's training context: ``restore``/``report``/``sync_gradients``/``rank``/``world_size``/
``device``), so nothing here imports Ray and a notebook can call it with a local context.

Data. Rows are the stored (example, token) activations of one site, minus the examples held out for
evaluation (``heldout``: a fixed fraction of example ids chosen by a hash of the id, so the split does
not depend on shard layout or order). Epoch e visits shards in a seeded order and shuffles rows in a
buffer of ``shuffle_buffer`` batches (``activations.stream``), so memory is bounded by the buffer, not
the data. With W workers, global batch g goes to rank g mod W and a step is one batch per rank with
gradients averaged (data parallel; the effective batch is W * batch_size).

Normalisation: the first ``init_rows`` rows of epoch 0 (the same on every rank) set the input scale
(E||x s||^2 = d_in) and the data-dependent initialisation; see ``train.py``.

Resume: a checkpoint holds the model, the Adam moments and the step; a resumed run replays the same
batch stream and skips the batches already trained on, so it follows the uninterrupted run's path.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import SAEConfig, SparseAutoencoder, check_input, make_sae
from .train import DivergedError, SAETrainConfig, SAETrainer


class SAEFitConfig(BaseModel):
    """How the training node trains one SAE on stored activations."""

    model_config = ConfigDict(extra="forbid")
    train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig(
        sae=SAEConfig(d_in=64, n_latents=256, k=8), steps=1500, batch_size=256, init_rows=4096))
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints (and the last step); "
                                  "keep them >= ~2 s apart: Ray Train takes one report per 2 s poll")
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of example ids held out for evaluation")
    shuffle_buffer: int = Field(16, ge=1, description="batches in the shuffle buffer (bounds memory)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel when > 1)")
    use_gpu: bool = Field(False, description="train on a GPU per worker")


def is_heldout(example_id: Any, fraction: float) -> bool:
    """Stable, order-free hold-out rule: the id's CRC32 falls in the first `fraction` of the range."""
    return zlib.crc32(str(example_id).encode()) % 100_000 < fraction * 100_000


def heldout_ids(ids, fraction: float) -> list:
    """The held-out subset of `ids` (in their order)."""
    return [i for i in ids if is_heldout(i, fraction)] if fraction > 0 else []


def heldout_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """`is_heldout` for an array of ids (hashing each distinct id once: rows of one example repeat it)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.array([is_heldout(i, fraction) for i in unique.tolist()], dtype=bool)[inverse]


def locate_row(activations: pads.Dataset, example_id: Any, position: int) -> str:
    """Which stored shard holds (example_id, position): for error messages that point at a file."""
    expr = (pc.field("id") == example_id) & (pc.field("position") == int(position))
    for fragment in activations.get_fragments():
        if fragment.to_table(columns=["id"], filter=expr).num_rows:
            path = getattr(fragment, "path", "an in-memory table")
            parts = [p for p in path.split("/") if p.startswith("shard-")]
            return f"{parts[-1]} ({path})" if parts else path
    return "an unknown shard"


def global_batches(cfg: SAEFitConfig, activations: pads.Dataset) -> Iterator[tuple]:
    """Every epoch's (ids, positions, vectors) batches in order; epoch e shuffles with seed + e."""
    from interpflow.tasks.activations import stream

    tcfg = cfg.train
    keep = (lambda ids: ~heldout_mask(ids, cfg.holdout)) if cfg.holdout > 0 else None
    epoch = 0
    while True:
        produced = False
        for ids, positions, vectors in stream(activations, tcfg.batch_size, shuffle_seed=tcfg.seed + epoch,
                                              buffer_batches=cfg.shuffle_buffer, keep=keep):
            if len(ids) < tcfg.batch_size:           # a short last batch would change the step's scale
                continue
            produced = True
            yield ids, positions, vectors
        if not produced:
            raise ValueError(f"the activations hold fewer than batch_size={tcfg.batch_size} training rows "
                             f"(after holding out {cfg.holdout:.0%} of examples); lower train.batch_size")
        epoch += 1


def _checked(batch: tuple, d_in: int, activations: pads.Dataset, when: str) -> torch.Tensor:
    ids, positions, vectors = batch
    x = vectors.float()
    if x.ndim == 2 and x.shape[1] != d_in:
        check_input(x, d_in)                               # raises: width mismatch, with the fix
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        kind = "NaN" if bool(torch.isnan(x[row]).any()) else "Inf"
        example = ids[row].item() if hasattr(ids[row], "item") else ids[row]
        where = locate_row(activations, example, int(positions[row]))
        raise ValueError(f"{kind} in the activations ({when}): example id {example!r}, position "
                         f"{int(positions[row])}, in {where}; {int(bad.sum())} of {len(ids)} rows of the batch "
                         f"are non-finite. Re-extract that shard (or fix the model's numerics)")
    return x


def fit(cfg: SAEFitConfig, train, activations: pads.Dataset) -> dict:
    """Train one SAE on the stored activations of one site (resumable; see the module docstring).
    `activations` is a pyarrow dataset (a sharded node's output) or a table."""
    if isinstance(activations, pa.Table):
        activations = pads.dataset(activations)
    tcfg = cfg.train.model_copy(update={"device": train.device})
    world, rank = train.world_size, train.rank
    trainer = SAETrainer(tcfg)

    init_rows, n = [], 0                                    # identical on every rank
    for step, batch in enumerate(global_batches(cfg, activations)):
        init_rows.append(_checked(batch, tcfg.sae.d_in, activations, "initialisation rows"))
        n += len(batch[0])
        if n >= tcfg.init_rows:
            break
    trainer.initialise(torch.cat(init_rows)[:tcfg.init_rows])

    state = train.restore()
    if state is not None:
        trainer.load_state(state)
    start = trainer.steps_done
    checkpoint_step = start if state is not None else None

    batches = global_batches(cfg, activations)
    for _ in range(start * world + rank):                   # replay: skip what was trained on
        next(batches)
    history, record, t0, rows = [], None, time.perf_counter(), 0
    sync = train.sync_gradients if world > 1 else None
    for step in range(start, tcfg.steps):
        batch = next(batches)
        x = _checked(batch, tcfg.sae.d_in, activations, f"step {step}")
        try:
            record = trainer.step(x, sync_gradients=sync)
        except DivergedError as exc:
            kept = (f"the last good checkpoint (step {checkpoint_step}) is kept and a rerun resumes from it"
                    if checkpoint_step is not None else "no checkpoint was written before it")
            raise DivergedError(exc.step, f"{exc.what}; {kept}", exc.last_finite_loss) from None
        rows += x.shape[0] * world
        for _ in range(world - 1):
            next(batches)
        last = step + 1 == tcfg.steps
        if step % tcfg.log_every == 0 or last:
            record["dead_frac"] = float(trainer.model.dead_mask().float().mean())
            history.append(record)
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            train.report(step + 1, record, trainer.state())
            checkpoint_step = step + 1
        elif step % tcfg.log_every == 0:
            train.report(step + 1, record)
    seconds = time.perf_counter() - t0
    model = trainer.model.eval()
    final = {k: v for k, v in (record or {}).items() if isinstance(v, (int, float))}
    return {
        "sae": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "sae_config": tcfg.sae.model_dump(mode="json"),
        "history": pa.Table.from_pylist(history) if history else pa.table({"step": pa.array([], pa.int64())}),
        "metrics": {**final, "start_step": start, "steps_run": tcfg.steps - start, "train_rows": rows,
                    "rows_per_s": rows / seconds if seconds > 0 else 0.0},
    }


def load_sae(saved: dict, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Rebuild a trained SAE from a fit node's outputs ({"sae": tensors, "sae_config": dict, ...})."""
    model = make_sae(SAEConfig(**saved["sae_config"]))
    model.load_state_dict(saved["sae"])
    return model.to(device).eval()
