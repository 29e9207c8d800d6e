"""User datasets in place of the embedded corpus: a `save_to_disk` folder, data files, or a hub id."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DatasetSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="load_from_disk folder, a data file (json/jsonl/csv/parquet/txt), or hub id")
    split: str = "train"
    revision: str | None = None
    limit: int | None = Field(None, ge=1, description="keep the first N examples")


def _kind(cfg: DatasetSource) -> str:
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return "disk" if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
            or (path / "dataset_dict.json").exists() else "folder"
    if path.suffix in FILE_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"dataset.path: no file '{cfg.path}'")
        return "file"
    if cfg.path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset.path: no file or folder '{cfg.path}'")
    return "hub"


def dataset_identity(cfg: DatasetSource) -> dict:
    """Digests of local data files (the node key follows their content), else hub id + revision."""
    from interpflow.workflows.engine.keys import directory_digest, file_digest

    kind = _kind(cfg)
    path = Path(cfg.path).expanduser().resolve()
    if kind in ("disk", "folder"):
        return {"path": str(path), "digest": directory_digest(path), "split": cfg.split, "limit": cfg.limit}
    if kind == "file":
        return {"path": str(path), "digest": file_digest(path), "split": cfg.split, "limit": cfg.limit}
    return {"id": cfg.path, "revision": cfg.revision or "main", "split": cfg.split, "limit": cfg.limit}


def _file_is_empty(path: Path) -> bool:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return len(lines) <= (1 if path.suffix == ".csv" else 0)


def load_source(cfg: DatasetSource):
    """The dataset as a `datasets.Dataset`; an `id` column (row index) is added if it has none."""
    import datasets

    kind = _kind(cfg)
    if kind == "disk":
        data = datasets.load_from_disk(str(Path(cfg.path).expanduser()))
        if isinstance(data, datasets.DatasetDict):
            if cfg.split not in data:
                raise ValueError(f"dataset.split: '{cfg.split}' not in {sorted(data)}")
            data = data[cfg.split]
    elif kind == "file":
        path = Path(cfg.path).expanduser()
        if _file_is_empty(path):  # `datasets` fails on these with an unhelpful generation error
            raise ValueError(f"dataset.path: '{cfg.path}' holds no examples: the dataset is empty")
        data = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    elif kind == "folder":
        data = datasets.load_dataset(str(Path(cfg.path).expanduser()), split=cfg.split)
    else:
        data = datasets.load_dataset(cfg.path, split=cfg.split, revision=cfg.revision)
    if cfg.limit is not None:
        data = data.select(range(min(cfg.limit, data.num_rows)))
    if "id" not in data.column_names:
        data = data.add_column("id", list(range(data.num_rows)))
    return data
