"""The artifact store: content-addressed node outputs on any `pyarrow.fs` filesystem.

Layout under the store root::

    <node-name>/<key>/_manifest.json            one committed node (files, sizes, sha256, rows, timings)
    <node-name>/<key>/shard-00007-of-00064/     one committed shard of a sharded node, own manifest
    runs/<run-id>/record.json                   the run record (see record.py)
    .tmp/  .locks/  .quarantine/                staging, write locks, corrupt artifacts set aside

Outputs are written into a staging directory and made visible by one rename, with the manifest
written last, so a reader never sees half an artifact. Formats: Parquet for tables, safetensors for
tensors, JSON for small metadata, `save_pretrained` directories for models, PNG for figures. Nothing
is pickled.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1


# Run ids and node names become path components of the store: one safe alphabet, no separators, no
# "..", so that no name a user types can reach outside the store root.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# A lock the store cannot parse (a crash between create and write, a full disk) is broken once it is
# this old; a readable one once its holder is gone or has not refreshed it for `LOCK_STALE_S`.
LOCK_STALE_S = 30.0
UNREADABLE_LOCK_GRACE_S = 2.0


class StoreError(RuntimeError):
    pass


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe store path component, else ValueError naming `what` and the alphabet."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} '{value}' is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter, digit or '_' (no '/' and no '..')")
    return value


class CorruptArtifact(StoreError):
    """A committed file no longer matches its manifest checksum: the node must be recomputed."""

    def __init__(self, node: str, key: str, path: str, reason: str):
        super().__init__(f"artifact of node '{node}' (key {key[:12]}) is corrupt: {path}: {reason}")
        self.node, self.key, self.path, self.reason = node, key, path, reason

    def __reduce__(self):  # keep the fields across Ray's exception transport
        return (CorruptArtifact, (self.node, self.key, self.path, self.reason))


def content_digest(obj: Any) -> str:
    """One sha256 naming an artifact's content (over its files' checksums, or its shards' digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_dirname(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def _sha256_file(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Output:
    """One named output as recorded in a manifest."""

    name: str
    kind: str  # table | tensors | ndarray | json | hf | dataset | figure | html
    path: str
    rows: int | None = None


def classify(value: Any) -> str:
    """The storage kind of a task's return value, by type (tasks never import the engine)."""
    import numpy as np

    if isinstance(value, pa.Table):
        return "table"
    if type(value).__name__ == "DataFrame" and hasattr(value, "to_parquet"):
        return "table"
    if type(value).__name__ == "Figure" and hasattr(value, "savefig"):
        return "figure"
    if hasattr(value, "save_pretrained"):
        return "hf"
    if type(value).__name__ == "Dataset" and hasattr(value, "save_to_disk"):
        return "dataset"  # a Hugging Face `datasets.Dataset`
    if callable(getattr(value, "_repr_html_", None)):
        return "html"  # a self-contained page for people (IPython's rich-display convention)
    if isinstance(value, np.ndarray):
        return "ndarray"
    try:
        import torch

        if isinstance(value, torch.Tensor) or (
            isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
        ):
            return "tensors"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "json"


def _write_output(name: str, value: Any, staging: Path) -> Output:
    kind = classify(value)
    if kind == "table":
        table = value if isinstance(value, pa.Table) else pa.Table.from_pandas(value, preserve_index=False)
        path = f"{name}.parquet"
        pq.write_table(table, staging / path)
        return Output(name, kind, path, rows=table.num_rows)
    if kind == "tensors":
        import torch
        from safetensors.torch import save_file

        tensors = {"tensor": value} if isinstance(value, torch.Tensor) else value
        path = f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / path),
                  metadata={"single": str(isinstance(value, torch.Tensor))})
        return Output(name, kind, path)
    if kind == "ndarray":
        from safetensors.numpy import save_file

        path = f"{name}.safetensors"
        save_file({"array": value}, str(staging / path))
        return Output(name, kind, path, rows=int(value.shape[0]) if value.ndim else None)
    if kind == "hf":
        value.save_pretrained(str(staging / name))
        return Output(name, kind, name)
    if kind == "dataset":
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # a storage detail: no bar per commit in the driver's console
        value.save_to_disk(str(staging / name))
        return Output(name, kind, name, rows=value.num_rows)
    if kind == "html":
        path = f"{name}.html"
        (staging / path).write_text(value._repr_html_(), encoding="utf-8")
        return Output(name, kind, path)
    if kind == "figure":
        path = f"{name}.png"
        value.savefig(staging / path, dpi=110, bbox_inches="tight")
        try:
            import matplotlib.pyplot as plt

            plt.close(value)
        except Exception:  # pragma: no cover - closing is best effort
            pass
        return Output(name, kind, path)
    path = f"{name}.json"
    (staging / path).write_text(json.dumps(value, indent=1, sort_keys=True, allow_nan=True))
    return Output(name, kind, path)


def normalise_outputs(result: Any) -> dict[str, Any]:
    """A task returns one value, or a dict of named values (tables, tensors, figures, `metrics`).

    A plain JSON dict without a `metrics` entry is one value, stored as the output named `output`.
    """
    if isinstance(result, dict) and result and all(isinstance(k, str) for k in result) \
            and classify(result) == "json" \
            and ("metrics" in result or any(classify(v) != "json" for v in result.values())):
        return result
    return {"output": result}


class Store:
    """A store root on a local directory or any URI `pyarrow.fs` understands (s3://, gs://, ...)."""

    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = uri
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.uri = uri
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __getstate__(self):  # a Store travels to Ray workers: its S3 client does not (it is made again there)
        state = dict(self.__dict__)
        state.pop("_conditional", None)
        return state

    @functools.cached_property
    def _conditional(self):
        """S3's conditional writes for locks (s3.py), or None: a local store (O_EXCL does it), another
        object store, or an S3 server that does not enforce them (best effort then: see README)."""
        if self.is_local or type(self.fs).__name__ != "S3FileSystem":
            return None
        from interpflow.workflows.engine.s3 import ConditionalS3

        return ConditionalS3.open(self.uri, self.path(".locks", ".conditional-probe"))

    # --- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the root; StoreError if the parts would lead outside it (`..`, absolute parts)."""
        root = posixpath.normpath(self.root) if self.root else ""
        joined = posixpath.normpath("/".join([root, *parts])) if parts else root
        if parts and not joined.startswith(root.rstrip("/") + "/"):
            raise StoreError(f"path {'/'.join(parts)!r} leads outside the store {self.uri}")
        return joined

    def node_path(self, name: str, key: str) -> str:
        return self.path(check_name(name, "node name"), check_name(key, "node key"))

    def shard_path(self, name: str, key: str, index: int, count: int) -> str:
        return self.path(name, key, shard_dirname(index, count))

    def uri_of(self, path: str) -> str:
        return path if self.is_local else f"{self.uri.split('://')[0]}://{path}"

    def check_reachable(self) -> None:
        """Create the root and write/read a probe file; raise StoreError with the cause otherwise."""
        try:
            self.fs.create_dir(self.root, recursive=True)
            probe = self.path(".tmp", f"probe-{uuid.uuid4().hex}")
            self.fs.create_dir(self.path(".tmp"), recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
            raise StoreError(f"store '{self.uri}' is not writable: {exc}") from exc

    # --- manifests -------------------------------------------------------------------------
    def read_manifest(self, directory: str) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{directory}/{MANIFEST}") as f:
                manifest = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None
        return manifest if manifest.get("format") == MANIFEST_FORMAT else None

    def committed(self, directory: str) -> dict | None:
        """The manifest if `directory` holds a complete, undamaged commit (see `inspect`)."""
        return self.inspect(directory)[0]

    def inspect(self, directory: str) -> tuple[dict | None, str | None]:
        """(manifest, None) for a complete commit; (None, None) when nothing is committed; (None, reason)
        when a manifest is there but its files are not what it committed (damaged: quarantine it). A
        reason starts with the damaged file's path relative to `directory`, then a colon.

        The cheap proof a cache hit pays for: every listed file exists with its committed size, and on a
        local store its committed mtime; a file whose mtime moved (rewritten in place, or a store copied
        without times) is re-hashed, so only real damage fails. A sharded node checks every shard."""
        manifest = self.read_manifest(directory)
        if manifest is None:
            return None, (f"{MANIFEST}: unreadable" if self._exists(f"{directory}/{MANIFEST}") else None)
        damage = self._damage(directory, manifest)
        if damage is None:
            for shard in manifest.get("shards", []):
                shard_dir = f"{directory}/{shard['dir']}"
                shard_manifest = self.read_manifest(shard_dir)
                damage = f"{shard['dir']}: manifest missing or unreadable" if shard_manifest is None \
                    else self._damage(shard_dir, shard_manifest, prefix=f"{shard['dir']}/")
                if damage is not None:
                    break
        return (None, damage) if damage is not None else (manifest, None)

    def _damage(self, directory: str, manifest: dict, prefix: str = "") -> str | None:
        files = manifest.get("files", {})
        if not files:
            return None
        mtimes = manifest.get("mtime_ns", {}) if self.is_local else {}
        infos = self.fs.get_file_info([f"{directory}/{rel}" for rel in files])
        for info, (rel, meta) in zip(infos, files.items()):
            if info.type != pafs.FileType.File:
                return f"{prefix}{rel}: missing"
            if info.size != meta["size"]:
                return f"{prefix}{rel}: {info.size} bytes, committed {meta['size']}"
            if rel in mtimes and info.mtime_ns != mtimes[rel] \
                    and _sha256_file(self.fs, f"{directory}/{rel}") != meta["sha256"]:
                return f"{prefix}{rel}: sha256 differs from the manifest"
        return None

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def verify(self, directory: str, manifest: dict) -> None:
        """Recompute every file's sha256; raise CorruptArtifact on the first mismatch."""
        for rel, meta in manifest.get("files", {}).items():
            path = f"{directory}/{rel}"
            try:
                digest = _sha256_file(self.fs, path)
            except (FileNotFoundError, OSError) as exc:
                raise CorruptArtifact(manifest.get("node", "?"), manifest.get("key", "?"), path, str(exc))
            if digest != meta["sha256"]:
                raise CorruptArtifact(manifest.get("node", "?"), manifest.get("key", "?"), path,
                                      "sha256 differs from the manifest")

    def damaged_parts(self, directory: str) -> tuple[int, list[tuple[str, str]]]:
        """Check every sha256 of a commit; return (files checked, [(damaged directory, reason)]).

        A sharded node's damage is reported per shard, so that only the damaged shards are set aside."""
        manifest = self.read_manifest(directory)
        if manifest is None:
            return 0, [(directory, "manifest missing or unreadable")]
        checked, damaged = 0, []
        levels = [(directory, manifest)]
        for shard in manifest.get("shards", []):
            shard_dir = f"{directory}/{shard['dir']}"
            shard_manifest = self.read_manifest(shard_dir)
            if shard_manifest is None:
                damaged.append((shard_dir, "shard manifest missing or unreadable"))
            else:
                levels.append((shard_dir, shard_manifest))
        for level_dir, level_manifest in levels:
            checked += len(level_manifest.get("files", {}))
            try:
                self.verify(level_dir, level_manifest)
            except CorruptArtifact as exc:
                damaged.append((level_dir, f"{exc.path.rsplit('/', 1)[-1]}: {exc.reason}"))
        return checked, damaged

    def set_aside(self, directory: str) -> list[str]:
        """Quarantine a damaged commit so that it is recomputed; return where things went.

        A damaged shard goes alone, with its node's top manifest (so the node is sealed again once the
        shard is recomputed); a damaged node goes whole."""
        moved = []
        name = directory.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard-"):
            top = f"{directory.rstrip('/').rsplit('/', 1)[0]}/{MANIFEST}"
            if self._exists(top):
                moved.append(self.quarantine(top))
        if self._exists(directory):
            moved.append(self.quarantine(directory))
        return moved

    # --- writing ---------------------------------------------------------------------------
    @contextmanager
    def _staging(self) -> Iterator[Path]:
        if self.is_local:
            base = Path(self.path(".tmp"))
            base.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=base))
        else:
            staging = Path(tempfile.mkdtemp(prefix="interpflow-"))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit(self, directory: str, outputs: dict[str, Any], meta: dict[str, Any]) -> dict:
        """Write `outputs` and a manifest to `directory` atomically; return the manifest.

        If another writer committed the same directory first, its commit stands and is returned.
        """
        with self._staging() as staging:
            written = {name: _write_output(name, value, staging) for name, value in outputs.items()}
            files, mtimes = {}, {}
            for file in sorted(p for p in staging.rglob("*") if p.is_file()):
                rel = str(file.relative_to(staging))
                stat = file.stat()
                files[rel] = {"size": stat.st_size, "sha256": _sha256_local(file)}
                mtimes[rel] = stat.st_mtime_ns  # a rename keeps it: the cheap check of a cache hit
            # The digest names the data: metrics (timings among them) are kept beside it, not in it, so
            # two identical computations have one digest.
            metrics_files = {o.path for o in written.values() if o.name == "metrics"}
            manifest = {
                "format": MANIFEST_FORMAT,
                **meta,
                "files": files,
                **({"mtime_ns": mtimes} if self.is_local else {}),
                "digest": content_digest({rel: f for rel, f in files.items() if rel not in metrics_files}),
                "outputs": {o.name: {"kind": o.kind, "path": o.path, "rows": o.rows} for o in written.values()},
                "rows": sum(o.rows or 0 for o in written.values() if o.kind in ("table", "dataset")),
                "bytes": sum(f["size"] for f in files.values()),
                "committed_at": time.time(),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            return self._publish(staging, directory, manifest)

    def commit_manifest(self, directory: str, manifest: dict) -> dict:
        """Commit a manifest-only directory level (a sharded node over its committed shards)."""
        manifest = {"format": MANIFEST_FORMAT, **manifest, "committed_at": time.time()}
        self.write_json_atomic(f"{directory}/{MANIFEST}", manifest)
        return manifest

    def _publish(self, staging: Path, directory: str, manifest: dict) -> dict:
        existing, damage = self.inspect(directory)
        if existing is not None:
            return existing
        if damage is not None:  # a damaged commit the caller holds the lock of: make room
            self.quarantine(directory)
        parent = directory.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            if os.path.exists(directory) and not os.path.exists(os.path.join(directory, MANIFEST)) \
                    and not any(n.startswith("shard-") for n in os.listdir(directory)):
                shutil.rmtree(directory, ignore_errors=True)  # leftovers of an older, broken writer
            try:
                os.rename(staging, directory)
            except OSError:
                existing = self.committed(directory)
                if existing is None:
                    raise
                return existing
            return manifest
        # Object stores have no atomic directory rename: upload data files, then the manifest last.
        self._check_lock_not_lost(directory)
        for file in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST):
            dest = f"{directory}/{file.relative_to(staging)}"
            self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.write_json_atomic(f"{directory}/{MANIFEST}", manifest)
        return manifest

    def write_json_atomic(self, path: str, obj: Any) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def read_json(self, path: str) -> Any:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def quarantine(self, directory: str) -> str:
        """Move a corrupt commit aside (kept for inspection) so that it is recomputed."""
        rel = directory[len(self.root):].strip("/").replace("/", "--")
        dest = self.path(".quarantine", f"{rel}--{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}")
        self.fs.create_dir(self.path(".quarantine"), recursive=True)
        if self.is_local or self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            self.fs.move(directory, dest)
            return dest
        # An object store moves no directories: copy, then delete the manifest first (not committed from
        # that moment on), then the rest.
        pafs.copy_files(directory, dest, source_filesystem=self.fs, destination_filesystem=self.fs)
        self._remove(f"{directory}/{MANIFEST}")
        self.fs.delete_dir(directory)
        return dest

    # --- reading ---------------------------------------------------------------------------
    def load(self, directory: str, manifest: dict, output: str | None = None, verify: bool = True) -> Any:
        """Open a committed node's outputs: one value if `output` names one (or only one exists)."""
        if "shards" in manifest:
            return self._load_sharded(directory, manifest, output, verify)
        if verify:
            self.verify(directory, manifest)
        outputs = manifest["outputs"]
        # By default a node's value is its data: figures are for people, metrics for MLflow (ask
        # for them by name), unless metrics are all the node has.
        data = [n for n, o in outputs.items() if o["kind"] not in ("figure", "html") and n != "metrics"]
        names = [output] if output else (data or [n for n in outputs if n == "metrics"])
        values = {n: self._load_one(directory, outputs[n]) for n in names}
        if output or len(values) == 1:
            return next(iter(values.values()))
        return values

    def _load_one(self, directory: str, out: dict) -> Any:
        path = f"{directory}/{out['path']}"
        kind = out["kind"]
        if kind == "table":
            return pq.read_table(path, filesystem=self.fs)
        if kind in ("tensors", "ndarray"):
            with self.fs.open_input_stream(path) as f:
                data = f.read()
            if kind == "ndarray":
                from safetensors.numpy import load

                return load(data)["array"]
            from safetensors.torch import load

            tensors = load(data)
            return tensors["tensor"] if set(tensors) == {"tensor"} else tensors
        if kind == "json":
            return self.read_json(path)
        if kind in ("hf", "figure", "html"):
            return self.local_copy(path)
        if kind == "dataset":
            import datasets

            return datasets.load_from_disk(self.local_copy(path))
        raise StoreError(f"unknown output kind {kind!r} in {directory}")

    def local_copy(self, path: str) -> str:
        """A local filesystem path for `path` (itself on a local store; a cached download otherwise)."""
        if self.is_local:
            return path
        # Keyed by the file's size and time too (a recomputed artifact has the same path), and under the
        # file's own name (a figure is logged to MLflow by it). Downloaded beside it, then renamed.
        info = self.fs.get_file_info(path)
        version = f"{path}|{info.size}|{info.mtime_ns}" if info.type == pafs.FileType.File else path
        dest = Path(tempfile.gettempdir()) / "interpflow-cache" / hashlib.sha256(version.encode()).hexdigest()[:16] \
            / posixpath.basename(path)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
            if info.type == pafs.FileType.Directory:  # Arrow creates the folders it lists, not the root
                partial.mkdir()
            pafs.copy_files(path, str(partial), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            try:
                os.rename(partial, dest)
            except OSError:  # another process got there first
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        return str(dest)

    def _load_sharded(self, directory: str, manifest: dict, output: str | None, verify: bool) -> Any:
        """Tables open as one dataset over every shard; another output, named, as a list of per-shard values."""
        shard_dirs = [f"{directory}/{s['dir']}" for s in manifest["shards"]]
        shard_manifests = [self.read_manifest(d) for d in shard_dirs]
        for d, m in zip(shard_dirs, shard_manifests):
            if m is None:
                raise CorruptArtifact(manifest.get("node", "?"), manifest.get("key", "?"), d, "shard manifest missing")
            if verify:
                self.verify(d, m)
        if output and manifest["outputs"].get(output, {}).get("kind", "table") != "table":
            # tensors, JSON, ...: one value per shard, in shard order (e.g. per-example gradient blocks)
            return [self._load_one(d, m["outputs"][output]) for d, m in zip(shard_dirs, shard_manifests)
                    if output in m["outputs"]]
        import pyarrow.dataset as pads  # imported here: it loads pandas, which `interpflow ls` never needs

        names = [output] if output else [n for n, o in manifest["outputs"].items() if o["kind"] == "table"]
        datasets = {}
        for name in names:
            files = [f"{d}/{m['outputs'][name]['path']}" for d, m in zip(shard_dirs, shard_manifests)
                     if name in m["outputs"]]
            datasets[name] = pads.dataset(files, format="parquet", filesystem=self.fs)
        if output or len(datasets) == 1:
            return next(iter(datasets.values()))
        return datasets

    # --- locks -----------------------------------------------------------------------------
    def _lock_path(self, directory: str) -> str:
        rel = directory[len(self.root):].strip("/").replace("/", "--")
        return self.path(".locks", f"{rel}.lock")

    @contextmanager
    def lock(self, directory: str, stale_after_s: float = LOCK_STALE_S, poll_s: float = 0.2,
             is_done=None) -> Iterator[bool]:
        """Hold the write lock of `directory`; yields False if `is_done()` became true while waiting.

        Locks are files created exclusively, naming their holder (host, pid, process start time). The
        holder refreshes its lock every `stale_after_s / 6` s; a lock is broken when its holder is gone
        (same host: no such process, or the pid now names another process), when nobody refreshed it for
        `stale_after_s` (a hung or partitioned holder), or when it cannot be parsed and is over
        `UNREADABLE_LOCK_GRACE_S` old (a crash between creating and writing it, a full disk).

        On S3 every step is a conditional request (s3.py): create with If-None-Match, refresh, release
        and break with If-Match on the ETag last seen, so two drivers never both hold a lock, and a holder
        whose lock was broken learns it before it publishes (StoreError). Where the server ignores those
        headers, and on other object stores, it is best effort (README, "Hardening").
        """
        lock_path = self._lock_path(directory)
        self.fs.create_dir(self.path(".locks"), recursive=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _own_start_time(),
                 "token": uuid.uuid4().hex}
        while True:
            held = self._try_create(lock_path, owner)
            if held is not None:
                break
            if is_done is not None and is_done():
                yield False
                return
            stale = self._lock_is_stale(lock_path, stale_after_s)
            if stale:
                held = self._break(lock_path, owner, stale)
                if held is not None:
                    break
                continue
            time.sleep(poll_s)
        _HEARTBEAT.hold(self, held, stale_after_s / 6)
        try:
            yield True
        finally:
            _HEARTBEAT.release(lock_path)
            self._release(held)

    def _try_create(self, path: str, owner: dict) -> "_Held | None":
        data = json.dumps(owner).encode()
        if self.is_local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                return _Held(path, owner, str(os.fstat(f.fileno()).st_ino))
        if self._conditional is not None:
            etag = self._conditional.create(path, data)
            return None if etag is None else _Held(path, owner, etag)
        # Best effort on object stores without conditional writes: write, then read back to see whose
        # write won.
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            return None
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        time.sleep(0.05)
        try:
            return _Held(path, owner) if self.read_json(path).get("token") == owner["token"] else None
        except (OSError, ValueError, AttributeError):
            return None

    def _lock_is_stale(self, path: str, stale_after_s: float) -> Any:
        """False while the lock at `path` stands; else something true (on S3: the lock object as read,
        whose ETag guards the break)."""
        if self._conditional is not None:
            found = self._conditional.read(path)
            if found is None:
                return False  # released meanwhile: try to create it again
            age, raw = found.age_s, found.body
        elif self.is_local:
            found = _local_identity(path)
            if found is None:
                return False  # released meanwhile: try to create it again
            age, raw = time.time() - found[1] / 1e9, None
        else:
            info = self.fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                return False  # released meanwhile: try to create it again
            age = time.time() - (info.mtime.timestamp() if info.mtime else time.time())
            found, raw = True, None
        try:
            owner = json.loads(raw.decode()) if raw is not None else self.read_json(path)
            if not isinstance(owner, dict):
                raise ValueError("not a lock record")
        except (FileNotFoundError, OSError, ValueError):
            return found if age > UNREADABLE_LOCK_GRACE_S else False
        if owner.get("host") == socket.gethostname() and not _process_alive(owner.get("pid"), owner.get("started")):
            return found
        return found if age > stale_after_s else False

    def _break(self, path: str, owner: dict, stale: Any) -> "_Held | None":
        """Break a stale lock: the breaker takes it over only if it is still the lock it judged stale, so of
        two breakers one wins. On S3 one request guarded by the ETag it read; on a local store an atomic
        replace, checked (inode and mtime) under the store's lock guard; elsewhere it is removed, and the
        caller tries to create it again."""
        if self._conditional is not None:
            etag = self._conditional.replace(path, json.dumps(owner).encode(), stale.etag)
            return None if etag is None else _Held(path, owner, etag)
        if self.is_local:
            with _local_guard(path):
                if _local_identity(path) != stale:
                    return None  # broken by another driver, refreshed or released since it was judged
                staging = f"{path}.{owner['token']}.tmp"
                with open(staging, "wb") as f:
                    f.write(json.dumps(owner).encode())
                    inode = os.fstat(f.fileno()).st_ino
                os.replace(staging, path)
                return _Held(path, owner, str(inode))
        self._remove(path)
        return None

    def _refresh(self, held: "_Held") -> bool:
        """Refresh a held lock's heartbeat; False once the lock is known lost (broken by another driver)."""
        with held.guard:
            if held.released or held.lost:
                return not held.lost
            try:
                if self.is_local:
                    current = _local_identity(held.path)
                    held.lost = current is None or str(current[0]) != held.etag
                    if not held.lost:
                        os.utime(held.path)
                elif self._conditional is not None:
                    held.owner["beat"] = held.owner.get("beat", 0) + 1  # a new ETag each time: no ABA
                    etag = self._conditional.replace(held.path, json.dumps(held.owner).encode(), held.etag)
                    held.lost, held.etag = etag is None, etag or held.etag
                else:  # best effort: rewrite it if it still names this holder
                    held.lost = self.read_json(held.path).get("token") != held.owner["token"]
                    if not held.lost:
                        with self.fs.open_output_stream(held.path) as f:
                            f.write(json.dumps(held.owner).encode())
            except Exception:  # noqa: BLE001 - a transient failure (OSError, an S3 5xx): the next beat tries again
                pass
            if held.lost:
                warnings.warn(f"interpflow: the store lock {held.path} was broken by another driver",
                              RuntimeWarning, stacklevel=2)
            return not held.lost

    def _release(self, held: "_Held") -> None:
        with held.guard:
            held.released = True
            if self._conditional is not None:
                try:
                    if not held.lost:
                        self._conditional.delete(held.path, held.etag)
                except Exception:  # noqa: BLE001 - as `_remove`: a lock left behind goes stale after its lease
                    pass
                return
            if self.is_local:
                with _local_guard(held.path):
                    current = _local_identity(held.path)
                    if current is not None and str(current[0]) == held.etag:
                        self._remove(held.path)  # never a lock another driver took over
                return
            self._remove(held.path)

    def _check_lock_not_lost(self, directory: str) -> None:
        """Before publishing to an object store: if this process holds `directory`'s lock, refresh it now,
        and raise StoreError if another driver broke it (it may be writing the same files)."""
        held = _HEARTBEAT.held(self._lock_path(directory))
        if held is not None and not self._refresh(held):
            raise StoreError(f"the lock of {directory} was broken by another driver (not refreshed for "
                             f"{LOCK_STALE_S:.0f} s): not publishing over its work")

    def _remove(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass


def _local_identity(path: str) -> tuple[int, int] | None:
    """A local lock file's (inode, mtime in ns): a replaced or refreshed lock has another."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextmanager
def _local_guard(lock_path: str) -> Iterator[None]:
    """Serialise check-then-replace (a break) and check-then-remove (a release) of a local store's locks
    between processes: an flock on one file beside them (released by the kernel if the holder dies)."""
    fd = os.open(os.path.join(os.path.dirname(lock_path), ".guard"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sha256_local(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(eq=False)
class _Held:
    """A lock this process holds: its path, its record, and on S3 the ETag it last wrote."""

    path: str
    owner: dict
    etag: str | None = None
    lost: bool = False
    released: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)  # one refresh or release at a time


class _Heartbeat:
    """One thread per process refreshes every lock the process holds (a thread per lock cost more than
    a small shard's whole computation)."""

    def __init__(self):
        self._held: dict[str, tuple[Store, _Held, float, float]] = {}  # path -> (store, lock, period, last)
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def hold(self, store: "Store", held: _Held, period_s: float) -> None:
        with self._guard:
            self._held[held.path] = (store, held, period_s, time.monotonic())
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child has no thread of its parent's
                self._thread = threading.Thread(target=self._beat, name="interpflow-lock-heartbeat", daemon=True)
                self._thread.start()

    def held(self, path: str) -> _Held | None:
        with self._guard:
            entry = self._held.get(path)
        return None if entry is None else entry[1]

    def release(self, path: str) -> None:
        with self._guard:
            self._held.pop(path, None)

    def _beat(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._guard:
                due = [(store, held) for store, held, period, last in self._held.values() if now - last >= period]
                for store, held in due:
                    _, _, period, _ = self._held[held.path]
                    self._held[held.path] = (store, held, period, now)
            for store, held in due:
                try:
                    store._refresh(held)
                except Exception:  # noqa: BLE001 - a beat must never kill the thread; the next one retries
                    pass


_HEARTBEAT = _Heartbeat()


@functools.lru_cache(maxsize=1)
def _own_start_time_of(pid: int) -> float | None:
    return _process_started(pid)


def _own_start_time() -> float | None:
    return _own_start_time_of(os.getpid())


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: no start time to compare
        return None


def _process_alive(pid: Any, started: float | None = None) -> bool:
    """Is `pid` a live process on this host, and the same one that started at `started` (pids are reused)?"""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # alive but not ours to signal, or no pid to judge: let the heartbeat decide
    if started is not None:
        now_started = _process_started(pid)
        if now_started is not None and abs(now_started - float(started)) > 1.0:
            return False
    return True
