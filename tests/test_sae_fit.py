"""The SAE training node's task (no Ray): streaming, hold-out, exact resume, bad-input errors.

It runs with the engine's in-process training context; the Ray Train path is in test_sae_workflow.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from interpflow.tasks.sae import DivergedError, SAEConfig, SAETrainConfig, SyntheticConfig, make_synthetic, matched_cosine
from interpflow.tasks.sae.fit import SAEFitConfig, fit, heldout_ids, is_heldout, load_sae
from interpflow.workflows.engine.training import LocalTrainContext

TOKENS_PER_EXAMPLE = 10


def write_shards(root, x: torch.Tensor, num_shards: int = 4):
    """Store rows like the extraction node does: (id, position, vector) per shard folder."""
    n, d = x.shape
    ids = np.arange(n) // TOKENS_PER_EXAMPLE
    positions = (np.arange(n) % TOKENS_PER_EXAMPLE).astype(np.int32)
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    for s in range(num_shards):
        part = slice(bounds[s], bounds[s + 1])
        folder = root / f"shard-{s:05d}-of-{num_shards:05d}"
        folder.mkdir(parents=True)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x[part].numpy().reshape(-1)), d)
        pq.write_table(pa.table({"id": ids[part], "position": positions[part], "vector": vectors}),
                       folder / "blocks.0.resid_post.parquet")
    return pads.dataset(str(root), format="parquet")


def config(steps=600, batch_size=128, **train) -> SAEFitConfig:
    sae = SAEConfig(variant="topk", d_in=32, n_latents=48, k=3)
    return SAEFitConfig(train=SAETrainConfig(sae=sae, steps=steps, batch_size=batch_size, init_rows=2048, log_every=50,
                                             threads=1, **train), checkpoint_every=200, holdout=0.1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, dictionary, _ = make_synthetic(SyntheticConfig(n=20000, seed=3))
    return write_shards(tmp_path_factory.mktemp("acts"), x), dictionary


def test_fit_streams_stored_shards_and_recovers_the_dictionary(synthetic):
    data, dictionary = synthetic
    context = LocalTrainContext()
    out = fit(config(steps=1500, batch_size=256), context, data)
    assert matched_cosine(load_sae(out).dictionary(), dictionary)[0] >= 0.9
    assert [c["step"] for c in context.checkpoints] == [200, 400, 600, 800, 1000, 1200, 1400, 1500]
    assert out["metrics"]["train_rows"] == 1500 * 256 and out["metrics"]["start_step"] == 0
    assert out["history"].num_rows == len(range(0, 1500, 50)) + 1     # every log_every steps and the last
    assert {"step", "mse", "l0", "dead_frac"} <= set(out["history"].column_names)


def test_held_out_examples_never_reach_training(synthetic, monkeypatch):
    data, _ = synthetic
    ids = list(range(20000 // TOKENS_PER_EXAMPLE))
    held = set(heldout_ids(ids, 0.1))
    assert 0.05 < len(held) / len(ids) < 0.15
    assert held == {i for i in reversed(ids) if is_heldout(i, 0.1)}        # order does not matter
    seen = set()
    from interpflow.tasks import activations

    real_stream = activations.stream

    def recording_stream(*args, **kwargs):
        for batch in real_stream(*args, **kwargs):
            seen.update(batch[0].tolist())
            yield batch

    monkeypatch.setattr(activations, "stream", recording_stream)
    fit(config(steps=100), LocalTrainContext(), data)
    assert seen and not seen & held


def test_resume_from_a_checkpoint_continues_the_same_run(synthetic):
    data, _ = synthetic
    cfg = config(steps=600)
    full = fit(cfg, LocalTrainContext(), data)
    first = LocalTrainContext()
    fit(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 600})}), first, data)
    resumed = fit(cfg, LocalTrainContext(resume_from=first.checkpoints[1]), data)   # from step 400
    assert resumed["metrics"]["start_step"] == 400 and resumed["metrics"]["steps_run"] == 200
    for name, tensor in full["sae"].items():
        assert torch.equal(tensor, resumed["sae"][name]), name


def test_width_mismatch_names_the_field_and_the_fix(synthetic):
    data, _ = synthetic
    cfg = config()
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"sae": cfg.train.sae.model_copy(
        update={"d_in": 16})})})
    with pytest.raises(ValueError, match=r"width 32 does not match d_in=16.*sae.d_in=32"):
        fit(bad, LocalTrainContext(), data)


def test_nan_in_activations_reports_shard_example_and_position(tmp_path):
    x, _, _ = make_synthetic(SyntheticConfig(n=4000, seed=1))
    x[3333, 5] = float("nan")                     # example 333, position 3, in the last of 4 shards
    data = write_shards(tmp_path, x)
    with pytest.raises(ValueError) as err:
        fit(config(steps=400), LocalTrainContext(), data)
    message = str(err.value)
    assert "NaN" in message and "example id 333" in message and "position 3" in message
    assert "shard-00003-of-00004" in message


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    x, _, _ = make_synthetic(SyntheticConfig(n=8000, seed=2))
    x[-400:] *= 1e19                  # finite, but the squared error overflows float32 once they are reached
    data = write_shards(tmp_path, x, num_shards=8)
    cfg = config(steps=2000).model_copy(update={"holdout": 0.0, "checkpoint_every": 10})
    context = LocalTrainContext()
    with pytest.raises(DivergedError) as err:
        fit(cfg, context, data)
    step = err.value.step
    assert step > 0 and context.checkpoints
    last_good = context.checkpoints[-1]["step"]
    assert last_good <= step
    assert f"diverged at step {step}" in str(err.value) and f"last good checkpoint (step {last_good})" in str(err.value)
    assert all(torch.isfinite(v).all() for k, v in context.checkpoints[-1].items()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
