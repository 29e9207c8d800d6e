"""The news benchmark's video side (issue #13), measured: decoding, embedding on model actors, and the memory
of a long video.

Prints, on generated stand-in copies (squares over a tint, H.264 MP4 written by the stand-in itself):
- decoded frames/s of `layout.decode_frames` (resizing to the model's 32 px) when every frame of a video is
  kept vs only the frames its clips sample (`layout.sample_clips`, segments policy, 8 clips of 8 frames at
  most), on the default stand-in (16 frames of 32 x 32) and on the memory part's --mem-size copies. Decoding
  streams up to the last sampled frame, so "frames through the decoder" are shown beside the frames kept (a
  16-frame video's 2 clips of 8 frames are all its frames: there both modes do the same work);
- embedded clips/s of `embed.embed_videos` (the function the workflow's sharded node runs) on 1 and on 2
  Ray model actors (the repo's `ModelActor`, loading the model with `load_model` once, 1 CPU and 1 torch
  thread each, videos split evenly), against the same function in a plain in-process loop on 1 thread
  (the baseline), the three alternating in each round: the ratios 2 actors / 1 actor and actors / plain
  loop, and the number of cores here (actor start and model load are timed apart);
- peak RSS growth while embedding one video of the default length (16 frames) and one 10x longer (160
  frames), both --mem-size x --mem-size (default 256) resized to the model's 32 px, each case in a fresh
  process (the peak, VmHWM, is reset after model load and warm-up: import transients would hide the growth
  from a lifetime ru_maxrss): the chunked path (`embed_videos`: only the sampled frames are kept, resized
  as they are decoded) vs a naive path that first decodes every frame at the file's size into one array,
  then cuts and resizes the same clips and embeds them. Chunked decoding should stay flat; the naive path
  grows with the length.

    python benchmarks/news_benchmark.py [--videos-per-category 40] [--mem-size 256] [--repeats 3]

Timings are the fastest of --repeats passes (the machine may be shared).

The video model is a tiny VideoMAE (2 blocks, width 64, patch 16) trained for 20 steps: speed and memory do
not depend on what its weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

FRAMES = 16          # StandInConfig's default video length
LONG = 10            # the long video is this many times longer


def write_standin(root: str, per_category: int, frames: int, size: int) -> dict:
    """A stand-in copy written, then loaded through the layout loader: its video paths and frame counts."""
    from interpflow.tasks.news import layout, standin

    standin.StandIn(standin.StandInConfig(videos_per_category=per_category, frames=frames, size=size)
                    ).save_pretrained(root)
    items = layout.load_news(layout.NewsDatasetConfig(), root=root)["items"]
    return {"paths": items.column("video_path").to_pylist(), "n_frames": items.column("n_frames").to_pylist()}


def decode_rates(videos: dict, sampling, size: int, repeats: int) -> dict:
    """Frames kept per second and frames through the decoder per second, all frames vs the sampled ones
    (the fastest of `repeats` passes over the videos; the two modes alternate, so load spikes hit both)."""
    from interpflow.tasks.news.layout import decode_frames, sample_clips

    wanted = {"all": [list(range(n)) for n in videos["n_frames"]],
              "sampled": [[i for clip in sample_clips(n, sampling) for i in clip] for n in videos["n_frames"]]}
    decode_frames(videos["paths"][0], [0], size=size)          # warm-up: codec libraries, first open
    seconds = {mode: float("inf") for mode in wanted}
    for _ in range(repeats):
        for mode, per_video in wanted.items():
            started = time.perf_counter()
            for path, indices in zip(videos["paths"], per_video):
                decode_frames(path, indices, size=size)
            seconds[mode] = min(seconds[mode], time.perf_counter() - started)
    rates = {mode: {"kept": sum(map(len, per_video)) / seconds[mode],
                    "through": sum(max(i) + 1 for i in per_video) / seconds[mode],
                    "videos": len(per_video) / seconds[mode]} for mode, per_video in wanted.items()}
    return {**rates, "same": wanted["all"] == wanted["sampled"]}


def n_clips(videos: dict, sampling) -> int:
    from interpflow.tasks.news.layout import sample_clips

    return sum(len(sample_clips(n, sampling)) for n in videos["n_frames"])


def embed_actor_class():
    """The repo's `ModelActor` (its model loaded once by `actors.model.load`) with a method that embeds videos
    (defined here, not in the package: this benchmark adds no code to it)."""
    from interpflow.actors.model import ModelActor

    class EmbedActor(ModelActor):
        """A `ModelActor` that embeds videos with `embed_videos`, on 1 torch thread."""

        def __init__(self, *args, **kwargs):
            import torch

            torch.set_num_threads(1)
            super().__init__(*args, **kwargs)

        def embed(self, paths, n_frames, cfg):
            from interpflow.tasks.news.embed import embed_videos

            return {k: v.numpy() for k, v in embed_videos(self.loaded, paths, n_frames, cfg).items()}

    return EmbedActor


def embedding_times(model_path: str, videos: dict, cfg, repeats: int) -> dict:
    """Seconds to embed all videos: in a plain in-process loop (1 thread) and split evenly over 1 and 2 model
    actors (dispatch to all results), the fastest of `repeats` rounds in which the three alternate (so load
    spikes from other processes hit all three); and the seconds to start 2 actors, load the model and warm up."""
    import ray
    import torch

    from interpflow.actors.model import load
    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.tasks.news.embed import embed_videos

    torch.set_num_threads(1)
    model = load_model(model_path, ModelConfig())
    first = (videos["paths"][:1], videos["n_frames"][:1])
    embed_videos(model, *first, cfg)                                        # warm-up

    started = time.perf_counter()
    remote = ray.remote(num_cpus=1, max_restarts=0)(embed_actor_class())
    pool = [remote.remote(None, load, ModelConfig(), model=model_path) for _ in range(2)]
    ray.get([a.embed.remote(*first, cfg) for a in pool])                   # model loaded and warmed up
    times = {"start": time.perf_counter() - started, "plain": float("inf"), 1: float("inf"), 2: float("inf")}
    n = len(videos["paths"])
    for _ in range(repeats):
        begun = time.perf_counter()
        embed_videos(model, videos["paths"], videos["n_frames"], cfg)
        times["plain"] = min(times["plain"], time.perf_counter() - begun)
        for actors in (1, 2):
            bounds = [round(i * n / actors) for i in range(actors + 1)]
            begun = time.perf_counter()
            results = ray.get([a.embed.remote(videos["paths"][lo:hi], videos["n_frames"][lo:hi], cfg)
                               for a, lo, hi in zip(pool, bounds, bounds[1:])])
            times[actors] = min(times[actors], time.perf_counter() - begun)
            assert sum(len(next(iter(r.values()))) for r in results) == n
    for a in pool:
        ray.kill(a)
    return times


MEMORY = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import torch
    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.tasks.news import embed, layout
    from interpflow.tasks.video.extract import forward_clips
    from interpflow.tasks.video.layout import pool_tokens, token_grid

    torch.set_num_threads(1)
    model_path, video, mode = sys.argv[1], sys.argv[2], sys.argv[4]
    n_frames, sites = int(sys.argv[3]), json.loads(sys.argv[5])
    model = load_model(model_path, ModelConfig())
    cfg = embed.VideoEmbedConfig(sites=sites)
    size = int(model.model.config.image_size)
    clips = layout.sample_clips(n_frames, cfg.sampling)
    resolved = model.sites.resolve_all(sites)
    grid = token_grid(model.model.config, frames=cfg.sampling.clip_frames, size=size)
    # warm-up before the baseline: a forward pass of as many clips (zeros) and a one-frame decode of the file
    for _ in forward_clips(model, np.zeros((len(clips), cfg.sampling.clip_frames, size, size, 3), np.uint8), resolved,
                           cfg.batch_size):
        pass
    layout.decode_frames(video, [0], size=size)

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    try:    # reset the peak (VmHWM) to the current RSS: import and model-load transients would mask the growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset, before = True, status_mb("VmRSS")
    except OSError:   # no resettable peak here: the process's lifetime peak (growth can be masked)
        reset, before = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "chunked":
        vectors = embed.embed_videos(model, [video], [n_frames], cfg)
    else:   # naive: every frame at the file's size in one array, then the same clips cut, resized and embedded
        frames = layout.decode_frames(video, list(range(n_frames)))
        def resized(frame):   # one frame at a time: only the array of all frames scales with the length
            x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")[0]
            return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

        small = np.stack([resized(frames[i]) for clip in clips for i in clip])
        small = small.reshape(len(clips), cfg.sampling.clip_frames, size, size, 3)
        sums = {s.name: [] for s in resolved}
        for captured in forward_clips(model, small, resolved, cfg.batch_size):
            for s in resolved:
                sums[s.name].append(pool_tokens(captured[s.name].float(), grid)[0])
        vectors = {k: torch.cat(v).mean(0, keepdim=True) for k, v in sums.items()}
    after = status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert all(v.shape[0] == 1 for v in vectors.values())
    print(json.dumps({"before_mb": before, "peak_mb": after, "growth_mb": after - before, "clips": len(clips),
                      "reset": reset}))
""")


def memory_case(model_path: str, video: str, n_frames: int, mode: str, sites: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY, model_path, video, str(n_frames), mode, json.dumps(sites)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory case {mode} {n_frames} frames failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos-per-category", type=int, default=40, help="stand-in videos per category (x7)")
    parser.add_argument("--mem-size", type=int, default=256, help="frame side of the memory part's two videos")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the fastest is shown")
    args = parser.parse_args()
    total_started = time.perf_counter()
    load_at_start = os.getloadavg()[0]

    import ray

    from interpflow.tasks.news.embed import VideoEmbedConfig
    from interpflow.tasks.video.clips import ClipConfig
    from interpflow.tasks.video.extract import residual_sites
    from interpflow.tasks.video.model import VideoModelConfig, train

    model_cfg = VideoModelConfig(layers=2, steps=20, train_clips=200, eval_clips=50, threads=2)
    sites = residual_sites(model_cfg.layers)
    sites = [sites[0], sites[-1]]                    # the workflow's default feature layers [0, -1]
    cfg = VideoEmbedConfig(sites=sites, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = f"{tmp}/model"
        train(model_cfg, ClipConfig(n_clips=100, frames=cfg.sampling.clip_frames, size=32))["model"].save_pretrained(
            model_path)
        size = 32
        default = write_standin(f"{tmp}/standin", args.videos_per_category, FRAMES, size)
        big = {f: write_standin(f"{tmp}/big-{f}", 2, f, args.mem_size) for f in (FRAMES, LONG * FRAMES)}

        decoding = {"default": decode_rates(default, cfg.sampling, size, args.repeats),
                    f"{FRAMES}f": decode_rates(big[FRAMES], cfg.sampling, size, args.repeats),
                    f"{LONG * FRAMES}f": decode_rates(big[LONG * FRAMES], cfg.sampling, size, args.repeats)}

        clips = n_clips(default, cfg.sampling)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            timed = embedding_times(model_path, default, cfg, args.repeats)
        finally:
            ray.shutdown()

        memory = {(mode, f): memory_case(model_path, big[f]["paths"][0], big[f]["n_frames"][0], mode, sites)
                  for mode in ("chunked", "naive") for f in (FRAMES, LONG * FRAMES)}

    cores = os.cpu_count()
    n_videos = len(default["paths"])
    print(f"news benchmark, video side: tiny VideoMAE (2 blocks, width 64, patch 16, clips of 8 x 32 x 32), sites "
          f"{', '.join(sites)}; segments sampling (<= {cfg.sampling.max_segments} clips of {cfg.sampling.clip_frames} "
          f"frames); batch {args.batch_size}; fastest of {args.repeats} passes; this machine has {cores} cores "
          f"(1-min load average {load_at_start:.1f} at the start)")
    print("decoding, layout.decode_frames resized to 32 px (one streaming pass per video, up to its last wanted "
          "frame):")
    print(f"  {'copy':>31} | {'all frames':>10} | {'sampled: kept':>13} {'through decoder':>15} | {'videos/s all':>12} "
          f"{'sampled':>8}")
    shapes = {"default": f"{n_videos} videos x {FRAMES} frames, {size} px",
              f"{FRAMES}f": f"{len(big[FRAMES]['paths'])} videos x {FRAMES} frames, {args.mem_size} px",
              f"{LONG * FRAMES}f": f"{len(big[LONG * FRAMES]['paths'])} videos x {LONG * FRAMES} frames, "
                                   f"{args.mem_size} px"}
    for name, rates in decoding.items():
        a, b = rates["all"], rates["sampled"]
        print(f"  {shapes[name]:>31} | {a['kept']:10.0f} | {b['kept']:13.0f} {b['through']:15.0f} | "
              f"{a['videos']:12.1f} {b['videos']:8.1f}  (frames/s; videos/s sampled/all "
              f"x{b['videos'] / a['videos']:.2f}{'; the clips sample every frame' if rates['same'] else ''})")
    print(f"embedding {n_videos} videos = {clips} clips with embed_videos (decoding included; 1 torch thread per "
          f"process, 1 CPU per actor):")
    base = clips / timed["plain"]
    print(f"  {'plain in-process loop:':22} {base:7.0f} clips/s ({timed['plain']:.2f} s)")
    one = clips / timed[1]
    for actors in (1, 2):
        rate = clips / timed[actors]
        label = f"{actors} model actor{'s' if actors > 1 else ''}:"
        print(f"  {label:22} {rate:7.0f} clips/s ({timed[actors]:.2f} s) | x{rate / one:.2f} vs 1 actor, "
              f"x{rate / base:.2f} vs plain loop")
    print(f"  starting 2 actors, loading the model and warming up (once, not in the rates above): "
          f"{timed['start']:.1f} s")
    print(f"  ({cores} cores here: 2 actors can be at most x{min(2, cores or 1)} faster than 1)")
    print(f"peak RSS growth while embedding one {args.mem_size} x {args.mem_size} video (resized to 32 px), a fresh "
          f"process per case, over its RSS after model load and warm-up:")
    for mode, label in (("chunked", "chunked (embed_videos)"), ("naive", "naive (all frames decoded first)")):
        short, long = memory[(mode, FRAMES)], memory[(mode, LONG * FRAMES)]
        growth = (f"x{long['growth_mb'] / short['growth_mb']:.1f}" if short["growth_mb"] >= 0.5
                  else f"{long['growth_mb'] - short['growth_mb']:+.1f} MB (default < 0.5 MB: no ratio)")
        print(f"  {label:>32}: {FRAMES} frames ({short['clips']} clips) +{short['growth_mb']:5.1f} MB, "
              f"{LONG * FRAMES} frames ({long['clips']} clips) +{long['growth_mb']:5.1f} MB | long/default growth "
              f"{growth}, peak RSS x{long['peak_mb'] / short['peak_mb']:.2f} ({short['peak_mb']:.0f} -> "
              f"{long['peak_mb']:.0f} MB)")
    if not all(m["reset"] for m in memory.values()):
        print("  (peak RSS could not be reset here (/proc/self/clear_refs): growth is over the lifetime peak and an "
              "earlier transient can hide it)")
    print(f"total wall time {time.perf_counter() - total_started:.0f} s")


if __name__ == "__main__":
    main()
