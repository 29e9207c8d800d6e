"""Content digests of values, files and folders: what node keys and the identities of external models
and datasets are made of (pure hashing, shared by tasks and the engine's keys)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: the same value always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def directory_digest(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Digest of every file (relative name + content) under `path`, optionally by suffix."""
    root = Path(path)
    entries = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if suffixes and not file.name.endswith(suffixes):
            continue
        entries[str(file.relative_to(root))] = file_digest(file)
    return sha256_text(canonical_json(entries))
