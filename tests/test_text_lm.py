"""Unit tests (no Ray) for the generated text corpus and the tiny causal LM trained on it."""

from __future__ import annotations

import json
import time

import numpy as np
import pydantic
import pytest
import torch
import transformers

from interpflow.tasks import text_corpus, tiny_lm
from interpflow.tasks.text_corpus import CONCEPT_WORDS, FILLER_WORDS, MARKER


@pytest.fixture(scope="module")
def corpus():
    return text_corpus.make_corpus(text_corpus.CorpusConfig())


# --- corpus -------------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_seeded(corpus):
    again = text_corpus.make_corpus(text_corpus.CorpusConfig())
    assert again.to_dict() == corpus.to_dict()
    other = text_corpus.make_corpus(text_corpus.CorpusConfig(seed=1))
    assert other["text"][:50] != corpus["text"][:50]


def test_corpus_schema_and_stable_ids(corpus):
    cfg = text_corpus.CorpusConfig()
    assert corpus.num_rows == cfg.n_examples
    assert set(corpus.column_names) == {"id", "text", "topic", "concept"}
    assert str(corpus.features["id"].dtype) == "int64"
    assert corpus["id"] == list(range(cfg.n_examples))
    assert set(corpus["topic"]) == set(range(cfg.n_topics))
    assert set(corpus["concept"]) == {0, 1}


def test_marker_present_iff_concept(corpus):
    concepts = np.array(corpus["concept"])
    for text, concept in zip(corpus["text"], concepts):
        words = text.split()
        assert (MARKER in words) == bool(concept), text
        if concept:
            assert words.count(MARKER) == 1
            assert words[words.index(MARKER) + 1] in CONCEPT_WORDS
        else:
            assert not set(words) & set(CONCEPT_WORDS)
    assert 0.45 < concepts.mean() < 0.55          # concept_rate 0.5 over 2000 draws
    none = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=200, concept_rate=0.0))
    assert not any(MARKER in t.split() for t in none["text"])


def test_topic_vocabularies_are_disjoint_and_respected(corpus):
    vocab = text_corpus.topic_vocabulary(4)
    flat = [w for v in vocab for w in v]
    assert len(flat) == len(set(flat)) == 4 * text_corpus.WORDS_PER_TOPIC
    assert not set(flat) & ({MARKER, *CONCEPT_WORDS, *FILLER_WORDS})
    shared = {MARKER, *CONCEPT_WORDS, *FILLER_WORDS}
    topic_words_seen = [set() for _ in vocab]
    for text, topic in zip(corpus["text"], corpus["topic"]):
        content = set(text.split()) - shared
        assert content <= set(vocab[topic]), (topic, content - set(vocab[topic]))
        topic_words_seen[topic] |= content
    # each topic actually uses (nearly) its whole vocabulary, and nothing else
    assert all(len(seen) >= text_corpus.WORDS_PER_TOPIC - 1 for seen in topic_words_seen)
    # the vocabulary is fixed; the seed only changes the draws
    assert text_corpus.topic_vocabulary(2) == vocab[:2]


def test_lengths_vary_within_bounds(corpus):
    cfg = text_corpus.CorpusConfig()
    lengths = np.array([len(t.split()) for t in corpus["text"]])
    assert lengths.min() == cfg.min_words and lengths.max() == cfg.max_words
    assert len(set(lengths[:32].tolist())) > 5       # any batch mixes lengths


def test_corpus_config_validation_and_speed():
    with pytest.raises(pydantic.ValidationError, match="max_words"):
        text_corpus.CorpusConfig(min_words=10, max_words=5)
    with pytest.raises(pydantic.ValidationError):
        text_corpus.CorpusConfig(n_exampels=10)
    start = time.perf_counter()
    text_corpus.make_corpus(text_corpus.CorpusConfig())
    assert time.perf_counter() - start < 1.0


# --- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip(corpus):
    texts = list(corpus["text"])
    tok = tiny_lm.train_tokenizer(tiny_lm.TokenizerConfig(), texts, model_max_length=64)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) <= 512 and tok.model_max_length == 64
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    for text in texts[:200] + ["héllo wörld, 123 — unseen ☃ text"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # a planted word is one token, wherever it stands in a text
    marker_ids = {tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in (MARKER, f"the {MARKER}")}
    assert tok.convert_ids_to_tokens(tok(MARKER, add_special_tokens=False)["input_ids"]) == ["Ġ" + MARKER]
    assert {ids[-1:] for ids in marker_ids} == {(tok.convert_tokens_to_ids("Ġ" + MARKER),)}
    batch = tok(texts[:8], padding=True)
    lens = [sum(m) for m in batch["attention_mask"]]
    assert len(set(lens)) > 1
    assert all(ids[n:] == [tok.pad_token_id] * (len(ids) - n) for ids, n in zip(batch["input_ids"], lens))


# --- tiny LM ------------------------------------------------------------------------------------

SMALL = dict(n_layer=2, steps=250, batch_size=32)     # ~4 s on 2 cores


@pytest.fixture(scope="module")
def trained(corpus):
    return tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(**SMALL), corpus)


def _next_token_probs(pretrained, prompts: list[str]) -> torch.Tensor:
    enc = pretrained.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = pretrained.model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(prompts)), last].softmax(-1)


def test_training_loss_drops_and_structure_is_learned(trained):
    m = trained.metrics
    assert m["initial_loss"] == pytest.approx(np.log(m["vocab_size"]), abs=0.5)   # untrained: ~uniform
    assert m["final_loss"] < 0.6 * m["initial_loss"], m
    tok = trained.tokenizer
    ids = lambda words: [tok.convert_tokens_to_ids("Ġ" + w) for w in words]  # noqa: E731
    vocab = text_corpus.topic_vocabulary(4)
    # topic: after words of topic t, the next word is far likelier from t's vocabulary than any other's
    prompts = [f"the {vocab[t][0]} {vocab[t][1]} of {vocab[t][0]}" for t in range(4)]
    probs = _next_token_probs(trained, prompts)
    mass = torch.stack([probs[:, ids(v)].sum(-1) for v in vocab], dim=1)       # [prompt topic, vocab topic]
    assert (mass.diagonal() > 0.4).all(), mass
    assert (mass.diagonal() > 10 * (mass.sum(1) - mass.diagonal())).all(), mass
    # concept: right after the marker, nearly all mass is on the concept words; elsewhere almost none
    with_marker = [p + f" {MARKER}" for p in prompts]
    concept_mass = _next_token_probs(trained, with_marker + prompts)[:, ids(CONCEPT_WORDS)].sum(-1)
    assert (concept_mass[:4] > 0.8).all() and (concept_mass[4:] < 0.05).all(), concept_mass


def test_training_is_deterministic(corpus):
    cfg = tiny_lm.TinyLMConfig(n_layer=1, n_embd=32, steps=5)
    data = corpus.select(range(200))
    a, b = tiny_lm.train_tiny_lm(cfg, data), tiny_lm.train_tiny_lm(cfg, data)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_lm.train_tiny_lm(cfg.model_copy(update={"seed": 1}), data)
    assert not torch.equal(c.model.state_dict()["transformer.wte.weight"], sa["transformer.wte.weight"])


def test_save_pretrained_reloads_like_a_hub_repo(trained, corpus, tmp_path):
    trained.save_pretrained(tmp_path / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert model.config.pad_token_id == tok.pad_token_id == trained.tokenizer.pad_token_id
    assert model.config.bos_token_id == model.config.eos_token_id == tok.bos_token_id
    texts = list(corpus["text"][:6])
    enc = tok(texts, padding=True, return_tensors="pt")
    ref = trained.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert (enc["attention_mask"] == 0).any()                        # the batch really is padded
    with torch.no_grad():
        got = model(**enc).logits
        want = trained.model(**ref).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    saved = json.loads((tmp_path / "lm" / "training_metrics.json").read_text())
    assert saved["final_loss"] == pytest.approx(trained.metrics["final_loss"])
    again = tiny_lm.Pretrained.from_pretrained(tmp_path / "lm")
    assert again.metrics == saved and isinstance(again.model, transformers.GPT2LMHeadModel)


def test_lm_config_validation():
    with pytest.raises(pydantic.ValidationError, match="multiple of n_head"):
        tiny_lm.TinyLMConfig(n_embd=30, n_head=4)
    with pytest.raises(pydantic.ValidationError):
        tiny_lm.TinyLMConfig(tokenizer={"vocab_size": 512, "bogus": 1})
