"""How a run executes (where the store and MLflow live, retries, Ray address): policy as data."""

from __future__ import annotations

import builtins
import importlib
import os
import warnings
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

# `run.register` names a field like ABCMeta.register, a method of the model class, never of its instances
warnings.filterwarnings("ignore", message='Field name "register" in "RunSettings" shadows', category=UserWarning)


class RunSettings(BaseModel):
    """The `run:` section of a spec. Nothing here changes what a node computes, so none of it is
    part of a node's key."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(default_factory=lambda: os.environ.get("INTERPFLOW_STORE", ".interpflow/store"),
                       description="artifact store: a local directory or a pyarrow.fs URI (s3://, gs://)")
    tracking_uri: str | None = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI"),
                                     description="MLflow tracking URI; default SQLite beside a local store")
    experiment: str = Field(default_factory=lambda: os.environ.get("MLFLOW_EXPERIMENT_NAME") or "interpflow",
                            description="MLflow experiment; default MLFLOW_EXPERIMENT_NAME or 'interpflow'")
    lineage: bool = Field(True, description="record the run in MLflow")
    register: bool = Field(False, description="register every model a node logs (hf outputs) in the MLflow "
                                              "model registry as <workflow>.<node>")
    address: str | None = Field(None, description="Ray address; default RAY_ADDRESS or a private local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a private local Ray cluster")
    max_retries: int = Field(2, ge=0, description="Ray retries of a task after a worker or node dies")
    retry_exceptions: list[str] = Field(default_factory=lambda: ["ConnectionError", "TimeoutError"],
                                        description="exception class names that Ray retries as transient")
    verify: bool = Field(True, description="check sha256 of every artifact a node reads")
    progress: bool = True

    @field_validator("retry_exceptions")
    @classmethod
    def _known_exceptions(cls, names: list[str]) -> list[str]:
        for name in names:
            exception_class(name)
        return names

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if "://" in self.store:
            raise ValueError("run.tracking_uri must be set when run.store is a remote URI "
                             "(an MLflow tracking server the cluster can reach)")
        db = Path(self.store).expanduser().resolve().parent / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"

    def resolved_store(self) -> str:
        return self.store if "://" in self.store else str(Path(self.store).expanduser().resolve())


def exception_class(name: str) -> type[BaseException]:
    """The exception class `name` stands for: a builtin (`ConnectionError`) or a dotted `module.Class`
    (`requests.exceptions.ConnectionError`; the module is imported). ValueError naming
    `run.retry_exceptions` and the fix if it names none."""
    fix = ("Fix: give a builtin exception name (ConnectionError, TimeoutError, OSError, ...) or an importable "
           "dotted module.Class")
    if not isinstance(name, str) or not name.strip() or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"run.retry_exceptions: {name!r} is not an exception class name. {fix}")
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's bad name
            raise ValueError(f"run.retry_exceptions: cannot import module '{module}' for {name!r} "
                             f"({type(exc).__name__}). {fix}") from None
    else:
        found = getattr(builtins, name, None)
    if found is None:
        where = f"module '{name.rpartition('.')[0]}'" if "." in name else "Python's builtins"
        raise ValueError(f"run.retry_exceptions: no exception {name!r} in {where}. {fix}")
    if not (isinstance(found, type) and issubclass(found, Exception)):
        raise ValueError(f"run.retry_exceptions: {name!r} is not an Exception subclass. {fix}")
    return found
