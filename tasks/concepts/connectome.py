"""The Visual Concept Connectome: concepts per layer joined by significant ITCAV edges, the top layer
joined to the classes by ablation (or TCAV) edges; saved as GraphML and JSON, drawn as a layered graph; the concept
paths that fire in misclassified images; and the check against the planted part -> whole hierarchy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.concepts.vcc_images import CLASSES, PART_OF, WHOLES

OBJECTS = frozenset(PART_OF) | frozenset(WHOLES)       # labels of parts and wholes
DECIDED = OBJECTS | {"texture"}                        # concept labels the planted hierarchy speaks about

LABEL_COLOURS = {"roof": "#d62728", "wall": "#e6c229", "house": "#ff7f0e", "wheel": "#444444", "body": "#1f5fd6",
                 "cart": "#17becf", "texture": "#2ca02c", "background": "#bbbbbb", "unlabelled": "#ffffff"}


class ConnectomeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks, bottom to top (set by the workflow)")
    classes: list[str] = Field(default_factory=lambda: list(CLASSES), description="class names (set by the workflow)")


def _layer_inputs(cfg: ConnectomeConfig, inputs: dict, prefix: str) -> list:
    return [inputs[f"{prefix}_{layer}"] for layer in cfg.layers]


def _graph(cfg: ConnectomeConfig, inputs: dict):
    import networkx as nx

    g = nx.DiGraph()
    for depth, (layer, concepts) in enumerate(zip(cfg.layers, _layer_inputs(cfg, inputs, "concepts"))):
        for row in concepts["concepts"].to_pylist():
            if row["kept"]:
                g.add_node(row["concept"], layer=int(layer), depth=depth, label=row["label"],
                           label_iou=float(row["label_iou"]), segments=int(row["segments"]), kind="concept")
    for c, name in enumerate(cfg.classes):
        g.add_node(f"class.{name}", layer=-1, depth=len(cfg.layers), label=name, label_iou=1.0, segments=0,
                   kind="class")
    tables = [inputs[f"edges_{a}_{b}"] for a, b in zip(cfg.layers, cfg.layers[1:])]
    tables.append(inputs["class_edges"])
    all_edges = pa.concat_tables(tables)
    for row in all_edges.to_pylist():
        if row["significant"]:
            extra = {"effect": float(row["effect"])} if np.isfinite(row["effect"]) else {}   # ablation edges only
            g.add_edge(row["source"], row["target"], score=float(row["score"]), p=float(row["p"]),
                       random_score=float(row["random_score"]), test=row["test"], **extra)
    return g, all_edges


class GraphFiles:
    """The connectome as files: GraphML (for Gephi, Cytoscape, networkx) and node-link JSON."""

    def __init__(self, graph):
        self.graph = graph

    def save_pretrained(self, path) -> None:
        import networkx as nx

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        nx.write_graphml(self.graph, path / "connectome.graphml")
        (path / "connectome.json").write_text(json.dumps(nx.node_link_data(self.graph, edges="edges"), indent=1))


def draw(graph, layers: list[int], title: str = ""):
    """A layered drawing: one column per layer (bottom layer left), classes on the right; node colour is
    the ground-truth label. Edge width is what decided the edge: the (I)TCAV score above 1/2, or, dashed, an
    ablation's logit drop relative to the largest one drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth_nodes: dict[int, list[str]] = {}
    for n, d in graph.nodes(data=True):
        depth_nodes.setdefault(d["depth"], []).append(n)
    pos = {}
    for depth, nodes in depth_nodes.items():
        for i, n in enumerate(sorted(nodes)):
            pos[n] = (depth, -(i - (len(nodes) - 1) / 2))
    height = max((len(v) for v in depth_nodes.values()), default=1)
    fig, ax = plt.subplots(figsize=(2.6 * (len(layers) + 1) + 1, 0.8 * height + 1.8))
    largest_effect = max((d["effect"] for _, _, d in graph.edges(data=True) if _by_ablation(d)), default=0.0)
    for u, v, d in graph.edges(data=True):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        if _by_ablation(d):
            style = dict(lw=0.5 + 3 * max(d["effect"], 0) / max(largest_effect, 1e-12), linestyle="--")
        else:
            style = dict(lw=0.5 + 3 * max(d["score"] - 0.5, 0))
        ax.annotate("", xy=(x1 - 0.12, y1), xytext=(x0 + 0.12, y0),
                    arrowprops=dict(arrowstyle="-|>", alpha=0.6, color="#555", **style))
    for n, d in graph.nodes(data=True):
        x, y = pos[n]
        colour = LABEL_COLOURS.get(d["label"], "#ffffff")
        ax.scatter([x], [y], s=500 if d["kind"] == "concept" else 900, c=colour, edgecolors="k", zorder=3,
                   marker="o" if d["kind"] == "concept" else "s")
        text = f"{n}\n{d['label']}" if d["kind"] == "concept" else d["label"]
        ax.text(x, y - 0.38, text, ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(layers) + 1), [f"block {layer}" for layer in layers] + ["class"])
    ax.set_yticks([])
    ax.set_xlim(-0.6, len(layers) + 0.6)
    ax.set_ylim(-height / 2 - 1, height / 2 + 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or "Visual Concept Connectome (significant edges; colour: ground-truth label; "
                 "dashed: kept by ablation, width its logit drop)", fontsize=9)
    return fig


def _by_ablation(edge: dict) -> bool:
    return "ablation" in edge.get("test", "") and "effect" in edge


def build_connectome(cfg: ConnectomeConfig, **inputs) -> dict:
    """Graph node: the connectome (inputs ``concepts_<layer>`` (a concepts node's outputs),
    ``edges_<lower>_<upper>`` and ``class_edges`` (edge tables))."""
    import networkx as nx

    g, all_edges = _graph(cfg, inputs)
    layer_of = {n: d["layer"] for n, d in g.nodes(data=True)}
    label_of = {n: d["label"] for n, d in g.nodes(data=True)}
    all_edges = all_edges.append_column("source_label", pa.array([label_of.get(s, "") for s in
                                                                  all_edges.column("source").to_pylist()]))
    all_edges = all_edges.append_column("target_label", pa.array([label_of.get(t, "") for t in
                                                                  all_edges.column("target").to_pylist()]))
    nodes = pa.Table.from_pylist([{"node": n, **{k: d[k] for k in ("layer", "label", "label_iou", "segments", "kind")}}
                                  for n, d in g.nodes(data=True)])
    metrics = {"concepts": float(sum(1 for _, d in g.nodes(data=True) if d["kind"] == "concept")),
               "significant_edges": float(g.number_of_edges()), "tested_edges": float(all_edges.num_rows)}
    for a, b in zip(cfg.layers, cfg.layers[1:]):
        metrics[f"significant.{a}-{b}"] = float(sum(1 for u, v in g.edges if layer_of[u] == a and layer_of[v] == b))
    metrics["significant.class"] = float(sum(1 for _, v in g.edges if layer_of[v] == -1))
    return {"graph": nx.node_link_data(g, edges="edges"), "files": GraphFiles(g), "edges": all_edges, "nodes": nodes,
            "figure": draw(g, cfg.layers), "metrics": metrics}


def load_graph(data: dict):
    import networkx as nx

    return nx.node_link_graph(data, edges="edges")


# --- failure modes ---------------------------------------------------------------------------------------

class FailureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks (set by the workflow)")
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    fallback: int = Field(4, ge=0, description="with no misclassified image, show this many correct images of "
                                               "smallest margin instead (marked misclassified=false)")
    paths_per_image: int = Field(3, ge=1)


def _path_factor(edge: dict) -> float:
    """What an edge multiplies a path's score by: its (I)TCAV score when that decided it; 1 for an edge kept
    by ablation alone (its TCAV score is reported but did not decide it; its logit drop is kept beside)."""
    return 1.0 if edge.get("test") == "ablation" else edge["score"]


def image_paths(graph, present: list[set[str]], target: str) -> list[tuple[list[str], float, float]]:
    """Concept paths bottom layer -> ... -> top layer -> ``target`` along significant edges, using only
    concepts present in the image at each layer; with the product of the scores that decided the edges and
    the class edge's ablation logit drop (NaN when it was not decided by ablation). Strongest first: by
    score, then by the drop."""
    paths = [([c], 1.0) for c in present[0]]
    for layer_present in present[1:]:
        paths = [(p + [v], s * _path_factor(graph.edges[p[-1], v])) for p, s in paths for v in layer_present
                 if graph.has_edge(p[-1], v)]
    out = []
    for p, s in paths:
        if graph.has_edge(p[-1], target):
            edge = graph.edges[p[-1], target]
            out.append((p + [target], s * _path_factor(edge), float(edge.get("effect", float("nan")))))
    return sorted(out, key=lambda pse: (-pse[1], -np.nan_to_num(pse[2], nan=-np.inf), pse[0]))


def failure_paths(cfg: FailureConfig, ids, logits, images, connectome, **inputs) -> dict:
    """For misclassified images: which concept paths fire (present in the image, joined by significant
    edges) towards the predicted class, and towards the true one. Inputs ``concepts_<layer>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interpflow.tasks.concepts.vcc_segments import concat

    g = load_graph(connectome)
    ids = concat(ids)
    logits = concat(logits)[:, :len(cfg.classes)]
    labels = np.asarray(images["labels"])[ids]
    pred = logits.argmax(1)
    margin = logits[np.arange(len(ids)), labels] - np.max(np.where(np.eye(logits.shape[1], dtype=bool)[labels],
                                                                   -np.inf, logits), axis=1)
    wrong = np.flatnonzero(pred != labels)
    chosen = list(wrong) if len(wrong) else list(np.argsort(margin)[:cfg.fallback])
    present_by_layer = []
    for layer in cfg.layers:
        table = inputs[f"concepts_{layer}"]["assignments"]
        sets: dict[int, set[str]] = {}
        for image, concept in zip(table.column("image").to_pylist(), table.column("concept").to_pylist()):
            if concept:
                sets.setdefault(image, set()).add(concept)
        present_by_layer.append(sets)
    rows = []
    for i in chosen:
        image = int(ids[i])
        present = [sets.get(image, set()) for sets in present_by_layer]
        for toward, cls in (("predicted", int(pred[i])), ("true", int(labels[i]))):
            target = f"class.{cfg.classes[cls]}"
            found = image_paths(g, present, target)
            for path, score, effect in found[:cfg.paths_per_image] or [([], 0.0, float("nan"))]:
                rows.append({"image": image, "true": cfg.classes[int(labels[i])], "predicted": cfg.classes[int(pred[i])],
                             "misclassified": bool(pred[i] != labels[i]), "margin": float(margin[i]),
                             "toward": toward, "path": " -> ".join(path) or "(no path fires)",
                             "labels": " -> ".join(g.nodes[n]["label"] for n in path), "score": float(score),
                             "class_effect": effect})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image", pa.int64()), ("true", pa.string()), ("predicted", pa.string()), ("misclassified", pa.bool_()),
        ("margin", pa.float64()), ("toward", pa.string()), ("path", pa.string()), ("labels", pa.string()),
        ("score", pa.float64()), ("class_effect", pa.float64())]))
    n_show = max(1, min(len(chosen), 6))
    fig, axes = plt.subplots(1, n_show, figsize=(3.2 * n_show, 3.8), squeeze=False)
    for ax, i in zip(axes[0], chosen[:n_show]):
        image = int(ids[i])
        ax.imshow(images["images"][image])
        best = next((r for r in rows if r["image"] == image and r["toward"] == "predicted"), None)
        kind = "WRONG" if pred[i] != labels[i] else "low margin"
        ax.set_title(f"#{image} {kind}: true {cfg.classes[labels[i]]}, pred {cfg.classes[pred[i]]}", fontsize=7)
        ax.set_xlabel((best["labels"] if best and best["labels"] else "(no path)").replace(" -> ", "\n-> "), fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0][len(chosen[:n_show]):]:
        ax.axis("off")
    if not chosen:
        axes[0][0].text(0.5, 0.5, "no images", ha="center")
    fig.suptitle("Concept paths toward the predicted class (misclassified images, else lowest margins)", fontsize=8)
    fig.tight_layout()
    return {"paths": table, "figure": fig,
            "metrics": {"misclassified": float(len(wrong)), "accuracy": float((pred == labels).mean()),
                        "shown": float(len(chosen))}}


# --- ground truth ----------------------------------------------------------------------------------------

class GroundTruthConfig(BaseModel):
    """The check of the connectome against the planted hierarchy."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] = Field(default_factory=list, description="analysed blocks (set by the workflow)")
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    min_precision: float = Field(0.7, ge=0, le=1, description="edge precision needed for ground_truth_ok")
    min_recall: float = Field(0.5, ge=0, le=1, description="edge recall needed for ground_truth_ok")


def planted(source_label: str, target_label: str) -> bool:
    """Is (source concept -> target concept or class) a planted link? Part -> the whole it belongs to;
    part, whole or texture -> the same one layer up (a texture may persist through the blocks; it must
    not reach a class); part or whole -> its class. Background and unlabelled concepts have none."""
    if source_label == "texture":
        return target_label == "texture"
    if source_label not in OBJECTS:
        return False
    if target_label.startswith("class."):
        cls = target_label[len("class."):]
        return source_label == cls or PART_OF.get(source_label) == cls
    return target_label == source_label or PART_OF.get(source_label) == target_label


def decided(label: str) -> bool:
    """Does the planted hierarchy say anything about edges at a concept with this label? Parts, wholes,
    textures (which must reach nothing) and classes: yes. Background: no; its segments on the patch grid
    take in the objects' border patches, and a ViT's background tokens carry image-level information
    through attention, so its edges to and from objects are the model's, neither planted nor forbidden.
    Unlabelled concepts: no."""
    return label.startswith("class.") or label in DECIDED


def ground_truth(cfg: GroundTruthConfig, connectome) -> dict:
    """Edge precision and recall against the planted links over the edges the hierarchy decides (both
    ends decided, see ``decided``), the precision over every labelled edge beside it, and whether
    textures reach a class (which passes only when at least one texture concept exists)."""
    import networkx as nx

    g = load_graph(connectome["graph"])
    edges = connectome["edges"].to_pylist()
    label = {n: d["label"] for n, d in g.nodes(data=True)}

    def target_label(t: str) -> str:
        return t if t.startswith("class.") else label.get(t, "")

    labelled = [e for e in edges if label.get(e["source"], "unlabelled") != "unlabelled"
                and target_label(e["target"]) not in ("", "unlabelled")]
    for e in labelled:
        e["planted"] = planted(label[e["source"]], target_label(e["target"]))
        e["decided"] = decided(label[e["source"]]) and decided(target_label(e["target"]))
    judged = [e for e in labelled if e["decided"]]
    significant = [e for e in judged if e["significant"]]
    candidates = [e for e in judged if e["planted"]]
    hits = [e for e in candidates if e["significant"]]
    precision = len(hits) / len(significant) if significant else 0.0
    recall = len(hits) / len(candidates) if candidates else 0.0
    labelled_significant = [e for e in labelled if e["significant"]]
    kinds = {"part_to_whole": lambda s, t: PART_OF.get(s) == t, "same_part_up": lambda s, t: s == t,
             "to_class": lambda s, t: t.startswith("class.")}
    metrics = {"edge_precision": precision, "edge_recall": recall, "significant_judged": float(len(significant)),
               "edge_precision_with_background": len(hits) / max(len(labelled_significant), 1),
               "background_edges_significant": float(len(labelled_significant) - len(significant)),
               "planted_candidates": float(len(candidates)), "planted_found": float(len(hits)),
               "significant_unjudged": float(sum(e["significant"] for e in edges) - len(significant))}
    for kind, test in kinds.items():
        cand = [e for e in candidates if test(label[e["source"]], target_label(e["target"]))]
        metrics[f"{kind}.candidates"] = float(len(cand))
        metrics[f"{kind}.found"] = float(sum(e["significant"] for e in cand))
    textures = [n for n, d in g.nodes(data=True) if d["label"] == "texture"]
    classes = [n for n, d in g.nodes(data=True) if d["kind"] == "class"]
    reach = sorted({(t, c) for t in textures for c in classes if nx.has_path(g, t, c)})
    metrics["texture_concepts"] = float(len(textures))
    metrics["texture_paths_to_class"] = float(len(reach))
    metrics["texture_edges_significant"] = float(sum(1 for e in edges if e["significant"]
                                                     and label.get(e["source"]) == "texture"))
    labels_found = {d["label"] for _, d in g.nodes(data=True)}
    checks = {"check.precision": precision >= cfg.min_precision, "check.recall": recall >= cfg.min_recall,
              # not vacuous: a texture concept must exist for "no texture reaches a class" to say anything
              "check.textures_do_not_reach_class": bool(textures) and not reach,
              # every part -> whole link the concepts allow is significant
              "check.part_to_whole_found": 0 < metrics["part_to_whole.candidates"] == metrics["part_to_whole.found"],
              "check.parts_discovered": len(labels_found & set(PART_OF)) >= 2,
              # and the connectome reaches a class along a planted link (else "no texture reaches a class"
              # would hold for want of any class edge)
              "check.class_reached": metrics["to_class.found"] > 0}
    metrics.update({k: float(v) for k, v in checks.items()})
    metrics["ground_truth_ok"] = float(all(checks.values()))
    metrics["labels_found"] = float(len(labels_found & DECIDED))
    table = pa.Table.from_pylist([{"source": e["source"], "target": e["target"], "source_label": label[e["source"]],
                                   "target_label": target_label(e["target"]), "score": e["score"], "p": e["p"],
                                   "significant": e["significant"], "planted": e["planted"], "decided": e["decided"]}
                                  for e in labelled],
                                 schema=pa.schema([("source", pa.string()), ("target", pa.string()),
                                                   ("source_label", pa.string()), ("target_label", pa.string()),
                                                   ("score", pa.float64()), ("p", pa.float64()),
                                                   ("significant", pa.bool_()), ("planted", pa.bool_()),
                                                   ("decided", pa.bool_())]))
    return {"judged_edges": table, "metrics": metrics,
            "summary": {"texture_paths_to_class": [list(r) for r in reach], "labels_found": sorted(labels_found)}}
