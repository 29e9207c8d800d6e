"""The graph: nodes are calls of plain `tasks/` functions with a typed config and upstream nodes.

A workflow module builds its graph so that it reads like the study's methods section::

    corpus = node(data.make_corpus, cfg.corpus)
    acts = sharded(activations.extract, cfg.extract, ids=data.example_ids, num_shards=8, corpus=corpus)
    report = node(evaluate.report, cfg.eval, activations=acts)
    return Graph(report)

Where a node runs, how it is cached and retried, and what MLflow records are the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pydantic import BaseModel


@dataclass(frozen=True)
class Shard:
    """One shard of a sharded node: a contiguous slice of the node's stable input ids."""

    index: int
    count: int
    ids: tuple

    @property
    def name(self) -> str:
        from interpflow.workflows.engine.store import shard_dirname

        return shard_dirname(self.index, self.count)


def split_ids(ids: Sequence, num_shards: int) -> list[Shard]:
    """Split stable ids into `num_shards` contiguous shards of near-equal size (order preserved)."""
    ids = tuple(ids)
    if not ids:
        raise ValueError("a sharded node got no input ids: its input is empty")
    count = max(1, min(num_shards, len(ids)))
    base, extra = divmod(len(ids), count)
    shards, start = [], 0
    for index in range(count):
        stop = start + base + (1 if index < extra else 0)
        shards.append(Shard(index, count, ids[start:stop]))
        start = stop
    return shards


@dataclass(frozen=True)
class Resources:
    """What one execution of the node asks of Ray."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: int | None = None


@dataclass(frozen=True)
class ActorPool:
    """Run a sharded node's shards on N long-lived actors that each build a resource once.

    `setup(config, **inputs)` runs once per actor (load a model, say) and its result is passed to the
    task function as the keyword `resource_arg`. Upstream inputs named in `setup_inputs` go to setup.
    """

    setup: Callable
    config: BaseModel | None = None
    size: int = 1
    resource_arg: str = "model"
    setup_inputs: tuple[str, ...] = ()
    num_cpus: float = 1
    num_gpus: float = 0
    max_restarts: int = 3
    actor: type | None = None  # the actor class; default actors.pool.PoolWorker


@dataclass(eq=False)
class Node:
    fn: Callable
    config: BaseModel | None
    name: str
    version: str
    inputs: dict[str, "Node | OutputRef"]
    ids: Callable | None = None  # sharded nodes: fn(config, **inputs) -> stable ids
    num_shards: int | None = None
    external: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    actors: ActorPool | None = None
    training: Any = None  # engine.training.Training: run under Ray Train, resumable from checkpoints

    def __post_init__(self) -> None:
        from interpflow.workflows.engine.store import check_name

        check_name(self.name, "node name")  # it is a directory of the store: nothing that leads outside

    @property
    def is_sharded(self) -> bool:
        return self.ids is not None

    def __getitem__(self, output: str) -> "OutputRef":
        return OutputRef(self, output)

    def upstream(self) -> list["Node"]:
        return [ref.node if isinstance(ref, OutputRef) else ref for ref in self.inputs.values()]

    def __repr__(self) -> str:
        return f"Node({self.name})"


@dataclass(frozen=True, eq=False)
class OutputRef:
    """One named output of an upstream node, e.g. `corpus["train"]`."""

    node: Node
    output: str


def _check_inputs(inputs: dict[str, Any]) -> dict[str, Node | OutputRef]:
    for arg, value in inputs.items():
        if not isinstance(value, (Node, OutputRef)):
            raise TypeError(f"input '{arg}' must be a node (or node['output']), got {type(value).__name__}; "
                            "put plain values in the node's config instead")
    return inputs


def node(fn: Callable, config: BaseModel | None = None, *, name: str | None = None, version: str = "1",
         external: dict[str, Any] | None = None, resources: Resources | None = None,
         **inputs: Node | OutputRef) -> Node:
    """A call `fn(config, **inputs)` whose outputs are committed to the store as one artifact."""
    return Node(fn, config, name or fn.__name__, version, _check_inputs(inputs),
                external=dict(external or {}), resources=resources or Resources())


def sharded(fn: Callable, config: BaseModel | None = None, *, ids: Callable, num_shards: int,
            name: str | None = None, version: str = "1", external: dict[str, Any] | None = None,
            resources: Resources | None = None, actors: ActorPool | None = None,
            **inputs: Node | OutputRef) -> Node:
    """A node run as `fn(config, shard=Shard, **inputs)` per shard, each shard committed on its own.

    `ids(config, **inputs)` returns the stable input ids (example ids, say); they are split into
    `num_shards` contiguous shards, so a shard's content never depends on how Ray laid out blocks.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    return Node(fn, config, name or fn.__name__, version, _check_inputs(inputs), ids=ids,
                num_shards=num_shards, external=dict(external or {}), resources=resources or Resources(),
                actors=actors)


def trained(fn: Callable, config: BaseModel | None = None, *, training: Any = None, name: str | None = None,
            version: str = "1", external: dict[str, Any] | None = None, **inputs: Node | OutputRef) -> Node:
    """A node run as `fn(config, train=context, **inputs)`: in its own task with one worker, on Ray Train
    with several (see engine/training.py). If the node is interrupted, running it again resumes from its
    last checkpoint.
    """
    from interpflow.workflows.engine.training import Training

    training = training or Training()
    # On Ray Train the outer task only waits for the trainer, whose workers hold the CPUs; with one
    # worker the task is the worker.
    resources = (Resources(num_cpus=0.1) if training.on_ray_train else
                 Resources(num_cpus=training.cpus_per_worker, num_gpus=1 if training.use_gpu else 0))
    return Node(fn, config, name or fn.__name__, version, _check_inputs(inputs), external=dict(external or {}),
                resources=resources, training=training)


class Graph:
    """The nodes reachable from the given outputs, in a deterministic topological order."""

    def __init__(self, *outputs: Node | Iterable[Node]):
        roots: list[Node] = []
        for item in outputs:
            roots.extend([item] if isinstance(item, Node) else list(item))
        order: list[Node] = []
        state: dict[int, str] = {}

        def visit(n: Node, path: tuple[str, ...]) -> None:
            mark = state.get(id(n))
            if mark == "done":
                return
            if mark == "active":
                raise ValueError(f"the graph has a cycle: {' -> '.join(path + (n.name,))}")
            state[id(n)] = "active"
            for up in n.upstream():
                visit(up, path + (n.name,))
            state[id(n)] = "done"
            order.append(n)

        for root in roots:
            visit(root, ())
        names: dict[str, Node] = {}
        for n in order:
            if n.name in names and names[n.name] is not n:
                raise ValueError(f"two nodes are named '{n.name}'; pass name=... to node()/sharded() "
                                 "to tell them apart")
            names[n.name] = n
        self.nodes: list[Node] = order
        self.by_name: dict[str, Node] = names

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no node named '{name}'; nodes: {', '.join(self.by_name)}") from None

    def dependents(self, name: str) -> set[str]:
        """Every node downstream of `name` (transitively)."""
        out: set[str] = set()
        frontier = {name}
        while frontier:
            nxt = {n.name for n in self.nodes if any(u.name in frontier for u in n.upstream())} - out
            out |= nxt
            frontier = nxt
        return out
