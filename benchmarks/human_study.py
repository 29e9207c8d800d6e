"""Simulated studies: participants per minute with the tiny LM as the persuader, on 1 and 2 model
actors and through the Ray Serve endpoint, and the share of time spent generating.

Prints, for the same study (rule participants, a local-model persuader, `--turns` turns):
- participants/min of the `conversations` node at 1 and 2 actors, and the scaling ratio (2 cores here);
- participants/min against `interpflow serve` of the same model (one replica) with 4 conversations
  in flight per shard;
- model-call seconds (summed over calls) per wall second of the node: with one actor, the share of
  the node's time spent generating (the rest is orchestration: scheduling, actor start and model
  load, commits); above 1 when calls overlap (several actors, or requests in flight to the endpoint).

    python benchmarks/human_study.py [--per-arm 40] [--turns 3] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import tempfile


def run(spec: dict, store: str) -> dict:
    import interpflow
    from interpflow.workflows.engine import RunSettings

    handle = interpflow.run(spec, settings=RunSettings(store=store, lineage=False, progress=False), progress=False)
    assert handle.ok, {n: s["error"] for n, s in handle.nodes().items() if s["error"]}
    node = handle.nodes()["conversations"]
    return {"seconds": node["seconds"], "metrics": handle.metrics("conversations"), "handle": handle}


def study(per_arm: int, turns: int, persuader: dict, seed: int = 0, **top) -> dict:
    """The bundled study with every persuader replaced; a distinct `seed` per measurement keeps a run from
    reusing the previous one's committed shards (the actor count is not part of a node's key)."""
    spec = {"workflow": "human_study", "study": {"n_per_arm": per_arm, "turns": turns, "seed": seed}, "num_shards": 8,
            "lm": {"steps": 100, "n_layer": 2}, "corpus": {"n_examples": 400}, **top}
    from interpflow.workflows.spec import load_spec

    arms = load_spec(spec, check_store=False).config.study.model_dump(mode="json")["arms"]
    for arm in arms:
        for role in ("persuader", "corrective"):
            if arm.get(role):
                arm[role] = {**arm[role], **persuader}
    spec["study"]["arms"] = arms
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-arm", type=int, default=40)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    local = {"backend": "local", "max_tokens": args.max_tokens}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        run(study(2, 1, local), store)              # trains and caches the tiny LM outside the measurement
        for actors in (1, 2):
            result = run(study(args.per_arm, args.turns, local, seed=actors, actors=actors, actor_cpus=1), store)
            rows.append((f"local model, {actors} actor(s)", result, actors))
        handle = result["handle"]
        model_dir = handle.store.local_copy(f"{handle.store.node_path('tiny_lm', handle.record.nodes['tiny_lm']['key'])}/model")

        import ray

        from interpflow.actors import serve as chat_serve

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            url = chat_serve.start(model_dir, port=8777, served_name="tiny")
            endpoint = {"backend": "endpoint", "url": url, "model": "tiny", "max_tokens": args.max_tokens}
            result = run(study(args.per_arm, args.turns, endpoint, seed=3, concurrency=4), store)
            rows.append(("Serve endpoint, 1 replica, 4 in flight/shard", result, 1))
        finally:
            chat_serve.stop()
            ray.shutdown()

    people = rows[0][1]["metrics"]["participants"]
    print(f"human study: {people} participants (rule participants, tiny-LM persuader), {args.turns} turns, "
          f"{args.max_tokens} new tokens per turn, 2 CPUs")
    base = None
    for label, result, _ in rows:
        per_min = 60 * result["metrics"]["participants"] / result["seconds"]
        base = base or per_min
        calls_s = result["metrics"]["generation_s"]
        print(f"  {label:45s} {per_min:7.1f} participants/min  x{per_min / base:4.2f}  node {result['seconds']:5.1f} s, "
              f"model calls {calls_s:5.1f} s ({calls_s / result['seconds']:.2f} per wall s, "
              f"{result['metrics']['model_calls']} calls)")


if __name__ == "__main__":
    main()
