"""VTCD: video concepts and their importance (issue #10; method: "Understanding Video Transformers via
Universal Concept Discovery", Kowal et al., CVPR 2024) on any HF video classifier.

Methods, as the graph runs them:
 1. Clips with planted ground truth: the label is a moving ball's direction, a static distractor square
    is present too; ball and square masks are stored (``tasks.concepts.vtcd_clips``).
 2. Model: the embedded tiny ViViT classifier, or any HF video classifier by id/path.
 3. Tubelets, sharded over the target class's videos on model actors: per (layer, head), SLIC on the
    feature volume (keys by default), tiny segments dropped, masked-mean features.
 4. Concepts, one node per (layer, head): k-means with the elbow rule (or convex NMF); spread,
    silhouette, token IoU with the planted objects.
 5. CRIS, sharded over draws on model actors (many masks per forward pass): random halves of all
    concepts removed by zeroing the feature at their tokens; importance from the draws.
 6. Checks, sharded over conditions on model actors: removal curves (most/least/random orders) and
    head importance with head pruning.
 7. A report with figures and the planted checks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import models
from interpflow.tasks.concepts import cris as removal
from interpflow.tasks.concepts.classifier import classifier_auto, load_classifier
from interpflow.tasks.concepts.tubelets import TubeletConfig, study_layers_heads, target_ids, tubelet_shard
from interpflow.tasks.concepts.vtcd_clips import ConceptClipConfig, make_concept_clips
from interpflow.tasks.concepts.vtcd_concepts import ConceptConfig, discover_concepts
from interpflow.tasks.concepts.vtcd_model import VideoClassifierConfig, classifier_config, train_video_classifier
from interpflow.tasks.concepts.vtcd_report import ImportanceConfig, VtcdReportConfig, cris_importance, vtcd_report
from interpflow.tasks.video.layout import token_grid
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.extract import model_actor_pool


class ClassifierTraining(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: VideoClassifierConfig
    clips: ConceptClipConfig


def train_classifier(cfg: ClassifierTraining) -> dict:
    """Graph node: the embedded video classifier, trained on fresh clips shaped like the study's."""
    return train_video_classifier(cfg.model, cfg.clips)


class VTCDStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clips: ConceptClipConfig = Field(ConceptClipConfig(n_clips=180), description=(
        "the clips whose concepts are discovered (the classes in turn: n_clips/classes of the target class)"))
    video_model: VideoClassifierConfig = Field(VideoClassifierConfig(), description="the embedded classifier "
                                                                                    "(used when model is unset)")
    model: models.ModelRef | None = Field(None, description="any HF video classifier (id or folder) instead")
    load: models.ModelConfig = models.ModelConfig()
    tubelets: TubeletConfig = TubeletConfig()
    concepts: ConceptConfig = ConceptConfig()
    cris: removal.CrisConfig = removal.CrisConfig()
    importance: ImportanceConfig = ImportanceConfig()
    curves: removal.CurveConfig = removal.CurveConfig()
    report: VtcdReportConfig = VtcdReportConfig()
    num_shards: int = Field(2, ge=1, le=100_000, description="shards of the videos for tubelets")
    cris_shards: int = Field(8, ge=1, description="shards of the CRIS draws")
    check_shards: int = Field(4, ge=1, description="shards of the removal curves and head-pruning conditions")
    actors: int = Field(1, ge=1, description="model actors")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)


def model_config(cfg: VTCDStudy):
    """The study model's HF config, known before anything is trained or loaded."""
    return classifier_config(cfg.video_model, cfg.clips) if cfg.model is None else models.hf_config(cfg.model, cfg.load)


def grid_of(cfg: VTCDStudy) -> list[int]:
    grid = token_grid(model_config(cfg), frames=cfg.clips.frames, size=cfg.clips.size)
    return [grid.prefix, grid.frames, grid.height, grid.width]


def pairs_of(cfg: VTCDStudy) -> list[tuple[int, int]]:
    config = model_config(cfg)
    return study_layers_heads(cfg.tubelets, config.num_hidden_layers, config.num_attention_heads)


def vtcd_graph(cfg: VTCDStudy) -> Graph:
    grid, pairs = grid_of(cfg), pairs_of(cfg)
    target = cfg.tubelets.target_class
    feature = cfg.tubelets.feature
    clips = node(make_concept_clips, cfg.clips, name="clips")
    if cfg.model is None:
        model = node(train_classifier, ClassifierTraining(model=cfg.video_model, clips=cfg.clips),
                     name="video_classifier")["model"]
    else:
        model = node(models.use_model, cfg.model, name="model",
                     external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus, setup=load_classifier)
    tubelets = sharded(tubelet_shard, cfg.tubelets, ids=target_ids, num_shards=cfg.num_shards, name="tubelets",
                       actors=pool, data=clips, model=model)
    members, concept_tables = {}, {}
    for layer, head in pairs:
        found = node(discover_concepts, cfg.concepts.model_copy(update={"layer": layer, "head": head, "grid": grid}),
                     name=f"concepts.{layer}.{head}", tubelets=tubelets["tubelets"], data=clips)
        members[f"members.{layer}.{head}"] = found["members"]
        concept_tables[f"concepts.{layer}.{head}"] = found["concepts"]
    cris_cfg = cfg.cris.model_copy(update={"feature": feature, "target_class": target})
    draws = sharded(removal.cris_shard, cris_cfg, ids=removal.draw_ids, num_shards=cfg.cris_shards, name="cris",
                    actors=pool, data=clips, model=model, **members)
    importance = node(cris_importance, cfg.importance, name="importance", draws=draws["draws"], **concept_tables)
    curve_cfg = cfg.curves.model_copy(update={"feature": feature, "target_class": target})
    conditions = removal.check_conditions(curve_cfg)
    checks = sharded(removal.check_shard, curve_cfg, ids=removal.check_conditions,
                     num_shards=min(len(conditions), cfg.check_shards), name="checks", actors=pool, data=clips,
                     model=model, importance=importance["importance"], **members)
    report = node(vtcd_report, cfg.report.model_copy(update={"grid": grid}), name="vtcd_report",
                  importance=importance["importance"], heads=importance["heads"], curves=checks["curves"],
                  pruning=checks["pruning"], data=clips, **members)
    return Graph(report)


def validate(cfg: VTCDStudy) -> None:
    """Before any compute: the model is a video classifier that takes these clips, the layers and heads
    exist, it exposes the feature, the target class exists, and there are enough videos to cluster."""
    from interpflow.tasks.concepts.features import feature_modules

    config = model_config(cfg)
    try:
        token_grid(config, frames=cfg.clips.frames, size=cfg.clips.size)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    if getattr(config, "num_channels", cfg.clips.channels) != cfg.clips.channels:
        raise ValueError(f"clips.channels={cfg.clips.channels} but the model takes num_channels={config.num_channels}; "
                         f"set clips.channels={config.num_channels}")
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    bad_layers = [i for i in cfg.tubelets.layers if not 0 <= i < n_layers]
    if bad_layers:
        raise ValueError(f"tubelets.layers has {bad_layers} out of range: the model has blocks 0..{n_layers - 1}")
    bad_heads = [h for h in cfg.tubelets.heads if not 0 <= h < n_heads]
    if bad_heads:
        raise ValueError(f"tubelets.heads has {bad_heads} out of range: the model has heads 0..{n_heads - 1}")
    n_labels = getattr(config, "num_labels", 0)
    if not 0 <= cfg.tubelets.target_class < max(n_labels, 1):
        raise ValueError(f"tubelets.target_class={cfg.tubelets.target_class} but the model has {n_labels} classes "
                         f"(0..{n_labels - 1})")
    videos = len(range(cfg.tubelets.target_class, cfg.clips.n_clips, cfg.clips.classes))
    if videos < cfg.concepts.max_concepts:
        raise ValueError(f"only {videos} videos of the target class (clips.n_clips={cfg.clips.n_clips}, one clip in "
                         f"{cfg.clips.classes}) for concepts.max_concepts={cfg.concepts.max_concepts} clusters; raise "
                         f"clips.n_clips to at least {cfg.clips.classes * cfg.concepts.max_concepts} or lower "
                         "concepts.max_concepts")
    if cfg.concepts.min_concepts > cfg.concepts.max_concepts:
        raise ValueError(f"concepts.min_concepts={cfg.concepts.min_concepts} exceeds concepts.max_concepts="
                         f"{cfg.concepts.max_concepts}")
    import torch

    with torch.device("meta"):
        net = classifier_auto(config).from_config(config)
    try:
        feature_modules(net, cfg.tubelets.feature)
    except ValueError as exc:
        raise ValueError(f"tubelets.feature: {exc}") from None
    if cfg.curves.prune_counts and cfg.tubelets.feature == "tokens":  # heads would be whole layers
        raise ValueError("curves.prune_counts needs per-head concepts, which tubelets.feature=tokens does not have; "
                         "set curves.prune_counts=[] or another feature")
