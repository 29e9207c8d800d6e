"""Benchmarks of SAE dictionary quality (after the Archetypal SAE paper), each with a ground-truth check:

- identifiability: every variant, with every seed, on synthetic rows x = codes @ D + noise with a
  known D (or a researcher's own `identifiability.data.path=X.npz` with arrays X and atoms); TopK
  must recover D with every seed (Hungarian-matched cosine >= 0.9); FVU is measured on held-out rows;
- stability and plausibility: each variant trained with several seeds (and on disjoint halves of the
  examples) on the tiny LM's activations (or `stability.data.path=rows.npz`); RA-SAE must be more
  stable than TopK at comparable FVU; plausibility is the atoms' best cosine with the planted topics'
  class-mean directions (or with the class means of the file's `labels`);
- Universal SAE: one shared code for two tiny LMs trained with different seeds on the same corpus;
  cross-model R^2 table, and each model's self R^2 at least 0.8 of its own single-model SAE's.

Any of the three can be null; no language model is trained unless a benchmark needs one (stability
without `data`, or universal).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import activations, tiny_lm
from interpflow.tasks.sae import SAEConfig, SAETrainConfig, Variant
from interpflow.tasks.sae import bench
from interpflow.tasks.sae.arrays import check_npz
from interpflow.tasks.sae.base import TOPK_FAMILY
from interpflow.tasks.types import Seed
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.engine.keys import file_digest
from interpflow.workflows.extract import ActivationSource, activation_nodes, site_widths
from interpflow.workflows.spec import brief

ALL_VARIANTS = ["relu", "topk", "batchtopk", "jumprelu", "archetypal", "relaxed_archetypal"]


class IdentifiabilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: bench.IdentifiabilityData = bench.IdentifiabilityData()
    variants: list[Variant] = Field(default_factory=lambda: list(ALL_VARIANTS), min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1,
                              description="every variant is trained once per seed (weights and batch order)")
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of examples held out: the table's fvu is "
                                                        "measured on them")
    train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig(
        sae=SAEConfig(d_in=32, n_latents=48, k=3, n_candidates=256), steps=2000, batch_size=256, init_rows=4096,
        threads=1), description="sae.variant and the seed come from `variants` and `seeds`; d_in should match the "
                                "data's width; k is used by the topk family only")
    check: bench.IdentifiabilityCheck = bench.IdentifiabilityCheck()


class StabilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: bench.StabilityData | None = Field(None, description="your own rows (.npz); default: the tiny LM's "
                                                                "activations at extract.sites")
    variants: list[Variant] = Field(default_factory=lambda: ["topk", "relaxed_archetypal"], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=2)
    train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig(
        sae=SAEConfig(d_in=64, n_latents=128, k=4, delta=2.0), steps=1000, batch_size=256, init_rows=4096,
        threads=1), description="sae.variant and the seeds come from the lists")
    label_column: str | None = Field("topic", description="class labels for plausibility (with data.path: "
                                                          "'label' when the file has labels, else skipped)")
    check: bench.StabilityCheck = bench.StabilityCheck()


class UniversalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    second_lm_seed: Seed = Field(1, description="the second model: the tiny LM trained with this seed")
    study: bench.UniversalStudy = bench.UniversalStudy()


class SaeBench(ActivationSource):
    extract: activations.ExtractConfig = activations.ExtractConfig(sites=["blocks.1.resid_post"])
    identifiability: IdentifiabilityConfig | None = Field(IdentifiabilityConfig(), description="None skips it")
    stability: StabilityConfig | None = Field(StabilityConfig(), description="None skips it")
    universal: UniversalConfig | None = Field(UniversalConfig(), description="None skips the Universal SAE "
                                                                             "(it needs the built-in tiny LM)")

    def needs_lm(self) -> bool:
        """Is a language model (and its activations) needed? Not for benchmarks on a researcher's arrays."""
        return self.universal is not None or (self.stability is not None and self.stability.data is None)


def _with(train: SAETrainConfig, variant: str, seed: int) -> SAETrainConfig:
    """`train` for one variant and seed (validated: k >= n_latents is an error). The topk family keeps the
    sweep's k; relu and jumprelu take none (a penalty sets their sparsity)."""
    fields = {**train.sae.model_dump(), "variant": variant, "seed": seed}
    if variant not in TOPK_FAMILY:
        fields["k"] = None
    return train.model_copy(update={"sae": SAEConfig(**fields)})


def _file(path: str) -> dict:
    return {"data": {"path": path, "digest": file_digest(path)}}


def _stability_nodes(cfg: SaeBench, acts, data) -> dict:
    stab = cfg.stability
    label_column, id_column = stab.label_column, cfg.extract.id_column
    if stab.data is not None:
        id_column = "id"
        shapes = check_npz(stab.data.path, "stability.data.path", required=("X",))
        label_column = "label" if "labels" in shapes else None
    runs = {}
    for variant in stab.variants:
        for seed in stab.seeds:
            run_cfg = bench.StabilityRun(train=_with(stab.train, variant, seed), label_column=label_column,
                                         id_column=id_column)
            runs[f"{variant}.seed{seed}"] = node(bench.stability_run, run_cfg, name=f"stability.{variant}.seed{seed}",
                                                 activations=acts, data=data)
        for half, seed in (("a", stab.seeds[0]), ("b", stab.seeds[1])):
            run_cfg = bench.StabilityRun(train=_with(stab.train, variant, seed), half=half, label_column=label_column,
                                         id_column=id_column)
            runs[f"{variant}.half-{half}"] = node(bench.stability_run, run_cfg, name=f"stability.{variant}.half-{half}",
                                                  activations=acts, data=data)
    return runs


def sae_bench_graph(cfg: SaeBench) -> Graph:
    outputs = []
    ident = cfg.identifiability
    if ident is not None:
        rows = node(bench.identifiability_data, ident.data, name="synthetic",
                    external=_file(ident.data.path) if ident.data.path else None)
        identified = {f"{v}.seed{s}": node(bench.identify, bench.IdentifyRun(train=_with(ident.train, v, s),
                                                                              holdout=ident.holdout),
                                           name=f"identify.{v}.seed{s}", synthetic=rows)
                      for v in ident.variants for s in ident.seeds}
        outputs.append(node(bench.identifiability_table, ident.check, name="identifiability",
                            **{name: n["summary"] for name, n in identified.items()}))

    src = activation_nodes(cfg) if cfg.needs_lm() else None
    if cfg.stability is not None:
        if cfg.stability.data is not None:
            own = node(bench.stability_data, cfg.stability.data, name="stability_data",
                       external=_file(cfg.stability.data.path))
            acts, data = own["activations"], own["data"]
        else:
            acts, data = src.activations, src.data
        outputs.append(node(bench.stability_table, cfg.stability.check, name="stability",
                            **_stability_nodes(cfg, acts, data)))

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
    """Widths, data files and sweep members are checked before any compute; the model and sites only
    when a benchmark needs the language model."""
    if cfg.identifiability is None and cfg.stability is None and cfg.universal is None:
        raise ValueError("identifiability, stability and universal are all null: nothing to run; keep at least one")
    ident, stab = cfg.identifiability, cfg.stability
    if ident is not None:
        d_in = ident.train.sae.d_in
        if ident.data.path is not None:
            check_npz(ident.data.path, "identifiability.data.path", required=("X", "atoms"), d_in=d_in,
                      d_in_field="identifiability.train.sae.d_in")
        elif d_in != ident.data.d:
            raise ValueError(f"identifiability.train.sae.d_in={d_in} does not match identifiability.data.d="
                             f"{ident.data.d}; make them equal")
    if stab is not None and stab.data is not None:
        check_npz(stab.data.path, "stability.data.path", required=("X",), optional=("ids", "labels"),
                  d_in=stab.train.sae.d_in, d_in_field="stability.train.sae.d_in")
    if cfg.needs_lm():
        if len(cfg.extract.sites) != 1:
            raise ValueError("extract.sites: the benchmark uses one site")
        (site, width), = site_widths(cfg).items()
        if stab is not None and stab.data is None and width is not None and width != stab.train.sae.d_in:
            raise ValueError(f"stability.train.sae.d_in={stab.train.sae.d_in} does not match the width {width} of "
                             f"site '{site}'; set stability.train.sae.d_in={width}")
    if cfg.universal is not None and (cfg.model is not None or cfg.dataset is not None):
        raise ValueError("universal: the Universal SAE pairs two tiny LMs on the generated corpus; set "
                         "universal: null when using your own model or dataset")
    for section, part in (("identifiability", ident), ("stability", stab)):
        if part is None:
            continue
        for v in part.variants:
            try:
                _with(part.train, v, part.train.seed)
            except ValueError as exc:
                raise ValueError(f"{section} (variant={v}): {brief(exc)}") from None
