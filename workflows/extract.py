"""Activation extraction: a dataset, sharded by stable example ids, through a pool of model actors.

By default the data is the generated corpus (planted topics and a binary concept marked by a token)
and the model is a tiny GPT-2 trained on it; `model` and `dataset` take any HF model id or local
path and any `datasets` source instead. The report probes the planted concept as a ground-truth check.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.actors.model import ModelActor, load
from interpflow.tasks import activations, datasets_io, models, text_corpus, tiny_lm
from interpflow.workflows.engine import ActorPool, Graph, node, sharded


class ExtractStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus: text_corpus.CorpusConfig = text_corpus.CorpusConfig()
    lm: tiny_lm.TinyLMConfig = tiny_lm.TinyLMConfig()
    model: models.ModelRef | None = Field(None, description="HF model id or local folder; default: the tiny LM")
    dataset: datasets_io.DatasetSource | None = Field(None, description="default: the generated corpus")
    load: models.ModelConfig = models.ModelConfig()
    extract: activations.ExtractConfig = activations.ExtractConfig()
    report: activations.ReportConfig = activations.ReportConfig()
    num_shards: int = Field(8, ge=1)
    actors: int = Field(1, ge=1, description="model actors in the pool")
    actor_cpus: float = Field(1, gt=0, description="CPUs (and torch threads) per actor")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor")


def extract_graph(cfg: ExtractStudy) -> Graph:
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
    pool = ActorPool(setup=load, config=cfg.load, size=cfg.actors, setup_inputs=("model",), actor=ModelActor,
                     num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)
    acts = sharded(activations.extract_shard, cfg.extract, ids=activations.example_ids, num_shards=cfg.num_shards,
                   name="activations", actors=pool, data=data, model=model)
    return Graph(node(activations.report, cfg.report, name="report", activations=acts, data=data))


def validate(cfg: ExtractStudy) -> None:
    """Input errors found before any compute: model source, site names, device and dtype, data columns."""
    if cfg.model is not None:
        models.check_model_source(cfg.model.path)
        sites = models.model_sites(cfg.model.path, cfg.load)
    else:
        sites = tiny_lm.site_map(cfg.lm)
    try:
        sites.resolve_all(cfg.extract.sites)
    except ValueError as exc:
        raise ValueError(f"extract.sites: {exc}") from None
    try:  # the driver may have no GPU while actors do: with actor_gpus, CUDA is checked in the actor
        device = "cpu" if cfg.actor_gpus else models.resolve_device(cfg.load)
        models.check_dtype(cfg.load.dtype, device)
    except ValueError as exc:
        raise ValueError(f"load: {exc}") from None
    if cfg.dataset is not None:
        activations.check_dataset(cfg.extract, datasets_io.load_source(cfg.dataset))
