"""sae_bench on a researcher's own arrays (issue #30, point 5): `.npz` files for identifiability and
stability, no language model when none is needed, held-out FVU, every seed, and bad files named
before compute."""

from __future__ import annotations

import numpy as np
import pytest

import interpflow
from interpflow.tasks.sae import SAEConfig, SAETrainConfig, SyntheticConfig, make_synthetic
from interpflow.tasks.sae import bench
from interpflow.workflows.spec import SpecError, load_spec

TRAIN = {"sae": {"d_in": 16, "n_latents": 24, "k": 2, "n_candidates": 32}, "steps": 300, "batch_size": 128,
         "init_rows": 512, "warmup_steps": 20, "threads": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_data")
    x, atoms, codes = make_synthetic(SyntheticConfig(d=16, n_atoms=24, k=2, n=3000, seed=5))
    np.savez(root / "ident.npz", X=x.numpy(), atoms=atoms.numpy())
    ids = np.arange(3000) // 10                                  # 300 examples of 10 rows
    labels = np.where(ids % 2 == 0, "even", "odd")
    np.savez(root / "stab.npz", X=x.numpy(), ids=ids, labels=labels)
    np.savez(root / "no_atoms.npz", X=x.numpy())
    bad = x.numpy().copy()
    bad[17, 3] = np.nan
    np.savez(root / "nan.npz", X=bad, atoms=atoms.numpy())
    (root / "not.npz").write_text("hello")
    return root


def test_identify_reports_heldout_fvu_on_user_rows(files):
    rows = bench.identifiability_data(bench.IdentifiabilityData(path=str(files / "ident.npz")))
    assert rows["dictionary"].shape == (24, 16) and rows["activations"].num_rows == 3000
    run = bench.IdentifyRun(train=SAETrainConfig(**{**TRAIN, "seed": 3}), holdout=0.2)
    out = bench.identify(run, rows)["summary"]
    assert out["seed"] == 3 and 400 < out["heldout_rows"] < 800        # ~20% of the rows, never trained on
    assert 0 < out["fvu"] < 0.5 and out["train_fvu"] < 0.5 and out["matched_cosine"] > 0.5
    with pytest.raises(ValueError, match=r"NaN/Inf in row 17"):
        bench.identifiability_data(bench.IdentifiabilityData(path=str(files / "nan.npz")))


def test_bad_user_files_fail_before_compute(files):
    def load(*overrides):
        return load_spec("sae_bench", [*overrides, "universal=null"], check_store=False)

    with pytest.raises(SpecError, match=r"identifiability.data.path: no file at"):
        load(f"identifiability.data.path={files / 'missing.npz'}")
    with pytest.raises(SpecError, match=r"is not a .npz file"):
        load(f"identifiability.data.path={files / 'not.npz'}")
    with pytest.raises(SpecError, match=r"has no array 'atoms' .*np.savez\(path, X=..., atoms=...\)"):
        load(f"identifiability.data.path={files / 'no_atoms.npz'}")
    with pytest.raises(SpecError, match=r"identifiability.train.sae.d_in=32 does not match the width 16 of X.*"
                                        r"set identifiability.train.sae.d_in=16"):
        load(f"identifiability.data.path={files / 'ident.npz'}")
    with pytest.raises(SpecError, match=r"stability.train.sae.d_in=64 does not match the width 16"):
        load(f"stability.data.path={files / 'stab.npz'}", "identifiability=null")
    with pytest.raises(SpecError, match=r"nothing to run"):
        load("identifiability=null", "stability=null")
    spec = load(f"identifiability.data.path={files / 'ident.npz'}", "identifiability.train.sae.d_in=16",
                "stability=null")
    assert not spec.config.needs_lm()


def test_jumprelu_k_is_refused_naming_l0_coeff():
    with pytest.raises(ValueError, match=r"k=4 does not apply to variant='jumprelu'.*l0_coeff"):
        SAEConfig(variant="jumprelu", k=4)
    with pytest.raises(SpecError, match=r"k=4 does not apply to variant='jumprelu'.*l0_coeff"):
        load_spec("sae", ["fit.train.sae.variant=jumprelu", "fit.train.sae.k=4", "sweep.variants=[topk]"],
                  check_store=False)
    # a sweep with k values trains jumprelu once, and with no k
    configs = load_spec("sae", ["sweep.variants=[topk, jumprelu]", "sweep.k=[4, 8]"], check_store=False).config
    members = configs.sae_configs()
    assert sorted(members) == ["jumprelu", "topk-k4", "topk-k8"] and members["jumprelu"].k is None


@pytest.mark.usefixtures("ray_local")
def test_bench_runs_on_user_files_with_no_language_model(files, settings):
    spec = {"workflow": "sae_bench", "universal": None,
            "identifiability": {"data": {"path": str(files / "ident.npz")}, "variants": ["topk", "relu"],
                                "seeds": [0, 1], "train": TRAIN, "check": {"min_topk_matched_cosine": 0.5}},
            "stability": {"data": {"path": str(files / "stab.npz")}, "variants": ["topk"], "seeds": [0, 1],
                          "train": TRAIN}}
    handle = interpflow.run(spec, settings=settings, progress=False)
    assert handle.ok, {n: s["error"] for n, s in handle.nodes().items() if s["error"]}
    nodes = set(handle.nodes())
    assert not {"tiny_lm", "corpus", "activations"} & nodes                 # no LM trained, nothing extracted
    assert {"identify.topk.seed0", "identify.topk.seed1", "identify.relu.seed0", "identify.relu.seed1"} <= nodes
    runs = handle.table("identifiability", "runs").to_pylist()
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("relu", 0), ("relu", 1), ("topk", 0), ("topk", 1)]
    seeds_differ = {r["seed"]: r["matched_cosine"] for r in runs if r["variant"] == "topk"}
    assert seeds_differ[0] != seeds_differ[1]                              # two trainings, not one twice
    table = {r["variant"]: r for r in handle.table("identifiability", "table").to_pylist()}
    assert table["topk"]["seeds"] == 2 and 0 < table["topk"]["fvu"] < 0.5
    stab = handle.table("stability", "table").to_pylist()[0]
    assert stab["seeds"] == 2 and 0 < stab["stability"] <= 1 and stab["stability_init"] < 0.9
    assert not np.isnan(stab["plausibility"])                              # labels from the file were used
