"""TransformerLens hook names as aliases of the project's site names (issue #30, point 2). No Ray: a
tiny GPT-2 with random weights and a trained tokenizer."""

from __future__ import annotations

import datasets
import pytest
import torch

from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.activations import ExtractConfig, extract_shard, vectors_of
from interpflow.tasks.models import LoadedModel
from interpflow.tasks.sites import SiteMap, UnknownSite, canonical_name, capture, tl_alias
from interpflow.workflows.engine.graph import Shard

ALIASES = {
    "hook_embed": "embed",
    "blocks.0.hook_resid_pre": "embed",
    "blocks.2.hook_resid_pre": "blocks.1.resid_post",
    "blocks.1.hook_resid_post": "blocks.1.resid_post",
    "blocks.0.hook_attn_out": "blocks.0.attn_out",
    "blocks.2.hook_mlp_out": "blocks.2.mlp_out",
    "blocks.1.attn.hook_z.3": "blocks.1.attn.head.3",
    "blocks.1.attn.hook_z[2]": "blocks.1.attn.head.2",
    "ln_final.hook_normalized": "final_norm",
}


@pytest.fixture(scope="module")
def loaded():
    cfg = tiny_lm.TinyLMConfig(n_layer=3, n_embd=32, n_head=4, steps=1)
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=60))
    trained = tiny_lm.train_tiny_lm(cfg, corpus)
    model = trained.model.eval()
    return LoadedModel(model, trained.tokenizer, "cpu", SiteMap(model), "tiny")


def test_every_alias_resolves_to_its_canonical_site(loaded):
    sites = loaded.sites
    for alias, canonical in ALIASES.items():
        assert canonical_name(alias) == canonical
        site = sites.resolve(alias)
        plain = sites.resolve(canonical)
        assert (site.name, site.module, site.side, site.head) == (plain.name, plain.module, plain.side, plain.head)
        assert site.alias == alias and plain.alias is None
        assert sites.width(site) == sites.width(plain)
    for name in sites.names():                                  # and back: every named site has its TL name
        assert canonical_name(tl_alias(name)) == name


def test_alias_captures_the_same_tensor(loaded):
    enc = loaded.tokenizer(["the cat sat on the mat"], return_tensors="pt")
    for alias, canonical in ALIASES.items():
        got = capture(loaded.model, [loaded.sites.resolve(alias)], n_heads=loaded.sites.n_heads, **enc)
        want = capture(loaded.model, [loaded.sites.resolve(canonical)], n_heads=loaded.sites.n_heads, **enc)
        assert list(got) == [canonical]                          # captured under the canonical name
        assert torch.equal(got[canonical], want[canonical]), alias


def test_stored_rows_keep_the_canonical_name_and_record_the_alias(loaded):
    data = datasets.Dataset.from_dict({"id": [7, 8], "text": ["one two three", "four five"]})
    out = extract_shard(ExtractConfig(sites=["blocks.1.hook_resid_post", "blocks.0.attn_out"]), Shard(0, 1, (7, 8)),
                        loaded, data)
    table = out["blocks.1.resid_post"]
    assert set(table.column("site").to_pylist()) == {"blocks.1.resid_post"}
    meta = table.schema.metadata
    assert meta[b"site"] == b"blocks.1.resid_post" and meta[b"requested_site"] == b"blocks.1.hook_resid_post"
    assert out["blocks.0.attn_out"].schema.metadata[b"requested_site"] == b"blocks.0.attn_out"
    plain = extract_shard(ExtractConfig(sites=["blocks.1.resid_post"]), Shard(0, 1, (7, 8)), loaded, data)
    assert torch.equal(vectors_of(table), vectors_of(plain["blocks.1.resid_post"]))


def test_bad_aliases_are_named_before_compute(loaded):
    sites = loaded.sites
    with pytest.raises(UnknownSite, match=r"'blocks.1.attn.hook_z.9' \(the TransformerLens name of "
                                          r"'blocks.1.attn.head.9'\): .*4 heads per block \(0..3\)"):
        sites.resolve("blocks.1.attn.hook_z.9")
    with pytest.raises(UnknownSite, match=r"hook_z holds every head; name one head as blocks.1.attn.hook_z.H"):
        sites.resolve("blocks.1.attn.hook_z")
    with pytest.raises(UnknownSite, match=r"the model has 3 blocks"):
        sites.resolve("blocks.5.hook_resid_post")
    with pytest.raises(UnknownSite) as info:
        sites.resolve("blocks.1.hook_resid_mid")
    message = str(info.value)
    assert "Valid sites: embed, blocks.0.resid_post" in message                  # the project's names ...
    assert "TransformerLens names: hook_embed, blocks.0.hook_resid_post" in message  # ... and TL's
    for name in ("blocks.I.attn.head.H", "blocks.I.attn.hook_z.H", "blocks.I.mlp_out", "blocks.I.hook_mlp_out"):
        assert name in message, message


def test_spec_with_an_alias_is_checked_before_compute():
    from interpflow.workflows.spec import SpecError, load_spec

    spec = load_spec("sae", ["extract.sites=[blocks.1.hook_resid_post]"], check_store=False)
    assert spec.config.extract.sites == ["blocks.1.hook_resid_post"]
    with pytest.raises(SpecError, match=r"hook_z.7.*heads per block"):
        load_spec("extract", ["extract.sites=[blocks.0.attn.hook_z.7]"], check_store=False)
