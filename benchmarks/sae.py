"""SAE training: the Ray Train node against a plain PyTorch loop, and memory while streaming.

Prints, for the same SAE, data, batch size, steps and one CPU thread:
- training rows/s of the `trained(fit, ...)` node (1 Ray Train worker; rows/s of its training loop, and
  of the whole node including Ray Train start-up) vs `train_sae` on an in-memory tensor in this
  process (target >= 0.9 for the loop);
- peak RSS of the training task streaming 1x and 10x the shuffle buffer's worth of stored activations
  (target: flat; memory is bounded by the buffer, not the data).

    python benchmarks/sae.py [--rows 200000] [--d 64] [--latents 256] [--steps 6000]

The node checkpoints 4 times. Ray Train's report blocks until its controller (polling every 2 s) has
taken the previous one, so checkpoints closer than ~2 s apart slow a fast loop down: with 1500 steps
(about 1 s between checkpoints here) the loop ratio drops to about 0.7.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time


def activations_table(rows: int, d: int, seed: int):
    """Synthetic activations stored as the extraction node stores them (id, position, vector)."""
    from interpflow.tasks.sae import SyntheticConfig, as_activations, make_synthetic

    return as_activations(make_synthetic(SyntheticConfig(d=d, n_atoms=2 * d, k=4, n=rows, seed=seed))[0])


def make_activations(cfg, shard):
    """Task: one shard of synthetic activations."""
    return activations_table(cfg.rows_per_shard, cfg.d, seed=shard.index)


def shard_ids(cfg) -> list[int]:
    return list(range(cfg.shards))


def fit_config(d: int, latents: int, steps: int, batch: int):
    from interpflow.tasks.sae import SAEConfig, SAETrainConfig
    from interpflow.tasks.sae.fit import SAEFitConfig

    return SAEFitConfig(train=SAETrainConfig(sae=SAEConfig(variant="topk", d_in=d, n_latents=latents, k=8),
                                             steps=steps, batch_size=batch, init_rows=4096, log_every=100,
                                             threads=1),
                        checkpoint_every=max(steps // 4, 1), holdout=0.0)


def node_run(store: str, rows: int, d: int, latents: int, steps: int, batch: int) -> dict:
    from pydantic import BaseModel

    from interpflow.tasks.sae.fit import fit
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import Graph, RunSettings, sharded, trained

    class Acts(BaseModel):
        rows_per_shard: int
        d: int
        shards: int = 8

    acts = sharded(make_activations, Acts(rows_per_shard=rows // 8, d=d), ids=shard_ids, num_shards=8,
                   name="activations")
    node = trained(fit, fit_config(d, latents, steps, batch), name="sae", activations=acts)
    settings = RunSettings(store=store, lineage=False, progress=False, num_cpus=2)
    handle = run_graph(Graph(node), settings, progress=False)
    assert handle.ok, handle.nodes()
    return {"metrics": handle.metrics("sae"), "seconds": handle.nodes()["sae"]["seconds"]}


def plain_loop(rows: int, d: int, latents: int, steps: int, batch: int) -> float:
    import torch

    from interpflow.tasks.activations import vectors_of
    from interpflow.tasks.sae import train_sae

    torch.set_num_threads(1)
    x = torch.cat([vectors_of(activations_table(rows // 8, d, seed=s)) for s in range(8)])
    cfg = fit_config(d, latents, steps, batch).train
    start = time.perf_counter()
    train_sae(cfg, x)
    return steps * batch / (time.perf_counter() - start)


STREAM = textwrap.dedent("""
    import json, resource, sys, pyarrow.dataset as pads, torch
    sys.path.insert(0, {bench_dir!r})
    from sae import fit_config
    from interpflow.tasks.sae.fit import fit
    from interpflow.workflows.engine.training import LocalTrainContext
    torch.set_num_threads(1)
    data = pads.dataset({path!r}, format="parquet")
    cfg = fit_config({d}, {latents}, {steps}, {batch}).model_copy(update={{"shuffle_buffer": {buffer}}})
    fit(cfg, LocalTrainContext(), data)
    print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""")


def streamed_peak_rss(root: str, buffer_rows: int, multiple: int, d: int, latents: int, batch: int,
                      buffer: int) -> float:
    """Peak RSS (MB) of a process training one pass over `multiple` x `buffer_rows` stored rows."""
    import os

    import pyarrow.parquet as pq

    path = f"{root}/stream-{multiple}"
    os.makedirs(path, exist_ok=True)
    rows = buffer_rows * multiple
    per_file = buffer_rows
    for i in range(multiple):
        pq.write_table(activations_table(per_file, d, seed=i), f"{path}/part-{i:03d}.parquet")
    steps = rows // batch - 1
    code = STREAM.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), path=path, d=d, latents=latents,
                         steps=steps, batch=batch, buffer=buffer)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    baseline = plain_loop(args.rows, args.d, args.latents, args.steps, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        node = node_run(f"{tmp}/store", args.rows, args.d, args.latents, args.steps, args.batch)
        loop_rate = node["metrics"]["rows_per_s"]
        node_rate = args.steps * args.batch / node["seconds"]
        print(f"SAE topk d={args.d} n_latents={args.latents} batch={args.batch} steps={args.steps}, 1 thread, "
              f"checkpoint every {max(args.steps // 4, 1)} steps")
        print(f"  plain PyTorch loop (in memory)      {baseline:10.0f} rows/s")
        print(f"  Ray Train node, training loop       {loop_rate:10.0f} rows/s   ratio {loop_rate / baseline:.2f} "
              f"(target >= 0.9)")
        print(f"  Ray Train node, whole node          {node_rate:10.0f} rows/s   ratio {node_rate / baseline:.2f} "
              f"({node['seconds']:.1f} s incl. Ray Train start-up)")

        # wide rows and big batches, so that the data (not the interpreter) would dominate if it were held
        d, latents, buffer, batch = 256, 512, 16, 2048
        buffer_rows = buffer * batch
        small = streamed_peak_rss(tmp, buffer_rows, 1, d, latents, batch, buffer)
        large = streamed_peak_rss(tmp, buffer_rows, 10, d, latents, batch, buffer)
        size = 10 * buffer_rows * d * 4 / 2**20
        print(f"  peak RSS streaming 1x buffer  ({buffer_rows:7d} rows of d={d})  {small:6.0f} MB")
        print(f"  peak RSS streaming 10x buffer ({10 * buffer_rows:7d} rows, {size:.0f} MB float32) {large:6.0f} MB"
              f"   growth {large / small:.2f}x (target: flat)")


if __name__ == "__main__":
    main()
