"""Ray Workflows' per-node overhead on the trivial DAG of engine_overhead.py, for comparison.

Ray Workflows was removed from Ray after 2.47, so this runs in a separate virtual environment that
holds only that Ray (it does not import interpflow):

    python -m venv /tmp/rw && /tmp/rw/bin/pip install ray==2.47.1
    /tmp/rw/bin/python benchmarks/ray_workflows_overhead.py [--nodes 200] [--repeats 2]

As in engine_overhead.py: a local Ray cluster of 2 CPUs, bare Ray tasks as the baseline in the same
process, N independent trivial nodes (gathered by one final step, which Ray Workflows needs to run them
as one DAG), durable storage on local disk, then the same workflow id run again (its stored result).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
from ray import workflow


def trivial(i: int) -> dict:
    return {"i": i, "square": i * i}


def gather(*results: dict) -> int:
    return len(results)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.nodes
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", storage=tmp)
        bare = ray.remote(num_cpus=1)(trivial)
        step = ray.remote(num_cpus=1)(trivial)
        final = ray.remote(num_cpus=1)(gather)
        ray.get([bare.remote(i) for i in range(20)])  # warm the worker pool
        bare_s = min(timed(lambda: ray.get([bare.remote(i) for i in range(n)]))[0] for _ in range(3))
        workflow.run(final.bind(*[step.bind(i) for i in range(4)]), workflow_id="warm")
        best = None
        for r in range(args.repeats):
            dag = final.bind(*[step.bind(i) for i in range(n)])
            first = timed(lambda: workflow.run(dag, workflow_id=f"bench-{r}"))
            again = timed(lambda: workflow.run(dag, workflow_id=f"bench-{r}"))
            if best is None or first[0] < best[0][0]:
                best = (first, again)
        ray.shutdown()
    (first, first_cpu), (again, _) = best
    print(f"Ray Workflows (ray {ray.__version__}), local Ray, 2 CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"best of {args.repeats}")
    print(f"bare Ray tasks: {n} in {bare_s:.3f} s ({1000 * bare_s / n:.2f} ms/task)")
    print(f"{n} nodes: first {first:.3f} s, overhead {1000 * (first - bare_s) / n:.2f} ms/node, driver CPU "
          f"{1000 * first_cpu / n:.2f} ms/node; same workflow id again {again:.3f} s ({1000 * again / n:.2f} ms/node)")


if __name__ == "__main__":
    main()
