"""The Physics Emergence Zone study (issue #9; method: "Interpreting Physics in Video World Models",
arXiv 2602.07050) on any video encoder.

Methods, as the graph runs them:
 1. Clips: balls in a wrap-around world (position balanced: where the ball is says nothing about where
    it goes), with impossible twins; every variable known exactly (``tasks.video.clips``).
 2. Model: the embedded tiny VideoMAE (tubelet 1: a token sees one frame) trained to predict the ball's
    next step, or any HF video encoder by id/path; beside it, the same architecture randomly initialised.
 3. Extraction, sharded over clips on model actors: the residual stream at the embedding output and
    after every block, mean-pooled over tokens and per spatial patch (mean over frames).
 4. Probes, one node per (model, layer, variable): ridge for speed, |a|, (vx, vy), (ax, ay); circular
    for direction; logistic for possible/impossible; nested grouped CV over scenes with a grid, and a
    shuffled-label control.
 5. Depth: where each variable emerges and peaks; direction must be at chance at the embedding output.
 6. Geometry at the zone layer (direction's emergence layer): the ring, circular correlation, principal
    angles to the possible/impossible probe, orthogonal-probe dimensionality.
 7. Patch decoding: per-patch direction probes and their agreement with where the ball is.
 8. Attention ablations one block at a time (all, cross-frame, local) and cross-frame in every block:
    the drop of fixed readout probes and of the model's own objective.
 9. Steering along 1, 2, 4, ... dimensions of the direction subspace at the zone layer (or
    ``steering.layer``), read out at the last layer.
10. A one-page report.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from interpflow.tasks import models
from interpflow.tasks.video import clips as clip_data
from interpflow.tasks.video import interventions, probing, zone
from interpflow.tasks.video import model as tiny_video
from interpflow.tasks.video.extract import PATCHES, VideoExtractConfig, extract_clips_shard, residual_sites
from interpflow.tasks.video.report import ReportConfig, physics_report
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.extract import model_actor_pool


class VideoTraining(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: tiny_video.VideoModelConfig
    clips: clip_data.ClipConfig


def train_model(cfg: VideoTraining) -> dict:
    """Graph node: the embedded tiny video transformer, trained on fresh clips shaped like the study's."""
    return tiny_video.train(cfg.model, cfg.clips)


class PhysicsProbingStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clips: clip_data.ClipConfig = Field(clip_data.ClipConfig(impossible_rate=0.5), description=(
        "the probed clips (wrap world: position balanced); impossible twins for the possible probe"))
    video_model: tiny_video.VideoModelConfig = Field(tiny_video.VideoModelConfig(),
                                                      description="the embedded model (used when model is unset)")
    model: models.ModelRef | None = Field(None, description="any HF video encoder (id or folder) instead")
    load: models.ModelConfig = models.ModelConfig()
    random_control: tiny_video.RandomInitConfig | None = Field(
        tiny_video.RandomInitConfig(), description="the same architecture with random weights, probed beside "
                                                    "it (null: skip)")
    variables: list[str] = Field(default_factory=lambda: ["speed", "accel", "velocity", "acceleration", "direction",
                                                          "possible"], min_length=1)
    extract: VideoExtractConfig = Field(VideoExtractConfig(sites=["embed"]), description=(
        "sites are set to the residual stream at every depth (embed, blocks.I.resid_post); pooling: mean "
        "over all patch tokens, and per patch: mean over frames"))
    probes: probing.ProbeGrid = probing.ProbeGrid()
    depth: probing.DepthConfig = probing.DepthConfig()
    geometry: zone.DirectionGeometryConfig = zone.DirectionGeometryConfig()
    patches: zone.PatchDecodingConfig = zone.PatchDecodingConfig()
    readout: interventions.ReadoutConfig = interventions.ReadoutConfig()
    ablation: interventions.AblationConfig = interventions.AblationConfig()
    steering: interventions.SteeringConfig = interventions.SteeringConfig()
    report: ReportConfig = ReportConfig()
    num_shards: int = Field(4, ge=1, le=100_000, description="shards of the clips for extraction")
    actors: int = Field(1, ge=1, description="model actors")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)

    @field_validator("variables")
    @classmethod
    def _known_variables(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in clip_data.VARIABLES]
        if unknown:
            raise ValueError(f"variables {unknown} are not in the clips; they carry {sorted(clip_data.VARIABLES)}")
        return v


def model_config(cfg: PhysicsProbingStudy):
    """The study model's HF config, known before anything is trained or loaded."""
    return tiny_video.videomae_config(cfg.video_model, cfg.clips) if cfg.model is None else models.hf_config(cfg.model, cfg.load)


def study_scope(cfg: PhysicsProbingStudy) -> dict:
    config = model_config(cfg)
    return {"sites": residual_sites(config.num_hidden_layers), "variables": list(cfg.variables)}


def physics_graph(cfg: PhysicsProbingStudy) -> Graph:
    scope = study_scope(cfg)
    sites, variables = scope["sites"], scope["variables"]
    clips = node(clip_data.make_clips, cfg.clips, name="clips")
    if cfg.model is None:
        model = node(train_model, VideoTraining(model=cfg.video_model, clips=cfg.clips), name="video_model")["model"]
    else:
        model = node(models.use_model, cfg.model, name="model",
                     external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus)
    extract_cfg = cfg.extract.model_copy(update={"sites": sites})
    acts = sharded(extract_clips_shard, extract_cfg, ids=clip_data.clip_ids, num_shards=cfg.num_shards,
                   name="activations", actors=pool, data=clips, model=model)
    runs = {"trained": acts}
    if cfg.random_control is not None:
        random_model = node(tiny_video.random_init, cfg.random_control, name="random_model", model=model)["model"]
        random_pool = model_actor_pool(cfg.load, 1, cfg.actor_cpus, cfg.actor_gpus)
        runs["random"] = sharded(extract_clips_shard, extract_cfg.model_copy(update={"per_patch": False}),
                                 ids=clip_data.clip_ids, num_shards=cfg.num_shards, name="random_activations",
                                 actors=random_pool, data=clips, model=random_model)

    probe_metrics = {}
    for run, stored in runs.items():
        for var in variables:
            probe_cfg = probing.VariableProbe(variable=var, probe=cfg.probes.for_variable(var))
            for i, site in enumerate(sites):
                probe = node(probing.probe_variable, probe_cfg, name=f"probe.{run}.{var}.{i}",
                             activations=stored[site], data=clips)
                probe_metrics[f"{run}.{var}.{i}"] = probe["metrics"]
    depth = node(probing.depth_report, cfg.depth.model_copy(update=scope), name="depth", **probe_metrics)

    pooled = {site: acts[site] for site in sites}
    geometry = node(zone.direction_geometry, cfg.geometry.model_copy(update=scope), name="geometry",
                    depth=depth["metrics"], data=clips, **pooled)
    patches = node(zone.patch_decoding, cfg.patches.model_copy(update=scope), name="patch_decoding",
                   depth=depth["metrics"], data=clips, **{s + PATCHES: acts[s + PATCHES] for s in sites})
    readout = node(interventions.readout_probes, cfg.readout.model_copy(update=scope), name="readout",
                   data=clips, **pooled)
    ablation_cfg = cfg.ablation.model_copy(update={**scope, "n_blocks": len(sites) - 1})
    ablations = sharded(interventions.ablation_shard, ablation_cfg, ids=interventions.ablation_conditions,
                        num_shards=len(interventions.ablation_conditions(ablation_cfg)), name="ablation",
                        actors=pool, model=model, data=clips, readout=readout["readout"])
    ablation = node(interventions.ablation_report, ablation_cfg, name="ablation_report", scores=ablations["scores"])
    steering_cfg = cfg.steering.model_copy(update=scope)
    subspace = node(interventions.steering_subspace, steering_cfg, name="steering_subspace", depth=depth["metrics"],
                    data=clips, **pooled)
    steered = sharded(interventions.steering_shard, steering_cfg, ids=interventions.steering_dims,
                      num_shards=len(interventions.steering_dims(steering_cfg)), name="steering", actors=pool,
                      model=model, data=clips, readout=readout["readout"], subspace=subspace["metrics"],
                      basis=subspace["basis"], **pooled)
    steering = node(interventions.steering_report, steering_cfg, name="steering_report", rotation=steered["rotation"])
    report = node(physics_report, cfg.report.model_copy(update=scope), name="physics_report",
                  depth=depth["metrics"], geometry=geometry["metrics"], patches=patches["metrics"],
                  ablation=ablation["metrics"], steering=steering["metrics"])
    return Graph(report)


def validate(cfg: PhysicsProbingStudy) -> None:
    """Before any compute: the model is a video encoder that takes these clips (frames, size), the layer
    indices of the config exist, and ablations fit its attention."""
    from interpflow.tasks.video.layout import token_grid

    config = model_config(cfg)
    try:
        token_grid(config, frames=cfg.clips.frames, size=cfg.clips.size)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    n_layers = config.num_hidden_layers + 1
    for field, layer in (("geometry.layer", cfg.geometry.layer), ("patches.layer", cfg.patches.layer),
                         ("steering.layer", cfg.steering.layer)):
        if layer is not None and not 0 <= layer < n_layers:
            raise ValueError(f"{field}={layer} is out of range: the model has layers 0..{n_layers - 1} "
                             f"(0 = embedding output, i = after block i-1)")
    if cfg.clips.impossible_rate == 0 and "possible" in cfg.variables:
        raise ValueError("variables has 'possible' but clips.impossible_rate=0 makes every clip possible; "
                         "set clips.impossible_rate>0 or drop 'possible'")
    from interpflow.tasks.video.ablation import SUPPORTED

    if config.model_type not in SUPPORTED:
        raise ValueError(f"model: attention ablations support {list(SUPPORTED)}, not '{config.model_type}'")
