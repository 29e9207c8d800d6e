"""News-benchmark metrics: agreement with the reference packages, hand-computed values, an oracle that
is perfect on every metric, shuffled predictions at chance, and clear errors. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import sacrebleu
from nltk.translate.meteor_score import meteor_score
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer

from interpflow.tasks.news.metrics import (
    NoWordNet, caption_scores, corpus_bleu, embedding_similarity, keyword_scores, meteor_max,
    normalise_keyword, per_category_table, ranks_from_rankings, ranks_from_similarity, retrieval_chance,
    retrieval_scores, tokenize,
)

PREDS = ["Flood waters rose in the city centre on Monday.", "The minister spoke about rising prices",
         "Police closed the bridge after the storm!", "Farmers protest new tax on diesel fuel"]
REFS = ["Flood waters rose across the city on Monday", "The finance minister warned about rising prices.",
        "Police closed the main bridge after a storm", "Farmers protested a new diesel tax in the capital"]
# varied, >= 4 tokens each, so every n-gram order has an informative idf and the oracle reaches CIDEr 10
ORACLE = REFS + ["Rescue teams searched the collapsed building overnight",
                 "Voters queued for hours outside polling stations in Lagos"]


def norm(s: str) -> str:
    return " ".join(tokenize(s))


def test_normalisation():
    assert tokenize("The U.S. President's  speech, today!") == ["the", "us", "presidents", "speech", "today"]
    assert normalise_keyword("  New  York! ") == "new york" == normalise_keyword("new york")


# --- 1. agreement with the reference packages: every metric sees the normalised text ---------------

def test_caption_scores_agree_with_reference_packages():
    got = caption_scores(PREDS, REFS)
    assert set(got) == {"bleu", "rouge_l", "meteor", "cider"}
    assert all(v.shape == (len(PREDS),) for v in got.values())
    p, r = [norm(s) for s in PREDS], [norm(s) for s in REFS]
    bleu = [sacrebleu.sentence_bleu(a, [b]).score for a, b in zip(p, r)]
    rouge = [RougeScorer(["rougeL"]).score(b, a)["rougeL"].fmeasure for a, b in zip(p, r)]
    meteor = [meteor_score([b.split()], a.split(), wordnet=NoWordNet()) for a, b in zip(p, r)]
    _, cider = Cider().compute_score({i: [b] for i, b in enumerate(r)}, {i: [a] for i, a in enumerate(p)})
    np.testing.assert_allclose(got["bleu"], bleu)
    np.testing.assert_allclose(got["rouge_l"], rouge)
    np.testing.assert_allclose(got["meteor"], meteor)
    np.testing.assert_allclose(got["cider"], cider)
    assert 0 < got["bleu"].min() and got["bleu"].max() < 100      # the examples are neither 0 nor perfect
    assert corpus_bleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(p, [r]).score)
    # on already-normalised text, caption_scores is sacrebleu on the raw strings
    np.testing.assert_allclose(caption_scores(p, r, metrics=("bleu",))["bleu"], bleu)


def test_case_and_punctuation_do_not_count():
    a = caption_scores(["The Minister, SPOKE about prices today."], ["the minister spoke about prices today"],
                       metrics=("bleu", "rouge_l", "meteor"))
    assert a["bleu"][0] == pytest.approx(100) and a["rouge_l"][0] == pytest.approx(1)


def test_metric_subset_and_cider_single_item_is_degenerate():
    assert set(caption_scores(PREDS, REFS, metrics=("rouge_l",))) == {"rouge_l"}
    # with one item every n-gram is in every reference: idf 0, so even a perfect caption scores 0
    assert caption_scores(REFS[:1], REFS[:1], metrics=("cider",))["cider"][0] == 0.0


# --- 2. hand-computed values --------------------------------------------------------------------

def test_rouge_l_by_hand():
    # LCS("the cat on a mat", "the cat sat on the mat") = "the cat on mat", 4 tokens
    got = caption_scores(["the cat on a mat"], ["the cat sat on the mat"], metrics=("rouge_l",))["rouge_l"][0]
    p, r = 4 / 5, 4 / 6
    assert got == pytest.approx(2 * p * r / (p + r)) and got == pytest.approx(8 / 11)


def test_meteor_by_hand():
    # 5 exact matches in 2 chunks ("the cat" | "on the mat"); P = 1, R = 5/6
    got = caption_scores(["the cat on the mat"], ["the cat sat on the mat"], metrics=("meteor",))["meteor"][0]
    p, r, chunks, matches = 1.0, 5 / 6, 2, 5
    fmean = 10 * p * r / (r + 9 * p)
    assert got == pytest.approx(fmean * (1 - 0.5 * (chunks / matches) ** 3))
    # Porter stems match without WordNet: "cats"/"cat", "rained"/"rains" -> 3 matches, one chunk
    got = caption_scores(["cats rained down"], ["cat rains down"], metrics=("meteor",))["meteor"][0]
    assert got == pytest.approx(meteor_max("a b c"))
    # synonyms need WordNet: the stand-in finds none, a WordNet-like object passed in is used
    assert caption_scores(["a big sofa"], ["a big couch"], metrics=("meteor",))["meteor"][0] < 0.67

    class Lemma:
        def __init__(self, name): self._name = name
        def name(self): return self._name

    class Synset:
        def lemmas(self): return [Lemma("sofa"), Lemma("couch")]

    class TinyWordNet:
        def synsets(self, word, *a, **k): return [Synset()] if word in ("sofa", "couch") else []

    got = caption_scores(["a big sofa"], ["a big couch"], metrics=("meteor",), wordnet=TinyWordNet())
    assert got["meteor"][0] == pytest.approx(meteor_max("a big couch"))


def test_meteor_max_matches_nltk():
    for s in ORACLE + ["a", "the the the cat the", "b a b a b a"]:
        t = tokenize(s)
        assert meteor_max(s) == pytest.approx(meteor_score([t], t, wordnet=NoWordNet()), abs=1e-12)
        assert meteor_max(s) == pytest.approx(1 - 0.5 / len(t) ** 3)
    assert meteor_max("...") == 0.0


def test_keyword_scores_by_hand():
    pred = [["New  York!", "election", "Election", "vote"], [], [], ["x"], ["!!"]]
    ref = [["new york", "economy"], [], ["x"], [], []]
    got = keyword_scores(pred, ref)
    assert set(got) == {"precision", "recall", "f1"}
    np.testing.assert_allclose(got["precision"], [1 / 3, 1, 0, 0, 1])   # duplicates count once
    np.testing.assert_allclose(got["recall"], [1 / 2, 1, 0, 0, 1])
    np.testing.assert_allclose(got["f1"], [0.4, 1, 0, 0, 1])
    assert keyword_scores([["a"]], [["b"]])["f1"][0] == 0.0                # p + r = 0 -> f1 = 0


def test_keyword_scores_with_embeddings():
    vec = {"flood": [1, 0, 0], "flooding": [0.9, 0.1, 0], "rain": [0, 1, 0], "storm": [0.6, 0.8, 0],
           "sport": [0, 0, 1], "blank": [0, 0, 0]}
    calls = []

    def embed(words):
        calls.append(list(words))
        return np.array([vec[w] for w in words], dtype=float)

    pred = [["Flooding", "rain", "sport"], ["flood", "flooding"], ["blank"]]
    ref = [["flood", "storm"], ["flood"], ["blank"]]
    got = keyword_scores(pred, ref, embed=embed, threshold=0.75)
    assert calls == [sorted(vec)]                      # one call, on every distinct normalised keyword
    np.testing.assert_allclose(got["precision"], [0, 1 / 2, 1])
    np.testing.assert_allclose(got["emb_precision"], [2 / 3, 1 / 2, 1])    # flooding~flood, rain~storm (0.8)
    np.testing.assert_allclose(got["emb_recall"], [1, 1, 1])             # one-to-one: "flood" used once
    np.testing.assert_allclose(got["emb_f1"], [0.8, 2 / 3, 1])           # equal strings match even at 0
    strict = keyword_scores(pred, ref, embed=embed, threshold=0.9)
    np.testing.assert_allclose(strict["emb_precision"], [1 / 3, 1 / 2, 1])  # rain~storm below 0.9


def test_embedding_similarity():
    got = embedding_similarity(np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]),
                               np.array([[6.0, 8.0], [0.0, 2.0], [1.0, 1.0]]))
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0])


def test_retrieval_by_hand():
    s = np.array([[0.9, 0.1, 0.2, 0.3],     # correct is best -> 1
                  [0.5, 0.4, 0.6, 0.1],     # two higher -> 3
                  [0.7, 0.7, 0.7, 0.0],     # tied with two others, counted against -> 3
                  [0.2, 0.2, 0.2, 0.2]])    # constant row -> last
    ranks = ranks_from_similarity(s)
    np.testing.assert_array_equal(ranks, [1, 3, 3, 4])
    got = retrieval_scores(ranks, ks=(1, 2, 3, 5))
    assert got == pytest.approx({"r@1": 0.25, "r@2": 0.25, "r@3": 0.75, "r@5": 1.0,
                                 "median_rank": 3.0, "mean_rank": 2.75})
    np.testing.assert_array_equal(ranks_from_similarity(np.ones((5, 5))), [5] * 5)
    assert retrieval_chance(100) == pytest.approx({"r@1": 0.01, "r@5": 0.05, "r@10": 0.1,
                                                   "median_rank": 50.5, "mean_rank": 50.5})
    assert retrieval_chance(3)["r@5"] == 1.0


def test_ranks_from_rankings():
    got = ranks_from_rankings([["b", "a", "c"], ["a"], ["c", "b", "a"]], ["a", "b", "c"])
    np.testing.assert_array_equal(got, [2, 3, 1])             # "b" missing -> worst of 3 candidates
    got = ranks_from_rankings([["b", "a", "d"], ["a"], ["c"]], ["a", "b", "c"])
    np.testing.assert_array_equal(got, [2, 4, 1])             # pool seen is {a, b, c, d}


def test_per_category_table():
    t = per_category_table({"f1": np.array([1.0, 2.0, 4.0]), "bleu": np.array([0.0, 10.0, 20.0])},
                           ["b", "a", "b"])
    assert t.schema.names == ["category", "n", "f1", "bleu"]
    assert t.schema.field("category").type == pa.string() and t.schema.field("n").type == pa.int64()
    assert t.column("category").to_pylist() == ["all", "a", "b"]
    assert t.column("n").to_pylist() == [3, 1, 2]
    np.testing.assert_allclose(t.column("f1").to_pylist(), [7 / 3, 2.0, 2.5])
    np.testing.assert_allclose(t.column("bleu").to_pylist(), [10.0, 10.0, 10.0])


# --- 3. an oracle is perfect on every metric ------------------------------------------------------

def test_oracle_is_perfect():
    got = caption_scores(ORACLE, ORACLE)
    np.testing.assert_allclose(got["bleu"], 100.0)
    np.testing.assert_allclose(got["rouge_l"], 1.0)
    np.testing.assert_allclose(got["meteor"], [meteor_max(s) for s in ORACLE])
    np.testing.assert_allclose(got["cider"], 10.0)
    assert corpus_bleu(ORACLE, ORACLE) == pytest.approx(100.0)
    kw = [tokenize(s)[:3] for s in ORACLE]
    rng = np.random.default_rng(0)
    kw_got = keyword_scores(kw, kw, embed=lambda ws: rng.normal(size=(len(ws), 8)))
    for k in ("precision", "recall", "f1", "emb_precision", "emb_recall", "emb_f1"):
        np.testing.assert_allclose(kw_got[k], 1.0)
    e = rng.normal(size=(len(ORACLE), 16))
    sim = embedding_similarity(np.repeat(e, len(e), 0), np.tile(e, (len(e), 1))).reshape(len(e), len(e))
    r = retrieval_scores(ranks_from_similarity(sim))
    assert r["r@1"] == 1.0 and r["median_rank"] == 1.0
    assert retrieval_scores(ranks_from_rankings([[i] + [j for j in range(6) if j != i] for i in range(6)],
                                                list(range(6))))["r@1"] == 1.0


# --- 4. shuffled predictions score at chance ------------------------------------------------------

SUBJECTS = ["the president", "protesters", "the minister", "police", "farmers", "the central bank",
            "rescue teams", "voters", "workers", "the mayor"]
VERBS = ["spoke about", "warned about", "gathered over", "rejected", "celebrated", "debated"]
OBJECTS = ["the new budget", "rising prices", "the flood damage", "the election result", "fuel taxes",
           "the peace deal", "school closures", "the trade talks"]
PLACES = ["in london", "in nairobi", "in lagos", "in delhi", "in brasilia", "in tokyo", "in berlin"]
TIMES = ["on monday", "this week", "overnight", "on friday", "after the vote", ""]
KEYWORDS = ["economy", "politics", "weather", "protest", "election", "trade", "health", "energy",
            "police", "farming", "budget", "flood", "education", "strike", "diplomacy"]


def news_corpus(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]   # noqa: E731
    texts = [" ".join(filter(None, [pick(SUBJECTS), pick(VERBS), pick(OBJECTS), pick(PLACES), pick(TIMES)]))
             for _ in range(n)]
    keywords = [[str(k) for k in rng.choice(KEYWORDS, size=rng.integers(1, 5), replace=False)]
                for _ in range(n)]
    return texts, keywords


def test_shuffled_predictions_score_at_chance():
    n = 200
    texts, keywords = news_corpus(n, seed=0)
    i, j = np.where(~np.eye(n, dtype=bool))                 # all ordered pairs i != j
    chance_rouge = caption_scores([texts[a] for a in j], [texts[a] for a in i], metrics=("rouge_l",))
    chance_f1 = keyword_scores([keywords[a] for a in j], [keywords[a] for a in i])["f1"].mean()
    shuffled_rouge, shuffled_f1 = [], []
    for seed in range(10):
        perm = np.random.default_rng(100 + seed).permutation(n)
        shuffled = caption_scores([texts[p] for p in perm], texts, metrics=("rouge_l",))
        shuffled_rouge.append(shuffled["rouge_l"].mean())
        shuffled_f1.append(keyword_scores([keywords[p] for p in perm], keywords)["f1"].mean())
    chance_rouge = chance_rouge["rouge_l"].mean()
    assert chance_rouge < 0.5 and chance_f1 < 0.5            # chance is far below the oracle's 1
    assert np.mean(shuffled_rouge) == pytest.approx(chance_rouge, abs=0.02)
    assert np.mean(shuffled_f1) == pytest.approx(chance_f1, abs=0.03)


def test_random_retrieval_is_at_chance():
    n, seeds = 100, 50
    scores = [retrieval_scores(ranks_from_similarity(np.random.default_rng(s).normal(size=(n, n))))
              for s in range(seeds)]
    mean = {k: np.mean([s[k] for s in scores]) for k in scores[0]}
    chance = retrieval_chance(n)
    assert mean["r@1"] == pytest.approx(chance["r@1"], abs=0.006)
    assert mean["r@5"] == pytest.approx(chance["r@5"], abs=0.015)
    assert mean["r@10"] == pytest.approx(chance["r@10"], abs=0.02)
    assert mean["median_rank"] == pytest.approx(chance["median_rank"], abs=4)
    assert mean["mean_rank"] == pytest.approx(chance["mean_rank"], abs=3)


# --- 5. clear errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: caption_scores(["a"], ["a", "b"]),
    lambda: corpus_bleu(["a"], ["a", "b"]),
    lambda: keyword_scores([["a"]], [["a"], ["b"]]),
    lambda: ranks_from_rankings([["a"]], ["a", "b"]),
])
def test_mismatched_lengths_name_both(call):
    with pytest.raises(ValueError, match=r"1 .*2 "):
        call()


def test_other_bad_input():
    with pytest.raises(ValueError, match="no items"):
        caption_scores([], [])
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_scores(["a"], ["a"], metrics=("bleu", "spice"))
    with pytest.raises(ValueError, match=r"'f1' has 2 items but there are 3"):
        per_category_table({"f1": np.zeros(2)}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="square"):
        ranks_from_similarity(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="differ"):
        embedding_similarity(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="embed returned 1 vectors for 2 keywords"):
        keyword_scores([["a"]], [["b"]], embed=lambda ws: np.ones((1, 3)))
