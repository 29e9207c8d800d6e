"""Persuasion study: APE conversations per minute at 1 and 2 model actors, the cost of the steering
hook on generation, and the wall time of one steering sweep point.

Prints, on the embedded tiny LM (trained once, outside the measurements):
- conversations/min of the base model's `conversations` node at 1 and 2 actors (2 cores here), and
  the scaling ratio;
- generation tokens/s with no hook (coefficient 0 installs none) and with the steering hook at one
  layer, in one process on the same prompts, and the hook's overhead (target <= 10%);
- per sweep point (one steered coefficient): seconds of its `conversations` node and of its
  `evaluated` node, as the runner recorded them.

    python benchmarks/persuasion.py [--per-category 8] [--turns 2] [--replies 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def run(spec: dict, store: str):
    import interpflow
    from interpflow.workflows.engine import RunSettings

    handle = interpflow.run(spec, settings=RunSettings(store=store, lineage=False, progress=False), progress=False)
    assert handle.ok, {n: s["error"] for n, s in handle.nodes().items() if s["error"]}
    return handle


def study(per_category: int, turns: int, seed: int, coefficients: list[float], **top) -> dict:
    """Steering along the persuasive trait only, no SFT; a distinct `seed` per measurement keeps a run
    from reusing the previous one's committed conversations (the actor count is not part of a key)."""
    return {"workflow": "persuasion", "ape": {"statements_per_category": per_category, "turns": turns, "seed": seed},
            "steering": {"coefficients": coefficients, "traits": ["persuasive"], "random_seeds": []},
            "sft": {"conditions": []}, "num_shards": 4, **top}


def hook_overhead(model_dir: str, vector, layer: int, replies: int) -> tuple[float, float]:
    """Generation tokens/s without and with the steering hook (same prompts, greedy, one thread)."""
    import torch

    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.tasks.persuasion import steering, world
    from interpflow.tasks.study.chat import generate_reply

    torch.set_num_threads(1)
    loaded = load_model(model_dir, ModelConfig())
    rows = world.make_statements(world.WorldConfig()).to_list()
    prompts = [[{"role": "system", "content": world.NEUTRAL_PROMPT},
                {"role": "user", "content": f"i am not sure that {rows[i % len(rows)]['statement']} . i rate it 50 ."}]
               for i in range(replies)]
    site = steering.layer_site(layer)
    speeds = {}
    for trial in range(2):               # the first pass warms up; the second is measured
        for coef in (0.0, 1.0):          # 1.0 keeps replies in the unsteered regime: same lengths
            tokens, started = 0, time.perf_counter()
            with steering.steer(loaded, {site: vector}, coef):
                for messages in prompts:
                    tokens += generate_reply(loaded, messages, 24, 0.0, 0).completion_tokens
            speeds[coef] = tokens / (time.perf_counter() - started)
    return speeds[0.0], speeds[1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--replies", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        first = run(study(1, 1, 100, [4.0]), store)           # trains the LM and the vectors outside the measurements
        timed = []
        for actors in (1, 2):
            handle = run(study(args.per_category, args.turns, actors, [4.0], actors=actors), store)
            node = handle.nodes()["conversations.base"]
            timed.append((actors, handle.metrics("conversations.base")["conversations"], node["seconds"]))
        sweep = run(study(args.per_category, args.turns, 7, [2.0, 4.0, 8.0]), store)
        model_dir = first.outputs("tiny_lm")
        vector = first.outputs("persona_vector.persuasive", "vectors")["blocks.2.resid_post"].numpy()
        plain, hooked = hook_overhead(model_dir, vector, 2, args.replies)

    print(f"persuasion: APE conversations of the embedded tiny LM (4 x 128), {args.turns} turns, 24 new tokens per "
          f"reply, rule persuadees, 2 CPUs")
    base = None
    for actors, conversations, seconds in timed:
        per_min = 60 * conversations / seconds
        base = base or per_min
        print(f"  conversations node, {actors} actor(s): {per_min:7.1f} conversations/min  x{per_min / base:4.2f}  "
              f"({conversations} conversations in {seconds:.1f} s)")
    print(f"  generation, 1 thread, {args.replies} replies: no hook {plain:7.1f} tokens/s, steering hook "
          f"{hooked:7.1f} tokens/s: overhead {100 * (plain / hooked - 1):+.1f}% (target <= 10%)")
    nodes = sweep.nodes()
    for coef in (2, 4, 8):
        label = f"steer.persuasive.L2.c{coef}"
        talk, rate = nodes[f"conversations.{label}"]["seconds"], nodes[f"evaluated.{label}"]["seconds"]
        print(f"  sweep point coef {coef}: conversations {talk:5.1f} s + evaluation {rate:4.1f} s = {talk + rate:5.1f} s")


if __name__ == "__main__":
    main()
