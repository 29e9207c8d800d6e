"""The engine: graph, node keys, artifact store, runner, lineage, run records. No science here.

Names are imported on first use (PEP 562), so that importing one engine module (the CLI's `ls` reads
only records and the store) does not pull in torch through `Training`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ActorPool": "graph", "Graph": "graph", "Node": "graph", "Resources": "graph", "Shard": "graph",
    "node": "graph", "sharded": "graph", "trained": "graph",
    "RunSettings": "settings",
    "CorruptArtifact": "store", "Store": "store",
    "Training": "training",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from interpflow.workflows.engine.graph import ActorPool, Graph, Node, Resources, Shard, node, sharded, trained
    from interpflow.workflows.engine.settings import RunSettings
    from interpflow.workflows.engine.store import CorruptArtifact, Store
    from interpflow.workflows.engine.training import Training


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
