"""The video-language news benchmark (issue #13; dataset reference: ReutersViLNews, arXiv 2401.12419) on a
user's copy in the documented layout, or on the generated stand-in.

Methods, as the graph runs them:
 1. Data: the stand-in (squares whose colour, motion and background fix every annotation) written in the
    documented layout, or a user's copy; both validated by the same loader (one line per problem).
 2. Video model: the embedded tiny VideoMAE trained on the physics clips of #9, or any HF video encoder.
 3. Video embeddings, sharded over videos on model actors: frames sampled into clips (uniform or per
    segment), decoded with only the sampled frames kept, the residual stream mean-pooled per clip and
    averaged per video. Text embeddings of every title, description and story (all-MiniLM-L6-v2).
 4. Baselines: a dual encoder trained contrastively on Ray Train (retrieval), nearest-neighbour captions
    and stories from the training texts it retrieves, a multi-label keyword classifier.
 5. Evaluation per task, overall and per category, of the baselines, the oracle (the truth itself), a
    shuffled file (chance) and, if given, a user's predictions files.
 6. A report with the stand-in's checks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks import models
from interpflow.tasks.news import baselines
from interpflow.tasks.news import predictions as prediction_files
from interpflow.tasks.news import evaluate as scoring
from interpflow.tasks.news import embed as news_embed
from interpflow.tasks.news import layout
from interpflow.tasks.news import standin as stand_in
from interpflow.tasks.types import Seed
from interpflow.tasks.video import clips as clip_data
from interpflow.tasks.video import model as tiny_video
from interpflow.tasks.video.extract import residual_sites
from interpflow.workflows.engine import Graph, node, sharded, trained
from interpflow.workflows.engine.training import Training
from interpflow.workflows.extract import model_actor_pool
from interpflow.workflows.physics_probing import VideoTraining, train_model


class ReferenceSystem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field("oracle", pattern="^(oracle|shuffled)$")
    seed: Seed = 0


def reference_predictions(cfg: ReferenceSystem, items) -> dict:
    """Node: the oracle's or the shuffled system's predictions files (one table per task)."""
    return prediction_files.oracle(items) if cfg.kind == "oracle" else prediction_files.shuffled(items, seed=cfg.seed)


class PredictionsFolder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


def user_predictions(cfg: PredictionsFolder) -> dict:
    """Node: a user's predictions files, checked for their columns."""
    return prediction_files.read_folder(cfg.path)


class NewsBenchmark(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: layout.NewsDatasetConfig = layout.NewsDatasetConfig()
    standin: stand_in.StandInConfig = Field(stand_in.StandInConfig(), description="the generated copy (used when "
                                                                                 "dataset.path is unset)")
    video_model: tiny_video.VideoModelConfig = Field(
        tiny_video.VideoModelConfig(layers=4, steps=400, train_clips=3000),
        description="the embedded video model, trained on the physics clips of #9 (used when model is unset)")
    video_clips: clip_data.ClipConfig = Field(clip_data.ClipConfig(n_clips=100), description=(
        "the physics clips the embedded model is checked on; frames and size follow video.sampling.clip_frames "
        "and the frame size"))
    model: models.ModelRef | None = Field(None, description="any HF video encoder (id or folder) instead")
    load: models.ModelConfig = models.ModelConfig()
    video: news_embed.VideoEmbedConfig = news_embed.VideoEmbedConfig()
    feature_layers: list[int] = Field([0, -1], min_length=1, description=(
        "residual-stream depths whose embeddings the baselines use, concatenated (0: embedding output, "
        "i: after block i-1, -1: the last block)"))
    text: news_embed.TextEncoderConfig = news_embed.TextEncoderConfig()
    retrieval: baselines.DualEncoderConfig = baselines.DualEncoderConfig()
    retrieval_workers: int = Field(1, ge=1, description="Ray Train workers for the dual encoder")
    keywords: baselines.KeywordClassifierConfig = baselines.KeywordClassifierConfig()
    evaluate: scoring.EvaluateConfig = scoring.EvaluateConfig()
    predictions: str | None = Field(None, description="a folder of your system's predictions files, scored beside "
                                                      "the baselines")
    shuffle_seed: Seed = 0
    report: scoring.NewsReportConfig = scoring.NewsReportConfig()
    num_shards: int = Field(4, ge=1, le=100_000, description="shards of the videos for embedding")
    actors: int = Field(1, ge=1, description="model actors")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)


def model_config(cfg: NewsBenchmark):
    """The video model's HF config, known before anything is trained or loaded."""
    return tiny_video.videomae_config(cfg.video_model, training_clips(cfg)) if cfg.model is None else models.hf_config(cfg.model, cfg.load)


def training_clips(cfg: NewsBenchmark) -> clip_data.ClipConfig:
    size = cfg.video.size or cfg.standin.size
    return cfg.video_clips.model_copy(update={"frames": cfg.video.sampling.clip_frames, "size": size})


def feature_sites(cfg: NewsBenchmark) -> list[str]:
    sites = residual_sites(model_config(cfg).num_hidden_layers)
    return list(dict.fromkeys(sites[i] for i in cfg.feature_layers))


def news_graph(cfg: NewsBenchmark) -> Graph:
    if cfg.dataset.path is None:
        root = node(stand_in.make_standin, cfg.standin, name="standin")["root"]
        data = node(layout.load_news, cfg.dataset, name="dataset", root=root)
    else:
        data = node(layout.load_news, cfg.dataset, name="dataset",
                    external={"copy": layout.copy_identity(cfg.dataset.path)})
    items = data["items"]
    if cfg.model is None:
        model = node(train_model, VideoTraining(model=cfg.video_model, clips=training_clips(cfg)),
                     name="video_model")["model"]
        video_cfg = cfg.video.model_copy(update={"size": cfg.video.size or cfg.standin.size})
    else:
        model = node(models.use_model, cfg.model, name="model",
                     external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
        video_cfg = cfg.video
    sites = feature_sites(cfg)
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus)
    videos = sharded(news_embed.embed_videos_shard, video_cfg.model_copy(update={"sites": sites}),
                     ids=layout.item_ids, num_shards=cfg.num_shards, name="video_embeddings", actors=pool,
                     items=items, model=model)
    per_site = {site: videos[site] for site in sites}
    texts = node(news_embed.embed_texts, cfg.text, name="text_embeddings", items=items)["texts"]

    encoder = trained(baselines.train_dual_encoder, cfg.retrieval, training=Training(num_workers=cfg.retrieval_workers),
                      name="dual_encoder", texts=texts, items=items, **per_site)["weights"]
    generated = node(baselines.retrieval_predictions, cfg.retrieval, name="baseline_predictions", weights=encoder,
                     texts=texts, items=items, **per_site)
    keywords = node(baselines.keyword_predictions, cfg.keywords, name="keyword_classifier", items=items, **per_site)
    systems = {
        "baseline": {"captioning": generated["captioning"], "paragraph": generated["paragraph"],
                     "retrieval": generated["retrieval"], "keywords": keywords["keywords"]},
        "oracle": node(reference_predictions, ReferenceSystem(kind="oracle"), name="oracle", items=items),
        "shuffled": node(reference_predictions, ReferenceSystem(kind="shuffled", seed=cfg.shuffle_seed),
                         name="shuffled", items=items),
    }
    if cfg.predictions is not None:
        systems["user"] = node(user_predictions, PredictionsFolder(path=cfg.predictions), name="user_predictions",
                               external={"predictions": prediction_files.folder_identity(cfg.predictions)})
    submitted = prediction_files.tasks_in_folder(cfg.predictions) if cfg.predictions is not None else []
    scores = {}
    for task in prediction_files.TASKS:
        inputs = {name: files[task] for name, files in systems.items() if name != "user" or task in submitted}
        scores[task] = node(scoring.evaluate_task, cfg.evaluate.model_copy(update={"task": task}),
                            name=f"evaluate.{task}", items=items, **inputs)["metrics"]
    return Graph(node(scoring.news_report, cfg.report, name="news_report", **scores))


def validate(cfg: NewsBenchmark) -> None:
    """Before any compute: the copy's layout (every problem listed), the model takes the clips, the feature
    layers exist, and a predictions folder has the right columns."""
    from interpflow.tasks.video.layout import token_grid

    if cfg.dataset.path is not None:
        rows, problems = layout.validate_copy(cfg.dataset.path)
        if problems and cfg.dataset.on_problem == "error":
            raise ValueError(f"dataset.path: {len(problems)} problem(s) (set dataset.on_problem=skip to leave "
                             f"those rows out):\n" + "\n".join(message for _, _, message in problems))
    try:
        config = model_config(cfg)
    except ValueError as exc:
        if cfg.model is not None:
            raise
        clips = training_clips(cfg)
        raise ValueError(f"video.size={clips.size} / video.sampling.clip_frames={clips.frames} do not fit the "
                         f"embedded video model ({exc}); set video.size to a multiple of "
                         f"video_model.patch_size={cfg.video_model.patch_size}") from None
    size = cfg.video.size or (cfg.standin.size if cfg.model is None else getattr(config, "image_size", 224))
    try:
        token_grid(config, frames=cfg.video.sampling.clip_frames, size=size)
    except ValueError as exc:
        raise ValueError(f"model: {exc} (set video.sampling.clip_frames / video.size to what it takes)") from None
    depth = config.num_hidden_layers + 1
    bad = [i for i in cfg.feature_layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"feature_layers {bad} are out of range: the model has depths 0..{depth - 1} "
                         f"(0 = embedding output, -1 = the last block)")
    if cfg.predictions is not None:
        prediction_files.read_folder(cfg.predictions)
