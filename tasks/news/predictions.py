"""Predictions files: how any system's outputs enter the benchmark, and the two reference systems.

One JSONL file per task in a predictions folder (any subset of the four)::

    captioning.jsonl   {"id": "<video id>", "caption": "..."}
    paragraph.jsonl    {"id": "<video id>", "paragraph": "..."}
    keywords.jsonl     {"id": "<video id>", "keywords": ["...", "..."]}
    retrieval.jsonl    {"id": "<query id>", "direction": "video_to_text" | "text_to_video",
                        "ranking": ["<candidate id>", ...]}     (a text is named by its video's id)

Scored on the test split. A test video without a prediction is scored as an empty prediction (worst
case) and counted as missing; a prediction for an id outside the test split is counted and ignored; a
task without a file in the folder is not scored for that system.
``oracle`` writes the ground truth itself; ``shuffled`` gives every video another test video's truth
(a random derangement) and random rankings: the chance level of every metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from interpflow.tasks.news.baselines import split_ids

# task: (prediction column, reference field of the annotations)
TASKS = {"captioning": ("caption", "visual_description"), "paragraph": ("paragraph", "story_description"),
         "keywords": ("keywords", "keywords"), "retrieval": ("ranking", "id")}
DIRECTIONS = ("video_to_text", "text_to_video")


def _truth(items: pa.Table, task: str, ids: list[str]) -> list:
    field = TASKS[task][1]
    by_id = dict(zip(items.column("id").to_pylist(), items.column(field).to_pylist()))
    return [by_id[i] for i in ids]


def oracle(items: pa.Table, split: str = "test") -> dict[str, pa.Table]:
    """The ground truth as predictions: every metric's best score."""
    ids = split_ids(items, split)
    out = {task: pa.table({"id": ids, column: _truth(items, task, ids)})
           for task, (column, _) in TASKS.items() if task != "retrieval"}
    rows = [{"id": i, "direction": d, "ranking": [i] + [j for j in ids if j != i]} for d in DIRECTIONS for i in ids]
    out["retrieval"] = pa.Table.from_pylist(rows)
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (n >= 2), by rejection (accepted ~1/e of the time)."""
    if n < 2:
        raise ValueError("a shuffled predictions file needs at least 2 test videos")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def shuffled(items: pa.Table, seed: int = 0, split: str = "test") -> dict[str, pa.Table]:
    """Every video gets another test video's truth, and every query a random ranking: chance level."""
    ids = split_ids(items, split)
    rng = np.random.default_rng(seed)
    perm = derangement(len(ids), rng)
    out = {task: pa.table({"id": ids, column: [_truth(items, task, ids)[p] for p in perm]})
           for task, (column, _) in TASKS.items() if task != "retrieval"}
    rows = [{"id": i, "direction": d, "ranking": [ids[j] for j in rng.permutation(len(ids))]}
            for d in DIRECTIONS for i in ids]
    out["retrieval"] = pa.Table.from_pylist(rows)
    return out


def tasks_in_folder(path: str) -> list[str]:
    """The tasks a predictions folder has a file for (a task without one is not scored for that system)."""
    return [task for task in TASKS if (Path(path) / f"{task}.jsonl").exists()]


def read_folder(path: str) -> dict[str, pa.Table]:
    """The predictions files in a folder, each checked for its columns (one clear error per file)."""
    import pyarrow.json as pajson

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"predictions {path!r} is not a folder; it should hold captioning.jsonl, "
                         f"paragraph.jsonl, keywords.jsonl and/or retrieval.jsonl")
    found = {task: folder / f"{task}.jsonl" for task in tasks_in_folder(path)}
    if not found:
        raise ValueError(f"predictions {path!r} holds none of {', '.join(t + '.jsonl' for t in TASKS)}")
    out = {}
    for task, file in found.items():
        table = pajson.read_json(file)
        need = ["id", TASKS[task][0]] + (["direction"] if task == "retrieval" else [])
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise ValueError(f"{file}: column(s) {missing} missing; a {task} row is "
                             f"{{{', '.join(repr(c) for c in need)}}}")
        out[task] = table.cast(table.schema.set(table.schema.get_field_index("id"), pa.field("id", pa.string())))
    return out


def folder_identity(path: str) -> dict[str, str]:
    """What a predictions folder is, for node keys: the digest of its predictions files."""
    import hashlib

    digest = hashlib.sha256()
    for task in TASKS:
        file = Path(path) / f"{task}.jsonl"
        if file.exists():
            digest.update(task.encode() + hashlib.sha256(file.read_bytes()).digest())
    return {"path": str(Path(path).resolve()), "digest": digest.hexdigest()}


def align(predictions: pa.Table, task: str, ids: list[str], direction: str | None = None) -> tuple[list, dict]:
    """The predictions for ``ids`` in their order (missing: empty), and counts of missing and unknown ids."""
    rows = predictions.to_pylist()
    if direction is not None:
        rows = [r for r in rows if r["direction"] == direction]
    column = TASKS[task][0]
    given = {str(r["id"]): r[column] for r in rows}
    empty = [] if task in ("keywords", "retrieval") else ""
    wanted = set(ids)
    aligned = [given.get(i, empty) or empty for i in ids]
    return aligned, {"missing": sum(i not in given for i in ids), "unknown": sum(i not in wanted for i in given)}
