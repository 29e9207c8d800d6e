"""The entrypoint of a job that `interpflow submit` starts on a cluster:

    python -m interpflow.cluster.job spec.yaml --run-id RUN [--origin EARLIER_RUN]

It runs the spec under the run id the client chose (the job's submission id), so the client can read the
run with `interpflow status RUN`. `--origin` names the run of the spec's previous, failed or stopped
attempt: the new run resumes it (a new run whose record names its origin; committed nodes and shards are
reused from the store), as `interpflow resume` would. If that attempt never wrote a record (it failed
before its run started), the spec simply runs, reusing whatever the store holds.

The job's code is the client's checkout, shipped without its `.git`: the client passes its git commit and
dirty flag in INTERPFLOW_CODE_COMMIT / INTERPFLOW_CODE_DIRTY, and the run records them (the engine's
`code_version` reads them) (record `code`,
MLflow `code_commit` and `mlflow.source.git.commit`) instead of "unknown".
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interpflow.cluster.job")
    parser.add_argument("spec")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--origin", default=None)
    args = parser.parse_args(argv)

    from interpflow.workflows import api
    from interpflow.workflows.cli import print_summary
    from interpflow.workflows.engine.record import RunRecord
    from interpflow.workflows.engine.store import Store
    from interpflow.workflows.spec import load_spec

    spec = load_spec(args.spec)
    origin = args.origin
    if origin and not RunRecord.exists(Store(spec.settings.resolved_store()), origin):
        print(f"[interpflow] attempt {origin} left no run record; running the spec afresh (committed nodes "
              "are reused from the store)", flush=True)
        origin = None
    handle = api.run(spec, run_id=args.run_id, progress=False, origin=origin)
    print_summary(handle)
    return 0 if handle.ok else 1


if __name__ == "__main__":
    sys.exit(main())
