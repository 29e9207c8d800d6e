"""`interpflow` command line: a thin layer over the notebook API (workflows/api.py).

Exit codes: 0 success, 1 a node failed, 2 bad input (spec, overrides, store), reported before Ray starts.

The commands that only read (`--version`, `-h`, `ls`, `status`, `explain`, `show`, `verify`) answer at
once: this module imports typer and rich only, and each command imports what it uses, so none of them
loads torch, transformers, mlflow, ray, datasets or pandas (tests/test_cli_fast.py holds this).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from interpflow.workflows import api
    from interpflow.workflows.engine.record import RunRecord
    from interpflow.workflows.engine.store import Store

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run interpretability workflows as durable, resumable DAGs on Ray.")
out = Console()
err = Console(stderr=True)
# Output that is not a terminal (a pipe, a file, a test's capture) is never cut or wrapped: rich would
# otherwise lay it out for 80 columns and fold run ids and paths. COLUMNS, when set, still rules.
PIPED_WIDTH = 100_000


def _complete_run_id(incomplete: str) -> list[str]:
    """Shell completion of run ids: the runs of the default local store (a directory listing, no imports)."""
    root = os.environ.get("INTERPFLOW_STORE", ".interpflow/store")
    try:
        names = sorted(os.listdir(os.path.join(os.path.expanduser(root), "runs")))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


def _complete_spec(incomplete: str) -> list[str]:
    from pathlib import Path

    bundled = Path(__file__).resolve().parent / "specs"
    names = sorted(p.stem for p in bundled.glob("*.yaml"))
    return [n for n in names if n.startswith(incomplete)]


STORE_OPT = typer.Option(None, "--store", help="artifact store (default .interpflow/store or INTERPFLOW_STORE)")
RUN_ARG = typer.Argument(..., help="run id (interpflow ls lists them)", autocompletion=_complete_run_id)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"interpflow {version('interpflow')}", highlight=False)
        except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
            out.print("interpflow (not installed: no version metadata)", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the installed version and exit")) -> None:
    """Run interpretability workflows as durable, resumable DAGs on Ray."""
    for console in (out, err):
        if not console.is_terminal and not os.environ.get("COLUMNS"):
            console.width = PIPED_WIDTH


def _fail_input(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _store_overrides(store: str | None) -> list[str]:
    return [f"run.store={store}"] if store else []


def _input_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix: a bad run id or node name, a missing or damaged record, a store path that leads
    out, a bad spec."""
    from interpflow.workflows.engine.record import RecordError
    from interpflow.workflows.engine.store import StoreError
    from interpflow.workflows.spec import SpecError

    return RecordError, StoreError, SpecError, KeyError, FileNotFoundError, ValueError


def _open_store(store: str | None) -> "Store":
    """`api.open_store` without importing the rest of the API (spec parsing, lineage) for `ls`/`explain`."""
    from interpflow.workflows.engine.settings import RunSettings
    from interpflow.workflows.engine.store import Store

    return Store(RunSettings(**({"store": store} if store else {})).resolved_store())


def _fmt_shards(s: dict | None) -> str:
    return "" if not s else f"{s.get('ran', 0)} ran / {s.get('cached', 0)} cached / {s.get('total', 0)}"


def print_summary(handle: "api.RunHandle") -> None:
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
            out.print(f"[red]{name} failed:[/] {escape(str(s['error']))}  "
                      f"(full traceback: interpflow status {record.run_id})")
        for q in s.get("quarantined") or []:
            out.print(f"[yellow]{escape(q['path'])} was damaged ({escape(str(q['reason']))}): set aside and "
                      "recomputed[/]",
                      highlight=False, soft_wrap=True)
    out.print(f"outputs: {handle.store.uri}/<node>/<key>   (open: interpflow show {record.run_id} NODE)",
              highlight=False)
    if record.data.get("mlflow_run_id"):
        out.print(f"MLflow run: {record.data['mlflow_run_id']} at {record.data.get('tracking_uri')} "
                  f"(browse: mlflow ui --backend-store-uri {record.data.get('tracking_uri')})", highlight=False)
    if record.origin:
        out.print(f"run {record.run_id} resumes run {record.origin} (interpflow status {record.origin} shows "
                  "that run as it ended)", highlight=False)
    if record.status != "succeeded":
        out.print(f"resume after fixing: interpflow resume {record.run_id}", highlight=False)


@app.command()
def run(spec: str = typer.Argument(..., help="spec file, or a bundled spec name (demo, extract, ...)",
                                   autocompletion=_complete_spec),
        overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. transform.power=3"),
        store: Optional[str] = STORE_OPT,
        run_id: Optional[str] = typer.Option(
            None, help="name this run (default: workflow-time-random). An existing run of the same spec "
                       "continues as a new attempt of it; a run of another spec is refused"),
        progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Run a workflow spec; committed nodes are reused from the store."""
    from interpflow.workflows import api
    from interpflow.workflows.engine.record import RecordError, check_run_id
    from interpflow.workflows.spec import SpecError, load_spec

    try:
        if run_id is not None:
            check_run_id(run_id)
        loaded = load_spec(spec, list(overrides or []) + _store_overrides(store))
    except (SpecError, RecordError) as exc:
        _fail_input(str(exc))
    try:
        handle = api.run(loaded, run_id=run_id, progress=progress)
    except RecordError as exc:  # the run id names a run of another spec, or a running one
        _fail_input(str(exc))
    print_summary(handle)
    raise typer.Exit(0 if handle.ok else 1)


@app.command()
def resume(run_id: str = RUN_ARG, store: Optional[str] = STORE_OPT,
           new_id: Optional[str] = typer.Option(None, "--as", help="id of the new run (default: a fresh one)"),
           progress: bool = typer.Option(True, help="show progress bars")) -> None:
    """Resume a run as a new run naming it as origin; only what is not committed runs again.

    The original run's record stays as that run left it."""
    from interpflow.workflows import api

    try:
        handle = api.resume(run_id, store, progress=progress, new_id=new_id)
    except _input_errors() as exc:
        _fail_input(str(exc).strip("'\""))
    print_summary(handle)
    out.print(f"new run: {handle.run_id}", highlight=False)
    raise typer.Exit(0 if handle.ok else 1)


def _record(run_id: str | None, store: str | None) -> "RunRecord":
    """The run's record, or exit 2 with one line (no such run, a bad run id, a damaged record)."""
    from interpflow.workflows.engine.record import RunRecord

    try:
        st = _open_store(store)
        if run_id:
            return RunRecord.load(st, run_id)
    except _input_errors() as exc:
        _fail_input(str(exc))
    records = RunRecord.list(st)
    if not records:
        _fail_input(f"no runs in store {st.uri}")
    return records[-1]


@app.command()
def status(run_id: Optional[str] = typer.Argument(None, help="run id (default: the latest run)",
                                                  autocompletion=_complete_run_id),
           store: Optional[str] = STORE_OPT) -> None:
    """Per-node state of a run, with the traceback of every failed node."""
    from interpflow.workflows.api import RunHandle

    record = _record(run_id, store)
    handle = RunHandle(_open_store(store), record)
    print_summary(handle)
    for name, s in record.nodes.items():
        if s.get("traceback"):
            out.print(f"\n[bold red]--- {name} traceback ---[/]")
            out.print(s["traceback"], markup=False, highlight=False)
    raise typer.Exit(0 if record.status == "succeeded" else 1)


@app.command("ls")
def list_runs(store: Optional[str] = STORE_OPT) -> None:
    """Runs recorded in the store, oldest first; a resumed run names its origin."""
    from interpflow.workflows.engine.record import RunRecord

    try:
        st = _open_store(store)
    except _input_errors() as exc:
        _fail_input(str(exc))
    table = Table(title=f"runs in {st.uri}")
    table.add_column("run", no_wrap=True, overflow="fold")
    for col in ("workflow", "status", "ran", "cached", "failed"):
        table.add_column(col)
    table.add_column("origin", no_wrap=True, overflow="fold")
    records, broken = RunRecord.scan(st)
    for record in records:
        states = [s["status"] for s in record.nodes.values()]
        table.add_row(record.run_id, record.data["workflow"], record.status,
                      *(str(states.count(k)) for k in ("ran", "cached", "failed")), record.origin or "")
    for run_id, _ in broken:
        table.add_row(run_id, "?", "[red]unreadable[/]", "", "", "", "")
    out.print(table)
    for run_id, problem in broken:
        err.print(f"[yellow]{run_id}:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)


def explain_node(record: "RunRecord", node: str, store: str | None = None) -> list[str]:
    """Lines saying why `node` in `record` did or did not reuse the last computed output, naming the run
    that computed what it reused."""
    from interpflow.workflows.engine.keys import diff_parts
    from interpflow.workflows.engine.record import RunRecord

    if node not in record.nodes:
        raise KeyError(f"no node '{node}' in run {record.run_id}; nodes: {', '.join(record.nodes)}")
    current = record.node(node)
    key = current["key"]
    # Runs before this one that computed the node (a resume is a run of its own, so the run a resume took
    # a node from keeps saying it computed it), newest last.
    earlier = [r for r in RunRecord.list(_open_store(store)) if r.run_id != record.run_id
               and r.data.get("created", 0) <= record.data.get("created", 0)
               and r.nodes.get(node, {}).get("status") == "ran"]
    same_key = [r for r in earlier if r.nodes[node].get("key") == key]
    producer = (current.get("produced_by") or {}).get("run_id")
    if current["status"] == "cached":
        by = producer or (same_key[-1].run_id if same_key else None)
        if by == record.run_id:
            by = f"{by} itself, in an earlier attempt"
        where = f"computed by run {by}" if by else "committed in the store by a run no longer recorded"
        return [f"{node}: cache hit: key {key[:12]} was {where}; nothing that goes into the key changed"]
    # not computed here (failed, skipped, killed, pending): say so, then what the key is against earlier runs
    state = "" if current["status"] == "ran" else f" ({current['status']} in this run)"
    if same_key:
        previous = same_key[-1]
        if current["status"] != "ran":
            return [f"{node}{state}: run {previous.run_id} computed this key {key[:12]} before"]
        # computed again under a key that was computed before: its output was missing or damaged
        reason = ("its output was found damaged, set aside and recomputed" if current.get("recomputed_after_corruption")
                  else "its committed output was missing (removed, or set aside as damaged)")
        return [f"{node}: same key {key[:12]} as run {previous.run_id}, which computed it before; {reason}"]
    prior = [r for r in earlier if r.data.get("workflow") == record.data.get("workflow")]
    shards = current.get("shards") or {}
    reused = (f"; {shards['cached']} of its {shards['total']} shards were committed before (an interrupted run) "
              "and reused") if shards.get("cached") else ""
    if not prior:
        return [f"{node}{state}: no earlier run computed this node; key {key[:12]} is new{reused}"]
    previous = prior[-1]
    old = previous.node(node)
    lines = [f"{node}{state}: key {key[:12]} differs from {old['key'][:12]} computed by run "
             f"{previous.run_id}; changed key parts:"]
    for part in diff_parts(old["parts"], current["parts"]):
        a, b = _lookup(old["parts"], part), _lookup(current["parts"], part)
        what = {"source": "task function code", "version": "explicit version"}.get(part.split(".")[0], "")
        if part.startswith("upstream."):
            what = f"upstream node '{current['upstream'].get(part.split('.')[1], '?')}' changed"
        if part.startswith(("upstream.", "source")):
            a, b = str(a)[:12], str(b)[:12]
        lines.append(f"  {part}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}" + (f"  ({what})" if what else ""))
    if reused:
        lines.append(f"  ({reused[2:]})")
    return lines


def _lookup(parts: dict, dotted: str):
    value = parts
    for p in dotted.split("."):
        value = value.get(p) if isinstance(value, dict) else None
    return value


@app.command()
def explain(run_id: str = RUN_ARG, node: str = typer.Argument(..., help="node name"),
            store: Optional[str] = STORE_OPT) -> None:
    """Why NODE ran or was a cache hit: the run that computed it, or the key parts that changed.

    A cache hit names the run that computed the output; a node that ran is compared with the last earlier
    run that computed it."""
    try:
        lines = explain_node(_record(run_id, store), node, store)
    except _input_errors() as exc:
        _fail_input(str(exc).strip("'\""))
    for line in lines:
        out.print(line, markup=False, highlight=False)


def _cell(value: object, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, (list, dict, bytes)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _print_head(table, rows: int) -> None:
    """The first `rows` rows of an Arrow table as a text table (no pandas)."""
    head = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in table.column_names:
        head.add_column(name, overflow="fold")
    columns = [table.column(name).slice(0, rows).to_pylist() for name in table.column_names]
    for row in zip(*columns):
        head.add_row(*(_cell(v) for v in row))
    out.print(head, markup=False, highlight=False)


def _read_table(st: "Store", path: str):
    """A Parquet file as an Arrow table. `pq.ParquetFile`, not `pq.read_table`: the latter goes through
    pyarrow.dataset, which imports pandas."""
    import pyarrow.parquet as pq

    with st.fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read()


def _sharded_head(st: "Store", directory: str, manifest: dict, name: str, rows: int):
    """The first `rows` rows of a sharded node's table output, reading (and checking) only the shards they
    are in, and the total row count; `None, 0` if no shard holds that output."""
    import pyarrow as pa

    from interpflow.workflows.engine.store import CorruptArtifact

    tables_only = [n for n, o in manifest["outputs"].items() if o["kind"] == "table"] == [name]
    shard_manifests, parts, taken = [], [], 0
    for entry in manifest["shards"]:
        shard_dir = f"{directory}/{entry['dir']}"
        if tables_only and taken >= rows:
            break  # the node's row count is the sum over its shards: no need to read the rest
        shard = st.read_manifest(shard_dir)
        if shard is None:
            raise CorruptArtifact(manifest.get("node", "?"), manifest.get("key", "?"), shard_dir,
                                  "shard manifest missing")
        shard_manifests.append(shard)
        out_meta = shard["outputs"].get(name)
        if out_meta is None or taken >= rows:
            continue
        st.verify(shard_dir, shard)
        part = _read_table(st, f"{shard_dir}/{out_meta['path']}")
        parts.append(part.slice(0, rows - taken))
        taken += min(part.num_rows, rows - taken)
    if tables_only:
        count = int(manifest.get("rows") or 0)
    else:
        count = 0
        for entry in manifest["shards"][len(shard_manifests):]:
            shard_manifests.append(st.read_manifest(f"{directory}/{entry['dir']}") or {"outputs": {}})
        count = sum(int((m["outputs"].get(name) or {}).get("rows") or 0) for m in shard_manifests)
    if not parts:
        return None, count
    return pa.concat_tables(parts, promote_options="default"), count


@app.command()
def show(run_id: str = RUN_ARG, node: str = typer.Argument(..., help="node name"),
         store: Optional[str] = STORE_OPT,
         rows: int = typer.Option(5, help="rows of each table to print")) -> None:
    """A node's committed outputs: metrics, files and the first rows of each table."""
    from interpflow.workflows.api import RunHandle

    record = _record(run_id, store)
    handle = RunHandle(_open_store(store), record)
    try:
        directory, manifest = handle._directory(node)
        out.print(f"{node} at {directory}", markup=False, highlight=False)
        out.print(f"metrics: {json.dumps(manifest.get('metrics', {}), indent=1)}", markup=False)
        sharded = "shards" in manifest
        if not sharded and any(meta["kind"] == "table" for meta in manifest.get("outputs", {}).values()):
            handle.store.verify(directory, manifest)  # what store.load checks before a read
        for name, meta in manifest.get("outputs", {}).items():
            if sharded and meta["kind"] != "table":
                continue
            if meta["kind"] != "table":
                out.print(f"- {name}: {meta['kind']} at {directory}/{meta['path']}", markup=False)
                continue
            if sharded:
                head, count = _sharded_head(handle.store, directory, manifest, name, rows)
                out.print(f"- {name}: table, {count} rows in {len(manifest['shards'])} shards", markup=False)
            else:
                head = _read_table(handle.store, f"{directory}/{meta['path']}")
                count = head.num_rows
                out.print(f"- {name}: table, {count} rows", markup=False)
            if head is not None:
                _print_head(head, rows)
    except _input_errors() as exc:
        _fail_input(str(exc).strip("'\""))


@app.command()
def verify(run_id: Optional[str] = typer.Argument(None, help="run id (default: every commit in the store)",
                                                  autocompletion=_complete_run_id),
           store: Optional[str] = STORE_OPT) -> None:
    """Check every sha256 of a run's outputs (or the whole store); quarantine what is damaged.

    The next run recomputes exactly what was set aside. Exit 1 if anything was damaged."""
    from interpflow.workflows import api

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


ADDRESS_OPT = typer.Option(None, "--address", help="Ray dashboard (Jobs API) address, e.g. http://HEAD:8265; "
                                                    "default RAY_API_SERVER_ADDRESS, then RAY_ADDRESS")


def _write_raw(text: str) -> None:
    """A job's log text as it comes, unstyled and unwrapped."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _stopped_following(job: str | None = None) -> None:
    name = job or "the job"
    err.print(f"\nstopped following {name}; it keeps running on the cluster (interpflow logs -f {job or 'JOB'} "
              f"follows it again, interpflow stop {job or 'JOB'} stops it)", markup=False, highlight=False)
    raise typer.Exit(130)


@app.command()
def submit(spec: str = typer.Argument(..., help="spec file, or a bundled spec name", autocompletion=_complete_spec),
           overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. transform.power=3"),
           address: Optional[str] = ADDRESS_OPT,
           wait: bool = typer.Option(True, help="stream the job's logs until it ends"),
           timeout: float = typer.Option(1800, help="seconds to follow the job"),
           retries: int = typer.Option(0, min=0, help="with --wait: after a failed job, or one lost with its head, "
                                       "submit a new attempt that resumes from the store, up to N times"),
           head_wait: float = typer.Option(600, help="with --retries: seconds to wait for a lost head to answer "
                                           "again")) -> None:
    """Submit a spec to a Ray cluster as a Ray job.

    The same spec again attaches to its job while that is pending, running or succeeded; after a failed or
    stopped job it starts a new attempt that resumes the run from the store (--retries does that by itself,
    also when the head was lost). A relative run.store or SQLite run.tracking_uri is made absolute for a
    cluster on this machine and refused for any other."""
    from interpflow.cluster.submit import SubmitError, submit_spec
    from interpflow.workflows.spec import SpecError, load_spec

    try:
        loaded = load_spec(spec, list(overrides or []), check_store=False)
        result = submit_spec(loaded, address, wait=wait, timeout_s=timeout,
                             echo=lambda m: out.print(m, markup=False, highlight=False, soft_wrap=True),
                             write=_write_raw, retries=retries, head_wait_s=head_wait)
    except (SpecError, SubmitError) as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        _stopped_following()
    out.print(f"job {result.submission_id}: {result.status}"
              + (" (already submitted; attached)" if result.attached else ""), markup=False, highlight=False)
    out.print(f"run {result.submission_id} in {result.store}: interpflow status {result.submission_id} --store "
              f"{result.store}; logs: interpflow logs {result.submission_id}; stop: interpflow stop "
              f"{result.submission_id}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if result.status in ("SUCCEEDED", "RUNNING", "PENDING") else 1)


@app.command()
def logs(job: str = typer.Argument(..., help="submission id of the job (interpflow submit prints it)"),
         address: Optional[str] = ADDRESS_OPT,
         follow: bool = typer.Option(False, "--follow", "-f", help="stream the logs until the job ends")) -> None:
    """Print a Ray job's logs (exit 1 if the job failed or was stopped)."""
    from interpflow.cluster.submit import SubmitError, job_logs

    try:
        status = job_logs(job, address, follow=follow, write=_write_raw)
    except SubmitError as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        _stopped_following(job)
    raise typer.Exit(1 if status in ("FAILED", "STOPPED") else 0)


@app.command()
def stop(job: str = typer.Argument(..., help="submission id of the job (interpflow submit prints it)"),
         address: Optional[str] = ADDRESS_OPT,
         timeout: float = typer.Option(60, help="seconds to wait for the job to end")) -> None:
    """Stop a Ray job and wait until it has ended; submitting its spec again resumes it."""
    from interpflow.cluster.submit import SubmitError, stop_job

    try:
        status, stopped = stop_job(job, address, timeout_s=timeout)
    except SubmitError as exc:
        _fail_input(str(exc))
    if not stopped:
        out.print(f"job {job} had already ended: {status}", markup=False, highlight=False)
        raise typer.Exit(0)
    out.print(f"job {job}: {status}", markup=False, highlight=False)
    raise typer.Exit(0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1)


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
        app(prog_name="interpflow")  # under `python -m` too: help says `interpflow`; completion: _INTERPFLOW_COMPLETE
    except ValueError as exc:  # pragma: no cover - defensive: commands catch their own SpecErrors
        from interpflow.workflows.spec import SpecError

        if not isinstance(exc, SpecError):
            raise
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    finally:
        # The command's work is done and flushed (lineage closed, outputs committed). Without this, the
        # interpreter's final garbage collections walk every object mlflow and pandas allocated: ~1 s of a
        # 2.5 s fully cached run, spent after the answer was printed.
        gc.freeze()


if __name__ == "__main__":
    main()
