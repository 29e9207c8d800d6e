"""The SAE benchmark workflow on local Ray, small: identifiability, stability, plausibility and the
Universal SAE tables with their ground-truth checks (issue #5)."""

from __future__ import annotations

import pytest

import interpflow
from interpflow.workflows.spec import SpecError, load_spec

SMALL = {"workflow": "sae_bench", "corpus": {"n_examples": 800}, "lm": {"steps": 200, "n_layer": 2},
         "num_shards": 2,
         "identifiability": {"variants": ["topk", "batchtopk", "relaxed_archetypal"],
                             "data": {"n": 12000}, "train": {"steps": 1500}},
         "stability": {"train": {"steps": 600}},
         "universal": {"study": {"steps": 800, "n_latents": 64}}}


@pytest.mark.usefixtures("ray_local")
def test_benchmarks_meet_their_ground_truth(settings):
    handle = interpflow.run(SMALL, settings=settings, progress=False)
    assert handle.ok, {n: s["error"] for n, s in handle.nodes().items() if s["error"]}

    ident = {r["variant"]: r for r in handle.table("identifiability", "table").to_pylist()}
    assert set(ident) == {"topk", "batchtopk", "relaxed_archetypal"}
    assert ident["topk"]["matched_cosine"] >= 0.9 and handle.metrics("identifiability")["ground_truth_ok"] == 1.0

    stab = {r["variant"]: r for r in handle.table("stability", "table").to_pylist()}
    ra, topk = stab["relaxed_archetypal"], stab["topk"]
    assert ra["stability"] > topk["stability"] and ra["fvu"] <= topk["fvu"] + 0.05
    assert handle.metrics("stability")["ground_truth_ok"] == 1.0
    for row in stab.values():
        assert row["seeds"] == 3 and 0 < row["stability_halves"] <= 1
        assert row["plausibility"] > row["plausibility_chance"]       # atoms align with the planted topics

    universal = handle.metrics("universal")
    assert universal["r2.a_to_b"] > 0.8 and universal["r2.b_to_a"] > 0.8
    assert min(universal["self_ratio.a"], universal["self_ratio.b"]) >= 0.8
    assert universal["ground_truth_ok"] == 1.0 and 0 < universal["shared_frac"] <= 1
    from interpflow.tasks.sae.saelens import load_universal_folder

    shared = load_universal_folder(handle.outputs("universal", "universal_sae"))  # own layout, SAELens spirit
    assert shared.cfg.names == ["a", "b"] and shared.cfg.n_latents == 64


def test_bad_benchmark_configs_fail_before_compute():
    with pytest.raises(SpecError, match=r"set stability.train.sae.d_in=64"):
        load_spec("sae_bench", ["stability.train.sae.d_in=32"], check_store=False)
    with pytest.raises(SpecError, match=r"identifiability.data.d=32; make them equal"):
        load_spec("sae_bench", ["identifiability.train.sae.d_in=16"], check_store=False)
    with pytest.raises(SpecError, match=r"stability.train.sae.*k=200 must be smaller than n_latents=128; lower k"):
        load_spec("sae_bench", ["stability.train.sae.k=200"], check_store=False)
