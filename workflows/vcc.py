"""The Visual Concept Connectome (VCC; Kowal, Wildes, Derpanis, CVPR 2024) on any HF image classifier
(issue #10, the image half).

Methods, as the graph runs them:
 1. Images: houses (roof + wall) and carts (wheels + body) with irrelevant textures in both classes,
    every pixel's part known (``tasks.concepts.vcc_images``).
 2. Model: the embedded tiny ViT classifier trained on fresh images of the same kind, or any HF image
    classifier by id/path.
 3. Tokens (sharded over images, on model actors): every analysed layer's patch tokens, the logits,
    and d(class logit)/d(top layer) for the class edges. The four actor steps (tokens, segment
    activations of all layers, gradients of all layer pairs, class ablations) are one sharded node each,
    so a run starts four actor pools whatever the number of layers.
 4. Segmentation, top down, one node per layer: k-means on the top layer's tokens per image, SLIC on
    each lower layer's tokens inside its parent segments.
 5. Segment images (crop, mean fill, resize) of every layer through the model (one sharded node over
    (layer, segment) ids, on actors); per layer, their pooled activations clustered into concepts (size
    and frequency filters), CAVs against random segment sets.
 6. Per adjacent layer pair: gradients of each upper concept's assignment with respect to the lower
    layer (one sharded node over (upper layer, segment) ids for all pairs, on actors), then ITCAV edges
    t-tested against random CAVs over the upper segments that contain the lower concept (``edges.within``).
    Class edges from the top layer: TCAV scores, and (default ``edges.class_test=ablation``) a causal
    test: each top concept's pixels mean-filled in the images that hold it (sharded over images, on
    actors), the class logit's drop t-tested against the same mask shifted elsewhere.
 7. The connectome (GraphML, JSON, layered plot), concept paths in misclassified images, and the check
    against the planted hierarchy (edge precision/recall, textures kept from the class).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from interpflow.tasks import models
from interpflow.tasks.concepts import cav as vcav
from interpflow.tasks.concepts import connectome
from interpflow.tasks.concepts import vcc_ablation as vablate
from interpflow.tasks.concepts import vcc_images as vimages
from interpflow.tasks.concepts import vcc_model
from interpflow.tasks.concepts import vcc_segments as vseg
from interpflow.tasks.concepts.classifier import load_classifier
from interpflow.workflows.engine import Graph, node, sharded
from interpflow.workflows.extract import model_actor_pool


class VccStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: vimages.ImageConfig = Field(vimages.ImageConfig(), description="the analysed images (planted parts)")
    classifier: vcc_model.ClassifierConfig = Field(vcc_model.ClassifierConfig(),
                                                   description="the embedded model (used when model is unset)")
    model: models.ModelRef | None = Field(None, description="any HF image classifier (id or folder) instead")
    load: models.ModelConfig = models.ModelConfig()
    layers: list[int] = Field([0, 1, 2], min_length=1, description=(
        "analysed blocks, bottom to top (block i's output); the top one is joined to the classes, so it must leave a block above it (the head reads only the CLS token of the last block)"))
    tokens: vseg.TokenConfig = vseg.TokenConfig()
    segment: vseg.SegmentConfig = vseg.SegmentConfig()
    segment_activations: vseg.SegmentActivationConfig = vseg.SegmentActivationConfig()
    concepts: vseg.ConceptConfig = vseg.ConceptConfig()
    cav: vcav.CavConfig = vcav.CavConfig()
    gradients: vseg.GradientConfig = vseg.GradientConfig()
    edges: vcav.EdgeConfig = vcav.EdgeConfig()
    ablation: vablate.AblationConfig = Field(vablate.AblationConfig(), description=(
        "the class edges' ablations (with edges.class_test ablation or both)"))
    failures: connectome.FailureConfig = connectome.FailureConfig()
    ground_truth: connectome.GroundTruthConfig = connectome.GroundTruthConfig()
    num_shards: int = Field(2, ge=1, le=100_000, description="shards of images / segments for the actor nodes")
    actors: int = Field(1, ge=1, description="model actors per actor node")
    actor_cpus: float = Field(1, gt=0)
    actor_gpus: float = Field(0, ge=0)

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"layers must be strictly increasing (bottom to top), got {v}")
        return v


def model_config(cfg: VccStudy):
    """The classifier's HF config, known before anything is trained or loaded."""
    return vcc_model.vit_config(cfg.classifier, cfg.images) if cfg.model is None else models.hf_config(cfg.model, cfg.load)


def vcc_graph(cfg: VccStudy) -> Graph:
    layers = list(cfg.layers)
    classes = list(vimages.CLASSES)
    images = node(vimages.make_images, cfg.images, name="images")
    if cfg.model is None:
        model = node(vcc_model.train, vcc_model.ClassifierTraining(classifier=cfg.classifier, images=cfg.images),
                     name="classifier")["model"]
    else:
        model = node(models.use_model, cfg.model, name="model",
                     external={"model": models.model_identity(cfg.model.path, cfg.model.revision)})
    pool = model_actor_pool(cfg.load, cfg.actors, cfg.actor_cpus, cfg.actor_gpus, setup=load_classifier)
    tokens = sharded(vseg.extract_tokens, cfg.tokens.model_copy(update={"layers": layers, "classes": len(classes)}),
                     ids=vimages.image_ids, num_shards=cfg.num_shards, name="tokens", actors=pool, images=images,
                     model=model)

    segments, parent = {}, {}
    for layer in reversed(layers):                       # top down: each layer inside its parent's segments
        segments[layer] = node(vseg.segment_layer, cfg.segment.model_copy(update={"layer": layer}),
                               name=f"segments.{layer}", tokens=tokens[f"tokens.{layer}"], ids=tokens["ids"], **parent)
        parent = {"parents": segments[layer]}

    # one sharded node (one actor pool) for every layer's segment images, ids (layer, segment)
    per_layer_segments = {f"segments_{layer}": segments[layer] for layer in layers}
    acts = sharded(vseg.extract_segments, cfg.segment_activations.model_copy(update={"layers": layers}),
                   ids=vseg.layer_segment_ids, num_shards=cfg.num_shards, name="segment_activations", actors=pool,
                   model=model, images=images, **per_layer_segments)
    concepts, cavs = {}, {}
    for layer in layers:
        concepts[layer] = node(vseg.find_concepts, cfg.concepts.model_copy(update={"layer": layer}),
                               name=f"concepts.{layer}", segments=segments[layer], ids=acts[f"ids.{layer}"],
                               pooled=acts[f"pooled.{layer}"], images=images)
        cavs[layer] = node(vcav.fit_layer_cavs, cfg.cav.model_copy(update={"layer": layer}), name=f"cavs.{layer}",
                           ids=acts[f"ids.{layer}"], pooled=acts[f"pooled.{layer}"], concepts=concepts[layer])

    edge_tables = {}
    if len(layers) > 1:
        # one sharded node for the gradients of every adjacent pair, ids (upper layer, segment)
        uppers = layers[1:]
        grads = sharded(vseg.concept_gradients, cfg.gradients.model_copy(update={"layers": layers}),
                        ids=vseg.concept_segment_ids, num_shards=cfg.num_shards, name="gradients", actors=pool,
                        model=model, images=images, **{f"segments_{u}": segments[u] for u in uppers},
                        **{f"concepts_{u}": concepts[u] for u in uppers})
        for lower, upper in zip(layers, uppers):
            pair = {"lower": lower, "upper": upper}
            edges = node(vcav.itcav_edges, cfg.edges.model_copy(update=pair), name=f"edges.{lower}-{upper}",
                         grads=grads[f"grads.{lower}-{upper}"], concept=grads[f"concept.{lower}-{upper}"],
                         segment=grads[f"segment.{lower}-{upper}"], cavs=cavs[lower], upper=concepts[upper],
                         lower_segments=segments[lower], lower_concepts=concepts[lower])
            edge_tables[f"edges_{lower}_{upper}"] = edges["edges"]
    top = layers[-1]
    ablations = {}
    if cfg.edges.class_test != "tcav":
        # use, not only sensitivity: each top concept's pixels mean-filled in every image that holds it
        ablations["ablations"] = sharded(
            vablate.class_ablations, cfg.ablation.model_copy(update={"classes": len(classes)}), ids=vimages.image_ids,
            num_shards=cfg.num_shards, name="ablation", actors=pool, model=model, images=images,
            segments=segments[top], concepts=concepts[top])["drops"]
    to_class = node(vcav.class_edges, cfg.edges.model_copy(update={"lower": top, "upper": -1, "classes": classes}),
                    name="edges.class", ids=tokens["ids"], class_grads=tokens["class_grads"], images=images,
                    cavs=cavs[top], **ablations)
    per_layer = {f"concepts_{layer}": concepts[layer] for layer in layers}
    graph = node(connectome.build_connectome, connectome.ConnectomeConfig(layers=layers, classes=classes),
                 name="connectome", class_edges=to_class["edges"], **edge_tables, **per_layer)
    failures = node(connectome.failure_paths, cfg.failures.model_copy(update={"layers": layers, "classes": classes}),
                    name="failures", ids=tokens["ids"], logits=tokens["logits"], images=images,
                    connectome=graph["graph"], **per_layer)
    report = node(connectome.ground_truth, cfg.ground_truth.model_copy(update={"layers": layers, "classes": classes}),
                  name="ground_truth", connectome=graph)
    return Graph(report, failures)


def validate(cfg: VccStudy) -> None:
    """Before any compute: the model is a patch-token image classifier that takes these images, the
    layers exist, and there are enough images for the clusters asked for."""
    config = model_config(cfg)
    if getattr(config, "patch_size", None) is None or getattr(config, "image_size", None) is None:
        raise ValueError(f"model: model type '{config.model_type}' has no patch_size/image_size: VCC here needs a "
                         "ViT-like image classifier (patch tokens on a grid), e.g. ViTForImageClassification")
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    if size != cfg.images.size:
        raise ValueError(f"images.size={cfg.images.size} but the model takes image_size={size}: set "
                         f"images.size={size} (or use a model made for {cfg.images.size}-pixel images)")
    rows, _ = vcc_model.token_grid(config)
    if size % rows:
        raise ValueError(f"model: patch_size={config.patch_size} does not divide image_size={size}")
    n = config.num_hidden_layers
    for layer in cfg.layers:
        if not 0 <= layer < n - 1:
            last = "" if layer != n - 1 else (" (block {0} is the last: the head reads only its CLS token, so "
                                              "patch-token concepts there cannot reach the class)".format(n - 1))
            raise ValueError(f"layers: layer {layer} is out of range: the model has blocks 0..{n - 1} and the "
                             f"analysed ones must lie in 0..{n - 2}{last}; e.g. layers=[{max(n - 3, 0)}, {max(n - 2, 0)}]")
    if (getattr(config, "num_labels", 0) or 0) < len(vimages.CLASSES):
        raise ValueError(f"model: it has {config.num_labels} class logits; the images have {len(vimages.CLASSES)} "
                         "classes (logits 0 and 1 are read as house and cart)")
    for field, k in (("concepts.max_concepts", cfg.concepts.max_concepts),
                     ("concepts.min_concepts", cfg.concepts.min_concepts),
                     ("segment.top_clusters", cfg.segment.top_clusters)):
        if cfg.images.n_images < k:
            raise ValueError(f"images.n_images={cfg.images.n_images} is fewer than {field}={k}: there must be at "
                             f"least as many images as clusters; raise images.n_images or lower {field}")
    if cfg.segment.top_clusters > rows * rows:
        raise ValueError(f"segment.top_clusters={cfg.segment.top_clusters} exceeds the {rows * rows} patch tokens "
                         "of an image; lower it")
    if cfg.concepts.min_concepts > cfg.concepts.max_concepts:
        raise ValueError(f"concepts.min_concepts={cfg.concepts.min_concepts} exceeds concepts.max_concepts="
                         f"{cfg.concepts.max_concepts}; lower min_concepts")
