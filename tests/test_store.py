"""The artifact store: typed round trips, manifest-last commits, checksums, exclusive locks.

Tests taking `store` run twice: on a local directory and on S3 (moto's server, conftest.s3_server)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from interpflow.workflows.engine.store import MANIFEST, CorruptArtifact, Store, normalise_outputs
from support import hold_lock


@pytest.fixture
def store(store_uri):
    return Store(store_uri)


def read_bytes(store: Store, path: str) -> bytes:
    with store.fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(store: Store, path: str, data: bytes, keep_mtime: bool = False) -> None:
    """Rewrite a store file through the store's filesystem (on a local store optionally under its old mtime)."""
    stat = os.stat(path) if store.is_local and keep_mtime else None
    with store.fs.open_output_stream(path) as f:
        f.write(data)
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def store_files(store: Store) -> list[str]:
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def test_round_trip_of_every_kind(store):
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    outputs = {
        "table": pa.table({"id": [1, 2, 3], "v": [0.5, 1.5, 2.5]}),
        "weights": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        "array": np.ones((4, 2), dtype=np.float16),
        "meta": {"name": "x", "n": 3},
        "plot": fig,
        "metrics": {"loss": 0.25},
        "texts": datasets.Dataset.from_dict({"text": ["a b", "c"], "id": [0, 1]}),  # a folder: S3 -> local copy
    }
    directory = store.node_path("node", "k1")
    manifest = store.commit(directory, outputs, {"node": "node", "key": "k1"})
    assert store.committed(directory) == manifest
    assert manifest["rows"] == 3 + 2 and manifest["outputs"]["plot"]["kind"] == "figure"  # table + dataset rows
    loaded = store.load(directory, manifest)
    assert loaded["table"].equals(outputs["table"])
    assert torch.equal(loaded["weights"]["w"], outputs["weights"]["w"])
    assert loaded["array"].dtype == np.float16 and loaded["array"].shape == (4, 2)
    assert loaded["meta"] == {"name": "x", "n": 3}
    assert loaded["texts"].to_dict() == {"text": ["a b", "c"], "id": [0, 1]}
    assert "plot" not in loaded and "metrics" not in loaded  # for people and MLflow, not downstream nodes
    assert store.load(directory, manifest, "metrics") == {"loss": 0.25}
    assert store_files(store) and not any(p.endswith(".pkl") for p in store_files(store))


def test_single_values_are_stored_as_output(tmp_path):
    assert set(normalise_outputs(pa.table({"a": [1]}))) == {"output"}
    assert set(normalise_outputs({"a": 1, "b": 2})) == {"output"}
    assert set(normalise_outputs({"metrics": {"m": 1.0}})) == {"metrics"}
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    manifest = store.commit(directory, normalise_outputs(torch.zeros(3)), {"node": "n", "key": "k"})
    assert torch.equal(store.load(directory, manifest), torch.zeros(3))


def test_nothing_is_visible_before_the_manifest(store):
    directory = store.node_path("n", "k")
    store.fs.create_dir(directory, recursive=True)
    write_bytes(store, f"{directory}/output.parquet", b"half written")
    assert store.committed(directory) is None  # no manifest: not done
    manifest = store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    assert store.committed(directory)["files"] == manifest["files"]


def test_a_truncated_file_fails_the_cheap_check(store):
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = f"{directory}/output.parquet"
    write_bytes(store, path, read_bytes(store, path)[:-10])
    assert store.committed(directory) is None


def test_a_same_size_rewrite_fails_the_cheap_check(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = tmp_path / "n" / "k" / "output.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: re-hashed, and the hash differs
    manifest, damage = store.inspect(directory)
    assert manifest is None and damage == "output.parquet: sha256 differs from the manifest"


def test_a_store_copied_without_times_is_still_committed(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = tmp_path / "n" / "k" / "output.parquet"
    os.utime(path, ns=(1, 1))  # what `cp -r` does to every file: the mtime moves, the bytes do not
    assert store.committed(directory) is not None


def test_a_same_size_corruption_is_caught_by_checksum_on_read(store):
    directory = store.node_path("n", "k")
    manifest = store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = f"{directory}/output.parquet"
    data = bytearray(read_bytes(store, path))
    data[len(data) // 2] ^= 0xFF
    write_bytes(store, path, bytes(data), keep_mtime=True)  # bit rot under the same size (and mtime)
    assert store.committed(directory) is not None  # the cheap check cannot see it...
    with pytest.raises(CorruptArtifact) as err:  # ...but the reader checks sha256
        store.load(directory, manifest)
    assert err.value.node == "n" and err.value.key == "k"
    where = store.quarantine(directory)
    assert store.committed(directory) is None and store.read_manifest(where)["key"] == "k"
    # ...and the next commit recomputes it
    again = store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    assert store.load(directory, again).column("a").to_pylist() == list(range(100))


def test_first_commit_wins(store):
    directory = store.node_path("n", "k")
    first = store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    second = store.commit(directory, {"output": pa.table({"a": [2]})}, {"node": "n", "key": "k"})
    assert second == first
    assert store.load(directory, first).column("a").to_pylist() == [1]


@pytest.mark.parametrize("drivers", [2, 3])
def test_lock_excludes_other_processes(store, tmp_path, drivers):
    directory = store.node_path("n", "k")
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")  # the children inherit the test's AWS variables
    procs = [ctx.Process(target=hold_lock, args=(store.uri, directory, str(log), 0.5)) for _ in range(drivers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["enter", "exit"] * drivers  # never two holders at once
    assert [p.exitcode for p in procs] == [0] * drivers
    assert not [f for f in store_files(store) if "/.locks/" in f and f.endswith(".lock")]  # every lock released


def test_a_dead_holders_lock_is_broken(store, tmp_path):
    directory = store.node_path("n", "k")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=hold_lock, args=(store.uri, directory, str(tmp_path / "log"), 60))
    p.start()
    deadline = time.time() + 30
    while not (tmp_path / "log").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.join()
    started = time.time()
    with store.lock(directory) as acquired:
        assert acquired
    assert time.time() - started < 5


def test_manifest_lists_checksums(store):
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    manifest = json.loads(read_bytes(store, f"{directory}/{MANIFEST}"))
    assert set(manifest["files"]) == {"output.parquet"}
    assert len(manifest["files"]["output.parquet"]["sha256"]) == 64
