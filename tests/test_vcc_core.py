"""VCC's pieces without Ray: the planted images, top-down segmentation, segment images, CAVs, the ITCAV
gradient (checked against a finite difference on a real ViT), edge scores on a hand-built case, the
t-test pruning, and the planted-link rule of the ground-truth check."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from interpflow.tasks.concepts import cav, connectome
from interpflow.tasks.concepts import vcc_images as vi
from interpflow.tasks.concepts import vcc_segments as vs


def test_images_have_their_parts_and_textures_in_both_classes():
    data = vi.render(vi.ImageConfig(size=32), 40, seed=3)
    assert data["images"].shape == (40, 32, 32, 3) and data["parts"].shape == (40, 32, 32)
    for parts, label in zip(data["parts"], data["labels"]):
        regions = vi.region_masks(parts)
        whole = vi.CLASSES[label]
        other = vi.CLASSES[1 - label]
        assert all(regions[p].any() for p in vi.WHOLES[whole]), "every part of the object is drawn"
        assert not regions[other].any()
    texture = (data["parts"] == vi.PARTS.index("texture")).mean(axis=(1, 2))
    assert (texture > 0).mean() > 0.9                    # a texture only fails to fit on a crowded image
    assert abs(texture[data["labels"] == 0].mean() - texture[data["labels"] == 1].mean()) < 0.02


def test_top_down_segmentation_nests_and_segment_images_fill_with_the_mean():
    rng = np.random.default_rng(0)
    feats = np.zeros((2, 6, 6, 4), np.float32)
    feats[:, :3, :, 0] = 5.0                             # two regions per image: top and bottom halves
    feats[:, :, :3, 1] = 3.0                             # each half has a left and a right part
    feats += rng.normal(0, 0.05, feats.shape).astype(np.float32)
    ids = [np.arange(2)]
    top = vs.segment_layer(vs.SegmentConfig(layer=1, top_clusters=2), [feats], ids)
    assert top["masks"].shape[1:] == (6, 6) and top["segments"].num_rows >= 4
    below = vs.segment_layer(vs.SegmentConfig(layer=0, slic_segments=2, min_patches=1), [feats], ids, parents=top)
    parents = below["segments"].column("parent").to_numpy()
    for mask, parent in zip(below["masks"].astype(bool), parents):
        assert not (mask & ~top["masks"][parent].astype(bool)).any(), "a child lies inside its parent"

    images = np.full((1, 12, 12, 3), 200, np.uint8)
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:2] = True                                # 2 x 1 patches = 4 x 2 pixels
    seg = vs.segment_images(images, np.array([0]), mask[None], fill=np.array([10.0, 20.0, 30.0]), out_size=12)
    assert seg.shape == (1, 12, 12, 3) and (seg[0] == 200).all()   # the crop is the segment itself
    mask[2, 2] = True                                    # L-shape: the bbox has a hole, filled with the mean
    seg = vs.segment_images(images, np.array([0]), mask[None], fill=np.array([10.0, 20.0, 30.0]), out_size=12)
    assert (seg[0, 0, -1] == [10, 20, 30]).all() and (seg[0, -1, -1] == 200).all()


def test_cav_is_the_unit_normal_of_the_separating_plane():
    rng = np.random.default_rng(1)
    pos = rng.normal(0, 1, (60, 5)) + np.array([3.0, 0, 0, 0, 0])
    neg = rng.normal(0, 1, (60, 5))
    normal, acc = cav.fit_cav(pos, neg)
    assert acc > 0.9 and np.isclose(np.linalg.norm(normal), 1.0) and normal[0] > 0.9


def test_tcav_scores_and_itcav_edges_on_a_hand_built_case():
    grads = np.array([[1.0, 0.2], [2.0, -0.1], [0.5, 0.0], [-1.0, 1.0], [-2.0, 1.0]])
    cavs_ = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(cav.tcav_scores(grads[:3], cavs_), [1.0, 0.0, 1 / 3])
    # upper concept 0 owns examples 0-2 (grad along +x), upper concept 1 owns 3-4 (grad along -x, +y)
    upper = {"concepts": pa.Table.from_pylist([{"concept": "U0", "kept": True}, {"concept": "U1", "kept": True}])}
    repeats = 6
    rng = np.random.default_rng(0)
    along_x = np.tile([1.0, 0.0], (repeats, 1)) + rng.normal(0, 0.05, (repeats, 2))
    along_y = np.tile([0.0, 1.0], (repeats, 1)) + rng.normal(0, 0.05, (repeats, 2))
    cavs = {"cavs": np.stack([along_x, along_y]), "random_cavs": rng.normal(0, 1, (repeats, 2)),
            "names": {"concepts": ["Lx", "Ly"]}}
    out = cav.itcav_edges(cav.EdgeConfig(within=False), [grads[:3], grads[3:]],
                          [np.array([0, 0, 0]), np.array([1, 1])], cavs, upper)
    edges = {(r["source"], r["target"]): r for r in out["edges"].to_pylist()}
    assert edges[("Lx", "U0")]["score"] == 1.0 and edges[("Lx", "U1")]["score"] == 0.0
    assert edges[("Ly", "U1")]["score"] == 1.0
    assert edges[("Lx", "U1")]["significant"] is False
    # the null holds every random CAV in both orientations, so its mean is 1/2 whatever the gradients
    assert all(r["random_score"] == pytest.approx(0.5) for r in edges.values())
    assert all(r["p_adjusted"] == r["p"] for r in edges.values())           # no correction by default
    holm = cav.itcav_edges(cav.EdgeConfig(correction="holm", within=False), [grads[:3], grads[3:]],
                           [np.array([0, 0, 0]), np.array([1, 1])], cavs, upper)["edges"].to_pylist()
    assert all(r["p_adjusted"] >= r["p"] for r in holm) and any(r["p_adjusted"] > r["p"] for r in holm)


def test_holm_and_bonferroni_adjust_p_values_tested_together():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(cav.adjusted_p(p, "holm"), [0.03, 0.06, 0.06, 0.02])      # step-down, monotone
    np.testing.assert_allclose(cav.adjusted_p(p, "bonferroni"), [0.04, 0.16, 0.12, 0.02])
    np.testing.assert_allclose(cav.adjusted_p(p, "none"), p)
    assert cav.adjusted_p([0.5, 0.9], "bonferroni").max() == 1.0


def test_t_test_keeps_edges_above_random_only():
    rng = np.random.default_rng(0)
    random = 0.5 + rng.normal(0, 0.15, 8)
    assert cav.edge_test(0.9 + rng.normal(0, 0.02, 8), random)["significant"]
    assert not cav.edge_test(0.5 + rng.normal(0, 0.15, 8), random)["significant"]
    low = cav.edge_test(0.1 + rng.normal(0, 0.02, 8), random)
    assert not low["significant"] and low["p"] > 0.95            # one-sided: below random is no edge
    assert cav.edge_test(np.ones(4), np.full(4, 0.5))["significant"]
    assert not cav.edge_test(np.full(4, 0.5), np.full(4, 0.5))["significant"]
    assert cav.edge_test(0.8 + rng.normal(0, 0.1, 8), random, alpha=1e-9)["significant"] is False


def test_itcav_gradient_matches_a_finite_difference_on_a_vit():
    from transformers import ViTConfig, ViTForImageClassification

    from interpflow.tasks.concepts.vcc_model import gradient_sums, hooked_forward, pooled
    from interpflow.tasks.models import LoadedModel
    from interpflow.tasks.sites import SiteMap, intervene

    torch.manual_seed(0)
    net = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=2, intermediate_size=32, num_labels=2)).eval()
    loaded = LoadedModel(net, None, "cpu", SiteMap(net), "x")
    pixels = torch.randn(2, 3, 16, 16)
    centroid = torch.randn(16)

    def objective(logits, captured):
        return -(pooled(captured[2], 16) - centroid).norm(dim=-1)

    g = gradient_sums(loaded, pixels, 0, objective, layers=(2,), patches=16)
    direction = torch.randn(16)
    eps = 1e-3

    def value(shift: float) -> torch.Tensor:
        site = loaded.sites.resolve("blocks.0.resid_post")
        def shift_patches(t):                            # a CAV moves the patch tokens, not CLS
            out = t.clone()
            out[:, 1:] += shift * direction
            return out

        with intervene(net, site, shift_patches), torch.no_grad():
            _, captured, _ = hooked_forward(loaded, pixels, [2])
        return objective(None, captured)

    numeric = (value(eps) - value(-eps)) / (2 * eps)
    np.testing.assert_allclose((g @ direction).numpy(), numeric.numpy(), rtol=2e-2, atol=1e-4)


def test_planted_links_and_the_ground_truth_report():
    assert connectome.planted("roof", "house") and connectome.planted("wheel", "cart")
    assert connectome.planted("wall", "wall") and connectome.planted("body", "class.cart")
    assert connectome.planted("house", "class.house")
    assert not connectome.planted("roof", "cart") and not connectome.planted("roof", "class.cart")
    assert not connectome.planted("texture", "class.house") and not connectome.planted("texture", "house")
    assert connectome.planted("texture", "texture")            # the same texture one block up
    assert not connectome.planted("background", "house")

    import networkx as nx

    g = nx.DiGraph()
    for name, layer, depth, label in [("a", 0, 0, "roof"), ("b", 0, 0, "texture"), ("c", 1, 1, "house"),
                                      ("d", 1, 1, "texture"), ("e", 1, 1, "background")]:
        g.add_node(name, layer=layer, depth=depth, label=label, label_iou=0.5, segments=10, kind="concept")
    for cls in ("house", "cart"):
        g.add_node(f"class.{cls}", layer=-1, depth=2, label=cls, label_iou=1.0, segments=0, kind="class")
    rows = [("a", "c", True), ("b", "c", True), ("a", "d", False), ("b", "d", True), ("c", "class.house", True),
            ("d", "class.house", False), ("c", "class.cart", False), ("d", "class.cart", False), ("a", "e", True)]
    for s, t, sig in rows:
        if sig:
            g.add_edge(s, t, score=0.9, p=0.01, random_score=0.5)
    edges = pa.Table.from_pylist([{"source": s, "target": t, "score": 0.9 if sig else 0.5, "p": 0.01 if sig else 0.5,
                                   "significant": sig} for s, t, sig in rows])
    out = connectome.ground_truth(connectome.GroundTruthConfig(layers=[0, 1]),
                                  {"graph": nx.node_link_data(g, edges="edges"), "edges": edges})
    m = out["metrics"]
    # planted and found: a -> c, b -> d (texture one block up), c -> house; b (texture) -> c (house) is not
    assert m["edge_precision"] == pytest.approx(3 / 4) and m["edge_recall"] == 1.0
    # the hierarchy says nothing of a -> e (into background): beside the precision, not in it
    assert m["background_edges_significant"] == 1 and m["edge_precision_with_background"] == pytest.approx(3 / 5)
    assert m["check.part_to_whole_found"] == 1.0           # a (roof) -> c (house), the one candidate, is significant
    assert m["check.class_reached"] == 1.0                 # c (house) -> class.house
    assert m["texture_paths_to_class"] == 1 and m["check.textures_do_not_reach_class"] == 0.0   # b -> c -> house
    assert m["ground_truth_ok"] == 0.0
    figure = connectome.draw(g, [0, 1])
    assert figure.axes


def test_the_connectome_keeps_what_decided_each_edge_and_draws_ablation_edges_by_their_effect(tmp_path):
    def concepts(*rows):
        return {"concepts": pa.Table.from_pylist([{"concept": c, "kept": True, "label": lab, "label_iou": 0.6,
                                                   "segments": 12} for c, lab in rows])}

    def edges(*rows):
        nan = float("nan")
        return pa.Table.from_pylist([{"source": s, "target": t, "test": test, "examples": 20, "score": score,
                                      "score_std": 0.0, "random_score": 0.5, "tcav_p": 0.01, "effect": effect,
                                      "effect_p": nan if effect != effect else 0.01, "p": p, "p_adjusted": p,
                                      "significant": p <= 0.05} for s, t, test, score, effect, p in rows],
                                    schema=cav.EDGE_SCHEMA)

    nan = float("nan")
    out = connectome.build_connectome(
        connectome.ConnectomeConfig(layers=[0, 1], classes=["house", "cart"]),
        concepts_0=concepts(("0.a", "roof")), concepts_1=concepts(("1.a", "house"), ("1.b", "texture")),
        edges_0_1=edges(("0.a", "1.a", "itcav", 0.95, nan, 0.001), ("0.a", "1.b", "itcav", 0.55, nan, 0.4)),
        class_edges=edges(("1.a", "class.house", "ablation", 0.52, 2.0, 0.001),
                          ("1.b", "class.house", "ablation", 0.9, 0.01, 0.3),
                          ("1.a", "class.cart", "ablation", 0.6, 0.5, 0.02)))
    g = connectome.load_graph(out["graph"])
    assert set(g.edges) == {("0.a", "1.a"), ("1.a", "class.house"), ("1.a", "class.cart")}
    assert g.edges["0.a", "1.a"]["test"] == "itcav" and "effect" not in g.edges["0.a", "1.a"]
    assert g.edges["1.a", "class.house"]["test"] == "ablation" and g.edges["1.a", "class.house"]["effect"] == 2.0
    out["files"].save_pretrained(tmp_path)
    assert "NaN" not in (tmp_path / "connectome.json").read_text()
    arrows = [a.arrow_patch for a in out["figure"].axes[0].texts if getattr(a, "arrow_patch", None)]
    widths = sorted((p.get_linestyle() not in ("-", "solid"), round(p.get_linewidth(), 2)) for p in arrows)
    # the ITCAV edge solid at 0.5 + 3 (0.95 - 1/2); the ablation edges dashed, the larger drop at full width
    assert widths == [(False, 1.85), (True, 1.25), (True, 3.5)]


def test_image_paths_use_present_concepts_and_only_the_scores_that_decided_their_edges():
    import networkx as nx

    g = nx.DiGraph()
    g.add_edge("0.roof", "1.house", score=0.9, test="itcav")
    g.add_edge("0.wall", "1.house", score=0.6, test="itcav")
    g.add_edge("0.wall", "1.body", score=0.8, test="itcav")
    g.add_edge("0.wheel", "1.body", score=1.0, test="itcav")        # the wheel is not in this image
    # ablation edges: the TCAV score rides along but did not decide them; the logit drop orders ties
    g.add_edge("1.house", "class.house", score=0.1, test="ablation", effect=2.0)
    g.add_edge("1.body", "class.house", score=0.99, test="ablation", effect=0.5)
    g.add_edge("1.body", "class.cart", score=0.7, test="tcav")
    present = [{"0.roof", "0.wall"}, {"1.house", "1.body"}]

    house = connectome.image_paths(g, present, "class.house")
    assert [(p, round(s, 6)) for p, s, _ in house] == [
        (["0.roof", "1.house", "class.house"], 0.9), (["0.wall", "1.body", "class.house"], 0.8),
        (["0.wall", "1.house", "class.house"], 0.6)]
    assert [e for _, _, e in house] == [2.0, 0.5, 2.0]
    cart = connectome.image_paths(g, present, "class.cart")         # a TCAV class edge multiplies in
    assert [(p, round(s, 6)) for p, s, _ in cart] == [(["0.wall", "1.body", "class.cart"], 0.56)]
    assert np.isnan(cart[0][2])
    # equal scores: the larger logit drop first (not the order of the names)
    g.edges["0.wall", "1.body"]["score"] = 0.9
    g.edges["1.body", "class.house"]["effect"] = 3.0
    assert [p[:2] for p, _, _ in connectome.image_paths(g, present, "class.house")[:2]] == [
        ["0.wall", "1.body"], ["0.roof", "1.house"]]
    assert connectome.image_paths(g, [{"0.wheel"}, {"1.house"}], "class.house") == []


def test_itcav_within_tests_an_edge_only_on_the_upper_segments_that_contain_the_lower_concept():
    # upper concept U0 owns upper segments 0-5; lower concept "in" lies inside all of them, "out" in none,
    # yet both CAVs align with every gradient: only "in" -> U0 is an edge (a part must lie in its whole)
    repeats = 6
    rng = np.random.default_rng(1)
    grads = np.tile([1.0, 1.0], (6, 1)) + rng.normal(0, 0.05, (6, 2))
    cavs = {"cavs": np.stack([np.tile([1.0, 0.0], (repeats, 1)), np.tile([0.0, 1.0], (repeats, 1))])
            + rng.normal(0, 0.05, (2, repeats, 2)), "random_cavs": rng.normal(0, 1, (repeats, 2)),
            "names": {"concepts": ["in", "out"]}}
    upper = {"concepts": pa.Table.from_pylist([{"concept": "U0", "kept": True}])}
    # lower segments: 0-5 are children of upper segments 0-5 ("in"); 6-8 children of upper segment 9 ("out")
    lower_segments = {"segments": pa.table({"segment": np.arange(9), "parent": [0, 1, 2, 3, 4, 5, 9, 9, 9]})}
    lower_concepts = {"assignments": pa.table({"segment": np.arange(9), "concept": ["in"] * 6 + ["out"] * 3})}
    args = ([grads], [np.zeros(6, np.int64)], cavs, upper)
    within = cav.itcav_edges(cav.EdgeConfig(), *args, segment=[np.arange(6)], lower_segments=lower_segments,
                             lower_concepts=lower_concepts)["edges"].to_pylist()
    edges = {r["source"]: r for r in within}
    assert edges["in"]["significant"] and edges["in"]["examples"] == 6 and edges["in"]["test"] == "itcav"
    assert not edges["out"]["significant"] and edges["out"]["examples"] == 0 and edges["out"]["p"] == 1.0
    every = {r["source"]: r for r in cav.itcav_edges(cav.EdgeConfig(within=False), *args)["edges"].to_pylist()}
    assert every["out"]["significant"]                                  # the paper's form keeps it
    with pytest.raises(ValueError, match="within"):
        cav.itcav_edges(cav.EdgeConfig(), *args)


def test_shifted_masks_keep_the_shape_and_size_elsewhere():
    from interpflow.tasks.concepts.vcc_ablation import shifted_masks

    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:4] = True
    for shifted in shifted_masks(mask, 5, np.random.default_rng(0)):
        assert shifted.sum() == mask.sum() and not (shifted & mask).any()
    full = np.ones((3, 3), bool)
    full[0, 0] = False                           # no free place: the least overlapping shifts
    assert all(s.sum() == 8 for s in shifted_masks(full, 2, np.random.default_rng(0)))


def test_class_ablations_measure_the_own_class_logit_drop_against_shifted_masks(tmp_path):
    import json
    from types import SimpleNamespace

    from transformers import ViTConfig, ViTForImageClassification

    from interpflow.tasks.concepts.vcc_ablation import AblationConfig, class_ablations
    from interpflow.tasks.models import LoadedModel
    from interpflow.tasks.sites import SiteMap

    torch.manual_seed(0)
    net = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32, num_labels=2)).eval()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    loaded = LoadedModel(net, None, "cpu", SiteMap(net), str(tmp_path))
    rng = np.random.default_rng(0)
    images = {"images": rng.integers(0, 255, (2, 16, 16, 3)).astype(np.uint8), "labels": np.array([0, 1])}
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :2, :2] = 1
    masks[1, 2:, 1:3] = 1
    segments = {"masks": masks, "segments": pa.table({"segment": [0, 1], "image": [0, 1]})}
    concepts = {"assignments": pa.table({"segment": [0, 1], "image": [0, 1], "concept": ["A", "B"]})}
    out = class_ablations(AblationConfig(null_draws=3), SimpleNamespace(ids=[0, 1]), loaded, images, segments,
                          concepts)["drops"].to_pylist()
    assert [(r["image"], r["concept"], r["label"]) for r in out] == [(0, "A", 0), (1, "B", 1)]

    def centred(x):
        with torch.no_grad():
            lg = net(pixel_values=torch.from_numpy(vi.pixel_values(x, [0.5] * 3, [0.5] * 3))).logits
        return (lg - lg.mean(-1, keepdim=True)).numpy()

    filled = images["images"][1].copy()
    filled[vs.pixel_mask(masks[1].astype(bool), 16)] = vs.mean_colour(images["images"])
    expected = centred(images["images"][1:2])[0, 1] - centred(filled[None])[0, 1]
    assert out[1]["drop"] == pytest.approx(float(expected), abs=1e-4)
    assert out[1]["null_drop"] != pytest.approx(out[1]["drop"])


def test_class_edges_by_ablation_keep_a_used_concept_and_drop_an_unused_one():
    from interpflow.tasks.concepts.vcc_ablation import ABLATION_SCHEMA

    rng = np.random.default_rng(0)
    repeats, n = 4, 20
    ids, labels = np.arange(2 * n), np.repeat([0, 1], n)
    # TCAV: both CAVs align with every class gradient (the "unused" texture looks significant to TCAV)
    class_grads = np.tile([1.0, 1.0], (2 * n, 2, 1)) + rng.normal(0, 0.05, (2 * n, 2, 2))
    cavs = {"cavs": np.stack([np.tile([1.0, 0.2], (repeats, 1)), np.tile([0.2, 1.0], (repeats, 1))]),
            "random_cavs": rng.normal(0, 1, (repeats, 2)), "names": {"concepts": ["roofish", "texture"]}}
    rows = []
    for i in range(n):    # house images (centred logit 6): the roof costs ~1 logit, the texture a consistent 0.003
        rows.append({"image": i, "label": 0, "concept": "roofish", "logit": 6.0, "drop": 1.0 + rng.normal(0, 0.2),
                     "null_drop": rng.normal(0, 0.05)})
        rows.append({"image": i, "label": 0, "concept": "texture", "logit": 6.0, "drop": 0.003 + rng.normal(0, 5e-4),
                     "null_drop": rng.normal(0, 5e-4)})
    drops = pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA)
    images = {"labels": labels}

    def edges(test):
        cfg = cav.EdgeConfig(lower=2, upper=-1, classes=["house", "cart"], class_test=test)
        out = cav.class_edges(cfg, [ids], [class_grads], images, cavs, ablations=drops)["edges"].to_pylist()
        return {(r["source"], r["target"]): r for r in out}

    tcav = edges("tcav")
    assert tcav[("texture", "class.house")]["significant"] and tcav[("roofish", "class.house")]["significant"]
    used = edges("ablation")
    assert used[("roofish", "class.house")]["significant"] and used[("roofish", "class.house")]["effect"] > 0.8
    # a t-test alone would keep the texture's consistent nudge; it is under min_effect x the class logit
    assert used[("texture", "class.house")]["effect_p"] < 1e-6 and not used[("texture", "class.house")]["significant"]
    nudge = cav.class_edges(cav.EdgeConfig(classes=["house", "cart"], min_effect=0), [ids], [class_grads], images,
                            cavs, ablations=drops)["edges"].to_pylist()
    assert [r["significant"] for r in nudge if r["source"] == "texture" and r["target"] == "class.house"] == [True]
    assert not used[("roofish", "class.cart")]["significant"]            # no cart image holds it: untested
    assert used[("roofish", "class.cart")]["examples"] == 0
    assert used[("texture", "class.house")]["tcav_p"] == tcav[("texture", "class.house")]["p"]   # still reported
    both = edges("both")
    assert both[("roofish", "class.house")]["p"] == max(used[("roofish", "class.house")]["effect_p"],
                                                        tcav[("roofish", "class.house")]["tcav_p"])
    with pytest.raises(ValueError, match="class_test"):
        cav.class_edges(cav.EdgeConfig(classes=["house", "cart"]), [ids], [class_grads], images, cavs)
