"""A generated text corpus with planted, known-true structure, for studies that need no hub.

Each sequence belongs to one topic and is written mostly in that topic's own small vocabulary of
pseudo-words, mixed with filler words shared by all topics. A sequence with ``concept == 1`` also
contains the marker word ``zorp`` at a random position, immediately followed by one of the
concept words (``CONCEPT_WORDS``); no other sequence contains either. Lengths vary between
``min_words`` and ``max_words``, so any batch mixes lengths.

Ground truth a study can check against:
  * ``MARKER in text.split()``  iff  ``concept == 1``, and the word after it is in ``CONCEPT_WORDS``;
  * every non-filler, non-concept word of a sequence comes from ``topic_vocabulary(n)[topic]``,
    and the topic vocabularies are disjoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from interpflow.tasks.types import Seed

if TYPE_CHECKING:  # datasets loads when the corpus is made, not when a graph is built
    import datasets

MARKER = "zorp"
CONCEPT_WORDS = ("kelvash", "mirrun", "tosquel")
FILLER_WORDS = ("the", "a", "of", "and", "to", "in", "is", "with", "on", "that")
WORDS_PER_TOPIC = 12
TOPIC_WORD_RATE = 0.65        # chance that a free position holds a topic word rather than filler
_VOCAB_SEED = 20240611        # the vocabulary is fixed; cfg.seed only changes which sequences are drawn
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "sh", "br", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "l", "s", "k", "r")


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_examples: int = Field(2000, ge=1, le=10_000_000, description="number of sequences")
    n_topics: int = Field(4, ge=1, le=32, description="topics, each with its own vocabulary")
    concept_rate: float = Field(0.5, ge=0.0, le=1.0, description="fraction of sequences carrying the concept")
    min_words: int = Field(8, ge=3, le=512, description="shortest sequence, in words")
    max_words: int = Field(24, ge=3, le=512, description="longest sequence, in words")
    seed: Seed = Field(0, description="seed for numpy.random.default_rng")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> CorpusConfig:
        if self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be >= min_words ({self.min_words}); "
                             f"raise max_words or lower min_words")
        return self


def topic_vocabulary(n_topics: int) -> list[list[str]]:
    """The disjoint pseudo-word vocabularies of topics 0..n_topics-1 (the same for every seed)."""
    rng = np.random.default_rng(_VOCAB_SEED)
    reserved = {MARKER, *CONCEPT_WORDS, *FILLER_WORDS}
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < n_topics * WORDS_PER_TOPIC:
        n_syll = int(rng.integers(2, 4))
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(n_syll)) + _CODAS[rng.integers(len(_CODAS))]
        if word not in seen and word not in reserved:
            seen.add(word)
            words.append(word)
    return [words[t * WORDS_PER_TOPIC:(t + 1) * WORDS_PER_TOPIC] for t in range(n_topics)]


def make_corpus(cfg: CorpusConfig) -> datasets.Dataset:
    """``n_examples`` sequences with columns id, text, topic, concept (see the module docstring)."""
    import datasets

    rng = np.random.default_rng(cfg.seed)
    vocab = [np.array(v) for v in topic_vocabulary(cfg.n_topics)]
    filler = np.array(FILLER_WORDS)
    # Zipf-like word frequencies inside a topic, so some words are common and some rare.
    zipf = 1.0 / np.arange(1, WORDS_PER_TOPIC + 1)
    zipf /= zipf.sum()

    n = cfg.n_examples
    topics = rng.integers(0, cfg.n_topics, size=n)
    concepts = (rng.random(n) < cfg.concept_rate).astype(np.int64)
    lengths = rng.integers(cfg.min_words, cfg.max_words + 1, size=n)

    texts = []
    for topic, concept, length in zip(topics, concepts, lengths):
        is_topic = rng.random(length) < TOPIC_WORD_RATE
        topic_words = vocab[topic][rng.choice(WORDS_PER_TOPIC, size=length, p=zipf)]
        filler_words = filler[rng.integers(0, len(filler), size=length)]
        words = np.where(is_topic, topic_words, filler_words).tolist()
        if concept:
            pos = int(rng.integers(0, length - 1))
            words[pos] = MARKER
            words[pos + 1] = CONCEPT_WORDS[rng.integers(len(CONCEPT_WORDS))]
        texts.append(" ".join(words))

    features = datasets.Features({"id": datasets.Value("int64"), "text": datasets.Value("string"),
                                  "topic": datasets.Value("int64"), "concept": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"id": np.arange(n, dtype=np.int64), "text": texts, "topic": topics.astype(np.int64),
         "concept": concepts}, features=features)
