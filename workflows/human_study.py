"""Simulated human studies of belief change (bunking / debunking): a seeded population randomised to
arms, each participant's conversations sharded by stable participant ids, and the analysis of the
real study (per-arm change with bootstrap CIs, effect sizes, contrasts, regression on persona).

Backends: `rule` (no model: beliefs follow a stated function, so the analysis must recover the
planted effects), `local` (an HF causal LM held by model actors; the embedded tiny LM by default),
`endpoint` (any OpenAI-compatible server, e.g. `interpflow serve MODEL`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import models, text_corpus, tiny_lm
from interpflow.tasks.study import AnalysisConfig, StudyConfig, analyse, participants
from interpflow.tasks.study import rules, simulate
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.extract import model_actor_pool


class HumanStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: StudyConfig = StudyConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    num_shards: int = Field(8, ge=1, le=100_000, description="shards of participants (each commits on its own)")
    concurrency: int = Field(4, ge=1, description="endpoint conversations in flight per shard")
    requests_per_s: float | None = Field(None, gt=0, description="endpoint rate limit per shard")
    max_retries: int = Field(5, ge=0, description="endpoint retries on 429/5xx/connection errors")
    corpus: text_corpus.CorpusConfig = Field(text_corpus.CorpusConfig(), description="local backend, no model "
                                             "given: the corpus the embedded tiny LM is trained on")
    lm: tiny_lm.TinyLMConfig = tiny_lm.TinyLMConfig()
    load: models.ModelConfig = models.ModelConfig()
    actors: int = Field(1, ge=1, description="model actors (local backend)")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)


def human_study_graph(cfg: HumanStudy) -> Graph:
    people = node(participants, cfg.study, name="participants")
    sim = simulate.Simulation(study=cfg.study, concurrency=cfg.concurrency, requests_per_s=cfg.requests_per_s,
                              max_retries=cfg.max_retries)
    inputs, pool = {}, None
    if simulate.uses_local_model(cfg.study):
        (path,) = simulate.local_models(cfg.study)
        if path is None:
            corpus = node(text_corpus.make_corpus, cfg.corpus, name="corpus")
            inputs["model"] = node(tiny_lm.train, cfg.lm, name="tiny_lm", corpus=corpus)["model"]
        else:
            ref = models.ModelRef(path=path)
            inputs["model"] = node(models.use_model, ref, name="model",
                                   external={"model": models.model_identity(ref.path, ref.revision)})
        pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus)
    conversations = sharded(simulate.simulate_shard, sim, ids=simulate.participant_ids, num_shards=cfg.num_shards,
                            name="conversations", actors=pool, participants=people, **inputs)
    analysis = node(analyse, cfg.analysis, name="analysis", results=conversations["results"])
    if cfg.study.participant_backend != "rule":
        return Graph(analysis)
    # rule participants: the effects are planted, so the analysis must find them (ground truth)
    planted = rules.PlantedCheck(planted=rules.planted_effects(cfg.study))
    return Graph(node(rules.check_planted, planted, name="ground_truth", arms=analysis["arms"]))


def validate(cfg: HumanStudy) -> None:
    """Before any compute: contrasts name real arms, one local model at most, reachable sources, keys set."""
    import os

    cfg.analysis.check_against(cfg.study)
    local = simulate.local_models(cfg.study)
    if len(local) > 1:
        raise ValueError(f"study: local backends ask for different models {sorted(map(str, local))}; a study "
                         f"holds one local model (leave `model` unset for the embedded tiny LM)")
    if local and None not in local:
        models.check_model_source(next(iter(local)))
    needed = {p.api_key_env for p in simulate.persuaders(cfg.study) if p.backend == "endpoint" and p.api_key_env}
    if cfg.study.participant_backend == "endpoint" and cfg.study.participant_api_key_env:
        needed.add(cfg.study.participant_api_key_env)
    for name in sorted(needed):
        if not os.environ.get(name):
            raise ValueError(f"api_key_env: the environment variable {name} is not set; export it before "
                             f"running (the key is read from the environment and never logged)")
