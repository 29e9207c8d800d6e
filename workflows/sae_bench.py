"""Benchmarks of SAE dictionary quality (after the Archetypal SAE paper), each with a ground-truth check:

- identifiability: every variant on synthetic rows x = codes @ D + noise with a known D; TopK must
  recover D (Hungarian-matched cosine >= 0.9);
- stability and plausibility: each variant trained with several seeds (and on disjoint halves of the
  examples) on the tiny LM's activations; RA-SAE must be more stable than TopK at comparable FVU;
  plausibility is the atoms' best cosine with the planted topics' class-mean directions;
- Universal SAE: one shared code for two tiny LMs trained with different seeds on the same corpus;
  cross-model R^2 table, and each model's self R^2 at least 0.8 of its own single-model SAE's.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import activations, tiny_lm
from interpflow.tasks.sae import SAEConfig, SAETrainConfig, SyntheticConfig, Variant, synthetic_activations
from interpflow.tasks.sae import bench
from interpflow.tasks.types import Seed
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.extract import ActivationSource, activation_nodes, site_widths
from interpflow.workflows.spec import brief

ALL_VARIANTS = ["relu", "topk", "batchtopk", "jumprelu", "archetypal", "relaxed_archetypal"]


class IdentifiabilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: SyntheticConfig = SyntheticConfig()
    variants: list[Variant] = Field(default_factory=lambda: list(ALL_VARIANTS), min_length=1)
    train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig(
        sae=SAEConfig(d_in=32, n_latents=48, k=3, n_candidates=256), steps=2000, batch_size=256, init_rows=4096,
        threads=1), description="sae.variant comes from `variants`; d_in, n_latents and k should match `data`")
    check: bench.IdentifiabilityCheck = bench.IdentifiabilityCheck()


class StabilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: list[Variant] = Field(default_factory=lambda: ["topk", "relaxed_archetypal"], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=2)
    train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig(
        sae=SAEConfig(d_in=64, n_latents=128, k=4, delta=2.0), steps=1000, batch_size=256, init_rows=4096,
        threads=1), description="on the tiny LM's activations; sae.variant and the seeds come from the lists")
    label_column: str | None = Field("topic", description="class labels for plausibility")
    check: bench.StabilityCheck = bench.StabilityCheck()


class UniversalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    second_lm_seed: Seed = Field(1, description="the second model: the tiny LM trained with this seed")
    study: bench.UniversalStudy = bench.UniversalStudy()


class SaeBench(ActivationSource):
    extract: activations.ExtractConfig = activations.ExtractConfig(sites=["blocks.1.resid_post"])
    identifiability: IdentifiabilityConfig = IdentifiabilityConfig()
    stability: StabilityConfig = StabilityConfig()
    universal: UniversalConfig | None = Field(UniversalConfig(), description="None skips the Universal SAE "
                                                                             "(it needs the built-in tiny LM)")


def _with(train: SAETrainConfig, **sae) -> SAETrainConfig:
    """A copy of `train` whose SAE config has the given fields (validated, so k >= n_latents is an error)."""
    return train.model_copy(update={"sae": SAEConfig(**{**train.sae.model_dump(), **sae})})


def sae_bench_graph(cfg: SaeBench) -> Graph:
    ident = cfg.identifiability
    synthetic = node(synthetic_activations, ident.data, name="synthetic")
    identified = {v: node(bench.identify, _with(ident.train, variant=v), name=f"identify.{v}", synthetic=synthetic)
                  for v in ident.variants}
    ident_table = node(bench.identifiability_table, ident.check, name="identifiability",
                       **{v: n["summary"] for v, n in identified.items()})

    src = activation_nodes(cfg)
    stab = cfg.stability
    runs = {}
    for variant in stab.variants:
        for seed in stab.seeds:
            run_cfg = bench.StabilityRun(train=_with(stab.train, variant=variant, seed=seed).model_copy(
                update={"seed": seed}), label_column=stab.label_column, id_column=cfg.extract.id_column)
            runs[f"{variant}.seed{seed}"] = node(bench.stability_run, run_cfg, name=f"stability.{variant}.seed{seed}",
                                                 activations=src.activations, data=src.data)
        for half, seed in (("a", stab.seeds[0]), ("b", stab.seeds[1])):
            run_cfg = bench.StabilityRun(train=_with(stab.train, variant=variant, seed=seed).model_copy(
                update={"seed": seed}), half=half, label_column=stab.label_column, id_column=cfg.extract.id_column)
            runs[f"{variant}.half-{half}"] = node(bench.stability_run, run_cfg, name=f"stability.{variant}.half-{half}",
                                                  activations=src.activations, data=src.data)
    stab_table = node(bench.stability_table, stab.check, name="stability", **runs)
    outputs = [ident_table, stab_table]

    if cfg.universal is not None:
        corpus = src.data
        second = node(tiny_lm.train, cfg.lm.model_copy(update={"seed": cfg.universal.second_lm_seed}),
                      name="tiny_lm_b", corpus=corpus)["model"]
        acts_b = sharded(activations.extract_shard, cfg.extract, ids=activations.example_ids,
                         num_shards=cfg.num_shards, name="activations_b", actors=cfg.model_pool(), data=corpus,
                         model=second)
        outputs.append(node(bench.universal_study, cfg.universal.study, name="universal",
                            a=src.activations, b=acts_b))
    return Graph(*outputs)


def validate(cfg: SaeBench) -> None:
    """Widths and sweep members are checked before any compute."""
    if len(cfg.extract.sites) != 1:
        raise ValueError("extract.sites: the benchmark uses one site")
    (site, width), = site_widths(cfg).items()
    d_in = cfg.stability.train.sae.d_in
    if width is not None and width != d_in:
        raise ValueError(f"stability.train.sae.d_in={d_in} does not match the width {width} of site '{site}'; "
                         f"set stability.train.sae.d_in={width}")
    if cfg.identifiability.train.sae.d_in != cfg.identifiability.data.d:
        raise ValueError(f"identifiability.train.sae.d_in={cfg.identifiability.train.sae.d_in} does not match "
                         f"identifiability.data.d={cfg.identifiability.data.d}; make them equal")
    if cfg.universal is not None and (cfg.model is not None or cfg.dataset is not None):
        raise ValueError("universal: the Universal SAE pairs two tiny LMs on the generated corpus; set "
                         "universal: null when using your own model or dataset")
    for v in cfg.identifiability.variants:
        try:
            _with(cfg.identifiability.train, variant=v)
        except ValueError as exc:
            raise ValueError(f"identifiability (variant={v}): {brief(exc)}") from None
    for v in cfg.stability.variants:
        try:
            _with(cfg.stability.train, variant=v)
        except ValueError as exc:
            raise ValueError(f"stability (variant={v}): {brief(exc)}") from None
