"""The on-disk layout of a ReutersViLNews copy, its validation, and chunked video decoding (PyAV).

Layout (a user's copy, or the generated stand-in)::

    <root>/annotations.jsonl      (or annotations.csv / annotations.parquet): one row per video
    <root>/videos/<id>.<ext>      one video per row (any container FFmpeg reads: .mp4, .mkv, .webm, ...)

Columns: ``id`` (unique), ``category`` (one of CATEGORIES), ``title``, ``visual_description``,
``story_description``, ``keywords`` (a list, or one string split on ``;``), ``location``, ``split``
(``train``, ``val`` or ``test``); an optional ``video`` column gives the file's path relative to the
root instead of ``videos/<id>.*``. Every problem is reported as one line; with ``on_problem: skip`` the
rows with problems are left out and counted in the report, never dropped silently.

Frame sampling (``SamplingConfig``): a model sees clips of ``clip_frames`` frames.
  * ``uniform``  one clip whose frames are spread evenly over the whole video (a coarse view);
  * ``segments`` up to ``max_segments`` clips of consecutive frames (every ``stride``-th), spread
    evenly over the video; the video's embedding is the mean over its clips (local motion is kept).
Decoding streams the file and keeps only the sampled frames, so memory does not grow with its length.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

CATEGORIES = ("disaster", "finance", "entertainment", "health", "politics", "sports", "miscellaneous")
TEXT_FIELDS = ("title", "visual_description", "story_description", "location")
REQUIRED = ("id", "category", *TEXT_FIELDS, "keywords", "split")
SPLITS = ("train", "val", "test")
ANNOTATIONS = "annotations.jsonl"
ANNOTATION_FILES = ("annotations.jsonl", "annotations.csv", "annotations.parquet")
VIDEO_DIR = "videos"


class NewsLayoutError(ValueError):
    """A copy that does not follow the layout; the message has one line per problem."""


class NewsDatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="root of a copy in the documented layout (null: the generated "
                                               "stand-in)")
    on_problem: Literal["error", "skip"] = Field("error", description=(
        "error: stop before compute and list every problem; skip: leave out the rows with problems, "
        "counted per reason in the report"))


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["uniform", "segments"] = Field("segments", description=(
        "uniform: one clip spread over the whole video; segments: clips of consecutive frames spread "
        "over the video, embeddings averaged"))
    clip_frames: int = Field(8, ge=1, description="frames per clip (the video model's num_frames)")
    stride: int = Field(1, ge=1, description="segments: take every stride-th frame inside a segment")
    max_segments: int = Field(8, ge=1, description="segments: at most this many clips per video")


# ------------------------------------------------------------------------------------------- video I/O

def write_video(path: Path | str, frames: np.ndarray, fps: int) -> None:
    """uint8 frames (T, H, W, 3) as an H.264 MP4 (near-lossless, constant rate factor 10)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_count(path: Path | str) -> int:
    """Frames in the first video stream: the container's count, or (if it has none) its packets, counted
    without decoding."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def sample_clips(n_frames: int, cfg: SamplingConfig) -> list[list[int]]:
    """Frame indices of each clip a video of ``n_frames`` frames is seen as (see the module docstring).
    A video shorter than a clip repeats its last frame."""
    if n_frames < 1:
        raise ValueError("a video without frames has no clips")
    if cfg.policy == "uniform":
        return [[min(n_frames - 1, int((j + 0.5) * n_frames / cfg.clip_frames)) for j in range(cfg.clip_frames)]]
    span = (cfg.clip_frames - 1) * cfg.stride + 1
    n_clips = max(1, min(cfg.max_segments, n_frames // span))
    room = max(0, n_frames - span)
    starts = [room // 2] if n_clips == 1 else [round(s * room / (n_clips - 1)) for s in range(n_clips)]
    return [[min(n_frames - 1, start + k * cfg.stride) for k in range(cfg.clip_frames)] for start in starts]


def decode_frames(path: Path | str, indices: list[int], size: int | None = None) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as uint8 (len(indices), H, W, 3), decoded in one
    streaming pass that keeps only those frames and stops after the last one; ``size`` resizes to a square."""
    import av

    wanted = set(indices)
    last = max(indices)
    kept: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                if size is not None and (frame.width != size or frame.height != size):
                    frame = frame.reformat(width=size, height=size)
                kept[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    missing = sorted(wanted - set(kept))
    if missing:
        # the container over-counted its frames: fall back to the last decoded one
        fallback = kept[max(kept)] if kept else None
        if fallback is None:
            raise ValueError(f"{path}: no frame could be decoded")
        kept.update({i: fallback for i in missing})
    return np.stack([kept[i] for i in indices])


# ------------------------------------------------------------------------------------------- annotations

def find_annotations(root: Path) -> Path:
    found = [root / name for name in ANNOTATION_FILES if (root / name).exists()]
    if not found:
        raise NewsLayoutError(f"{root}: no annotations file; expected one of {', '.join(ANNOTATION_FILES)} "
                              f"at the root (see the layout in the README)")
    if len(found) > 1:
        raise NewsLayoutError(f"{root}: several annotations files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def read_annotations(path: Path) -> pa.Table:
    if path.suffix == ".jsonl":
        import pyarrow.json as pajson

        return pajson.read_json(path)
    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _keywords(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [k.strip() for k in value.split(";") if k.strip()]
    return [str(k).strip() for k in value if str(k).strip()]


def _video_path(root: Path, row: dict, listing: dict[str, Path]) -> Path | None:
    if row.get("video"):
        path = root / str(row["video"])
        return path if path.exists() else None
    return listing.get(str(row["id"]))


def validate_copy(root: str | Path) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """The rows of a copy and its problems, each ``(reason, id, message)``; a missing column or annotations file
    raises at once (nothing else can be checked without it)."""
    root = Path(root)
    if not root.is_dir():
        raise NewsLayoutError(f"dataset.path {str(root)!r} is not a directory; point it at the root of the copy")
    annotations = find_annotations(root)
    table = read_annotations(annotations)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise NewsLayoutError("\n".join(f"{annotations.name}: column {c!r} is missing (required columns: "
                                        f"{', '.join(REQUIRED)})" for c in missing))
    listing = {p.stem: p for p in (root / VIDEO_DIR).glob("*") if p.is_file()} if (root / VIDEO_DIR).is_dir() else {}
    rows, problems = table.to_pylist(), []
    seen: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        seen.setdefault(str(row["id"]), []).append(i)
    for ident, where in seen.items():
        if len(where) > 1:
            problems.append(("duplicate_id", ident, f"id {ident!r} appears {len(where)} times (rows "
                                             f"{', '.join(str(w + 1) for w in where)}); ids must be unique"))
    for i, row in enumerate(rows):
        ident = str(row["id"])
        where = f"row {i + 1} (id {ident!r})"
        if row["category"] not in CATEGORIES:
            problems.append(("unknown_category", ident, f"{where}: category {row['category']!r} is not one of "
                                                 f"{', '.join(CATEGORIES)}"))
        if row["split"] not in SPLITS:
            problems.append(("unknown_split", ident, f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}"))
        for field in TEXT_FIELDS:
            if not isinstance(row[field], str) or not row[field].strip():
                problems.append(("empty_text", ident, f"{where}: {field} is empty"))
        video = _video_path(root, row, listing)
        if video is None:
            expected = row.get("video") or f"{VIDEO_DIR}/{ident}.<ext>"
            problems.append(("missing_video", ident, f"{where}: video file {expected} not found under {root}"))
        row["video_path"] = str(video) if video else None
        row["keywords"] = _keywords(row["keywords"])
    return rows, problems


def load_news(cfg: NewsDatasetConfig, root: str | None = None) -> dict:
    """Graph node: the copy's valid rows (a table with the absolute video path and its frame count) and a
    report of what was left out and why."""
    root = root if root is not None else cfg.path
    rows, problems = validate_copy(root)
    if problems and cfg.on_problem == "error":
        raise NewsLayoutError(f"{len(problems)} problem(s) in the copy at {root} (set dataset.on_problem=skip "
                              f"to leave those rows out):\n" + "\n".join(m for _, _, m in problems))
    bad_ids = {ident for _, ident, _ in problems}
    kept, counts = [], {}
    for reason, _, _ in problems:
        counts[reason] = counts.get(reason, 0) + 1
    for row in rows:
        if str(row["id"]) in bad_ids:
            continue
        try:
            row["n_frames"] = frame_count(row["video_path"])
        except Exception as exc:  # an unreadable file is a problem of the copy, reported like the others
            message = f"id {str(row['id'])!r}: video {row['video_path']} cannot be decoded ({type(exc).__name__}: {exc})"
            if cfg.on_problem == "error":
                raise NewsLayoutError(message) from None
            problems.append(("undecodable_video", str(row["id"]), message))
            counts["undecodable_video"] = counts.get("undecodable_video", 0) + 1
            continue
        kept.append(row)
    if not kept:
        raise NewsLayoutError(f"no usable rows in the copy at {root}:\n" + "\n".join(m for _, _, m in problems))
    columns = ["id", "category", *TEXT_FIELDS, "keywords", "split", "video_path", "n_frames"]
    table = pa.table({c: [(str(r[c]) if c == "id" else r[c]) for r in kept] for c in columns})
    skipped = len(rows) - len(kept)
    report = {"rows": len(rows), "kept": len(kept), "skipped": skipped, "problems": [m for _, _, m in problems],
              "skipped_by_reason": counts}
    metrics = {"rows": len(rows), "kept": len(kept), "skipped": skipped,
               **{f"problems.{k}": v for k, v in counts.items()},
               **{f"split.{s}": sum(r["split"] == s for r in kept) for s in SPLITS}}
    return {"items": table, "report": report, "metrics": metrics}


def copy_identity(path: str) -> dict[str, str]:
    """What a user's copy is, for node keys: the annotations file's digest and every video's name and size."""
    root = Path(path)
    digest = hashlib.sha256()
    annotations = find_annotations(root)
    digest.update(annotations.read_bytes())
    for video in sorted((root / VIDEO_DIR).glob("*")) if (root / VIDEO_DIR).is_dir() else []:
        digest.update(f"{video.name}:{video.stat().st_size}".encode())
    return {"path": str(root.resolve()), "digest": digest.hexdigest()}


def item_ids(cfg, items, **_) -> list[str]:
    """Stable shard ids: the copy's video ids, in annotation order."""
    return items.column("id").to_pylist()
