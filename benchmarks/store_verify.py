"""What a cache hit spends proving its files, per committed file, against re-hashing them (the baseline).

A cache hit (`Store.inspect`) checks that every file a manifest lists exists with its committed size and,
on a local store, its committed mtime (one stat per file, batched); only a file whose mtime moved is
re-hashed. The baseline is a full sha256 of every file (what `interpflow verify` does). Goal: <= 1 ms
per committed file for a cache hit. Both run in this process on the same store.

    python benchmarks/store_verify.py [--shards 2000] [--rows 2000] [--files-per-shard 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from interpflow.workflows.engine.store import Store


def build(store: Store, shards: int, rows: int, files: int) -> tuple[str, int]:
    """A sharded node of `shards` committed shards, each with `files` Parquet tables, sealed by a top manifest."""
    directory = store.node_path("bench", "k" * 64)
    rng = np.random.default_rng(0)
    entries, nbytes = [], 0
    for index in range(shards):
        shard_dir = store.shard_path("bench", "k" * 64, index, shards)
        outputs = {f"t{j}": pa.table({"id": np.arange(rows), "v": rng.standard_normal(rows)}) for j in range(files)}
        manifest = store.commit(shard_dir, outputs, {"node": "bench", "key": "k" * 64})
        entries.append({"dir": shard_dir.rsplit("/", 1)[-1], "digest": manifest["digest"]})
        nbytes += manifest["bytes"]
    store.commit_manifest(directory, {"node": "bench", "key": "k" * 64, "shards": entries, "files": {},
                                      "outputs": {}})
    return directory, nbytes


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=2000, help="rows per table (16 bytes a row)")
    parser.add_argument("--files-per-shard", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        directory, nbytes = build(store, args.shards, args.rows, args.files_per_shard)
        files = args.shards * args.files_per_shard
        assert store.inspect(directory)[0] is not None
        cache_hit = best_of(lambda: store.inspect(directory))
        full = best_of(lambda: store.damaged_parts(directory), repeat=1)
        # A store copied without times (cp -r): every mtime moved, so a cache hit re-hashes every file.
        for path, _, names in os.walk(tmp):
            for name in names:
                os.utime(os.path.join(path, name), ns=(1, 1))
        moved = best_of(lambda: store.inspect(directory), repeat=1)
    print(f"{args.shards} shards x {args.files_per_shard} files = {files} committed files, {nbytes / 1e6:.1f} MB")
    print(f"{'check':44s} {'total s':>9s} {'ms/file':>9s} {'vs sha256':>10s}")
    for label, seconds in (("sha256 of every file (verify; baseline)", full),
                           ("cache hit: size + mtime (inspect)", cache_hit),
                           ("cache hit after a copy without times", moved)):
        print(f"{label:44s} {seconds:9.3f} {1000 * seconds / files:9.4f} {full / seconds:9.1f}x")
    print(f"goal <= 1 ms per committed file on a cache hit: {'met' if 1000 * cache_hit / files <= 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
