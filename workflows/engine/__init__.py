"""The engine: graph, node keys, artifact store, runner, lineage, run records. No science here."""

from interpflow.workflows.engine.graph import ActorPool, Graph, Node, Resources, Shard, node, sharded, trained
from interpflow.workflows.engine.settings import RunSettings
from interpflow.workflows.engine.store import CorruptArtifact, Store
from interpflow.workflows.engine.training import Training

__all__ = ["ActorPool", "CorruptArtifact", "Graph", "Node", "Resources", "RunSettings", "Shard", "Store",
           "Training", "node", "sharded", "trained"]
