"""The `sae` workflow on local Ray: Ray Train nodes, evaluation through model actors, lineage, kill and
resume, data-parallel workers, and input errors before compute (issue #5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import interpflow
from interpflow.workflows.spec import SpecError, load_spec
from support import cli, run_then_kill

SMALL = {"workflow": "sae", "corpus": {"n_examples": 1000}, "num_shards": 2,
         "fit": {"train": {"sae": {"n_latents": 128}, "steps": 800, "init_rows": 2048, "log_every": 50},
                 "checkpoint_every": 200},
         "sweep": {"variants": ["topk", "relaxed_archetypal"], "k": [8]},
         "eval": {"max_examples": 80}, "eval_shards": 2}
COLUMNS = {"label", "variant", "k", "mse", "fvu", "l0", "dead_frac", "dense_frac", "ce_clean", "ce_sae", "ce_zero",
           "ce_loss_recovered", "marker_f1", "plausibility", "plausibility_chance"}


@pytest.mark.usefixtures("ray_local")
def test_sweep_trains_evaluates_and_checks_ground_truth(settings):
    handle = interpflow.run(SMALL, settings=settings, progress=False)
    assert handle.ok
    frontier = handle.metrics("sae_frontier")
    assert frontier["ground_truth_ok"] == 1.0 and frontier["saes"] == 2
    table = handle.table("sae_frontier", "table").to_pylist()
    assert {row["label"] for row in table} == {"topk-k8", "relaxed_archetypal-k8"}
    for row in table:
        assert COLUMNS <= set(row)
        assert row["ce_zero"] > row["ce_sae"] >= row["ce_clean"] - 0.05   # spliced SAE: near clean, far from zero
        assert 0 <= row["fvu"] < 0.2 and row["plausibility"] > row["plausibility_chance"]
    by_label = {row["label"]: row for row in table}
    assert by_label["topk-k8"]["l0"] == pytest.approx(8.0)       # TopK: exactly k on every held-out token

    fit = handle.metrics("sae.topk-k8")
    assert fit["steps_run"] == 800 and fit["train_rows"] == 800 * 256
    client = MlflowClient(settings.tracking_uri)
    run_id = handle.nodes()["sae.topk-k8"]["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "mse")]
    assert len(steps) >= 800 // 50 and max(steps) == 800           # logged every log_every steps, with steps
    report_run = handle.nodes()["sae_report.topk-k8"]["mlflow_run_id"]
    assert [a.path for a in client.list_artifacts(report_run, "figures")] == ["figures/latent_density.png"]
    frontier_run = handle.nodes()["sae_frontier"]["mlflow_run_id"]
    assert [a.path for a in client.list_artifacts(frontier_run, "figures")] == ["figures/frontier.png"]
    browser_run = handle.nodes()["sae_browser.topk-k8"]["mlflow_run_id"]     # the latent browser, an artifact
    assert [a.path for a in client.list_artifacts(browser_run, "pages")] == ["pages/browser.html"]

    # beside the project's files: a SAELens folder the real package loads (own layout for RA-SAE)
    import torch

    from interpflow.tasks.sae.fit import load_sae
    from interpflow.tasks.sae.saelens import load_folder, read_cfg

    sae_lens = pytest.importorskip("sae_lens")
    folder = handle.outputs("sae_saelens.topk-k8", "saelens")
    ours = load_sae(handle.outputs("sae.topk-k8"))
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.allclose(sae_lens.SAE.load_from_disk(folder)(x), ours(x)[0], atol=1e-4)
    assert read_cfg(folder)["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    page = Path(handle.outputs("sae_browser.topk-k8", "browser")).read_text()   # latent browser
    assert "top-activating contexts" in page and '"marker": "zorp"' in page
    assert handle.metrics("sae_browser.topk-k8")["browser_best_marker_f1"] >= 0.5
    ra = handle.outputs("sae_saelens.relaxed_archetypal-k8", "saelens")
    assert read_cfg(ra)["architecture"] == "interpflow.relaxed_archetypal"
    with torch.no_grad():
        ra_model = load_sae(handle.outputs("sae.relaxed_archetypal-k8"))
        assert torch.allclose(load_folder(ra)(x)[0], ra_model(x)[0], atol=1e-5)


def _small_spec(path, store, steps: int, **fit):
    spec = {**SMALL, "run": {"store": str(store), "tracking_uri": f"sqlite:///{store.parent / 'mlflow.db'}"},
            "corpus": {"n_examples": 600}, "lm": {"steps": 100, "n_layer": 2}, "sweep": {"variants": ["topk"], "k": [8]},
            "fit": {"train": {"sae": {"n_latents": 64}, "steps": steps, "init_rows": 2048, "log_every": 20}, **fit}}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL the driver once the SAE node has checkpoints; `resume` continues the step count and ends
    where an uninterrupted run of the same node ends."""
    store = tmp_path / "store"
    spec = _small_spec(tmp_path / "sae.yaml", store, steps=2000, checkpoint_every=200)
    run_then_kill(spec, tmp_path, lambda: len(list(store.glob(".train/sae.topk-k8-*/checkpoint_*"))) >= 2,
                  timeout=400, poll_s=0.2)
    assert not list(store.glob("sae.topk-k8/*/_manifest.json")), "the kill should land before training finished"
    (record_path,) = store.glob("runs/*/record.json")
    run_id = json.loads(record_path.read_text())["run_id"]
    resumed = cli("resume", run_id, "--store", str(store), "--no-progress", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (manifest,) = [json.loads(p.read_text()) for p in store.glob("sae.topk-k8/*/_manifest.json")]
    metrics = manifest["metrics"]
    assert metrics["start_step"] >= 200 and metrics["start_step"] % 200 == 0
    assert metrics["steps_run"] == 2000 - metrics["start_step"]

    # the uninterrupted run of the same task on the same stored activations, in this process
    import pyarrow.dataset as pads

    from interpflow.tasks.sae.fit import fit
    from interpflow.workflows.engine.training import LocalTrainContext

    config = load_spec(str(spec)).config
    fit_cfg = config.fit.model_copy(update={"train": config.fit.train.model_copy(update={
        "sae": config.sae_configs()["topk-k8"]})})
    files = sorted(str(p) for p in store.glob("activations/*/shard-*/*.parquet"))
    clean = fit(fit_cfg, LocalTrainContext(), pads.dataset(files, format="parquet"))["metrics"]
    for name in ("mse", "l0", "dead_frac"):
        assert metrics[name] == pytest.approx(clean[name], rel=1e-3, abs=1e-6), name


@pytest.mark.usefixtures("ray_local")
def test_two_workers_train_data_parallel(settings):
    """num_workers=2: each step trains on one batch per worker with averaged gradients, which learns
    what one worker learns with a batch twice the size."""
    import torch

    from interpflow.tasks.sae import matched_cosine
    from interpflow.tasks.sae.fit import SAEFitConfig, fit, load_sae
    from interpflow.tasks.sae.synthetic import SyntheticConfig, synthetic_activations
    from interpflow.workflows.api import run_graph
    from interpflow.workflows.engine import Graph, node, trained
    from interpflow.workflows.engine.training import LocalTrainContext, Training

    data = node(synthetic_activations, SyntheticConfig(n=20000, seed=3), name="synthetic")
    spec = {"train": {"sae": {"variant": "topk", "d_in": 32, "n_latents": 48, "k": 3}, "steps": 1200,
                      "batch_size": 256, "init_rows": 2048}, "checkpoint_every": 400, "holdout": 0.0}
    cfg = SAEFitConfig.model_validate({**spec, "num_workers": 2})
    sae = trained(fit, cfg, training=Training(num_workers=2), name="sae", activations=data["activations"])
    handle = run_graph(Graph(sae), settings, progress=False)
    assert handle.ok, handle.nodes()
    assert handle.metrics("sae")["train_rows"] == 1200 * 256 * 2
    model = load_sae(handle.outputs("sae"))
    assert torch.allclose(model.dictionary().norm(dim=1), torch.ones(48), atol=1e-5)
    dictionary = handle.outputs("synthetic", "dictionary")
    parallel = matched_cosine(model.dictionary(), dictionary)[0]

    spec["train"]["batch_size"] = 512
    single = fit(SAEFitConfig.model_validate(spec), LocalTrainContext(), handle.outputs("synthetic", "activations"))
    alone = matched_cosine(load_sae(single).dictionary(), dictionary)[0]
    assert parallel >= 0.85 and abs(parallel - alone) < 0.03, (parallel, alone)


@pytest.mark.parametrize("override, message", [
    ("fit.train.sae.d_in=32", "fit.train.sae.d_in=32 does not match the width 64 of site 'blocks.1.resid_post'; "
                              "set fit.train.sae.d_in=64"),
    ("sweep.k=[300]", "sweep (variant=topk, k=300): "),
    ("extract.sites=[blocks.0.resid_post,blocks.1.resid_post]", "an SAE study trains on one site"),
])
def test_bad_input_is_an_error_before_compute(override, message):
    with pytest.raises(SpecError, match="k=300 must be smaller than n_latents=256" if "300" in override else None) as err:
        load_spec("sae", [override], check_store=False)
    assert message in str(err.value)


def test_cli_reports_a_width_mismatch_with_exit_code_2(tmp_path):
    result = cli("run", "sae", "fit.train.sae.d_in=32", f"run.store={tmp_path / 'store'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "set fit.train.sae.d_in=64" in result.stdout + result.stderr
    assert not (tmp_path / "store" / "activations").exists()
