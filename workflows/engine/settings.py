"""How a run executes (where the store and MLflow live, retries, Ray address): policy as data."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class RunSettings(BaseModel):
    """The `run:` section of a spec. Nothing here changes what a node computes, so none of it is
    part of a node's key."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(default_factory=lambda: os.environ.get("INTERPFLOW_STORE", ".interpflow/store"),
                       description="artifact store: a local directory or a pyarrow.fs URI (s3://, gs://)")
    tracking_uri: str | None = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI"),
                                     description="MLflow tracking URI; default SQLite beside a local store")
    experiment: str = "interpflow"
    lineage: bool = Field(True, description="record the run in MLflow")
    address: str | None = Field(None, description="Ray address; default RAY_ADDRESS or a private local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a private local Ray cluster")
    max_retries: int = Field(2, ge=0, description="Ray retries of a task after a worker or node dies")
    retry_exceptions: list[str] = Field(default_factory=lambda: ["ConnectionError", "TimeoutError"],
                                        description="exception class names that Ray retries as transient")
    verify: bool = Field(True, description="check sha256 of every artifact a node reads")
    progress: bool = True

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
