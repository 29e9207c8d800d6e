"""Steering and concept vectors in the open (issue #30, point 4): safetensors + a JSON card, read by one
`load_file` call, and accepted where a study takes a vector (`concept_vector`, `persona_vectors.<trait>`).
No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from interpflow.tasks.concepts.cav import CavConfig, fit_layer_cavs
from interpflow.tasks.influence.concept import read_direction
from interpflow.tasks.persuasion import persona
from interpflow.tasks.persuasion.world import Trait
from interpflow.tasks.sae.vectors import read_card, read_vectors, write_vectors
from interpflow.workflows.spec import SpecError, load_spec


def test_vectors_file_and_card_round_trip(tmp_path):
    v = torch.arange(64, dtype=torch.float32) / 10
    path = tmp_path / "steer.safetensors"
    card = write_vectors(path, {"blocks.2.hook_resid_post": v, "blocks.1.resid_post": -v}, kind="persona_vector",
                         name="persuasive", model={"source": "tiny", "digest": "abc123"},
                         fitted={"method": "mean difference"})
    tensors = load_file(str(path))                                   # one call, canonical names
    assert set(tensors) == {"blocks.2.resid_post", "blocks.1.resid_post"}
    assert torch.equal(tensors["blocks.2.resid_post"], v)
    beside = json.loads((tmp_path / "steer.json").read_text())
    assert beside == card == read_card(path)
    entry = beside["vectors"]["blocks.2.resid_post"]
    assert entry["transformer_lens"] == "blocks.2.hook_resid_post" and entry["d"] == 64
    assert entry["norm"] == pytest.approx(float(v.norm()))
    assert beside["model"]["digest"] == "abc123" and beside["kind"] == "persona_vector"
    (tmp_path / "steer.json").unlink()
    assert read_card(path) == card                                   # the header carries the card too
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_vectors(tmp_path / "bad.safetensors", {"embed": torch.tensor([1.0, float("nan")])}, kind="x")


def test_concept_vector_takes_a_one_vector_file(tmp_path):
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    write_vectors(tmp_path / "one.safetensors", {"blocks.0.hook_mlp_out": v}, kind="sae_latent")
    got = read_direction(str(tmp_path / "one.safetensors"))
    assert torch.allclose(got, (v / v.norm()).double(), atol=1e-6)
    save_file({"direction": v}, str(tmp_path / "old.safetensors"))   # the older layout still reads
    assert torch.allclose(read_direction(str(tmp_path / "old.safetensors")), got)
    write_vectors(tmp_path / "two.safetensors", {"embed": v, "final_norm": v}, kind="cav")
    with pytest.raises(ValueError, match=r"concept_vector.path: .* holds 2 vectors"):
        read_direction(str(tmp_path / "two.safetensors"))
    save_file({"direction": torch.zeros(4, 4)}, str(tmp_path / "matrix.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(4, 4\); vectors are 1-D"):
        read_direction(str(tmp_path / "matrix.safetensors"))


def test_persona_node_writes_a_card_and_reads_either_spelling(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"id": f"{side}:{k}:s{q}", "side": side, "prompt_index": k, "statement_id": f"s{q}", "reply": "",
             "judge": 80.0, "kept": True, "layer_2": (rng.normal(size=8) + (1 if side == "positive" else 0)).tolist()}
            for side in ("positive", "negative") for k in range(4) for q in range(3)]
    model = json.dumps({"source": "tiny", "digest": "d1"})
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"model": model})
    trait = Trait(name="warm", description="warm", positive_prompts=["be warm"] * 4, negative_prompts=["be cold"] * 4,
                  markers=["warm"])
    out = persona.persona_vector(persona.PersonaConfig(trait=trait, layers=[2]), table)
    card = out["card"]
    assert card["kind"] == "persona_vector" and card["name"] == "warm" and card["model"]["digest"] == "d1"
    assert card["vectors"]["blocks.2.resid_post"]["transformer_lens"] == "blocks.2.hook_resid_post"
    norm = float(out["vectors"]["blocks.2.resid_post"].norm())
    assert card["vectors"]["blocks.2.resid_post"]["norm"] == pytest.approx(norm)
    assert card["fitted"]["kept_positive"] == 12
    # a file keyed by TransformerLens names is a valid persona_vectors.<trait> input
    write_vectors(tmp_path / "warm.safetensors", {"blocks.2.hook_resid_post": out["vectors"]["blocks.2.resid_post"]},
                  kind="persona_vector", name="warm")
    given = persona.given_vectors(persona.VectorFile(path=str(tmp_path / "warm.safetensors"), trait="warm", layers=[2]))
    assert torch.equal(given["vectors"]["blocks.2.resid_post"], out["vectors"]["blocks.2.resid_post"])


def test_persuasion_spec_checks_a_given_vector_file_before_compute(tmp_path):
    write_vectors(tmp_path / "ok.safetensors", {"blocks.2.hook_resid_post": torch.ones(128)}, kind="persona_vector")
    spec = load_spec("persuasion", [f"persona_vectors.persuasive={tmp_path / 'ok.safetensors'}"], check_store=False)
    assert "persuasive" in spec.config.persona_vectors
    write_vectors(tmp_path / "narrow.safetensors", {"blocks.2.resid_post": torch.ones(8)}, kind="persona_vector")
    with pytest.raises(SpecError, match=r"persona_vectors.persuasive: the vector for blocks.2.resid_post has 8"):
        load_spec("persuasion", [f"persona_vectors.persuasive={tmp_path / 'narrow.safetensors'}"], check_store=False)


def test_cavs_come_out_as_vectors_with_a_card():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    x[:20, 0] += 3                                                   # concept "a": segments 0..19, along axis 0
    concepts = {"assignments": pa.table({"segment": list(range(60)), "concept": ["a"] * 20 + ["other"] * 40}),
                "concepts": pa.table({"concept": ["a", "other"], "kept": [True, False]})}
    out = fit_layer_cavs(CavConfig(layer=1, repeats=2, random_size=20, steps=30), [np.arange(60)], [x], concepts)
    assert set(out["directions"]) == {"a"} and int(out["directions"]["a"].abs().argmax()) == 0
    entry = out["card"]["vectors"]["a"]
    assert out["card"]["kind"] == "cav" and entry["site"] == "blocks.1.resid_post"
    assert entry["transformer_lens"] == "blocks.1.hook_resid_post"
