"""A researcher's own arrays for the SAE benchmarks: one ``.npz`` file, checked before any compute.

``identifiability`` reads ``X`` (rows, d) and the true dictionary ``atoms`` (n_atoms, d);
``stability`` reads ``X`` and, optionally, ``ids`` (rows,) (which example each row came from: the
halves split and the hold-out go by example, never splitting one example's rows) and ``labels``
(rows,) (a class per row, for plausibility). Shapes are read from the file's headers without loading
the arrays (``npz_shapes``), so a spec with the wrong width fails before anything trains.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .synthetic import as_activations


def absolute(value: str | None) -> str | None:
    """A data path as an absolute one: the node that reads it may run where the working directory differs."""
    return None if value is None else str(Path(value).expanduser().resolve())


def npz_shapes(path: str | Path, field: str) -> dict[str, tuple[int, ...]]:
    """{array name: shape} of an ``.npz`` file, from its headers only. ``field`` names the config field
    in error messages (e.g. ``identifiability.data.path``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field}: no file at '{path}'; give the path of a .npz file (np.savez(path, X=..., ...))")
    try:
        with zipfile.ZipFile(path) as zf:
            shapes = {}
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise ValueError(f"{field}: array '{name[:-4]}' in '{path}' holds Python objects; "
                                     f"save plain numeric arrays (object arrays need pickle, which is refused)")
                shapes[name[:-4]] = tuple(shape)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{field}: '{path}' is not a .npz file ({exc}); write it with np.savez") from None
    return shapes


def check_npz(path: str | Path, field: str, *, required: tuple[str, ...], optional: tuple[str, ...] = (),
              d_in: int | None = None, d_in_field: str = "sae.d_in") -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays a benchmark reads, with every mismatch named before compute."""
    shapes = npz_shapes(path, field)
    missing = [name for name in required if name not in shapes]
    if missing:
        raise ValueError(f"{field}: '{path}' has no array {', '.join(repr(m) for m in missing)} (it holds "
                         f"{sorted(shapes) or 'nothing'}); save it as np.savez(path, "
                         + ", ".join(f"{n}=..." for n in required) + ")")
    x = shapes["X"]
    if len(x) != 2 or x[0] == 0 or x[1] == 0:
        raise ValueError(f"{field}: X must be a non-empty (rows, d) matrix, got shape {x}")
    if "atoms" in shapes and "atoms" in required + optional:
        a = shapes["atoms"]
        if len(a) != 2 or a[1] != x[1] or a[0] == 0:
            raise ValueError(f"{field}: atoms must be (n_atoms, {x[1]}) to match X's width, got shape {a}")
    for name in ("ids", "labels"):
        if name in shapes and name in optional and shapes[name] != (x[0],):
            raise ValueError(f"{field}: {name} must have one entry per row of X ({x[0]},), got shape {shapes[name]}")
    if d_in is not None and d_in != x[1]:
        raise ValueError(f"{d_in_field}={d_in} does not match the width {x[1]} of X in '{path}'; "
                         f"set {d_in_field}={x[1]}")
    return shapes


def _finite_rows(x: np.ndarray, name: str, path: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"'{path}': {name} has NaN/Inf in row {row} ({int(bad.sum())} of {t.shape[0]} rows); "
                         f"clean or drop those rows")
    return t


def load_rows(path: str | Path, *, with_atoms: bool = False) -> dict:
    """The arrays of one checked ``.npz`` as the benchmark nodes take them: ``activations`` (the table
    the extraction node would store: id, position, vector), ``data`` (id, and label when given) and,
    with ``with_atoms``, the true ``dictionary``."""
    path = str(path)
    required = ("X", "atoms") if with_atoms else ("X",)
    check_npz(path, "data.path", required=required, optional=("ids", "labels"))
    with np.load(path, allow_pickle=False) as arrays:
        x = _finite_rows(arrays["X"], "X", path)
        ids = np.asarray(arrays["ids"]) if "ids" in arrays.files else np.arange(x.shape[0], dtype=np.int64)
        labels = np.asarray(arrays["labels"]) if "labels" in arrays.files else None
        atoms = _finite_rows(arrays["atoms"], "atoms", path) if with_atoms else None
    table = as_activations(x, tokens_per_example=1)
    table = table.set_column(0, "id", pa.array(ids))
    positions = np.zeros(len(ids), dtype=np.int32)           # rows of one example get positions 0, 1, ...
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.r_[0, np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    positions[order] = (np.arange(len(ids)) - run_start).astype(np.int32)
    table = table.set_column(1, "position", pa.array(positions))
    unique_ids = np.unique(ids)
    data = {"id": pa.array(unique_ids)}
    if labels is not None:
        by_id = {}
        for i, label in zip(ids.tolist(), labels.tolist()):
            if by_id.setdefault(i, label) != label:
                raise ValueError(f"'{path}': example id {i!r} has rows with different labels "
                                 f"({by_id[i]!r} and {label!r}); a label belongs to an example")
        data["label"] = pa.array([by_id[i] for i in unique_ids.tolist()])
    out = {"activations": table, "data": pa.table(data)}
    if with_atoms:
        out["dictionary"] = atoms
    return out
