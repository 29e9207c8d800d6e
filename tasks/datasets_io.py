"""User datasets in place of the embedded corpus: a `save_to_disk` folder, data files, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

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
    from interpflow.tasks.digests import directory_digest, file_digest

    kind = _kind(cfg)
    path = Path(cfg.path).expanduser().resolve()
    if kind in ("disk", "folder"):
        return {"path": str(path), "digest": directory_digest(path), "split": cfg.split, "limit": cfg.limit}
    if kind == "file":
        return {"path": str(path), "digest": file_digest(path), "split": cfg.split, "limit": cfg.limit}
    return {"id": cfg.path, "revision": cfg.revision or "main", "split": cfg.split, "limit": cfg.limit}


MAX_LINE_BYTES = 64 * 2**20  # a JSON Lines/text line longer than this is not a dataset row


class _LongLine(ValueError):
    pass


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, sort_keys=True)


class _RowChecker:
    """Checks rows one at a time: text columns present and strings, other columns present, ids unique."""

    def __init__(self, field: str, name: str, text_columns: Sequence[str], columns: Sequence[str],
                 id_column: str | None, unit: str):
        self.field, self.name, self.unit = field, name, unit
        self.text_columns, self.columns, self.id_column = tuple(text_columns), tuple(columns), id_column
        self.seen: dict[Any, int] = {}
        self.rows = 0
        self.first_without_id: int | None = None

    def row(self, where: int, row: dict) -> None:
        self.rows += 1
        for column in self.text_columns:
            if column not in row:
                raise ValueError(f"{self.field}: {self.unit} {where} of {self.name} has no '{column}' field; "
                                 f"every row needs a '{column}' string (fix that {self.unit} or remove it)")
            if not isinstance(row[column], str):
                raise ValueError(f"{self.field}: {self.unit} {where} of {self.name} has a '{column}' that is "
                                 f"not a string (got {type(row[column]).__name__}); make it a string")
        for column in self.columns:
            if column not in row:
                raise ValueError(f"{self.field}: {self.unit} {where} of {self.name} has no '{column}' field; "
                                 f"every row needs one (fix that {self.unit} or remove it)")
        if self.id_column is None:
            return
        if self.id_column not in row:
            if self.first_without_id is None:
                self.first_without_id = where
            if self.seen:
                self._missing_id(where)
            return
        if self.first_without_id is not None:
            self._missing_id(self.first_without_id)
        key = _hashable(row[self.id_column])
        if key in self.seen:
            raise ValueError(f"{self.field}: {self.name} has duplicate {self.id_column} {row[self.id_column]!r} "
                             f"({self.unit}s {self.seen[key]} and {where}); ids must be unique: renumber them, "
                             f"or drop the '{self.id_column}' column to number rows by position")
        self.seen[key] = where

    def _missing_id(self, where: int) -> None:
        raise ValueError(f"{self.field}: {self.unit} {where} of {self.name} has no '{self.id_column}' field while "
                         f"other rows have one; give every row an id, or none")

    def done(self) -> None:
        if self.rows == 0:
            raise ValueError(f"{self.field}: {self.name} holds no examples: the dataset is empty; give a file "
                             "with at least one row")


def check_data_file(path: str | Path, field: str = "dataset.path", text_columns: Sequence[str] = ("text",),
                    columns: Sequence[str] = (), id_column: str | None = "id", limit: int | None = None) -> None:
    """Before any compute, that a local data file (json/jsonl/csv/parquet/txt) will load and has what a
    study reads: UTF-8 text, one JSON object per JSON Lines line, `text_columns` (strings) and `columns`
    present in every row, no duplicate `id_column` value when that column exists. Reads row by row
    (memory bounded by the longest line or one batch); `limit` checks only the rows that will be used.
    Raises ValueError naming `field`, the file, the line or row, and the fix."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{field}: '{path.name}' is not a data file this reads ({', '.join(sorted(FILE_FORMATS))})")
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no file '{path}'")
    if suffix == ".parquet":
        _check_parquet(path, field, text_columns, columns, id_column, limit)
    elif suffix == ".csv":
        _check_csv(path, field, text_columns, columns, id_column, limit)
    elif suffix == ".txt":
        _check_text(path, field, text_columns, columns, limit)
    else:
        _check_json(path, field, text_columns, columns, id_column, limit)


def _lines(path: Path, field: str):
    """(1-based line number, decoded line) of a UTF-8 text file, one line in memory at a time."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise _LongLine(f"{field}: line {number} of {path.name} is longer than {MAX_LINE_BYTES >> 20} MiB: "
                                 "not a line-oriented text file? Give a UTF-8 data file with one row per line")
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{field}: line {number} of {path.name} is not UTF-8 text (is it a binary "
                                 f"file?); give a UTF-8 {path.suffix.lstrip('.')} file") from None


def _check_text(path: Path, field: str, text_columns: Sequence[str], columns: Sequence[str],
                limit: int | None) -> None:
    missing = [c for c in (*text_columns, *columns) if c != "text"]
    if missing:
        raise ValueError(f"{field}: {path.name} is a plain text file, whose rows have only a 'text' column, but "
                         f"this study reads {missing}; give a jsonl/csv/parquet file with those columns")
    rows = 0
    for _, line in _lines(path, field):
        rows += bool(line.strip())
        if limit is not None and rows >= limit:
            break
    if rows == 0:
        raise ValueError(f"{field}: {path.name} holds no examples: the dataset is empty; give a file with at "
                         "least one row")


def _check_json(path: Path, field: str, text_columns: Sequence[str], columns: Sequence[str],
                id_column: str | None, limit: int | None) -> None:
    checker = _RowChecker(field, path.name, text_columns, columns, id_column, "line")
    document = path.suffix.lower() == ".json"  # may hold one JSON document instead of JSON Lines
    try:
        _check_json_lines(path, field, checker, document, limit)
    except _LongLine:
        if not document or checker.rows:
            raise
        _check_json_document(path, field, checker, limit)


def _check_json_lines(path: Path, field: str, checker: _RowChecker, document: bool, limit: int | None) -> None:
    first = True
    for number, line in _lines(path, field):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if first and document:  # one JSON document (a list of rows), not JSON Lines
                return _check_json_document(path, field, checker, limit)
            raise ValueError(f"{field}: line {number} of {path.name} is not valid JSON ({exc.msg}, column "
                             f"{exc.colno}); give one JSON object per line") from None
        if first and document and isinstance(row, list):
            return _check_json_document(path, field, checker, limit)
        first = False
        if not isinstance(row, dict):
            raise ValueError(f"{field}: line {number} of {path.name} is a JSON {type(row).__name__}, not an "
                             "object; give one JSON object per line ({\"text\": ...})")
        checker.row(number, row)
        if limit is not None and checker.rows >= limit:
            break
    checker.done()


def _check_json_document(path: Path, field: str, checker: _RowChecker, limit: int | None) -> None:
    """A .json file holding one document: a list of row objects (read whole, as `datasets` reads it)."""
    checker.unit = "record"
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{field}: {path.name} is not UTF-8 text (is it a binary file?); give a UTF-8 json "
                         "file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: {path.name} is neither JSON Lines nor one JSON document ({exc.msg} at line "
                         f"{exc.lineno}, column {exc.colno}); fix the JSON") from None
    if isinstance(data, dict):
        return  # a mapping: `datasets` reads its columns (or a `field`); it checks this itself
    if not isinstance(data, list):
        raise ValueError(f"{field}: {path.name} holds a JSON {type(data).__name__}; give a list of row objects "
                         "or JSON Lines")
    for number, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{field}: record {number} of {path.name} is a JSON {type(row).__name__}, not an "
                             "object; give a list of row objects")
        checker.row(number, row)
        if limit is not None and checker.rows >= limit:
            break
    checker.done()


def _arrow_problem(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _check_batches(batches, checker: _RowChecker, text_columns: Sequence[str], field: str, name: str,
                   limit: int | None, first_row: int) -> None:
    """Columnar rows: the text columns' first null, the id column's duplicates (row numbers from `first_row`)."""
    import pyarrow as pa

    row = first_row
    for batch in batches:
        for column in text_columns:
            array = batch.column(column)
            if not _is_text(array.type):
                raise ValueError(f"{field}: column '{column}' of {name} holds {array.type}, not text; make it "
                                 "a string column")
            if array.null_count:
                at = row + next(i for i, v in enumerate(array.is_null().to_pylist()) if v)
                raise ValueError(f"{field}: row {at} of {name} has no '{column}' value; every row needs a "
                                 f"'{column}' string (fix that row or remove it)")
        if checker.id_column is not None and checker.id_column in batch.schema.names:
            for i, value in enumerate(batch.column(checker.id_column).to_pylist()):
                checker.row(row + i, {checker.id_column: value})
        else:
            checker.rows += batch.num_rows
        row += batch.num_rows
        if limit is not None and checker.rows >= limit:
            break
    checker.done()


def _is_text(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) \
        or getattr(pa.types, "is_string_view", lambda _: False)(t)


def _check_columns(names: Sequence[str], field: str, name: str, text_columns: Sequence[str],
                   columns: Sequence[str]) -> None:
    missing = [c for c in (*text_columns, *columns) if c not in names]
    if missing:
        raise ValueError(f"{field}: {name} has no column(s) {missing} (its columns: {list(names)}); add them "
                         "or point the study at the columns it has")


def _check_csv(path: Path, field: str, text_columns: Sequence[str], columns: Sequence[str],
               id_column: str | None, limit: int | None) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    for _ in _lines(path, field):  # UTF-8 with a line number, before Arrow's block-wise parse
        pass
    names = next((line for _, line in _lines(path, field)), "")
    if not names.strip():
        raise ValueError(f"{field}: {path.name} holds no examples: the dataset is empty (no header row); give a "
                         "CSV file with a header and at least one row")
    convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in text_columns},
                                  strings_can_be_null=True)
    checker = _RowChecker(field, path.name, (), (), id_column, "row")
    try:
        reader = pcsv.open_csv(path, convert_options=convert)
        _check_columns(reader.schema.names, field, path.name, text_columns, columns)
        _check_batches(reader, checker, text_columns, field, path.name, limit, first_row=1)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{field}: {path.name} is not a readable CSV file ({_arrow_problem(exc)}); fix the "
                         "file") from None


def _check_parquet(path: Path, field: str, text_columns: Sequence[str], columns: Sequence[str],
                   id_column: str | None, limit: int | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{field}: {path.name} is not a valid Parquet file ({_arrow_problem(exc)}); re-write "
                         "it (e.g. pandas.DataFrame.to_parquet)") from None
    names = parquet.schema_arrow.names
    _check_columns(names, field, path.name, text_columns, columns)
    read = list(text_columns) + ([id_column] if id_column in names else [])
    checker = _RowChecker(field, path.name, (), (), id_column, "row")
    if not read:
        checker.rows = parquet.metadata.num_rows
        return checker.done()
    try:
        _check_batches(parquet.iter_batches(columns=read), checker, text_columns, field, path.name, limit,
                       first_row=1)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{field}: {path.name} is not a readable Parquet file ({_arrow_problem(exc)}); re-write "
                         "it") from None


def check_source(cfg: DatasetSource, field: str = "dataset.path", text_columns: Sequence[str] = ("text",),
                 columns: Sequence[str] = (), id_column: str | None = "id") -> None:
    """`check_data_file` for a source that is a local data file (folders and hub ids are left to `datasets`)."""
    if _kind(cfg) == "file":
        check_data_file(cfg.path, field, text_columns, columns, id_column, cfg.limit)


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
