"""Emergent persuasion (issue #12): does a model attempt to persuade when nobody asked it to, after
steering along persona-trait vectors or after supervised fine-tuning on trait data?
Measured with the Attempt-to-Persuade Eval (APE) against simulated persuadees (arXiv 2512.22201).

By default every piece is planted: a tiny LM trained on dialogues where a trait's system prompt
switches on the trait's marker phrases (``tasks.persuasion.world``), so steering, fine-tuning and
the evaluator can be checked against known truth. ``model``, ``statements`` and an endpoint
``evaluator`` take a real model, statement set and LLM judge instead.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from interpflow.tasks import datasets_io, models, tiny_lm
from interpflow.tasks.finetune import FinetuneConfig, finetune
from interpflow.tasks.persuasion import ape as apes
from interpflow.tasks.persuasion import persona as personas
from interpflow.tasks.persuasion import report as reports
from interpflow.tasks.persuasion import world as planted
from interpflow.tasks.persuasion.evaluators import EvaluatorConfig
from interpflow.tasks.types import Seed
from interpflow.workflows.engine import Graph, node, sharded, trained
from interpflow.workflows.engine.keys import file_digest
from interpflow.workflows.engine.training import Training
from interpflow.workflows.extract import model_actor_pool, study_sites


class CoefRange(BaseModel):
    """Coefficients start, start + step, ... up to stop (inclusive)."""

    model_config = ConfigDict(extra="forbid")
    start: float
    stop: float
    step: float = Field(gt=0)

    def values(self) -> list[float]:
        return [round(float(v), 10) for v in np.arange(self.start, self.stop + self.step / 2, self.step)]


class SteeringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=lambda: [2], min_length=1,
                              description="blocks whose residual stream is steered (and where vectors are taken)")
    coefficients: list[float] | CoefRange = Field(default_factory=lambda: [2.0, 4.0, 6.0, 8.0, 12.0], description=(
        "multiples of the persona vector added (0 is the base model, always run); a list or {start, stop, step}"))
    traits: list[str] | None = Field(None, description="traits steered (None: all)")
    random_traits: list[str] | None = Field(None, description="traits whose vector norm random directions copy "
                                                              "(None: the persuasion-related ones)")
    random_seeds: list[Seed] = Field(default_factory=lambda: [0, 1], description="one random direction per seed")

    @field_validator("coefficients")
    @classmethod
    def _not_empty(cls, value):
        values = value.values() if isinstance(value, CoefRange) else value
        if not [v for v in values if v != 0]:
            what = (f"the range start={value.start:g}, stop={value.stop:g}, step={value.step:g}"
                    if isinstance(value, CoefRange) else f"the list {value}")
            raise ValueError(f"{what} holds no non-zero coefficient; give e.g. [1, 2, 4] or "
                             "{start: 1, stop: 4, step: 1} (coefficient 0 is the base model, run anyway)")
        return value

    def coefficient_values(self) -> list[float]:
        values = self.coefficients.values() if isinstance(self.coefficients, CoefRange) else self.coefficients
        return sorted({float(v) for v in values if v != 0})


class SftCondition(BaseModel):
    """A fine-tuning data condition: persuasive dialogues about these statement categories."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    categories: list[str] = Field(min_length=1)


class SftStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conditions: list[SftCondition] = Field(
        default_factory=lambda: [
            SftCondition(name="benign_persuasion", categories=["benign_opinion", "benign_factual"]),
            SftCondition(name="persuasion", categories=["benign_opinion", "benign_factual", "conspiracy", "harmful",
                                                        "undermining_control"])],
        description="data conditions, each fine-tuned once per seed ([] for none; a list given replaces the "
                    "defaults)")
    trait: str = Field("persuasive", description="the trait the SFT dialogues show")
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], description="one data draw and fine-tune per seed")
    n_dialogues: int = Field(400, ge=1, le=1_000_000)
    finetune: FinetuneConfig = Field(FinetuneConfig(steps=60), description="full fine-tuning on Ray Train")


class PersuasionStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    world: planted.WorldConfig = planted.WorldConfig()
    traits: list[planted.Trait] = Field(default_factory=planted.default_traits, min_length=1)
    statements: datasets_io.DatasetSource | None = Field(None, description="statement and category columns; "
                                                         "default: the generated placeholder statements")
    lm: tiny_lm.TinyLMConfig = Field(tiny_lm.TinyLMConfig(n_layer=4, n_embd=128, n_positions=128, steps=800),
                                     description=("the embedded model: 128 positions (a two-turn dialogue reaches "
                                                  "~70 tokens); 4 x 128 because at 3 x 64 the trait mode is not a "
                                                  "direction steering can move (measured: no layer's vector steers)"))
    model: models.ModelRef | None = Field(None, description="HF causal LM id or folder; default the tiny LM")
    load: models.ModelConfig = models.ModelConfig()
    persona: personas.PersonaSettings = personas.PersonaSettings()
    persona_vectors: dict[str, str] = Field(default_factory=dict, description="trait -> safetensors file of its "
                                            "vectors (one 1-D tensor per blocks.L.resid_post): used instead of "
                                            "extracting them")
    steering: SteeringConfig = SteeringConfig()
    sft: SftStudy = SftStudy()
    ape: apes.ApeSettings = apes.ApeSettings()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    report: reports.ReportConfig = reports.ReportConfig()
    num_shards: int = Field(2, ge=1, le=100_000,
                            description="shards per condition's conversations (each commits on its own)")
    actors: int = Field(1, ge=1)
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _names(self) -> PersuasionStudy:
        for field, named in (("traits", self.traits), ("sft.conditions", self.sft.conditions),
                             ("ape.prompts", self.ape.prompts)):
            given = [item.name for item in named]
            if len(set(given)) != len(given):
                raise ValueError(f"{field}: names must be unique, got {given}")
        names = [t.name for t in self.traits]
        for field, chosen in (("steering.traits", self.steering.traits),
                              ("steering.random_traits", self.steering.random_traits),
                              ("persona_vectors", list(self.persona_vectors)), ("sft.trait", [self.sft.trait])):
            unknown = sorted(set(chosen or []) - set(names))
            if unknown:
                raise ValueError(f"{field}: unknown trait(s) {unknown}; the study's traits are {names}")
        return self

    def steered_traits(self) -> list[planted.Trait]:
        chosen = self.steering.traits
        return [t for t in self.traits if chosen is None or t.name in chosen]

    def random_traits(self) -> list[planted.Trait]:
        chosen = self.steering.random_traits
        return [t for t in self.traits if (t.persuasion_related if chosen is None else t.name in chosen)]

    def attempt_markers(self) -> list[str]:
        return [m for t in self.traits if t.persuasion_related for m in t.markers]

    def is_planted(self) -> bool:
        """Whether the planted checks apply: embedded model and statements, marker evaluator."""
        return self.model is None and self.statements is None and self.evaluator.kind == "marker"


def persuasion_graph(cfg: PersuasionStudy) -> Graph:
    if cfg.statements is None:
        statements = node(planted.make_statements, cfg.world, name="statements")
    else:
        statements = node(planted.load_statements, cfg.statements, name="statements",
                          external={"dataset": datasets_io.dataset_identity(cfg.statements)})
    if cfg.model is None:
        dialogues = node(planted.make_dialogues, planted.DialogueConfig(world=cfg.world, traits=cfg.traits),
                         name="dialogues", statements=statements)
        base = node(tiny_lm.train, cfg.lm, name="tiny_lm", corpus=dialogues)["model"]
    else:
        base = node(models.use_model, cfg.model, name="model",
                    external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus)

    # persona vectors: contrastive answers on the actors, judged, then a difference of means per layer
    vectors, summaries = {}, {}
    for trait in cfg.steered_traits() + [t for t in cfg.random_traits() if t not in cfg.steered_traits()]:
        if trait.name in cfg.persona_vectors:
            given = node(personas.given_vectors, personas.VectorFile(path=cfg.persona_vectors[trait.name],
                                                                   trait=trait.name, layers=cfg.steering.layers),
                         name=f"persona_vector.{trait.name}",
                         external={"vectors": {"path": cfg.persona_vectors[trait.name],
                                               "digest": file_digest(cfg.persona_vectors[trait.name])}})
        else:
            settings = personas.PersonaConfig(**cfg.persona.model_dump(), trait=trait, layers=cfg.steering.layers)
            responses = sharded(personas.trait_response_shard, settings, ids=personas.response_ids,
                                num_shards=cfg.num_shards, name=f"trait_responses.{trait.name}", actors=pool,
                                model=base, statements=statements)
            given = node(personas.persona_vector, settings, name=f"persona_vector.{trait.name}",
                         responses=responses["responses"])
        vectors[trait.name], summaries[f"persona.{trait.name}"] = given["vectors"], given["summary"]

    # APE conversations and their evaluation, one pair of nodes per condition of the model under test
    evaluate_cfg = apes.EvaluateConfig(evaluator=cfg.evaluator, markers=cfg.attempt_markers())
    settings = apes.ApeSettings(**{**cfg.ape.model_dump(), "persuadee": cfg.ape.persuadee.model_copy(
        update={"attempt_markers": cfg.ape.persuadee.attempt_markers or cfg.attempt_markers()})})

    def evaluated(condition: apes.Condition, model, trait_vectors=None):
        inputs = {"vectors": trait_vectors} if trait_vectors is not None else {}
        conversations = sharded(apes.conversation_shard, apes.ApeConfig(**settings.model_dump(), condition=condition),
                                ids=apes.conversation_ids, num_shards=cfg.num_shards,
                                name=f"conversations.{condition.label}", actors=pool, model=model,
                                statements=statements, **inputs)
        return node(apes.evaluate_conversations, evaluate_cfg, name=f"evaluated.{condition.label}",
                    conversations=conversations["conversations"])["evaluated"]

    results = {"base": evaluated(apes.Condition(), base)}
    for layer in cfg.steering.layers:
        for coef in cfg.steering.coefficient_values():
            for trait in cfg.steered_traits():
                c = apes.Condition(route="steer", trait=trait.name, layer=layer, coef=coef)
                results[c.label] = evaluated(c, base, vectors[trait.name])
            for trait in cfg.random_traits():
                for seed in cfg.steering.random_seeds:
                    c = apes.Condition(route="random", trait=trait.name, layer=layer, coef=coef, seed=seed)
                    results[c.label] = evaluated(c, base, vectors[trait.name])

    # supervised fine-tuning on trait dialogues, per data condition and seed
    training = Training(num_workers=cfg.sft.finetune.num_workers, use_gpu=cfg.sft.finetune.use_gpu,
                        distributed=cfg.sft.finetune.strategy == "deepspeed")
    for condition in cfg.sft.conditions:
        for seed in cfg.sft.seeds:
            dialogues = planted.SftData(categories=condition.categories, trait=cfg.sft.trait,
                                        n_dialogues=cfg.sft.n_dialogues, seed=seed, traits=cfg.traits)
            data = node(planted.make_sft_data, dialogues,
                        name=f"sft_data.{condition.name}.seed{seed}", statements=statements)
            tuned = trained(finetune, cfg.sft.finetune.model_copy(update={"seed": seed}), training=training,
                            name=f"sft.{condition.name}.seed{seed}", model=base, data=data)["model"]
            c = apes.Condition(route="sft", sft=condition.name, seed=seed)
            results[c.label] = evaluated(c, tuned)

    report_cfg = cfg.report.model_copy(update={"ground_truth": cfg.report.ground_truth and cfg.is_planted()})
    return Graph(node(reports.persuasion_report, report_cfg, name="persuasion_report", **summaries, **results))


def validate(cfg: PersuasionStudy) -> None:
    """Before any compute: layers in range, given vectors' widths, categories named in filters, keys set."""
    import os

    sites = study_sites(cfg.model, cfg.lm, cfg.load)
    for layer in cfg.steering.layers:
        if not 0 <= layer < sites.n_blocks:
            raise ValueError(f"steering.layers: layer {layer} is out of range; the model has blocks "
                             f"0..{sites.n_blocks - 1}")
    width = sites.width(sites.resolve("blocks.0.resid_post"))
    for trait, path in cfg.persona_vectors.items():
        found = personas.read_vectors(path)
        for layer in cfg.steering.layers:
            site = f"blocks.{layer}.resid_post"
            if site not in found:
                raise ValueError(f"persona_vectors.{trait}: {path} has no vector for {site} (it has "
                                 f"{sorted(found)}); give one per steered layer")
            if width is not None and found[site].shape[0] != width:
                raise ValueError(f"persona_vectors.{trait}: the vector for {site} has {found[site].shape[0]} "
                                 f"entries but the model's residual stream has width {width}")
    if cfg.statements is not None:
        datasets_io.check_source(cfg.statements, "statements.path", text_columns=("statement",), columns=("category",))
    known = set(planted.CATEGORIES) if cfg.statements is None else \
        set(planted.load_statements(cfg.statements)["category"])
    filters = [("ape.categories", cfg.ape.categories or []), ("persona.categories", cfg.persona.categories)]
    filters += [(f"sft.conditions.{c.name}", c.categories) for c in cfg.sft.conditions]
    if cfg.is_planted():
        filters.append(("report.heldout_category", [cfg.report.heldout_category]))
    for field, chosen in filters:
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise ValueError(f"{field}: unknown statement categor{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                             f"the statements have {sorted(known)}")
    if cfg.is_planted() and cfg.report.ground_truth:
        held = cfg.report.heldout_category
        for condition in cfg.sft.conditions:
            if condition.name == cfg.report.sft_condition and held in condition.categories:
                raise ValueError(f"sft.conditions.{condition.name}: it trains on report.heldout_category={held!r}, "
                                 "so the transfer check would test no transfer; leave that category out of it, or "
                                 "set report.heldout_category to one no SFT condition trains on")
        if cfg.ape.categories is not None and held not in cfg.ape.categories:
            raise ValueError(f"ape.categories {cfg.ape.categories} leave out report.heldout_category={held!r}, "
                             "which the transfer check reads; add it")
    if cfg.model is not None:
        models.check_model_source(cfg.model.path)
    needed = {e.api_key_env for e in (cfg.evaluator, cfg.persona.judge) if e.kind == "endpoint" and e.api_key_env}
    if cfg.ape.persuadee.backend == "endpoint" and cfg.ape.persuadee.api_key_env:
        needed.add(cfg.ape.persuadee.api_key_env)
    for name in sorted(needed):
        if not os.environ.get(name):
            raise ValueError(f"api_key_env: the environment variable {name} is not set; export it before running "
                             "(the key is read from the environment and never logged)")
    extracted = [t for t in cfg.steered_traits() + cfg.random_traits() if t.name not in cfg.persona_vectors]
    unmarked = sorted({t.name for t in extracted if not t.markers})
    if cfg.persona.judge.kind == "marker" and unmarked:
        raise ValueError(f"traits {unmarked} have no markers for the marker judge (persona.judge.kind=marker); give "
                         "each its markers, or judge with an LLM endpoint (persona.judge.kind=endpoint)")
    if cfg.evaluator.kind == "marker" and not (cfg.evaluator.markers or cfg.attempt_markers()):
        raise ValueError("evaluator: the marker evaluator needs attempt phrases: set evaluator.markers or mark a "
                         "trait persuasion_related with markers")
