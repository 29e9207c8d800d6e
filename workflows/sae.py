"""Sparse autoencoders on a model's activations: extract, train a sweep of SAEs on Ray Train, evaluate
each the same way (reconstruction, sparsity, CE loss recovered with the SAE spliced into the model),
and plot the L0-FVU frontier. Every trained SAE is also written as a SAELens folder (`sae_saelens.<label>`:
cfg.json + sae_weights.safetensors + sparsity.safetensors; the project's own layout for archetypal
variants), and `sae.path=FOLDER` evaluates a SAELens folder from elsewhere instead of training. Each
SAE gets a latent browser (`sae_browser.<label>/browser.html`, an MLflow artifact under `pages/`): one static page, no server.

By default it runs on the generated corpus and the tiny LM (ground truth: the planted marker token
gets a latent of its own, and every SAE recovers most of the CE loss); `model` and `dataset` take any
HF model id or local path and any `datasets` source instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks import activations
from interpflow.tasks.sae import SAEConfig, Variant
from interpflow.tasks.sae.base import TOPK_FAMILY
from interpflow.tasks.sae import evaluate as sae_eval
from interpflow.tasks.sae import browser as latent_browser, saelens
from interpflow.tasks.sae.fit import SAEFitConfig, fit
from interpflow.workflows.engine import Graph, node, sharded, trained
from interpflow.workflows.engine.keys import directory_digest
from interpflow.workflows.engine.training import Training
from interpflow.workflows.extract import ActivationSource, activation_nodes, site_widths
from interpflow.workflows.spec import brief


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: list[Variant] = Field(default_factory=lambda: ["topk"], min_length=1,
                                    description="SAE variants to train (each with every k)")
    k: list[int] = Field(default_factory=lambda: [8], min_length=1, description="sparsity levels")


class SaeStudy(ActivationSource):
    extract: activations.ExtractConfig = activations.ExtractConfig(sites=["blocks.1.resid_post"], dtype="float16")
    fit: SAEFitConfig = SAEFitConfig()
    sweep: SweepConfig = SweepConfig()
    eval: sae_eval.SAEEvalConfig = Field(sae_eval.SAEEvalConfig(), description=(
        "site, holdout, text/id columns and max_length are taken from extract and fit"))
    eval_shards: int = Field(4, ge=1, le=100_000, description="shards of held-out examples for evaluation")
    browser: latent_browser.BrowserConfig = Field(latent_browser.BrowserConfig(), description=(
        "the latent browser page (sae_browser.<label>/browser.html); holdout, columns and the "
        "marker token are taken from fit, extract and eval"))
    frontier: sae_eval.FrontierConfig = sae_eval.FrontierConfig()
    sae: saelens.SaeFolder | None = Field(None, description="evaluate this SAE folder (SAELens layout, e.g. "
                                          "sae.path=./my_sae) instead of training the sweep")

    @model_validator(mode="after")
    def _one_site(self) -> SaeStudy:
        if len(self.extract.sites) != 1:
            raise ValueError(f"extract.sites: an SAE study trains on one site, got {self.extract.sites}; "
                             f"list one site (run the study once per site)")
        return self

    def sae_configs(self) -> dict[str, SAEConfig]:
        """label -> the SAE config of every sweep member (validated: k < n_latents, ...). Variants
        without a k (relu, jumprelu: their sparsity comes from a penalty) are trained once."""
        base = self.fit.train.sae.model_dump()
        out = {}
        for variant in self.sweep.variants:
            for k in self.sweep.k if variant in TOPK_FAMILY else [None]:
                try:
                    config = SAEConfig(**{**base, "variant": variant, "k": k})
                except ValueError as exc:
                    raise ValueError(f"sweep (variant={variant}, k={k}): {brief(exc)}") from None
                out[f"{variant}-k{k}" if variant in TOPK_FAMILY else variant] = config
        return out


def sae_graph(cfg: SaeStudy) -> Graph:
    src = activation_nodes(cfg)
    eval_cfg = cfg.eval.model_copy(update={
        "site": cfg.extract.sites[0], "holdout": cfg.fit.holdout, "text_column": cfg.extract.text_column,
        "id_column": cfg.extract.id_column, "max_length": cfg.extract.max_length})
    training = Training(num_workers=cfg.fit.num_workers, use_gpu=cfg.fit.use_gpu)
    export_cfg = saelens.ExportConfig(site=cfg.extract.sites[0], model_name=cfg.model.path if cfg.model else "tiny_lm")
    browser_cfg = cfg.browser.model_copy(update={
        "holdout": cfg.fit.holdout, "id_column": cfg.extract.id_column, "text_column": cfg.extract.text_column,
        "concept_token": cfg.eval.concept_token})
    saes = {}
    if cfg.sae is not None:                 # a folder from elsewhere: evaluated like a trained one
        saes["given"] = node(saelens.given_sae, cfg.sae, name="sae.given",
                             external={"sae": {"path": cfg.sae.path, "digest": directory_digest(cfg.sae.path)}})
    else:
        for label, sae_cfg in cfg.sae_configs().items():
            fit_cfg = cfg.fit.model_copy(update={"train": cfg.fit.train.model_copy(update={"sae": sae_cfg})})
            saes[label] = trained(fit, fit_cfg, training=training, name=f"sae.{label}", activations=src.activations)
    summaries, exported = {}, []
    for label, sae in saes.items():
        if cfg.sae is None:                  # beside the project's files: the SAELens folder (own layout if none)
            exported.append(node(saelens.export, export_cfg, name=f"sae_saelens.{label}", sae=sae))
        exported.append(node(latent_browser.browser, browser_cfg.model_copy(update={"label": label}),
                             name=f"sae_browser.{label}", sae=sae, activations=src.activations, data=src.data,
                             model=src.model))
        evaluated = sharded(sae_eval.evaluate_shard, eval_cfg, ids=sae_eval.eval_ids, num_shards=cfg.eval_shards,
                            name=f"sae_eval.{label}", actors=cfg.model_pool(), model=src.model, sae=sae,
                            data=src.data)
        summaries[label] = node(sae_eval.report, sae_eval.SAEReportConfig(
            dense_threshold=cfg.eval.dense_threshold, label=label), name=f"sae_report.{label}",
            stats=evaluated["stats"], classes=evaluated["classes"], sae=sae)["summary"]
    return Graph(node(sae_eval.frontier, cfg.frontier, name="sae_frontier", **summaries), *exported)


def validate(cfg: SaeStudy) -> None:
    """Before any compute: the model, site and data checks of extraction, the SAE width against the
    site's width, and every sweep member's config."""
    (site, width), = site_widths(cfg).items()
    if cfg.sae is not None:
        saelens.load_folder(cfg.sae.path)                   # architecture, settings and shapes, checked
        d_in = saelens.folder_d_in(cfg.sae.path)
        if width is not None and width != d_in:
            raise ValueError(f"sae.path: the SAE's d_in={d_in} (cfg.json of '{cfg.sae.path}') does not match the "
                             f"width {width} of site '{site}'; give an SAE trained on that site, or set extract.sites "
                             f"to the site it was trained on")
        return
    d_in = cfg.fit.train.sae.d_in
    if width is not None and width != d_in:
        raise ValueError(f"fit.train.sae.d_in={d_in} does not match the width {width} of site '{site}'; "
                         f"set fit.train.sae.d_in={width}")
    cfg.sae_configs()
