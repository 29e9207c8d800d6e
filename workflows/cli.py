"""`interpflow` command line: a thin layer over the notebook API (workflows/api.py).

Exit codes: 0 success, 1 a node failed, 2 bad input (spec, overrides, store), reported before Ray starts.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from interpflow.workflows import api
from interpflow.workflows.engine.keys import diff_parts
from interpflow.workflows.engine.record import RecordError, RunRecord, check_run_id
from interpflow.workflows.engine.store import StoreError
from interpflow.workflows.spec import SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run interpretability workflows as durable, resumable DAGs on Ray.")
out = Console()
err = Console(stderr=True)

STORE_OPT = typer.Option(None, "--store", help="artifact store (default .interpflow/store or INTERPFLOW_STORE)")


def _fail_input(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _store_overrides(store: str | None) -> list[str]:
    return [f"run.store={store}"] if store else []


# What a user can fix: a bad run id or node name, a missing or damaged record, a store path that leads out.
INPUT_ERRORS = (RecordError, StoreError, SpecError, KeyError, FileNotFoundError, ValueError)


def _fmt_shards(s: dict | None) -> str:
    return "" if not s else f"{s.get('ran', 0)} ran / {s.get('cached', 0)} cached / {s.get('total', 0)}"


def print_summary(handle: api.RunHandle) -> None:
    record = handle.record
    table = Table(title=f"run {record.run_id}: {record.status}")
    for col in ("node", "status", "shards", "rows", "seconds", "key"):
        table.add_column(col, overflow="fold")
    colours = {"ran": "green", "cached": "cyan", "failed": "red", "skipped": "yellow"}
    for name, s in record.nodes.items():
        status = s["status"]
        table.add_row(name, f"[{colours.get(status, 'white')}]{status}[/]", _fmt_shards(s.get("shards")),
                      str(s.get("rows") or ""), "" if s.get("seconds") is None else f"{s['seconds']:.2f}",
                      s["key"][:12])
    out.print(table)
    for name, s in record.nodes.items():
        if s["status"] == "failed":
            out.print(f"[red]{name} failed:[/] {s['error']}  (full traceback: interpflow status {record.run_id})")
        for q in s.get("quarantined") or []:
            out.print(f"[yellow]{q['path']} was damaged ({q['reason']}): set aside and recomputed[/]",
                      highlight=False, soft_wrap=True)
    out.print(f"outputs: {handle.store.uri}/<node>/<key>   (open: interpflow show {record.run_id} NODE)")
    if record.data.get("mlflow_run_id"):
        out.print(f"MLflow run: {record.data['mlflow_run_id']} at {record.data.get('tracking_uri')} "
                  f"(browse: mlflow ui --backend-store-uri {record.data.get('tracking_uri')})")
    if record.status != "succeeded":
        out.print(f"resume after fixing: interpflow resume {record.run_id}")


@app.command()
def run(spec: str = typer.Argument(..., help="spec file, or a bundled spec name (demo, extract, ...)"),
        overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. transform.power=3"),
        store: Optional[str] = STORE_OPT,
        run_id: Optional[str] = typer.Option(None, help="name this run (default: workflow-time-random)"),
        progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Run a workflow spec; committed nodes are reused from the store."""
    try:
        if run_id is not None:
            check_run_id(run_id)
        loaded = load_spec(spec, list(overrides or []) + _store_overrides(store))
    except (SpecError, RecordError) as exc:
        _fail_input(str(exc))
    handle = api.run(loaded, run_id=run_id, progress=progress)
    print_summary(handle)
    raise typer.Exit(0 if handle.ok else 1)


@app.command()
def resume(run_id: str, store: Optional[str] = STORE_OPT,
           progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Resume a run: only nodes and shards that are not committed run again."""
    try:
        handle = api.resume(run_id, store, progress=progress)
    except INPUT_ERRORS as exc:
        _fail_input(str(exc).strip("'\""))
    print_summary(handle)
    raise typer.Exit(0 if handle.ok else 1)


def _record(run_id: str | None, store: str | None) -> RunRecord:
    """The run's record, or exit 2 with one line (no such run, a bad run id, a damaged record)."""
    st = api.open_store(store)
    if run_id:
        try:
            return RunRecord.load(st, run_id)
        except INPUT_ERRORS as exc:
            _fail_input(str(exc))
    records = RunRecord.list(st)
    if not records:
        _fail_input(f"no runs in store {st.uri}")
    return records[-1]


@app.command()
def status(run_id: Optional[str] = typer.Argument(None, help="run id (default: the latest run)"),
           store: Optional[str] = STORE_OPT) -> None:
    """Per-node state of a run, with the traceback of every failed node."""
    record = _record(run_id, store)
    handle = api.RunHandle(api.open_store(store), record)
    print_summary(handle)
    for name, s in record.nodes.items():
        if s.get("traceback"):
            out.print(f"\n[bold red]--- {name} traceback ---[/]")
            out.print(s["traceback"], markup=False, highlight=False)
    raise typer.Exit(0 if record.status == "succeeded" else 1)


@app.command("ls")
def list_runs(store: Optional[str] = STORE_OPT) -> None:
    """Runs recorded in the store, oldest first."""
    st = api.open_store(store)
    table = Table(title=f"runs in {st.uri}")
    for col in ("run", "workflow", "status", "ran", "cached", "failed"):
        table.add_column(col)
    records, broken = RunRecord.scan(st)
    for record in records:
        states = [s["status"] for s in record.nodes.values()]
        table.add_row(record.run_id, record.data["workflow"], record.status,
                      *(str(states.count(k)) for k in ("ran", "cached", "failed")))
    for run_id, _ in broken:
        table.add_row(run_id, "?", "[red]unreadable[/]", "", "", "")
    out.print(table)
    for run_id, problem in broken:
        err.print(f"[yellow]{run_id}:[/] {problem}", highlight=False, soft_wrap=True)


def explain_node(record: RunRecord, node: str, store: str | None = None) -> list[str]:
    """Lines saying why `node` in `record` did or did not reuse the last computed output."""
    if node not in record.nodes:
        raise KeyError(f"no node '{node}' in run {record.run_id}; nodes: {', '.join(record.nodes)}")
    current = record.node(node)
    st = api.open_store(store)
    earlier = [r for r in RunRecord.list(st) if r.run_id != record.run_id
               and r.data.get("workflow") == record.data.get("workflow")
               and r.data.get("created", 0) <= record.data.get("created", 0)
               and r.nodes.get(node, {}).get("status") == "ran"]
    if not earlier:
        return [f"{node}: no earlier run computed this node; key {current['key'][:12]} is new"]
    previous = earlier[-1]
    old = previous.node(node)
    if old["key"] == current["key"]:
        return [f"{node}: same key {current['key'][:12]} as run {previous.run_id}, which computed it: "
                "nothing changed, so it is a cache hit"]
    lines = [f"{node}: key {current['key'][:12]} differs from {old['key'][:12]} computed by run "
             f"{previous.run_id}; changed key parts:"]
    for part in diff_parts(old["parts"], current["parts"]):
        a, b = _lookup(old["parts"], part), _lookup(current["parts"], part)
        what = {"source": "task function code", "version": "explicit version"}.get(part.split(".")[0], "")
        if part.startswith("upstream."):
            what = f"upstream node '{current['upstream'].get(part.split('.')[1], '?')}' changed"
        if part.startswith(("upstream.", "source")):
            a, b = str(a)[:12], str(b)[:12]
        lines.append(f"  {part}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}" + (f"  ({what})" if what else ""))
    return lines


def _lookup(parts: dict, dotted: str):
    value = parts
    for p in dotted.split("."):
        value = value.get(p) if isinstance(value, dict) else None
    return value


@app.command()
def explain(run_id: str, node: str, store: Optional[str] = STORE_OPT) -> None:
    """Which key part of NODE changed versus the last run that computed it."""
    try:
        lines = explain_node(_record(run_id, store), node, store)
    except INPUT_ERRORS as exc:
        _fail_input(str(exc).strip("'\""))
    for line in lines:
        out.print(line, markup=False, highlight=False)


@app.command()
def show(run_id: str, node: str, store: Optional[str] = STORE_OPT,
         rows: int = typer.Option(5, help="rows of each table to print")) -> None:
    """A node's committed outputs: metrics, files and the first rows of each table."""
    record = _record(run_id, store)
    handle = api.RunHandle(api.open_store(store), record)
    try:
        directory, manifest = handle._directory(node)
    except INPUT_ERRORS as exc:
        _fail_input(str(exc).strip("'\""))
    out.print(f"{node} at {directory}")
    out.print(f"metrics: {json.dumps(manifest.get('metrics', {}), indent=1)}", markup=False)
    sharded = "shards" in manifest
    for name, meta in manifest.get("outputs", {}).items():
        if sharded and meta["kind"] != "table":
            continue
        if meta["kind"] == "table":
            value = handle.outputs(node, name)
            count = value.count_rows() if sharded else value.num_rows
            where = f" in {len(manifest['shards'])} shards" if sharded else ""
            out.print(f"- {name}: table, {count} rows{where}", markup=False)
            head = value.head(rows) if sharded else value.slice(0, rows)
            out.print(head.to_pandas().to_string(), markup=False)
        else:
            out.print(f"- {name}: {meta['kind']} at {directory}/{meta['path']}", markup=False)


@app.command()
def verify(run_id: Optional[str] = typer.Argument(None, help="run id (default: every commit in the store)"),
           store: Optional[str] = STORE_OPT) -> None:
    """Check every sha256 of a run's outputs (or the whole store); quarantine what is damaged so that
    the next run recomputes exactly that. Exit 1 if anything was damaged."""
    if run_id is not None:
        _record(run_id, store)  # exit 2 for an unknown or damaged run
    report = api.verify(run_id, store)
    for q in report.quarantined:
        out.print(f"damaged: {q['path']} ({q['reason']}); quarantined in {q['moved_to']}", markup=False,
                  highlight=False, soft_wrap=True)
    verdict = "all intact" if report.ok else f"{len(report.quarantined)} damaged, quarantined"
    out.print(f"verified {report.commits} commits, {report.files} files in {report.seconds:.2f} s: {verdict}",
              markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def submit(spec: str, overrides: Optional[list[str]] = typer.Argument(None),
           address: str = typer.Option(..., help="Ray dashboard address, e.g. http://127.0.0.1:8265"),
           wait: bool = typer.Option(True, help="follow the job until it ends"),
           timeout: float = typer.Option(1800, help="seconds to wait when following")) -> None:
    """Submit a spec to a Ray cluster as a Ray job (resubmitting the same spec attaches to it)."""
    from interpflow.cluster.submit import submit_spec

    try:
        loaded = load_spec(spec, list(overrides or []), check_store=False)
    except SpecError as exc:
        _fail_input(str(exc))
    result = submit_spec(loaded, address, wait=wait, timeout_s=timeout, echo=out.print)
    out.print(f"job {result.submission_id}: {result.status}"
              + (" (already submitted; attached)" if result.attached else ""))
    raise typer.Exit(0 if result.status in ("SUCCEEDED", "RUNNING", "PENDING") else 1)


@app.command("serve")
def serve_model(model: str = typer.Argument(..., help="a causal LM: local Hugging Face folder or hub id"),
                port: int = typer.Option(8000, help="HTTP port"),
                host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"),
                api_key_env: Optional[str] = typer.Option(
                    None, "--api-key-env", help="name of the env var holding the key clients must send "
                                                "as 'Authorization: Bearer <key>' (default: no key)"),
                address: Optional[str] = typer.Option(None, help="Ray address (default RAY_ADDRESS or a private "
                                                                 "local cluster)"),
                dtype: str = typer.Option("float32", help="weights dtype: float32, float16 or bfloat16"),
                num_gpus: float = typer.Option(0, help="GPUs for the model replica")) -> None:
    """Serve MODEL as an OpenAI-compatible chat endpoint (POST /v1/chat/completions) until Ctrl-C."""
    from interpflow.tasks.models import ModelConfig, check_model_source
    from interpflow.workflows.engine.ray_cluster import ensure_ray
    from interpflow.workflows.engine.settings import RunSettings

    try:
        check_model_source(model)
        cfg = ModelConfig(dtype=dtype)
    except (OSError, ValueError) as exc:  # a missing or corrupt model, a bad dtype (ValidationError is a ValueError)
        _fail_input(str(exc))
    if api_key_env and not os.environ.get(api_key_env):
        _fail_input(f"environment variable {api_key_env} is not set: export {api_key_env}=<the key clients "
                    "will send>, or drop --api-key-env")
    ensure_ray(RunSettings(address=address))
    from interpflow.actors import serve as chat_serve

    def ready(url: str) -> None:
        out.print(f"serving {model} at [bold]{url}[/] (POST {url}/chat/completions, GET {url}/models)"
                  + (f"; clients send the key in {api_key_env}" if api_key_env else "") + ". Ctrl-C stops.")

    chat_serve.start(model, host=host, port=port, cfg=cfg, api_key_env=api_key_env, num_gpus=num_gpus,
                     blocking=True, on_ready=ready)


def main() -> None:
    try:
        app()
    except SpecError as exc:  # pragma: no cover - defensive: commands catch their own
        err.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
