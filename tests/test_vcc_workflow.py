"""The `vcc` workflow on local Ray (issue #10, image half): the shipped spec through the real CLI writes the
connectome (GraphML, JSON, plot) and recovers the planted hierarchy, a new edge threshold re-runs only the
edge tests and what reads them, any HF ViT classifier (a random one in a folder) runs end to end, and
bad input fails before compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from interpflow.workflows.spec import SpecError, load_spec
from support import cli

# the smallest sizes that still give concepts on two layers, edges between them and to the classes
SMALL = {"workflow": "vcc", "images": {"n_images": 24, "size": 24},
         "classifier": {"layers": 3, "hidden_size": 16, "heads": 2, "intermediate_size": 32, "steps": 30,
                        "train_images": 120, "eval_images": 24},
         "layers": [0, 1], "segment": {"min_patches": 2},
         "concepts": {"min_concepts": 2, "max_concepts": 4, "min_segments": 3},
         "cav": {"repeats": 3, "random_size": 10, "steps": 20}, "num_shards": 1}


DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "workflows" / "specs" / "vcc.yaml"


def _spec(tmp_path: Path, base: dict | None = None, **changes) -> tuple[Path, Path]:
    store = tmp_path / "store"
    spec = tmp_path / "vcc.yaml"
    data = {**(SMALL if base is None else base), **changes,
            "run": {"store": str(store), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    spec.write_text(yaml.safe_dump(data))
    return spec, store


@pytest.mark.e2e
def test_the_default_spec_recovers_the_planted_hierarchy_and_a_new_alpha_reruns_only_the_edges(tmp_path):
    """The README's `interpflow run vcc` (the shipped spec): the connectome files, the planted checks
    (held on 6 of 6 seeds, README), and a new edge threshold re-running only the edge tests."""
    spec, store = _spec(tmp_path, base=yaml.safe_load(DEFAULT_SPEC.read_text()))
    result = cli("run", str(spec), "--no-progress", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]

    import interpflow

    handle = interpflow.open_run(run_id, store=str(store))
    files = Path(handle.outputs("connectome", "files"))
    import networkx as nx

    graph = nx.read_graphml(files / "connectome.graphml")
    assert {"class.house", "class.cart"} <= set(graph.nodes)
    assert json.loads((files / "connectome.json").read_text())["nodes"]
    assert handle.outputs("connectome", "figure").endswith(".png")
    assert handle.outputs("failures", "figure").endswith(".png")
    edges = handle.table("connectome", "edges").to_pylist()
    assert edges and all(0 <= e["p"] <= 1 and e["p_adjusted"] >= e["p"] for e in edges)
    # significant: the deciding p passes (and, for an ablation class edge, the effect is large enough)
    assert all((e["p"] <= 0.05) == e["significant"] for e in edges if e["test"] == "itcav")
    assert all(e["p"] <= 0.05 for e in edges if e["significant"])
    assert {e["test"] for e in edges if e["target"].startswith("class.")} == {"ablation"}
    report = handle.metrics("ground_truth")
    # the planted part -> whole links are significant, no texture reaches a class, a class is reached
    assert report["check.part_to_whole_found"] == 1.0 and report["part_to_whole.found"] >= 2
    assert report["texture_concepts"] >= 1 and report["texture_paths_to_class"] == 0
    assert report["check.class_reached"] == 1.0
    assert report["edge_precision"] >= 0.7 and report["edge_recall"] >= 0.5
    assert report["ground_truth_ok"] == 1.0
    assert handle.table("failures", "paths").num_rows >= 1

    rerun = cli("run", str(spec), "edges.alpha=0.01", "--no-progress", cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (latest,) = [p for p in store.glob("runs/*/record.json") if p != record_path]
    nodes = json.loads(latest.read_text())["nodes"]
    ran = {name for name, n in nodes.items() if n["status"] == "ran"}
    assert ran == {"edges.0-1", "edges.1-2", "edges.class", "connectome", "failures", "ground_truth"}  # not the ablations


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_local")
def test_a_random_vit_classifier_folder_runs_end_to_end(tmp_path, settings):
    from transformers import ViTConfig, ViTForImageClassification

    import interpflow

    folder = tmp_path / "random-vit"
    ViTForImageClassification(ViTConfig(image_size=24, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                         num_attention_heads=2, intermediate_size=32, num_labels=2)).save_pretrained(folder)
    spec = {**SMALL, "model": {"path": str(folder)}}
    handle = interpflow.run(spec, ["failures.fallback=2"], settings=settings)
    assert handle.ok
    assert "classifier" not in handle.nodes() and "model" in handle.nodes()
    # the actor steps are one sharded node each (four actor pools), whatever the number of layers
    assert {"tokens", "segment_activations", "gradients", "ablation"} <= set(handle.nodes())
    assert not any(n.startswith(("segment_activations.", "gradients.", "ablation.")) for n in handle.nodes())
    assert handle.metrics("ground_truth")["ground_truth_ok"] in (0.0, 1.0)
    assert handle.outputs("connectome", "figure").endswith(".png")


def test_bad_input_is_an_error_before_compute(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    def error(*overrides: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec("vcc", list(overrides), check_store=False)
        return str(err.value)

    assert "layers: layer 7 is out of range: the model has blocks 0..3" in error("layers=[1, 7]")
    assert "block 3 is the last" in error("layers=[1, 3]")
    assert "layers must be strictly increasing" in error("layers=[2, 1]")
    assert "images.n_images=6 is fewer than concepts.max_concepts=10" in error("images.n_images=6")
    folder = tmp_path / "vit16"
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                        num_attention_heads=2, intermediate_size=32, num_labels=2)).save_pretrained(folder)
    assert "images.size=40 but the model takes image_size=16" in error(f"model.path={folder}", "layers=[0, 1]")
    assert "no config.json" in error(f"model.path={tmp_path}")

    result = cli("run", "vcc", "layers=[0, 9]", f"run.store={tmp_path / 'store'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "layers: layer 9 is out of range" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "images").exists()
