"""interpflow: interpretability and AI-safety research workflows as durable DAGs on Ray.

The notebook API lives here; the CLI (``interpflow``) is a thin layer over it. Its names are imported
on first use (PEP 562), so that `import interpflow.workflows.cli` answers `--version` or `ls` without
loading the engine's heavier parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RunHandle", "load_spec", "open_run", "resume", "run", "verify"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from interpflow.workflows.api import RunHandle, load_spec, open_run, resume, run, verify


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from interpflow.workflows import api

    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
