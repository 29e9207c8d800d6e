"""The model actor on local Ray: forward with hooks, generate, loss, served by one loaded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interpflow.actors.model import ModelActor, load
from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.models import ModelConfig, load_model

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    import ray

    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=200))
    path = tmp_path_factory.mktemp("lm") / "lm"
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(n_layer=2, steps=30), corpus).save_pretrained(path)
    handle = ray.remote(ModelActor).options(num_cpus=1).remote(None, load, ModelConfig(), model=str(path))
    return handle, str(path)


def test_forward_matches_a_local_model(actor):
    import ray

    handle, path = actor
    texts = ["alpha beta", "a somewhat longer text to force some padding here"]
    out = ray.get(handle.forward.remote(["blocks.0.resid_post", "final_norm", "blocks.0.mlp_out"], texts=texts))
    local = load_model(path, ModelConfig())
    enc = local.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = local.model(**enc, output_hidden_states=True).hidden_states
    assert np.allclose(out["blocks.0.resid_post"], hidden[1].numpy(), atol=1e-5)
    assert np.allclose(out["final_norm"], hidden[2].numpy(), atol=1e-5)
    assert out["attention_mask"].tolist() == enc["attention_mask"].tolist()
    assert out["blocks.0.mlp_out"].shape == hidden[1].shape


def test_generate_and_loss(actor):
    import ray

    handle, _ = actor
    generated = ray.get(handle.generate.remote(["alpha", "a longer prompt here"], max_new_tokens=5, do_sample=False))
    assert len(generated) == 2 and all(isinstance(g, str) for g in generated) and any(generated)
    again = ray.get(handle.generate.remote(["alpha", "a longer prompt here"], max_new_tokens=5, do_sample=False))
    assert again == generated  # greedy decoding is deterministic
    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=20, seed=5))
    in_domain = ray.get(handle.loss.remote(list(corpus["text"][:8])))
    gibberish = ray.get(handle.loss.remote(["qx vvz kkp wq zz jjj ppq xqz"] * 8))
    assert len(in_domain) == 8 and np.mean(in_domain) < np.mean(gibberish)  # it learned the corpus


def test_unknown_site_lists_valid_names(actor):
    import ray

    handle, _ = actor
    with pytest.raises(Exception, match="Valid sites: embed, blocks.0.resid_post"):
        ray.get(handle.forward.remote(["blocks.0.resid"], texts=["x"]))
    assert "blocks.1.attn.head.3" in ray.get(handle.site_names.remote())
