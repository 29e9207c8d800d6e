"""Activation extraction: a dataset, sharded by stable example ids, through a pool of model actors.

By default the data is the generated corpus (planted topics and a binary concept marked by a token)
and the model is a tiny GPT-2 trained on it; `model` and `dataset` take any HF model id or local
path and any `datasets` source instead. The report probes the planted concept as a ground-truth check.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from interpflow.actors.model import ModelActor, load
from interpflow.tasks import activations, datasets_io, models, text_corpus, tiny_lm
from interpflow.workflows.engine import ActorPool, Graph, node, sharded
from interpflow.workflows.engine.graph import Node, OutputRef


class ActivationSource(BaseModel):
    """Where activations come from: data, model, sites, and the actor pool that extracts them.
    Studies that start from activations (SAEs, probes, ...) extend it."""

    model_config = ConfigDict(extra="forbid")
    corpus: text_corpus.CorpusConfig = text_corpus.CorpusConfig()
    lm: tiny_lm.TinyLMConfig = tiny_lm.TinyLMConfig()
    model: models.ModelRef | None = Field(None, description="HF model id or local folder; default: the tiny LM")
    dataset: datasets_io.DatasetSource | None = Field(None, description="default: the generated corpus")
    load: models.ModelConfig = models.ModelConfig()
    extract: activations.ExtractConfig = activations.ExtractConfig()
    num_shards: int = Field(8, ge=1, le=100_000)
    actors: int = Field(1, ge=1, description="model actors in the pool")
    actor_cpus: float = Field(1, gt=0, description="CPUs (and torch threads) per actor")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor")

    def model_pool(self) -> ActorPool:
        return model_actor_pool(self.load, self.actors, self.actor_cpus, self.actor_gpus)


def model_actor_pool(load_cfg: models.ModelConfig, size: int, num_cpus: float, num_gpus: float,
                     setup=load) -> ActorPool:
    """A pool of model actors that each load the study's model (the node's `model` input) once, with `setup`
    (`actors.model.load` by default; e.g. `tasks.concepts.classifier.load_classifier` to keep a head)."""
    return ActorPool(setup=setup, config=load_cfg, size=size, setup_inputs=("model",), actor=ModelActor,
                     num_cpus=num_cpus, num_gpus=num_gpus)


class ExtractStudy(ActivationSource):
    report: activations.ReportConfig = activations.ReportConfig()


@dataclass(frozen=True)
class Sources:
    """The nodes every activation study starts from."""

    data: Node            # the dataset (generated corpus by default)
    model: Node | OutputRef   # the model folder or hub id
    activations: Node     # sharded activations of `extract.sites`


def activation_nodes(cfg: ActivationSource) -> Sources:
    corpus = node(text_corpus.make_corpus, cfg.corpus, name="corpus")
    if cfg.dataset is None:
        data = corpus
    else:
        data = node(datasets_io.load_source, cfg.dataset, name="dataset",
                    external={"dataset": datasets_io.dataset_identity(cfg.dataset)})
    if cfg.model is None:
        model = node(tiny_lm.train, cfg.lm, name="tiny_lm", corpus=corpus)["model"]
    else:
        model = node(models.use_model, cfg.model, name="model",
                     external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    acts = sharded(activations.extract_shard, cfg.extract, ids=activations.example_ids, num_shards=cfg.num_shards,
                   name="activations", actors=cfg.model_pool(), data=data, model=model)
    return Sources(data, model, acts)


def extract_graph(cfg: ExtractStudy) -> Graph:
    src = activation_nodes(cfg)
    return Graph(node(activations.report, cfg.report, name="report", activations=src.activations, data=src.data))


def study_sites(model: models.ModelRef | None, lm: tiny_lm.TinyLMConfig, load: models.ModelConfig):
    """The site map of a study's model (a given model, checked to exist, or the embedded tiny LM, on
    `meta`), known before anything is trained or loaded."""
    if model is not None:
        models.check_model_source(model.path)
        return models.model_sites(model.path, load)
    return tiny_lm.site_map(lm)


def site_widths(cfg: ActivationSource) -> dict[str, int]:
    """Input errors found before any compute (model source, site names, device and dtype, data
    columns); returns the width of every requested site."""
    if cfg.model is None:
        widths = _tiny_lm_site_widths(cfg.lm, list(cfg.extract.sites))
    else:
        widths = _resolve_widths(study_sites(cfg.model, cfg.lm, cfg.load), cfg.extract.sites)
    # the driver may have no GPU while actors do: with actor_gpus, CUDA is checked in the actor. float32 runs
    # on every device, so only a half dtype needs torch here (a cached run then never imports it)
    if cfg.load.dtype != "float32" or cfg.load.device == "cuda":
        try:
            device = "cpu" if cfg.actor_gpus else models.resolve_device(cfg.load)
            models.check_dtype(cfg.load.dtype, device)
        except ValueError as exc:
            raise ValueError(f"load: {exc}") from None
    if cfg.dataset is not None:  # a local data file is read row by row first: it names a bad line, not a loader error
        datasets_io.check_source(cfg.dataset, text_columns=(cfg.extract.text_column,), id_column=cfg.extract.id_column)
        activations.check_dataset(cfg.extract, datasets_io.load_source(cfg.dataset))
    return widths


def _resolve_widths(sites, names: list[str]) -> dict[str, int | None]:
    try:
        resolved = sites.resolve_all(names)
    except ValueError as exc:
        raise ValueError(f"extract.sites: {exc}") from None
    return {site.name: sites.width(site) for site in resolved}


def _tiny_lm_site_widths(lm: tiny_lm.TinyLMConfig, names: list[str]) -> dict[str, int | None]:
    """`_resolve_widths` on the embedded tiny LM's site map, remembered on disk: building that map loads
    transformers' GPT-2 code (seconds), which a run whose nodes are all committed never needs otherwise.

    The answer is a pure function of the LM config, the site names and the code that builds the map (its
    source, transitively, as node keys hash it, and the transformers version), so it is kept under that
    digest in INTERPFLOW_CACHE (default ~/.cache/interpflow). Only answers are kept: a bad site name is
    found, and said, every time."""
    import json
    import os
    from importlib.metadata import version

    from interpflow.workflows.engine.keys import canonical_json, sha256_text, source_hash

    digest = sha256_text(canonical_json({
        "lm": lm.model_dump(mode="json"), "sites": names, "code": source_hash(tiny_lm.site_map),
        "widths": source_hash(_resolve_widths), "transformers": version("transformers")}))
    root = os.environ.get("INTERPFLOW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "interpflow")
    path = os.path.join(root, "site-widths", f"{digest}.json")
    try:
        with open(path, encoding="utf-8") as f:
            widths = json.load(f)
        if isinstance(widths, dict) and list(widths) == names:
            return widths
    except (OSError, ValueError):
        pass
    widths = _resolve_widths(tiny_lm.site_map(lm), names)
    try:  # a cache that cannot be written only costs the next run the same seconds
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(widths, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return widths


def validate(cfg: ExtractStudy) -> None:
    site_widths(cfg)
