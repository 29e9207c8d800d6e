"""Concept Influence training-data attribution on a planted-data benchmark (issue #6).

A base LM (the embedded tiny LM by default, or any HF causal LM) is fine-tuned on Ray Train on a
dataset where a known few examples carry a trait (``tasks.influence.planted``). The concept
direction is fitted per layer on the fine-tuned model's activations; per-example gradients and the
curvature statistics are sharded over model actors; every method scores every training example;
the scores are checked against the planted ids; and for the methods named in ``removal`` the top k
examples are removed and the model fine-tuned again, beside k random removals.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pathlib import Path

from interpflow.tasks import activations, datasets_io, models, text_corpus, tiny_lm
from interpflow.tasks.finetune import FinetuneConfig, finetune
from interpflow.tasks.influence import attribution, benchmark
from interpflow.tasks.influence import concept as concepts
from interpflow.tasks.influence import planted as planting
from interpflow.tasks.types import Seed
from interpflow.workflows.engine import Graph, node, sharded, trained
from interpflow.workflows.engine.training import Training
from interpflow.workflows.extract import model_actor_pool, study_sites


class RemovalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    methods: list[str] = Field(default_factory=lambda: ["concept_influence[ekfac]", "probe", "influence[ekfac]"],
                               min_length=1, description="methods whose top k are removed before fine-tuning "
                                                         "again (one fine-tune each); ['all'] = every scored method")
    random_seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1,
                                    description="one random removal of k examples per seed")


class InfluenceStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    planted: planting.PlantedConfig = planting.PlantedConfig()
    corpus: text_corpus.CorpusConfig = Field(text_corpus.CorpusConfig(concept_rate=0.0, max_words=20),
                                             description="the embedded base LM's corpus (no trait)")
    lm: tiny_lm.TinyLMConfig = Field(tiny_lm.TinyLMConfig(n_positions=128), description="the embedded base LM "
                                     "(128 positions: a dialect text can reach ~90 tokens)")
    model: models.ModelRef | None = Field(None, description="base model (HF id or folder); default the tiny LM")
    load: models.ModelConfig = models.ModelConfig()
    finetune: FinetuneConfig = Field(FinetuneConfig(steps=60), description=(
        "60 steps = 2.4 epochs: influence is taken at the fine-tuned weights, and many more epochs memorise "
        "the planted examples, whose gradients then vanish (classical EK-FAC AUC 1.0 at 60 steps, 0.76 at 150)"))
    concept: concepts.ConceptConfig = concepts.ConceptConfig()
    concept_vector: concepts.VectorFile | None = Field(None, description="use this direction (e.g. an SAE feature) "
                                                       "at concept.site instead of the fitted one")
    probe_sites: list[str] | None = Field(None, min_length=1,
                                          description="sites of the layer sweep (must include concept.site); "
                                                      "default: embed, every block's resid_post, final_norm")
    train_data: datasets_io.DatasetSource | None = Field(
        None, description="your own training set (columns gradients.text_column and gradients.id_column) in place "
                          "of planted.train; without a label column (evaluate.label_column) the study scores "
                          "only: no AUC and no removal")
    fine_tune: bool = Field(True, description="fine-tune the base model on the training set first; false: "
                                              "attribute the given model as it is (and skip removal)")
    gradients: attribution.GradientsConfig = attribution.GradientsConfig()
    scores: attribution.ScoreConfig = Field(attribution.ScoreConfig(), description="gradients is taken from above")
    evaluate: benchmark.EvaluateConfig = benchmark.EvaluateConfig()
    removal: RemovalConfig = RemovalConfig()
    report: benchmark.RemovalReportConfig = benchmark.RemovalReportConfig()
    num_shards: int = Field(8, ge=1, le=100_000, description="shards of the training set for gradients and statistics")
    actors: int = Field(1, ge=1, description="model actors holding the fine-tuned model")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)

    def scored_methods(self) -> list[str]:
        """Every method the study scores (the rows of the `attribution` table)."""
        return [f"{m}[{p}]" for p in self.scores.preconditioners for m in ("influence", "concept_influence")] + [
            "probe", "probe_cosine", "embedding_cosine", "random"]

    def removal_methods(self) -> list[str]:
        if self.removal.methods == ["all"]:
            return [m for m in self.scored_methods() if m != "random"]
        return list(self.removal.methods)

    @model_validator(mode="after")
    def _consistent(self) -> InfluenceStudy:
        if self.probe_sites is not None and self.concept.site not in self.probe_sites:
            raise ValueError(f"concept.site={self.concept.site!r} is not in probe_sites {self.probe_sites}; "
                             "add it to probe_sites")
        strategies = {m[m.index("[") + 1:-1] for m in self.removal.methods + [self.report.concept_method] if "[" in m}
        missing = strategies - set(self.scores.preconditioners)
        if missing:
            raise ValueError(f"removal.methods use preconditioners {sorted(missing)} that scores.preconditioners "
                             f"{self.scores.preconditioners} does not compute; add them")
        unknown = sorted(set(self.removal_methods()) - set(self.scored_methods()))
        if unknown:
            raise ValueError(f"removal.methods: {unknown} are not scored; choose from {self.scored_methods()} "
                             "or ['all']")
        if self.report.concept_method not in self.removal_methods():
            raise ValueError(f"report.concept_method={self.report.concept_method!r} must be one of "
                             f"removal.methods {self.removal.methods}")
        return self


def default_probe_sites(n_blocks: int) -> list[str]:
    return ["embed", *(f"blocks.{i}.resid_post" for i in range(n_blocks)), "final_norm"]


def probe_sites(cfg: InfluenceStudy) -> list[str]:
    """The layer sweep's sites: as given, or every depth of the model in use (its block count read from
    the tiny LM's config or, for a given model, from its config on ``meta``)."""
    if cfg.probe_sites is not None:
        return list(cfg.probe_sites)
    n_blocks = cfg.lm.n_layer if cfg.model is None else study_sites(cfg.model, cfg.lm, cfg.load).n_blocks
    sites = default_probe_sites(n_blocks)
    if cfg.concept.site not in sites:
        raise ValueError(f"concept.site={cfg.concept.site!r} is not a site of this {n_blocks}-block model; use one "
                         f"of {sites} (or set probe_sites)")
    return sites


def has_labels(cfg: InfluenceStudy) -> bool:
    """Whether the training set names its responsible examples (the planted set always does)."""
    if cfg.train_data is None:
        return True
    return cfg.evaluate.label_column in datasets_io.load_source(cfg.train_data).column_names


def influence_graph(cfg: InfluenceStudy) -> Graph:
    planted = node(planting.make_planted, cfg.planted, name="planted")
    data = {part: planted[part] for part in ("train", "probe", "query", "heldout")}
    sites = probe_sites(cfg)
    if cfg.train_data is not None:
        data["train"] = node(datasets_io.load_source, cfg.train_data, name="train_data",
                             external={"dataset": datasets_io.dataset_identity(cfg.train_data)})
    if cfg.model is None:
        corpus = node(text_corpus.make_corpus, cfg.corpus, name="corpus")
        base = node(tiny_lm.train, cfg.lm, name="tiny_lm", corpus=corpus)["model"]
    else:
        base = node(models.use_model, cfg.model, name="model",
                    external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    training = Training(num_workers=cfg.finetune.num_workers, use_gpu=cfg.finetune.use_gpu,
                        distributed=cfg.finetune.strategy == "deepspeed")
    tuned = (trained(finetune, cfg.finetune, training=training, name="finetune", model=base, data=data["train"])["model"]
             if cfg.fine_tune else base)
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus)

    # the concept: a probe and a direction per layer, on the fine-tuned model's pooled activations
    pooled = sharded(activations.extract_shard, activations.ExtractConfig(sites=sites, tokens="mean"),
                     ids=activations.example_ids, num_shards=2, name="probe_activations", actors=pool,
                     data=data["probe"], model=tuned)
    per_site = {site: node(concepts.fit_concept, cfg.concept.model_copy(update={"site": site}),
                           name=f"concept.{site}", activations=pooled[site], data=data["probe"])
                for site in sites}
    sweep = node(concepts.concept_sweep, name="concept_sweep", **{s: c["probe"] for s, c in per_site.items()})
    direction = per_site[cfg.concept.site]["direction"]
    if cfg.concept_vector is not None:
        from interpflow.workflows.engine.store import content_digest

        direction = node(concepts.given_concept, cfg.concept_vector, name="concept_vector",
                         external={"direction": {"path": cfg.concept_vector.path, "digest": content_digest(
                             concepts.read_direction(cfg.concept_vector.path).tolist())}})["direction"]

    # gradient-based methods: per-example gradients and curvature statistics, sharded on the actors
    shards = dict(ids=attribution.train_ids, num_shards=cfg.num_shards, actors=pool, model=tuned, data=data["train"])
    grads = sharded(attribution.gradient_shard, cfg.gradients, name="gradients", **shards)
    stats, costs = {"diagonal": grads["diagonal"]}, {"gradients": grads["metrics"]}
    logra = cfg.gradients.method == "logra"
    if {"kfac", "ekfac"} & set(cfg.scores.preconditioners) and logra:
        # LoGra: the projected covariances came with the gradients; EK-FAC's eigenvalues are read off the
        # stored projected gradients (the empirical Fisher), so no second or third model pass
        basis = node(attribution.kfac_basis, cfg.gradients, name="kfac_basis", model=tuned,
                     covariance=grads["covariance"])
        stats["basis"] = basis["basis"]
        costs["kfac_basis"] = basis["metrics"]
        if "ekfac" in cfg.scores.preconditioners and cfg.gradients.fisher == "true":
            lambdas = sharded(attribution.lambda_shard, cfg.gradients, name="ekfac_lambdas", basis=basis["basis"],
                              **shards)
        elif "ekfac" in cfg.scores.preconditioners:
            lambdas = node(attribution.logra_lambdas, cfg.gradients, name="ekfac_lambdas", model=tuned,
                           grads=grads["grads"], basis=basis["basis"])
        if "ekfac" in cfg.scores.preconditioners:
            stats["lambdas"] = lambdas["lambdas"]
            costs["ekfac_lambdas"] = lambdas["metrics"]
    elif {"kfac", "ekfac"} & set(cfg.scores.preconditioners):
        covariance = sharded(attribution.covariance_shard, cfg.gradients, name="covariance", **shards)
        basis = node(attribution.kfac_basis, cfg.gradients, name="kfac_basis", model=tuned,
                     covariance=covariance["covariance"])
        stats["basis"] = basis["basis"]
        costs.update(covariance=covariance["metrics"], kfac_basis=basis["metrics"])
        if "ekfac" in cfg.scores.preconditioners:
            lambdas = sharded(attribution.lambda_shard, cfg.gradients, name="ekfac_lambdas", basis=basis["basis"],
                              **shards)
            stats["lambdas"] = lambdas["lambdas"]
            costs["ekfac_lambdas"] = lambdas["metrics"]
    query = node(attribution.query_gradients, attribution.QueryConfig(gradients=cfg.gradients, site=cfg.concept.site),
                 name="query_gradients", model=tuned, query=data["query"], concept_prompts=data["query"],
                 concept=direction)
    gradient_scores = node(attribution.gradient_scores, cfg.scores.model_copy(update={"gradients": cfg.gradients}),
                           name="gradient_scores", model=tuned, grads=grads["grads"], query=query, **stats)
    costs.update(query_gradients=query["metrics"], gradient_scores=gradient_scores["metrics"])

    # activation-based methods: the probe projection and baselines, from the training set's activations
    site_tokens = activations.ExtractConfig(sites=[cfg.concept.site], tokens="all")
    train_acts = sharded(activations.extract_shard, site_tokens, ids=activations.example_ids,
                         num_shards=cfg.num_shards, name="train_activations", actors=pool, data=data["train"],
                         model=tuned)
    query_acts = sharded(activations.extract_shard, site_tokens, ids=activations.example_ids, num_shards=1,
                         name="query_activations", actors=pool, data=data["query"], model=tuned)
    activation_scores = node(attribution.activation_scores, attribution.ActivationScoreConfig(),
                             name="activation_scores", activations=train_acts[cfg.concept.site],
                             query_activations=query_acts[cfg.concept.site], probe=direction)
    costs.update(train_activations=train_acts["metrics"], query_activations=query_acts["metrics"],
                 activation_scores=activation_scores["metrics"],
                 concept=per_site[cfg.concept.site]["metrics"])
    if not has_labels(cfg):               # the user's own data: scores, no ground truth to check them against
        return Graph(gradient_scores, activation_scores, sweep)
    evaluated = node(benchmark.evaluate_methods, cfg.evaluate, name="attribution", train=data["train"],
                     gradient=gradient_scores["scores"], activation=activation_scores["scores"], **costs)

    if not cfg.fine_tune:                  # removal means fine-tuning again: nothing to compare with
        return Graph(evaluated, sweep)
    # removal: fine-tune again without each method's top k, and without k random examples
    trait_cfg = planting.TraitConfig(site=cfg.concept.site)
    full = node(planting.trait_metrics, trait_cfg.model_copy(update={"label": "full"}), name="trait.full",
                model=tuned, heldout=data["heldout"], probe=direction)["trait"]
    choices = {benchmark.label_of(m): benchmark.RemovalChoice(method=m) for m in cfg.removal_methods()}
    choices.update({f"random-{s}": benchmark.RemovalChoice(method="random", seed=s) for s in cfg.removal.random_seeds})
    removed = {}
    for label, choice in choices.items():
        drop = node(benchmark.removal_ids, choice, name=f"removal_ids.{label}", rankings=evaluated["rankings"])
        model = trained(finetune, cfg.finetune, training=training, name=f"finetune.minus.{label}", model=base,
                        data=data["train"], exclude=drop)["model"]
        removed[label] = node(planting.trait_metrics, trait_cfg.model_copy(update={"label": label}),
                              name=f"trait.minus.{label}", model=model, heldout=data["heldout"],
                              probe=direction)["trait"]
    report = node(benchmark.removal_report, cfg.report, name="influence_report", methods=evaluated["methods"],
                  full=full, **removed)
    return Graph(report, sweep)


def validate(cfg: InfluenceStudy) -> None:
    """Before any compute: empty query sets, the base model, the sites, the parameter patterns (on a
    meta copy of the model), a given concept vector's width, and, for a given model, the training
    texts' lengths under the stated policy (the embedded tiny LM's tokenizer exists only once it is
    trained: then the gradient node checks every length before its first shard)."""
    from interpflow.tasks.influence.params import select_parameters

    for field, what in (("n_query", "query set (texts showing the trait)"),
                        ("n_heldout", "trait-measurement set (held-out prompts)")):
        if getattr(cfg.planted, field) == 0:
            raise ValueError(f"planted.{field}=0: the {what} is empty; attribution needs at least one text there")
    if cfg.model is not None:
        check_tokenizer_files(cfg.model.path)
    if cfg.train_data is not None:
        g = cfg.gradients
        datasets_io.check_source(cfg.train_data, field="train_data.path", text_columns=(g.text_column,),
                                 id_column=g.id_column)
        attribution.check_texts(g, datasets_io.load_source(cfg.train_data), "training")
    sites = study_sites(cfg.model, cfg.lm, cfg.load)
    try:
        resolved = sites.resolve_all(probe_sites(cfg))
    except ValueError as exc:
        raise ValueError(f"probe_sites: {exc}") from None
    try:
        selection = select_parameters(sites.model, cfg.gradients.params)
    except ValueError as exc:
        raise ValueError(f"gradients.{exc}") from None
    if cfg.gradients.method == "logra":            # linear layers only, ranks within every layer's widths
        from interpflow.tasks.influence.logra import LograProjection

        LograProjection(cfg.gradients.logra, sites.model, selection)
    if cfg.concept_vector is not None:
        width = sites.width(next(r for r in resolved if r.name == cfg.concept.site))
        v = concepts.read_direction(cfg.concept_vector.path)
        if width is not None and v.shape[0] != width:
            raise ValueError(f"concept_vector: the direction has {v.shape[0]} entries but site {cfg.concept.site!r} "
                             f"has width {width}; give a direction of that site (or set concept.site to the "
                             f"site it was taken from)")
    if cfg.model is not None and cfg.gradients.too_long == "error":
        import transformers

        from interpflow.tasks.finetune import encode, model_max_length

        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.path)
        try:
            limit = model_max_length(sites.model.config, tokenizer, cfg.gradients.max_length)
        except ValueError as exc:
            raise ValueError(f"gradients.{exc}") from None
        train = (planting.make_planted(cfg.planted)["train"] if cfg.train_data is None
                 else datasets_io.load_source(cfg.train_data))
        encode(tokenizer, list(train[cfg.gradients.text_column]), limit, "error", list(train[cfg.gradients.id_column]))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer_files(path: str) -> None:
    """A local model folder without tokenizer files loads an empty tokenizer that encodes every text as its
    end token, and fine-tuning then 'converges' to loss 0: refuse it before compute."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"model.path={path!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer next to the weights (tokenizer.save_pretrained(folder)) or give the model's "
                         "hub id")
