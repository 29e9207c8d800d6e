"""The artifact store: typed round trips, manifest-last commits, checksums, exclusive locks."""

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


def test_round_trip_of_every_kind(tmp_path):
    store = Store(tmp_path)
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
    }
    directory = store.node_path("node", "k1")
    manifest = store.commit(directory, outputs, {"node": "node", "key": "k1"})
    assert store.committed(directory) == manifest
    assert manifest["rows"] == 3 and manifest["outputs"]["plot"]["kind"] == "figure"
    loaded = store.load(directory, manifest)
    assert loaded["table"].equals(outputs["table"])
    assert torch.equal(loaded["weights"]["w"], outputs["weights"]["w"])
    assert loaded["array"].dtype == np.float16 and loaded["array"].shape == (4, 2)
    assert loaded["meta"] == {"name": "x", "n": 3}
    assert "plot" not in loaded and "metrics" not in loaded  # for people and MLflow, not downstream nodes
    assert store.load(directory, manifest, "metrics") == {"loss": 0.25}
    assert not any(p.suffix == ".pkl" for p in tmp_path.rglob("*"))


def test_single_values_are_stored_as_output(tmp_path):
    assert set(normalise_outputs(pa.table({"a": [1]}))) == {"output"}
    assert set(normalise_outputs({"a": 1, "b": 2})) == {"output"}
    assert set(normalise_outputs({"metrics": {"m": 1.0}})) == {"metrics"}
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    manifest = store.commit(directory, normalise_outputs(torch.zeros(3)), {"node": "n", "key": "k"})
    assert torch.equal(store.load(directory, manifest), torch.zeros(3))


def test_nothing_is_visible_before_the_manifest(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    os.makedirs(directory)
    (tmp_path / "n" / "k" / "output.parquet").write_bytes(b"half written")
    assert store.committed(directory) is None  # no manifest: not done
    manifest = store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    assert store.committed(directory)["files"] == manifest["files"]


def test_a_truncated_file_fails_the_cheap_check(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = tmp_path / "n" / "k" / "output.parquet"
    path.write_bytes(path.read_bytes()[:-10])
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


def test_a_same_size_corruption_is_caught_by_checksum_on_read(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    manifest = store.commit(directory, {"output": pa.table({"a": list(range(100))})}, {"node": "n", "key": "k"})
    path = tmp_path / "n" / "k" / "output.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot under the same size and mtime
    assert store.committed(directory) is not None  # the cheap check cannot see it...
    with pytest.raises(CorruptArtifact) as err:  # ...but the reader checks sha256
        store.load(directory, manifest)
    assert err.value.node == "n" and err.value.key == "k"
    where = store.quarantine(directory)
    assert store.committed(directory) is None and os.path.exists(where)


def test_first_commit_wins(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    first = store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    second = store.commit(directory, {"output": pa.table({"a": [2]})}, {"node": "n", "key": "k"})
    assert second == first
    assert store.load(directory, first).column("a").to_pylist() == [1]


def _hold_lock(root, directory, log, hold_s):
    store = Store(root)
    with store.lock(directory):
        with open(log, "a") as f:
            f.write(f"enter {os.getpid()} {time.time()}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"exit {os.getpid()} {time.time()}\n")


def test_lock_excludes_other_processes(tmp_path):
    directory = Store(tmp_path).node_path("n", "k")
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path), directory, str(log), 0.5)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["enter", "exit"] * 3  # never two holders at once


def test_a_dead_holders_lock_is_broken(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), directory, str(tmp_path / "log"), 60))
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


def test_manifest_lists_checksums(tmp_path):
    store = Store(tmp_path)
    directory = store.node_path("n", "k")
    store.commit(directory, {"output": pa.table({"a": [1]})}, {"node": "n", "key": "k"})
    manifest = json.loads((tmp_path / "n" / "k" / MANIFEST).read_text())
    assert set(manifest["files"]) == {"output.parquet"}
    assert len(manifest["files"]["output.parquet"]["sha256"]) == 64
