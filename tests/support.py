"""Helpers shared by tests that drive the real `interpflow` command in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `interpflow` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "interpflow.workflows.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def spec_file(path: Path, store: Path, **sections) -> Path:
    """Write a demo spec with the given sections merged over `run: {store, tracking_uri}`."""
    import yaml

    data = {"workflow": "demo", "run": {"store": str(store), "tracking_uri": f"sqlite:///{store.parent / 'mlflow.db'}"}}
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path
