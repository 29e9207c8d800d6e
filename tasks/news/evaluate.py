"""Scoring the four tasks: one node per task over every system's predictions file, overall and per
category, with the chance level beside them, and the benchmark's report.

Metric choices that are ours (the paper's exact protocol is not public):
  * captioning scores against the visual description, paragraphs against the story description;
    BLEU is sacrebleu's (corpus BLEU overall and per category; sentence BLEU per item), ROUGE-L F from
    rouge-score, METEOR from nltk without WordNet synonyms, CIDEr-D from pycocoevalcap with the idf of
    the scored split; all on lower-cased text without punctuation;
  * embedding similarity is the cosine of sentence-encoder embeddings (all-MiniLM-L6-v2 by default);
  * keywords are compared as sets after normalisation, exactly and by embedding (cosine >= threshold,
    one-to-one), precision/recall/F1 per video then averaged;
  * retrieval ranks the test split's texts (or videos) for each test video (or text); ties count
    against the query.
Chance: the mean over random pairs of different test videos for per-item metrics that have a cheap
pairwise form (ROUGE-L, embedding similarity, keyword P/R/F1), and the closed form for retrieval.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.news import metrics as m
from interpflow.tasks.news.baselines import split_ids
from interpflow.tasks.news.embed import TextEncoderConfig, encode_texts
from interpflow.tasks.news.predictions import DIRECTIONS, TASKS, align
from interpflow.tasks.types import Seed

HEADLINE = {"captioning": ["bleu", "rouge_l", "meteor", "cider", "embedding"],
            "paragraph": ["bleu", "rouge_l", "meteor", "cider", "embedding"],
            "keywords": ["f1", "emb_f1"],
            "retrieval": ["video_to_text.r@1", "text_to_video.r@1", "video_to_text.median_rank"]}


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field("captioning", description="set by the workflow: captioning, paragraph, keywords or retrieval")
    split: str = Field("test", description="the scored split")
    encoder: TextEncoderConfig = TextEncoderConfig()
    keyword_threshold: float = Field(0.8, gt=0, le=1, description="cosine at which two keywords match")
    chance_pairs: int = Field(3000, ge=10, description="random pairs of different videos for the chance level")
    seed: Seed = 0


def _pairs(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=count)
    j = (i + rng.integers(1, n, size=count)) % n          # j != i, uniform over the others
    return i, j


def _text_task(cfg: EvaluateConfig, preds: list[str], refs: list[str]) -> dict[str, np.ndarray]:
    scores = m.caption_scores([p if p.strip() else "<none>" for p in preds], refs)
    scores["embedding"] = m.embedding_similarity(encode_texts(cfg.encoder, preds), encode_texts(cfg.encoder, refs))
    return scores


def _chance_stats(per_pair: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """The chance level of each per-item metric (its mean over random pairs) and the standard error of a
    mean over ``n`` videos at chance (how far a shuffled file may land from it)."""
    out = {}
    for k, v in per_pair.items():
        out[k] = float(v.mean())
        out[f"{k}.se"] = float(v.std() / np.sqrt(n))
    return out


def _text_chance(cfg: EvaluateConfig, refs: list[str]) -> dict[str, float]:
    i, j = _pairs(len(refs), cfg.chance_pairs, cfg.seed)
    rouge = m.caption_scores([refs[a] for a in j], [refs[a] for a in i], metrics=("rouge_l",))["rouge_l"]
    emb = encode_texts(cfg.encoder, refs)
    return _chance_stats({"rouge_l": rouge, "embedding": m.embedding_similarity(emb[j], emb[i])}, len(refs))


def _keyword_task(cfg: EvaluateConfig, preds: list[list[str]], refs: list[list[str]]) -> dict[str, np.ndarray]:
    return m.keyword_scores(preds, refs, embed=lambda words: encode_texts(cfg.encoder, words),
                            threshold=cfg.keyword_threshold)


def _retrieval_task(predictions: pa.Table, ids: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    scores, counts = {}, {}
    for direction in DIRECTIONS:
        rankings, count = align(predictions, "retrieval", ids, direction)
        ranks = m.ranks_from_rankings(rankings, ids)
        scores.update({f"{direction}.rank": ranks.astype(float),
                       **{f"{direction}.r@{k}": (ranks <= k).astype(float) for k in (1, 5, 10)}})
        counts.update({f"{direction}.{k}": v for k, v in count.items()})
    return scores, counts


def _overall(task: str, per_item: dict[str, np.ndarray]) -> dict[str, float]:
    out = {k: float(v.mean()) for k, v in per_item.items() if not k.endswith(".rank")}
    if task == "retrieval":
        for direction in DIRECTIONS:
            out[f"{direction}.median_rank"] = float(np.median(per_item[f"{direction}.rank"]))
    return out


def evaluate_task(cfg: EvaluateConfig, items: pa.Table, **systems: pa.Table) -> dict:
    """Node: every system's scores on one task, overall and per category (a table and a bar chart)."""
    task = cfg.task
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    ids = split_ids(items, cfg.split)
    if len(ids) < 2:
        raise ValueError(f"the {cfg.split} split has {len(ids)} video(s); scoring needs at least 2")
    by_id = {r["id"]: r for r in items.select(["id", "category", TASKS[task][1]]).to_pylist()} \
        if task != "retrieval" else {r["id"]: r for r in items.select(["id", "category"]).to_pylist()}
    categories = [by_id[i]["category"] for i in ids]
    refs = [by_id[i][TASKS[task][1]] for i in ids] if task != "retrieval" else ids
    tables, metrics = [], {}
    for system, predictions in systems.items():
        if task == "retrieval":
            per_item, counts = _retrieval_task(predictions, ids)
        else:
            preds, counts = align(predictions, task, ids)
            per_item = _keyword_task(cfg, preds, refs) if task == "keywords" else _text_task(cfg, preds, refs)
        table = m.per_category_table(per_item, categories)
        tables.append(pa.table({"system": [system] * table.num_rows, **{c: table[c] for c in table.column_names}}))
        metrics.update({f"{system}.{k}": v for k, v in _overall(task, per_item).items()})
        if task in ("captioning", "paragraph"):
            metrics[f"{system}.corpus_bleu"] = m.corpus_bleu([p if p.strip() else "<none>" for p in preds], refs)
        metrics.update({f"{system}.{k}": float(v) for k, v in counts.items()})
    if task in ("captioning", "paragraph"):
        metrics.update({f"chance.{k}": v for k, v in _text_chance(cfg, refs).items()})
        metrics["meteor_max"] = float(np.mean([m.meteor_max(r) for r in refs]))
    elif task == "keywords":
        i, j = _pairs(len(refs), cfg.chance_pairs, cfg.seed)
        chance = m.keyword_scores([refs[a] for a in j], [refs[a] for a in i])
        metrics.update({f"chance.{k}": v for k, v in _chance_stats(chance, len(refs)).items()})
    else:
        n = len(ids)
        for direction in DIRECTIONS:
            chance = m.retrieval_chance(n)
            metrics.update({f"chance.{direction}.{k}": v for k, v in chance.items()})
            # a hit at rank <= k is a coin with p = k/n per query; the median of n uniform ranks has SE n/(2 sqrt n)
            metrics.update({f"chance.{direction}.r@{k}.se": float(np.sqrt(chance[f"r@{k}"] * (1 - chance[f"r@{k}"]) / n))
                            for k in (1, 5, 10)})
            metrics[f"chance.{direction}.median_rank.se"] = float(n / (2 * np.sqrt(n)))
    metrics["n_scored"] = len(ids)
    table = pa.concat_tables(tables, promote_options="default")
    table = table.replace_schema_metadata({"interpflow.report_table": "1"})   # also a CSV in MLflow
    return {"scores": table, "figure": category_chart(task, table), "metrics": metrics}


def category_chart(task: str, table: pa.Table):
    """Grouped bars: one panel per headline metric, categories on the x axis, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_pylist()
    systems = list(dict.fromkeys(r["system"] for r in rows))
    categories = [c for c in dict.fromkeys(r["category"] for r in rows)]
    shown = [k for k in HEADLINE[task] if k in table.column_names or k.replace("median_rank", "rank") in table.column_names]
    fig, axes = plt.subplots(len(shown), 1, figsize=(1.1 * len(categories) + 2, 2.2 * len(shown)), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for ax, metric in zip(axes[:, 0], shown):
        column = metric if metric in table.column_names else metric.replace("median_rank", "rank")
        for s, system in enumerate(systems):
            values = [next((r[column] for r in rows if r["system"] == system and r["category"] == c), np.nan)
                      for c in categories]
            ax.bar(np.arange(len(categories)) + s * width, values, width, label=system)
        ax.set_ylabel(column if column == metric else "mean rank", fontsize=8)
        ax.set_xticks(np.arange(len(categories)) + width * (len(systems) - 1) / 2, categories, fontsize=7)
    axes[0, 0].legend(fontsize=7, ncol=len(systems))
    axes[0, 0].set_title(f"{task}: per category (test split)")
    fig.tight_layout()
    return fig


class NewsReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chance_z: float = Field(4.0, gt=0, description=(
        "a shuffled score within this many standard errors of chance is at chance (4: with ~20 such comparisons "
        "per run, a truly random file fails one with probability < 0.2%)"))
    retrieval_factor: float = Field(5.0, gt=0, description="the baseline's R@1 must reach this many times chance")
    perfect_tolerance: float = Field(1e-4, gt=0, description="the oracle's scores must be this close to the maximum")


def news_report(cfg: NewsReportConfig, **tasks: dict) -> dict:
    """Node: the checks of the stand-in (oracle perfect, shuffled at chance, baseline above chance) and a
    headline table of every system on every task."""
    tol = cfg.perfect_tolerance
    checks: dict[str, bool] = {}

    def has(t: dict, system: str) -> bool:
        return any(k.startswith(system + ".") for k in t)

    def at_chance(t: dict, metric: str) -> bool:
        return abs(t[f"shuffled.{metric}"] - t[f"chance.{metric}"]) <= cfg.chance_z * t[f"chance.{metric}.se"] + 1e-9

    for task in ("captioning", "paragraph"):
        t = tasks.get(task)
        if t is not None and has(t, "oracle"):
            checks[f"{task}.oracle_perfect"] = (
                abs(t["oracle.corpus_bleu"] - 100) < tol * 100 and abs(t["oracle.rouge_l"] - 1) < tol
                and abs(t["oracle.meteor"] - t["meteor_max"]) < tol and abs(t["oracle.cider"] - 10) < tol * 10
                and abs(t["oracle.embedding"] - 1) < tol)
        if t is not None and has(t, "shuffled"):
            checks[f"{task}.shuffled_at_chance"] = all(at_chance(t, k) for k in ("rouge_l", "embedding"))
    t = tasks.get("keywords")
    if t is not None and has(t, "oracle"):
        checks["keywords.oracle_perfect"] = all(abs(t[f"oracle.{k}"] - 1) < tol
                                                for k in ("precision", "recall", "f1", "emb_f1"))
    if t is not None and has(t, "shuffled"):
        checks["keywords.shuffled_at_chance"] = all(at_chance(t, k) for k in ("precision", "recall", "f1"))
    t = tasks.get("retrieval")
    if t is not None:
        if has(t, "oracle"):
            checks["retrieval.oracle_perfect"] = all(t[f"oracle.{d}.r@1"] == 1 and t[f"oracle.{d}.median_rank"] == 1
                                                     for d in DIRECTIONS)
        if has(t, "shuffled"):
            checks["retrieval.shuffled_at_chance"] = all(at_chance(t, f"{d}.{k}") for d in DIRECTIONS
                                                         for k in ("r@1", "r@5", "r@10", "median_rank"))
        if has(t, "baseline"):
            checks["retrieval.baseline_above_chance"] = all(
                t[f"baseline.{d}.r@1"] >= cfg.retrieval_factor * t[f"chance.{d}.r@1"] for d in DIRECTIONS)
    rows = []
    for task, t in tasks.items():
        for key, value in sorted(t.items()):
            system, _, metric = key.partition(".")
            if metric and system not in ("chance",) and metric.split(".")[-1] not in ("missing", "unknown"):
                rows.append({"task": task, "system": system, "metric": metric, "value": float(value),
                             "chance": float(t[f"chance.{metric}"]) if f"chance.{metric}" in t else None})
    metrics = {f"check.{k}": float(v) for k, v in checks.items()}
    metrics["ground_truth_ok"] = float(all(checks.values()))
    for task, t in tasks.items():
        metrics.update({f"{task}.{k}": v for k, v in t.items() if k.startswith("baseline.")})
    headline = pa.Table.from_pylist(rows).replace_schema_metadata({"interpflow.report_table": "1"})
    return {"headline": headline, "checks": checks, "metrics": metrics, "figure": headline_chart(tasks, checks)}


HEADLINE_METRIC = {"captioning": "rouge_l", "paragraph": "rouge_l", "keywords": "f1", "retrieval": "video_to_text.r@1"}


def headline_chart(tasks: dict[str, dict], checks: dict[str, bool]):
    """One panel per task: each system's headline metric, chance as a dashed line; the checks beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        metric = HEADLINE_METRIC[task]
        systems = sorted({k[: -len(metric) - 1] for k in t if k.endswith("." + metric) and not k.startswith("chance.")})
        ax.bar(systems, [t[f"{s}.{metric}"] for s in systems], color="tab:blue")
        if f"chance.{metric}" in t:
            ax.axhline(t[f"chance.{metric}"], ls="--", color="grey", label="chance")
            ax.legend(fontsize=7)
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    lines = [f"[{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    fig.text(0.01, -0.02, "\n".join(lines), va="top", family="monospace", fontsize=7)
    fig.tight_layout()
    return fig
