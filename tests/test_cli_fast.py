"""The CLI answers at once and right (issue #29, points 3 and 4), without Ray: the read-only commands load
none of the heavy libraries, piped output is not cut, unknown runs and nodes are one line with exit 2,
`explain` names the run that computed what a run reused (a resume being a run of its own), a run id is
not reused for another spec, and spec values parse as YAML 1.2.

The store here is written with the engine's own Store and RunRecord (a table node, a sharded node, and
three runs: one that failed, its resume, and a fully cached run after both), so no Ray cluster starts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from interpflow.workflows.cli import app, explain_node
from interpflow.workflows.engine.record import RunRecord
from interpflow.workflows.engine.store import Store, shard_dirname
from interpflow.workflows.spec import apply_overrides, load_spec, parse_yaml
from support import HEAVY, cli_imports

LONG_RUN = "a-run-id-long-enough-that-an-80-column-layout-would-fold-or-cut-it-" + "x" * 40
FAILED, RESUMED, CACHED = "demo-failed", "demo-resumed", LONG_RUN


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _node(key: str, status: str, produced_by: str | None = None, shards: dict | None = None,
          config: dict | None = None) -> dict:
    return {"key": key, "status": status, "parts": {"name": "n", "version": 1, "config": config or {}},
            "upstream": {}, "sharded": shards is not None, "shards": shards, "error": None, "traceback": None,
            "produced_by": {"run_id": produced_by} if produced_by else None, "seconds": 0.0}


def _record(store: Store, run_id: str, nodes: dict, created: float, status: str, origin: str | None = None):
    record = RunRecord.create(store, run_id, "demo", {"workflow": "demo"}, {}, {"store": store.uri},
                              origin=origin)
    record.data.update(nodes=nodes, status=status, created=created)
    record.save()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """numbers (a table) and parts (3 shards): run FAILED computed numbers and 1 shard of parts, then
    failed; RESUMED (origin FAILED) reused numbers and that shard and computed the rest; CACHED reused all."""
    root = tmp_path_factory.mktemp("cli") / "store"
    store = Store(str(root))
    k_numbers, k_parts = _key("numbers"), _key("parts")
    store.commit(store.node_path("numbers", k_numbers),
                 {"output": pa.table({"id": list(range(10)), "x": [i / 10 for i in range(10)]})},
                 {"node": "numbers", "key": k_numbers, "produced_by": {"run_id": FAILED}})
    entries = []
    for i in range(3):
        table = pa.table({"id": [3 * i + j for j in range(3)], "y": [[float(i), float(j)] for j in range(3)]})
        store.commit(store.shard_path("parts", k_parts, i, 3), {"output": table},
                     {"node": "parts", "key": k_parts, "shard": {"index": i, "count": 3}})
        entries.append({"dir": shard_dirname(i, 3), "rows": 3})
    store.commit_manifest(store.node_path("parts", k_parts), {
        "node": "parts", "key": k_parts, "shards": entries, "rows": 9, "metrics": {"rows": 9},
        "outputs": {"output": {"kind": "table", "path": "output.parquet", "rows": 3}},
        "produced_by": {"run_id": RESUMED}})
    _record(store, FAILED, {"numbers": _node(k_numbers, "ran"),
                            "parts": _node(k_parts, "failed", shards={"total": 3, "ran": 1, "cached": 0})},
            1.0, "failed")
    _record(store, RESUMED, {"numbers": _node(k_numbers, "cached", FAILED),
                             "parts": _node(k_parts, "ran", shards={"total": 3, "ran": 2, "cached": 1})},
            2.0, "succeeded", origin=FAILED)
    _record(store, CACHED, {"numbers": _node(k_numbers, "cached", FAILED),
                            "parts": _node(k_parts, "cached", RESUMED, shards={"total": 3, "ran": 0, "cached": 3})},
            3.0, "succeeded")
    return root


def _probe(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI's own `main` in a fresh interpreter (it prints which heavy modules it imported)."""
    return cli_imports(*args)[0]


def _heavy(done: subprocess.CompletedProcess) -> set[str]:
    line = [x for x in done.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return set(filter(None, line[len("HEAVY="):].split(",")))


@pytest.mark.parametrize("command", [
    ["--version"], ["-h"], ["ls"], ["status", RESUMED], ["explain", CACHED, "parts"], ["show", CACHED, "numbers"],
    ["show", CACHED, "parts"], ["verify", CACHED], ["show", "no-such-run", "numbers"],
], ids=lambda c: "-".join(c)[:24])
def test_read_only_commands_import_no_heavy_library(store_dir, command):
    store = [] if command[0].startswith("-") else ["--store", str(store_dir)]
    done = _probe(command + store)
    assert done.returncode in (0, 1, 2) and "Traceback" not in done.stderr, done.stderr
    assert _heavy(done) == set(), (command, done.stderr)


def test_version_and_short_help():
    done = _probe(["--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"interpflow {version('interpflow')}"
    short, long = _probe(["-h"]), _probe(["--help"])
    assert short.returncode == 0 and short.stdout == long.stdout and "--install-completion" in short.stdout


def test_shell_completion_offers_run_ids(store_dir):
    env = {**os.environ, "_INTERPFLOW_COMPLETE": "complete_bash", "COMP_WORDS": "interpflow status demo-",
           "COMP_CWORD": "2", "INTERPFLOW_STORE": str(store_dir)}
    done = subprocess.run([sys.executable, "-m", "interpflow.workflows.cli"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert set(done.stdout.split()) == {FAILED, RESUMED}, done.stdout + done.stderr


def test_piped_output_is_not_cut(store_dir):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    for args in (["ls"], ["status", CACHED]):
        done = subprocess.run([sys.executable, "-m", "interpflow.workflows.cli", *args, "--store", str(store_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert LONG_RUN in done.stdout, done.stdout  # whole, on one line
    assert f"(open: interpflow show {LONG_RUN} NODE)" in done.stdout  # status's summary line, not wrapped
    ls = subprocess.run([sys.executable, "-m", "interpflow.workflows.cli", "ls", "--store", str(store_dir)],
                        capture_output=True, text=True, env=env, timeout=120).stdout
    (row,) = [line for line in ls.splitlines() if RESUMED in line]
    assert row.split("│")[-2].strip() == FAILED  # the origin column names the run it resumes


@pytest.mark.parametrize("command", [
    ["show", "no-such-run", "numbers"], ["show", RESUMED, "no-such-node"], ["status", "no-such-run"],
    ["explain", "no-such-run", "numbers"], ["explain", RESUMED, "no-such-node"], ["resume", "no-such-run"],
    ["verify", "no-such-run"],
], ids=lambda c: "-".join(c)[:24])
def test_unknown_run_or_node_is_one_line_exit_2(store_dir, command):
    done = subprocess.run([sys.executable, "-m", "interpflow.workflows.cli", *command, "--store", str(store_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such" in lines[0], done.stderr


def test_show_reads_tables_and_shards_without_pandas(store_dir):
    result = CliRunner().invoke(app, ["show", CACHED, "parts", "--rows", "4", "--store", str(store_dir)])
    assert result.exit_code == 0, result.output
    assert "output: table, 9 rows in 3 shards" in result.output
    body = result.output.split("3 shards")[1].splitlines()[1:]
    assert [line.split()[0] for line in body if line.strip()] == ["id", "0", "1", "2", "3"]
    result = CliRunner().invoke(app, ["show", CACHED, "numbers", "--store", str(store_dir)])
    assert result.exit_code == 0 and "output: table, 10 rows" in result.output


def test_explain_names_the_run_that_computed_each_reused_node(store_dir):
    store = str(store_dir)
    load = lambda run_id: RunRecord.load(Store(store), run_id)  # noqa: E731
    (numbers,) = explain_node(load(CACHED), "numbers", store)
    assert "cache hit" in numbers and f"computed by run {FAILED}" in numbers
    (parts,) = explain_node(load(CACHED), "parts", store)
    assert "cache hit" in parts and f"computed by run {RESUMED}" in parts  # not "key is new"
    (numbers,) = explain_node(load(RESUMED), "numbers", store)
    assert f"computed by run {FAILED}" in numbers
    (parts,) = explain_node(load(RESUMED), "parts", store)  # the failed run never finished it
    assert "key" in parts and "is new" in parts and "1 of its 3 shards were committed before" in parts
    (parts,) = explain_node(load(FAILED), "parts", store)  # the original's record still says what it did
    assert parts.startswith("parts (failed in this run): no earlier run computed this node")


# --- run ids are not reused for another spec ---------------------------------------------------------------
def _seed_run(store: Path, run_id: str, overrides: list[str], **data) -> None:
    spec = load_spec("demo", overrides + [f"run.store={store}"])
    record = RunRecord.create(Store(str(store)), run_id, "demo", spec.raw, spec.config.model_dump(mode="json"),
                              {"store": str(store)}, spec_digest=spec.digest())
    record.data.update(status="failed", **data)
    record.save()


def test_a_run_id_of_another_spec_is_refused_before_anything_runs(tmp_path):
    import ray

    store = tmp_path / "store"
    _seed_run(store, "named", ["transform.power=2"])
    before = (store / "runs" / "named" / "record.json").read_text()
    result = CliRunner().invoke(app, ["run", "demo", "transform.power=3", "--run-id", "named",
                                      "--store", str(store), "--no-progress"])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert flat.count("error:") == 1 and "run id 'named' exists with a different spec" in flat
    assert (store / "runs" / "named" / "record.json").read_text() == before
    assert not ray.is_initialized()


def test_a_record_written_before_spec_digests_is_compared_by_its_config(tmp_path):
    store = tmp_path / "store"
    _seed_run(store, "old", ["numbers.n=50"])
    path = store / "runs" / "old" / "record.json"
    data = json.loads(path.read_text())
    del data["spec_digest"]
    path.write_text(json.dumps(data))
    assert RunRecord.load(Store(str(store)), "old").spec_digest == load_spec("demo", ["numbers.n=50"]).digest()
    result = CliRunner().invoke(app, ["run", "demo", "numbers.n=60", "--run-id", "old", "--store", str(store)])
    assert result.exit_code == 2 and "different spec" in result.output


def test_a_run_id_whose_driver_is_alive_is_refused(tmp_path):
    from interpflow.workflows.engine.store import _process_started

    store = tmp_path / "store"
    parent = os.getppid()  # alive, and not this process
    _seed_run(store, "busy", [], driver={"host": os.uname().nodename, "pid": parent,
                                         "started": _process_started(parent)})
    path = store / "runs" / "busy" / "record.json"
    data = json.loads(path.read_text())
    data["status"] = "running"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["run", "demo", "--run-id", "busy", "--store", str(store)])
    assert result.exit_code == 2 and "is still running" in " ".join(result.output.split()), result.output


# --- YAML 1.2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("1e-2", 0.01), ("-1E3", -1000.0), (".5", 0.5), ("1.", 1.0), ("10", 10), ("010", 10), ("0o17", 15),
    ("0x1f", 31), ("true", True), ("False", False), ("null", None), ("~", None), (".inf", float("inf")),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("1_000", "1_000"),
    ("2024-01-01", "2024-01-01"), ("12:30", "12:30"), ("'true'", "true"), ("[1e-3, off]", [0.001, "off"]),
])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text, value):
    assert parse_yaml(f"v: {text}") == {"v": value}
    assert apply_overrides({}, [f"v={text}"]) == {"v": value}


def test_spec_files_and_overrides_parse_as_yaml_1_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text("workflow: demo\nfit: {lr: 1e-2}\nsummary: {fail_marker: off}\n")
    spec = load_spec("spec.yaml")
    assert spec.raw["fit"]["lr"] == 0.01 and isinstance(spec.raw["fit"]["lr"], float)
    assert spec.config.fit.lr == 0.01
    assert spec.config.summary.fail_marker == "off"  # YAML 1.1 made it False: "not a valid string"
    spec = load_spec("spec.yaml", ["summary.fail_marker=yes", "fit.lr=2e-3"])
    assert spec.config.summary.fail_marker == "yes" and spec.raw["fit"]["lr"] == 0.002


# --- a fully cached run does not rebuild the tiny LM's site map -----------------------------------------
def test_the_tiny_lm_site_check_is_remembered_and_bad_sites_are_still_found(tmp_path, monkeypatch):
    """Building the embedded tiny LM's site map loads transformers' GPT-2 code (seconds): its answer is kept
    under a digest of the LM config, the sites and the code, so a second run skips it; errors are not kept."""
    import functools

    from interpflow.tasks import tiny_lm
    from interpflow.workflows.spec import SpecError

    monkeypatch.setenv("INTERPFLOW_CACHE", str(tmp_path / "cache"))
    real, calls = tiny_lm.site_map, []

    @functools.wraps(real)  # the same code digest: inspect.unwrap reaches the real function
    def counting(lm):
        calls.append(lm)
        return real(lm)

    monkeypatch.setattr(tiny_lm, "site_map", counting)
    for _ in range(2):
        load_spec("extract", check_store=False)
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "site-widths").glob("*.json"))) == 1
    load_spec("extract", ["lm.n_embd=32"], check_store=False)  # another LM: its own answer
    assert len(calls) == 2
    for _ in range(2):
        with pytest.raises(SpecError, match="extract.sites: site 'blocks.9.resid_post'"):
            load_spec("extract", ["extract.sites=[blocks.9.resid_post]"], check_store=False)
    assert len(calls) == 4
