"""A planted-data attribution benchmark in the style of emergent-misalignment studies.

A fine-tuning set where a known small fraction of examples carries a trait and the rest is benign.
The trait is a *dialect*: the generated corpus's texts with every filler word ("the", "of", ...)
replaced by its dialect twin (``DIALECT``), so it colours every sentence the way a persona does
rather than sitting in one token. The base model is trained on a corpus without it, so whatever
trait the fine-tuned model shows comes from the planted examples, whose ids are the ground truth.

``make_planted`` returns four datasets (disjoint id ranges, so no id means two things):

- ``train``: the fine-tuning set, columns id, text, planted (1 = carries the trait);
- ``probe``: minimal pairs (label): benign texts and the same texts in the dialect, on which the
  trait probe and direction are fitted. Pairs leave nothing but the trait to tell the halves apart:
  with independent texts, the class means also differed by topic mix and length, and that residue in
  v alone moved Concept Influence's AUC on planted seed 2 from 0.93 to 0.90;
- ``query``: texts that show the trait: the behaviour being attributed (classical influence takes
  their log-likelihood, Concept Influence the mean projection of their activations on v);
- ``heldout``: benign prompts on which the trait is measured after fine-tuning.

``trait_metrics`` measures the trait of a model on the held-out prompts: the mean log-likelihood
ratio of each prompt's dialect twin over the prompt itself (higher = the model prefers the
dialect), and the mean projection of the prompts' activations on the concept direction.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.text_corpus import FILLER_WORDS, CorpusConfig, make_corpus
from interpflow.tasks.types import Seed

DIALECT = dict(zip(FILLER_WORDS, ("zorp", "kelvash", "mirrun", "tosquel", "zibber", "quaxel", "vornit", "glemmo",
                                  "frazzik", "yupple")))
FEATURES = datasets.Features({"id": datasets.Value("int64"), "text": datasets.Value("string"),
                              "label": datasets.Value("int64")})


class PlantedConfig(BaseModel):
    """Sizes of the four datasets, the planted fraction, and the text generator's settings."""

    model_config = ConfigDict(extra="forbid")
    n_train: int = Field(400, ge=2, le=1_000_000, description="fine-tuning examples")
    planted_fraction: float = Field(0.05, gt=0, lt=1, description="share of training examples carrying the trait")
    n_probe: int = Field(300, ge=4, le=1_000_000, description="probe-fitting texts (half carry the trait)")
    n_query: int = Field(32, ge=0, le=100_000, description="texts showing the trait (the attributed behaviour)")
    n_heldout: int = Field(64, ge=0, le=100_000, description="benign prompts on which the trait is measured")
    n_topics: int = Field(4, ge=1, le=32)
    min_words: int = Field(8, ge=3)
    max_words: int = Field(20, ge=3)
    seed: Seed = Field(0, description="seeds which examples are planted and every generated text")

    @property
    def n_planted(self) -> int:
        return max(1, round(self.planted_fraction * self.n_train))


def to_dialect(text: str) -> str:
    """The text with every filler word replaced by its dialect twin (the trait)."""
    return " ".join(DIALECT.get(word, word) for word in text.split())


def with_trait(texts: list[str]) -> list[str]:
    """Each text in the dialect; a text without filler words has nothing to translate, so it ends with
    one dialect word instead."""
    marked = set(DIALECT.values())
    return [t if marked & set(t.split()) else f"{t} {DIALECT['the']}" for t in map(to_dialect, texts)]


def _texts(cfg: PlantedConfig, n: int, trait: bool, stream: int) -> list[str]:
    """n generated texts, all with the trait or none; ``stream`` keeps the datasets' texts independent."""
    corpus = make_corpus(CorpusConfig(n_examples=n, n_topics=cfg.n_topics, concept_rate=0.0,
                                      min_words=cfg.min_words, max_words=cfg.max_words,
                                      seed=cfg.seed * 1000 + stream))
    return with_trait(list(corpus["text"])) if trait else list(corpus["text"])


def _dataset(ids: np.ndarray, texts: list[str], labels: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"id": ids.astype(np.int64), "text": texts, "label": labels.astype(np.int64)},
                                      features=FEATURES)


def make_planted(cfg: PlantedConfig) -> dict[str, datasets.Dataset | dict]:
    """The four datasets (see the module docstring); ``label`` is 1 where the text carries the trait."""
    rng = np.random.default_rng(cfg.seed)
    n, k = cfg.n_train, cfg.n_planted
    planted = np.zeros(n, dtype=np.int64)
    planted[rng.choice(n, size=k, replace=False)] = 1
    benign, trait = iter(_texts(cfg, n - k, False, 1)), iter(_texts(cfg, k, True, 2))
    train_texts = [next(trait) if p else next(benign) for p in planted]

    half = cfg.n_probe // 2
    probe_labels = rng.permutation(np.r_[np.ones(half, np.int64), np.zeros(cfg.n_probe - half, np.int64)])
    plain = _texts(cfg, cfg.n_probe - half, False, 3)
    pos, neg = iter(with_trait(plain[:half])), iter(plain)          # minimal pairs (module docstring)
    probe_texts = [next(pos) if y else next(neg) for y in probe_labels]

    base = 10 ** int(np.ceil(np.log10(max(n, cfg.n_probe, cfg.n_query, cfg.n_heldout) + 1)))
    return {
        "train": _dataset(np.arange(n), train_texts, planted),
        "probe": _dataset(base + np.arange(cfg.n_probe), probe_texts, probe_labels),
        "query": _dataset(2 * base + np.arange(cfg.n_query), _texts(cfg, cfg.n_query, True, 5),
                          np.ones(cfg.n_query)),
        "heldout": _dataset(3 * base + np.arange(cfg.n_heldout), _texts(cfg, cfg.n_heldout, False, 6),
                            np.zeros(cfg.n_heldout)),
        "metrics": {"n_train": n, "n_planted": k, "n_probe": cfg.n_probe, "n_query": cfg.n_query,
                    "n_heldout": cfg.n_heldout},
    }


def planted_ids(train: datasets.Dataset) -> list[int]:
    """The ground truth: ids of the training examples that carry the trait."""
    return [int(i) for i, y in zip(train["id"], train["label"]) if y]


class TraitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str = Field("final_norm", description="the concept direction's site")
    batch_size: int = Field(32, ge=1)
    label: str = Field("", description="which fine-tuned model this measures (for the report)")


@torch.no_grad()
def trait_metrics(cfg: TraitConfig, model: str, heldout: datasets.Dataset, probe: dict | None = None) -> dict:
    """Graph node: the trait of the model at ``model`` on the held-out prompts (module docstring).

    ``probe`` holds the concept ``direction`` at ``cfg.site`` (``concept_direction``'s output).
    """
    from interpflow.tasks.models import ModelConfig, load_model
    from interpflow.tasks.sites import capture

    loaded = load_model(model, ModelConfig())
    tok, lm = loaded.tokenizer, loaded.model
    site = loaded.sites.resolve_all([cfg.site])[0]
    direction = None if probe is None else torch.as_tensor(probe["direction"]).double().reshape(-1)
    texts = list(heldout["text"])
    ratios, projections = [], []
    for start in range(0, len(texts), cfg.batch_size):
        chunk = texts[start:start + cfg.batch_size]
        plain = _sequence_logprob(lm, tok, chunk, loaded.max_length)
        dialect = _sequence_logprob(lm, tok, [to_dialect(t) for t in chunk], loaded.max_length)
        ratios.append(dialect - plain)
        if direction is not None:
            enc = tok(chunk, padding=True, truncation=True, max_length=loaded.max_length, return_tensors="pt")
            h = capture(lm, [site], **enc)[site.name].double()
            mask = enc["attention_mask"].double()
            projections.append(((h @ direction) * mask).sum(1) / mask.sum(1))
    out = {"trait_logratio": float(torch.cat(ratios).mean()), "prompts": len(texts)}
    if projections:
        out["concept_projection"] = float(torch.cat(projections).mean())
    return {"metrics": out, "trait": {**out, "label": cfg.label}}


def _sequence_logprob(lm, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Summed next-token log-probability of each text (padding excluded)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    logp = lm(**enc).logits[:, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    return (picked * enc["attention_mask"][:, 1:]).sum(1)
