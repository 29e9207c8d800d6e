"""The physics-probing study's heavy parts, measured side by side (issue #9).

Prints, on the default clip shape (8 frames of 32 x 32) and the default tiny VideoMAE shape:
- clips/s of the workflow's sharded extraction node (1 model actor, 1 thread) vs a plain
  `transformers` loop doing the same work (output_hidden_states at every layer, mean-pooled and
  per-patch) on one thread;
- wall time of the probe fan-out (every layer x variable x grid, grouped nested CV + control) with
  Ray limited to 1 and to 2 CPUs;
- bytes per clip stored for pooled and per-patch activations across all layers.

    python benchmarks/physics_probing.py [--clips 2000]

The model is a randomly initialised VideoMAE of the embedded model's shape: speed does not depend on
what the weights learned.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def plain_loop(model_path: str, frames, batch_size: int) -> float:
    """Clips/s of a plain loop: normalise, forward with output_hidden_states, pool every layer."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from interpflow.tasks.video.clips import pixel_values
    from interpflow.tasks.video.model import pixel_stats

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(model_path).eval()
    mean, std = pixel_stats(model_path)
    t, size = frames.shape[1], frames.shape[2]
    grid = size // model.config.patch_size
    kept = []
    start = time.perf_counter()
    for i in range(0, len(frames), batch_size):
        px = torch.from_numpy(pixel_values(frames[i:i + batch_size], mean, std))
        with torch.no_grad():
            hidden = model(pixel_values=px, output_hidden_states=True).hidden_states
        for h in hidden:
            pooled = h.mean(1)
            per_patch = h.reshape(h.shape[0], t, grid * grid, -1).mean(1)
            kept.append(np.asarray(pooled).sum() + np.asarray(per_patch).sum())
    return len(frames) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=2000, help="scenes (impossible twins add half as many)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ray

    from interpflow.tasks.video.clips import ClipConfig, column, make_clips
    from interpflow.tasks.video.model import VideoModelConfig, videomae_config
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import RunSettings
    from interpflow.workflows.physics_probing import PhysicsProbingStudy, physics_graph, study_scope

    clips_cfg = ClipConfig(n_clips=args.clips, impossible_rate=0.5)
    frames = column(make_clips(clips_cfg), "frames")
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import VideoMAEModel

        VideoMAEModel(videomae_config(VideoModelConfig(), clips_cfg)).save_pretrained(f"{tmp}/model")
        study = PhysicsProbingStudy(clips=clips_cfg, model={"path": f"{tmp}/model"}, random_control=None,
                                    extract={"sites": ["embed"], "batch_size": args.batch_size})
        graph = physics_graph(study)
        n_sites = len(study_scope(study)["sites"])
        settings = RunSettings(store=f"{tmp}/store", lineage=False, progress=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        baseline = plain_loop(f"{tmp}/model", frames, args.batch_size)
        handle = run_graph(_until(graph, "activations"), settings, progress=False)
        assert handle.ok, handle.nodes()
        wall = handle.nodes()["activations"]["seconds"]     # the node alone: actor start, model load, shards, commits
        acts = handle.metrics("activations")
        ray.shutdown()

        fanouts = {}
        for cpus in (1, 2):
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
            store = f"{tmp}/store"
            probes = _until(graph, "depth")
            _forget_probes(store)
            started = time.perf_counter()
            handle = run_graph(probes, RunSettings(store=store, lineage=False, progress=False), progress=False)
            fanouts[cpus] = time.perf_counter() - started
            assert handle.ok, handle.nodes()
            n_probes = sum(1 for name in handle.nodes() if name.startswith("probe."))
            ray.shutdown()
        pooled_bytes, patch_bytes = _bytes(f"{tmp}/store")

    n = len(frames)
    print(f"{n} clips of {frames.shape[1]} x {frames.shape[2]} x {frames.shape[3]}; tiny VideoMAE shape; batch "
          f"{args.batch_size}; 1 thread")
    print(f"extraction clips/s: plain loop {baseline:.0f}, workflow node {n / wall:.0f} (ratio {n / wall / baseline:.2f}), "
          f"inside the shard functions {acts['clips'] / acts['compute_s']:.0f} "
          f"(ratio {acts['clips'] / acts['compute_s'] / baseline:.2f})")
    print(f"probe fan-out ({n_probes} probe nodes + depth): 1 CPU {fanouts[1]:.1f} s, 2 CPUs {fanouts[2]:.1f} s "
          f"(speed-up {fanouts[1] / fanouts[2]:.2f}x)")
    print(f"stored bytes per clip, all {n_sites} layers: pooled {pooled_bytes / n:.0f}, per-patch "
          f"{patch_bytes / n:.0f}")


def _until(graph, last: str):
    """The part of the graph that `last` needs."""
    from interpflow.workflows.engine.graph import Graph

    return Graph(graph[last])


def _forget_probes(store: str) -> None:
    """Delete committed probe and depth outputs, so the fan-out runs again on the cached activations."""
    import shutil
    from pathlib import Path

    for path in Path(store).iterdir():
        if path.name.startswith("probe.") or path.name == "depth":
            shutil.rmtree(path)


def _bytes(store: str) -> tuple[int, int]:
    from pathlib import Path

    pooled = patches = 0
    for f in Path(store, "activations").rglob("*.parquet"):
        if f.name.endswith(".patches.parquet"):
            patches += f.stat().st_size
        else:
            pooled += f.stat().st_size
    return pooled, patches


if __name__ == "__main__":
    main()
