"""Preemption soak (issue #31, point 6) on the three-host cluster of `tests/hosts.py` (network namespaces on a
bridge; needs root), with the S3 store and the tracking server of `lab_cluster`.

`extract` is submitted twice with the same spec to two stores: once undisturbed, once while a bounded loop
kills every process of a random worker host every --kill-every seconds (uniform in the range) and starts it
again 5 s later (a replacement node, as an autoscaler brings one). The disturbed run must finish with every
(id, position) once and every shard output file byte-identical (sha256) to the undisturbed run's; the report
prints both wall times and what the kills cost, in all and per kill. The model is a 6-layer, 512-wide tiny
LM and one row is kept an example (`tokens: last`), so that extraction takes the time, not moving data.

    python benchmarks/soak.py [--examples 60000] [--shards 120] [--kill-every 60 90] [--seed 0]

The defaults take about ten minutes a run on this project's 2-core machines.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hosts import can_make_hosts, lab_cluster  # noqa: E402
from support import cli, shard_digests  # noqa: E402


def submit(lab, tmp: Path, label: str, args) -> tuple[float, str, str]:
    """Submit extract to a store of its own and wait: (wall s, store URI, run id)."""
    store = f"s3://lab/soak-{label}"
    spec = tmp / f"{label}.yaml"
    spec.write_text(yaml.safe_dump({
        "workflow": "extract", "num_shards": args.shards, "actors": len(lab.workers), "actor_cpus": 1,
        "corpus": {"n_examples": args.examples},
        # a model wide and deep enough that extraction, not the services, takes the time; one row an example
        "lm": {"n_embd": 512, "n_layer": 6, "n_head": 8, "steps": 20},
        "extract": {"sites": ["blocks.5.resid_post"], "tokens": "last"},
        "run": {"store": store, "tracking_uri": lab.tracking, "experiment": "soak"}}))
    start = time.perf_counter()
    done = cli("submit", str(spec), "--address", lab.url, "--wait", cwd=tmp, timeout=7200)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the {label} run failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    return wall, store, done.stdout.split("submitted job ")[1].split()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=60000)
    parser.add_argument("--shards", type=int, default=120)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(60.0, 90.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--max-kills", type=int, default=20, help="the loop's bound")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not can_make_hosts():
        sys.exit("benchmarks/soak.py needs root (ip netns), as CI has")
    import interpflow
    from interpflow.workflows.engine.store import Store

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp, lab_cluster("ifs", workers=2) as lab:
        tmp = Path(tmp)
        calm_s, calm_store, _ = submit(lab, tmp, "undisturbed", args)
        print(f"undisturbed: {calm_s:.0f} s", flush=True)

        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(run=submit(lab, tmp, "disturbed", args)))
        kills: list[tuple[float, str]] = []
        start = time.perf_counter()
        runner.start()
        while runner.is_alive() and len(kills) < args.max_kills:
            runner.join(rng.uniform(*args.kill_every))
            if not runner.is_alive():
                break
            host = rng.choice(lab.workers)
            lab.hosts.kill(host)
            kills.append((time.perf_counter() - start, host))
            print(f"{kills[-1][0]:6.0f} s: killed every process of {host}", flush=True)
            time.sleep(5)
            lab.rejoin(host)
        runner.join()
        if "run" not in result:
            raise SystemExit("the disturbed run did not finish (see its error above)")
        disturbed_s, disturbed_store, run_id = result["run"]

        rows = interpflow.open_run(run_id, store=disturbed_store).table("activations")
        positions = rows.column("position").to_pylist() if "position" in rows.column_names else [0] * len(rows)
        keys = list(zip(rows.column("id").to_pylist(), positions))
        once = len(keys) == len(set(keys)) and set(rows.column("id").to_pylist()) == set(range(args.examples))
        calm = shard_digests(Store(calm_store), "activations")
        disturbed = shard_digests(Store(disturbed_store), "activations")
        identical = calm == disturbed and len(calm) > 0

    cost = disturbed_s - calm_s
    print(f"extract, {args.examples} examples in {args.shards} shards on 2 worker hosts of 1 CPU")
    print(f"undisturbed {calm_s:.0f} s; disturbed {disturbed_s:.0f} s with {len(kills)} host kills "
          f"({', '.join(f'{h} at {t:.0f} s' for t, h in kills)})")
    print(f"the kills cost {cost:.0f} s ({100 * cost / calm_s:.0f}% of the undisturbed run), "
          f"{cost / max(1, len(kills)):.0f} s a kill")
    print(f"every (id, position) once: {once}; {len(calm)} shard files byte-identical: {identical}")
    if not (once and identical):
        sys.exit(1)


if __name__ == "__main__":
    main()
