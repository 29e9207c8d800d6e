"""VTCD's heavy parts (issue #10), measured: CRIS masked forward passes and the per-(layer, head) clustering.

Prints, on the planted clips and a 4-block x 4-head ViViT classifier (16-px patches, as the embedded
default; random weights: speed does not depend on what the weights learned):
- masked videos/s of CRIS (one masked video = one video through the model under one draw's masks):
  a plain loop with one mask per pass (one video under one draw per forward: the baseline), one draw per pass
  (all videos of the draw batched, each with its own masks), and `cris.cris_shard` (the function the
  workflow's sharded node runs, ``--draws-per-pass`` draws x all videos per forward; also at
  ``--many-draws-per-pass``) in process, on 1 Ray actor and on 2 Ray actors (each
  with 1 CPU and 1 torch thread, draws split evenly; actor start and model load timed apart). Ratios against
  the baseline and 2 actors / 1 actor;
- wall time of the clustering fan-out (`vtcd_concepts.discover_concepts` for every (layer, head), the graph's
  concept nodes) as Ray tasks on 1 and on 2 workers, and the ratio.

    python benchmarks/concept_discovery.py [--videos 30] [--draws 64] [--draws-per-pass 8] [--repeats 2]

Timings are the fastest of --repeats passes (the machine may be shared); the cores available are printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np


def build(tmp: str, videos: int):
    """A random embedded-size classifier folder, the clips, and the concepts of every (layer, head)."""
    import torch

    from interpflow.tasks.concepts.classifier import load_classifier
    from interpflow.tasks.concepts.tubelets import TubeletConfig, target_ids, tubelet_shard
    from interpflow.tasks.concepts.vtcd_clips import ConceptClipConfig, make_concept_clips
    from interpflow.tasks.concepts.vtcd_concepts import ConceptConfig, discover_concepts
    from interpflow.tasks.concepts.vtcd_model import ClassifierFolder, VideoClassifierConfig, classifier_config
    from interpflow.tasks.models import ModelConfig
    from interpflow.tasks.video.layout import token_grid
    from transformers import AutoModelForVideoClassification

    clips = ConceptClipConfig(n_clips=3 * videos)              # left, right, still: a third are target videos
    # 4 blocks x 4 heads (the embedded study uses 2 x 2): 16 clustering jobs and 4x the concepts to mask
    config = classifier_config(VideoClassifierConfig(layers=4, heads=4), clips)
    torch.manual_seed(0)
    path = os.path.join(tmp, "model")
    ClassifierFolder(AutoModelForVideoClassification.from_config(config).eval(), [0.1] * 3, [0.3] * 3
                     ).save_pretrained(path)
    model = load_classifier(ModelConfig(), path)
    data = make_concept_clips(clips)
    cfg = TubeletConfig()
    tubelets = tubelet_shard(cfg, SimpleNamespace(ids=tuple(target_ids(cfg, data))), model, data)["tubelets"]
    grid = token_grid(config)
    pairs = [(layer, head) for layer in range(config.num_hidden_layers) for head in range(config.num_attention_heads)]
    concept_cfgs = [ConceptConfig(layer=layer, head=head, grid=[grid.prefix, grid.frames, grid.height, grid.width])
                    for layer, head in pairs]
    members = {f"members.{c.layer}.{c.head}": discover_concepts(c, tubelets, data)["members"] for c in concept_cfgs}
    return path, model, data, tubelets, concept_cfgs, members


def plain_loop(model, data, members, draws: int, per_draw: bool) -> float:
    """Masked videos/s with one (draw, video) per forward (per_draw=False) or one draw per forward."""
    from interpflow.tasks.concepts import cris
    from interpflow.tasks.concepts.features import heads_of

    concepts = cris.pooled_concepts(members, cris._n_tokens(members))
    pixels = cris._video_pixels(model, data, concepts)
    n_heads = heads_of(model.model, "keys")
    started = time.perf_counter()
    for d in range(draws):
        keep = cris.keep_masks(concepts, [cris.drawn_subset(0, d, concepts.size, 0.5)], n_heads)
        if per_draw:
            cris.target_probability(model, pixels, 1, "keys", keep)
        else:
            for v in range(len(concepts.videos)):
                one = {layer: m[v:v + 1] for layer, m in keep.items()}
                cris.target_probability(model, pixels[v:v + 1], 1, "keys", one)
    return draws * len(concepts.videos) / (time.perf_counter() - started)


def shard_rate(model, data, members, draws: int, per_pass: int) -> float:
    from interpflow.tasks.concepts import cris

    cfg = cris.CrisConfig(draws=draws, draws_per_pass=per_pass)
    out = cris.cris_shard(cfg, SimpleNamespace(ids=tuple(range(draws))), model, data, **members)
    return out["metrics"]["masked_videos_per_s"]


def actor_rate(path: str, data, members, draws: int, per_pass: int, actors: int) -> tuple[float, float]:
    """(masked videos/s over all actors, seconds to start the actors and load the model)."""
    import ray

    from interpflow.tasks.concepts import cris

    @ray.remote(num_cpus=1)
    class CrisActor:
        def __init__(self, model_path: str):
            import torch

            from interpflow.tasks.concepts.classifier import load_classifier
            from interpflow.tasks.models import ModelConfig

            torch.set_num_threads(1)
            self.model = load_classifier(ModelConfig(), model_path)

        def run(self, ids, data, members, per_pass):
            cfg = cris.CrisConfig(draws=max(len(ids), 2), draws_per_pass=per_pass)   # draws: ids given explicitly
            return cris.cris_shard(cfg, SimpleNamespace(ids=tuple(ids)), self.model, data, **members)["draws"].num_rows

    started = time.perf_counter()
    pool = [CrisActor.remote(path) for _ in range(actors)]
    ray.get([a.__ray_ready__.remote() for a in pool])
    setup = time.perf_counter() - started
    data_ref, members_ref = ray.put(data), ray.put(members)
    ray.get([a.run.remote([0], data_ref, members_ref, per_pass) for a in pool])      # warm up
    split = np.array_split(np.arange(draws), actors)
    started = time.perf_counter()
    done = sum(ray.get([a.run.remote(s.tolist(), data_ref, members_ref, per_pass) for a, s in zip(pool, split)]))
    rate = done * len(np.unique(next(iter(members.values())).column("video").to_numpy())) / (time.perf_counter() - started)
    for a in pool:
        ray.kill(a)
    return rate, setup


def clustering_fanout(tubelets, data, concept_cfgs, workers: int) -> float:
    """Wall seconds of the concept nodes as Ray tasks, `workers` at a time (2 CPUs, each task asks 2/workers)."""
    import ray

    from interpflow.tasks.concepts.vtcd_concepts import discover_concepts

    task = ray.remote(num_cpus=2 / workers)(lambda c, t, d: discover_concepts(c, t, d)["metrics"]["concepts"])
    t_ref, d_ref = ray.put(tubelets), ray.put(data)
    started = time.perf_counter()
    ray.get([task.remote(c, t_ref, d_ref) for c in concept_cfgs])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=30)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--draws-per-pass", type=int, default=1)
    parser.add_argument("--many-draws-per-pass", type=int, default=8, help="also measured in process")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path, model, data, tubelets, concept_cfgs, members = build(tmp, args.videos)
        print(f"cores: {os.cpu_count()}, videos: {args.videos}, draws: {args.draws}, concepts: "
              f"{sum(m.num_rows and len(set(m.column('concept_id').to_pylist())) for m in members.values())}")
        best = lambda f: max(f() for _ in range(args.repeats))                      # noqa: E731
        baseline = best(lambda: plain_loop(model, data, members, max(args.draws // 8, 2), per_draw=False))
        one_draw = best(lambda: plain_loop(model, data, members, args.draws, per_draw=True))
        batched = best(lambda: shard_rate(model, data, members, args.draws, args.draws_per_pass))
        many = best(lambda: shard_rate(model, data, members, args.draws, args.many_draws_per_pass))
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            one, setup1 = max(actor_rate(path, data, members, args.draws, args.draws_per_pass, 1)
                              for _ in range(args.repeats))
            two, setup2 = max(actor_rate(path, data, members, args.draws, args.draws_per_pass, 2)
                              for _ in range(args.repeats))
            print("\nCRIS masked videos/s (1 torch thread per process)")
            for name, rate in (("one mask per pass (baseline)", baseline), ("one draw per pass", one_draw),
                               (f"cris_shard, {args.draws_per_pass} draw(s) per pass, in process", batched),
                               (f"cris_shard, {args.many_draws_per_pass} draws per pass, in process", many),
                               ("cris_shard on 1 actor", one), ("cris_shard on 2 actors", two)):
                print(f"  {name:<48} {rate:9.1f}   x{rate / baseline:5.1f} vs baseline")
            print(f"  2 actors / 1 actor: x{two / one:.2f}   (actor start + model load: {setup1:.1f} s / {setup2:.1f} s)")
            w1 = min(clustering_fanout(tubelets, data, concept_cfgs, 1) for _ in range(args.repeats))
            w2 = min(clustering_fanout(tubelets, data, concept_cfgs, 2) for _ in range(args.repeats))
            print(f"\nclustering fan-out ({len(concept_cfgs)} (layer, head) nodes): 1 worker {w1:.2f} s, "
                  f"2 workers {w2:.2f} s, x{w1 / w2:.2f}")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
