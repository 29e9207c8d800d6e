"""Scores for the video-language news benchmark: captions and paragraphs, keywords, and retrieval.

Pure computation (numpy, pyarrow and the reference metric packages), so it runs in any worker and is
tested without Ray. Every per-item function returns one value per item, so the caller can average,
slice by category (``per_category_table``) or bootstrap without scoring twice.

Text metrics all see the same normalised text, ``" ".join(tokenize(s))`` (lowercase, punctuation
removed), so they disagree only in what they measure, never in how they read case or punctuation:

* BLEU: ``sacrebleu.sentence_bleu`` (0-100, sacrebleu's default ``exp`` smoothing); ``corpus_bleu``
  for the corpus figure, which is not the mean of sentence BLEU.
* ROUGE-L: ``rouge_score`` rougeL F-measure (0-1), no stemming.
* METEOR: ``nltk`` (0-1) with exact and Porter-stem matching only. nltk's synonym stage needs the
  WordNet corpus, which cannot be downloaded here, so by default a stand-in with no synsets is used;
  with WordNet data installed, pass ``wordnet=nltk.corpus.wordnet`` to match synonyms too. Even a
  perfect match scores below 1 (one chunk still pays the fragmentation penalty): see ``meteor_max``.
* CIDEr-D: ``pycocoevalcap`` (0-10 for a perfect match), one reference per item. Its idf comes from
  the references of the corpus it is given, so the score of an item depends on the others: a corpus
  of one item has idf 0 everywhere and scores 0, and a perfect caption reaches 10 only if it has at
  least 4 tokens and each n-gram order has some n-gram not present in every reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import sacrebleu
from nltk.stem.porter import PorterStemmer
from nltk.translate.meteor_score import meteor_score as _nltk_meteor
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer

CAPTION_METRICS = ("bleu", "rouge_l", "meteor", "cider")
_PUNCT = re.compile(r"[^\w\s]|_")
_METEOR_GAMMA, _METEOR_BETA = 0.5, 3.0        # nltk's defaults, used by meteor_max
_STEMMER = PorterStemmer()
_ROUGE = RougeScorer(["rougeL"])


class NoWordNet:
    """WordNet stand-in with no synsets: METEOR then matches exact words and Porter stems only."""

    def synsets(self, word: str, *args: Any, **kwargs: Any) -> list:
        return []


def tokenize(text: str) -> list[str]:
    """Lowercase, drop punctuation (``"U.S."`` -> ``"us"``), split on whitespace."""
    return _PUNCT.sub("", text.lower()).split()


def normalise_keyword(k: str) -> str:
    """Canonical keyword form, so ``"New  York!"`` and ``"new york"`` count as the same keyword."""
    return " ".join(tokenize(k))


def _check_pair(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no items to score")


def caption_scores(predictions: list[str], references: list[str], metrics: Sequence[str] = CAPTION_METRICS,
                   wordnet: Any = None) -> dict[str, np.ndarray]:
    """Per-item BLEU, ROUGE-L, METEOR and CIDEr-D of each prediction against its one reference.

    ``metrics`` picks a subset (CIDEr is corpus-dependent and the slowest); ``wordnet`` replaces the
    no-synonym stand-in for METEOR (see the module docstring).
    """
    _check_pair(predictions, references)
    unknown = set(metrics) - set(CAPTION_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; known: {CAPTION_METRICS}")
    pred_tok, ref_tok = [tokenize(p) for p in predictions], [tokenize(r) for r in references]
    pred, ref = [" ".join(t) for t in pred_tok], [" ".join(t) for t in ref_tok]
    out: dict[str, np.ndarray] = {}
    if "bleu" in metrics:
        out["bleu"] = np.array([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(pred, ref)])
    if "rouge_l" in metrics:
        out["rouge_l"] = np.array([_ROUGE.score(r, p)["rougeL"].fmeasure for p, r in zip(pred, ref)])
    if "meteor" in metrics:
        wn = NoWordNet() if wordnet is None else wordnet
        out["meteor"] = np.array([_nltk_meteor([r], p, stemmer=_STEMMER, wordnet=wn)
                                  for p, r in zip(pred_tok, ref_tok)])
    if "cider" in metrics:
        _, per_item = Cider().compute_score({i: [r] for i, r in enumerate(ref)},
                                            {i: [p] for i, p in enumerate(pred)})
        out["cider"] = np.asarray(per_item, dtype=np.float64)
    return out


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) over the same normalised text as ``caption_scores``."""
    _check_pair(predictions, references)
    pred = [" ".join(tokenize(p)) for p in predictions]
    return float(sacrebleu.corpus_bleu(pred, [[" ".join(tokenize(r)) for r in references]]).score)


def meteor_max(reference: str) -> float:
    """METEOR of a perfect match: 1 - gamma * (1 chunk / n matches)^beta, 0 for an empty reference.

    A perfect caption of n tokens is one chunk, so nltk scores it 1 - 0.5/n^3, not 1; use this, not 1,
    as the ceiling when asking whether a system is perfect.
    """
    n = len(tokenize(reference))
    return 0.0 if n == 0 else 1.0 - _METEOR_GAMMA * (1.0 / n) ** _METEOR_BETA


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected (n, d) embeddings, got shape {a.shape}")
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


def embedding_similarity(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``pred`` with row i of ``ref``; a zero vector scores 0."""
    p, r = _unit_rows(pred), _unit_rows(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction embeddings {p.shape} and reference embeddings {r.shape} differ")
    return np.einsum("ij,ij->i", p, r)


def _prf(matched: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0                     # nothing to find and nothing claimed: perfect
    if n_pred == 0 or n_ref == 0:
        return 0.0, 0.0, 0.0                     # one side empty: nothing can be right
    p, r = matched / n_pred, matched / n_ref
    return p, r, (0.0 if p + r == 0 else 2 * p * r / (p + r))


def _greedy_matches(sim: np.ndarray, threshold: float) -> int:
    """Size of the one-to-one matching that takes pairs by descending similarity while >= threshold."""
    order = np.argsort(-sim, axis=None, kind="stable")
    used_p, used_r, n = set(), set(), 0
    for i, j in zip(*np.unravel_index(order, sim.shape)):
        if sim[i, j] < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            n += 1
    return n


def keyword_scores(predicted: list[list[str]], reference: list[list[str]],
                   embed: Callable[[list[str]], np.ndarray] | None = None,
                   threshold: float = 0.8) -> dict[str, np.ndarray]:
    """Per-item keyword precision, recall and F1, exact (after ``normalise_keyword``, as sets) and,
    with ``embed``, soft: a predicted keyword matches a reference one at cosine >= ``threshold``,
    one-to-one, greedily by descending cosine.

    Both lists empty scores 1; exactly one empty scores 0. ``embed`` maps a list of keywords to an
    (n, d) array and is called once, on every distinct keyword of the batch.
    """
    _check_pair(predicted, reference)
    preds = [sorted({normalise_keyword(k) for k in ks} - {""}) for ks in predicted]
    refs = [sorted({normalise_keyword(k) for k in ks} - {""}) for ks in reference]
    names = ["precision", "recall", "f1"]
    out = {k: np.zeros(len(preds)) for k in names}
    for i, (p, r) in enumerate(zip(preds, refs)):
        for k, v in zip(names, _prf(len(set(p) & set(r)), len(p), len(r))):
            out[k][i] = v
    if embed is None:
        return out
    vocab = sorted(set().union(*preds, *refs))
    vectors = _unit_rows(embed(vocab)) if vocab else np.zeros((0, 1))
    if vectors.shape[0] != len(vocab):
        raise ValueError(f"embed returned {vectors.shape[0]} vectors for {len(vocab)} keywords")
    index = {k: n for n, k in enumerate(vocab)}
    for k in names:
        out[f"emb_{k}"] = np.zeros(len(preds))
    for i, (p, r) in enumerate(zip(preds, refs)):
        matched = 0
        if p and r:
            sim = vectors[[index[k] for k in p]] @ vectors[[index[k] for k in r]].T
            sim[np.equal.outer(np.array(p, dtype=object), np.array(r, dtype=object))] = 1.0
            matched = _greedy_matches(sim, threshold)
        for k, v in zip(names, _prf(matched, len(p), len(r))):
            out[f"emb_{k}"][i] = v
    return out


def ranks_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the correct candidate (column i) for each query (row i) of a square matrix.

    Ties count against the query: rank = 1 + #candidates scored higher + #other candidates scored
    equal, so a constant similarity matrix ranks every query last, never first.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"expected a square (queries, candidates) matrix, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("similarity contains NaN")
    # 1 + #higher + #(equal, not itself) == #(>= the correct score), the correct one included
    return (s >= np.diag(s)[:, None]).sum(axis=1).astype(np.int64)


def ranks_from_rankings(rankings: list[list], truth: list) -> np.ndarray:
    """1-based position of ``truth[i]`` in ``rankings[i]`` (a query's candidate ids, best first).

    A truth absent from its (possibly truncated) ranking gets the worst rank, the number of distinct
    ids over all of ``truth`` and ``rankings``: the candidate pool as far as it can be seen.
    """
    _check_pair(rankings, truth)
    n_candidates = len(set(truth).union(*map(set, rankings)))
    ranks = []
    for ranking, t in zip(rankings, truth):
        ranking = list(ranking)
        ranks.append(ranking.index(t) + 1 if t in ranking else n_candidates)
    return np.array(ranks, dtype=np.int64)


def retrieval_scores(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (fraction of queries with rank <= k), median and mean rank."""
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0 or (r < 1).any():
        raise ValueError(f"expected a non-empty 1-D array of 1-based ranks, got shape {r.shape}")
    out = {f"r@{k}": float((r <= k).mean()) for k in ks}
    out.update(median_rank=float(np.median(r)), mean_rank=float(r.mean()))
    return out


def retrieval_chance(n_candidates: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What ``retrieval_scores`` expects from a random ranking of ``n_candidates``: the floor to beat."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    out = {f"r@{k}": min(k, n_candidates) / n_candidates for k in ks}
    out.update(median_rank=(n_candidates + 1) / 2, mean_rank=(n_candidates + 1) / 2)
    return out


def per_category_table(per_item: dict[str, np.ndarray], categories: list[str]) -> pa.Table:
    """Mean of each per-item metric over all items (row "all", first) and per category (sorted)."""
    cats = np.asarray(categories, dtype=object)
    if len(cats) == 0:
        raise ValueError("no items to tabulate")
    for name, values in per_item.items():
        if len(values) != len(cats):
            raise ValueError(f"metric {name!r} has {len(values)} items but there are {len(cats)} categories")
    if "all" in set(categories):
        raise ValueError('"all" is reserved for the all-items row and cannot be a category')
    rows = [("all", np.ones(len(cats), dtype=bool))] + [(c, cats == c) for c in sorted(set(categories))]
    columns: dict[str, pa.Array] = {
        "category": pa.array([c for c, _ in rows], type=pa.string()),
        "n": pa.array([int(m.sum()) for _, m in rows], type=pa.int64()),
    }
    for name, values in per_item.items():
        v = np.asarray(values, dtype=np.float64)
        columns[name] = pa.array([float(v[m].mean()) for _, m in rows], type=pa.float64())
    return pa.table(columns)
