"""Persona vectors: a trait's direction in the residual stream, from contrastive system prompts.

For each (positive or negative prompt, question) the model answers; a judge keeps the positive
answers that show the trait and the negative ones that do not; the vector at a layer is the
difference of the mean *response-token* activations (the residual stream after that block) between
the kept positive and negative answers. Stability: the same vector from two disjoint halves of the
contrastive prompts (even and odd prompt indices), compared by cosine.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.persuasion.evaluators import EvaluatorConfig, make_evaluator
from interpflow.tasks.persuasion.steering import layer_site
from interpflow.tasks.persuasion.world import Trait, opener
from interpflow.tasks.sae.vectors import read_vectors as read_open_vectors, vector_card
from interpflow.tasks.sites import capture
from interpflow.tasks.study.chat import format_prompt, generate_replies
from interpflow.tasks.types import Seed

SIDES = ("positive", "negative")


class PersonaSettings(BaseModel):
    """How persona vectors are extracted (the study fills in the trait and the layers)."""

    model_config = ConfigDict(extra="forbid")
    categories: list[str] = Field(default_factory=lambda: ["benign_opinion", "benign_factual"], min_length=1,
                                  description="statement categories the contrastive questions come from")
    n_questions: int = Field(12, ge=1, le=10_000, description="questions answered under every contrastive prompt")
    max_tokens: int = Field(24, ge=1)
    temperature: float = Field(0.0, ge=0)
    judge: EvaluatorConfig = Field(EvaluatorConfig(), description="keeps positive answers showing the trait "
                                                                  "and negative ones not showing it")
    seed: Seed = 0


class PersonaConfig(PersonaSettings):
    """One trait's extraction."""

    trait: Trait
    layers: list[int] = Field(min_length=1, description="blocks whose residual stream gives a vector")


def _questions(cfg: PersonaConfig, statements) -> list[dict]:
    rows = [r for r in statements.to_list() if r["category"] in cfg.categories]
    return rows[:cfg.n_questions]


def response_ids(cfg: PersonaConfig, statements, **_) -> list[str]:
    """``side:prompt_index:statement_id`` for every contrastive prompt and question."""
    questions = _questions(cfg, statements)
    if not questions:
        raise ValueError(f"persona.categories {cfg.categories} match no statement; the statements' categories "
                         f"are {sorted(set(statements['category']))}")
    prompts = {"positive": cfg.trait.positive_prompts, "negative": cfg.trait.negative_prompts}
    return [f"{side}:{k}:{q['id']}" for side in SIDES for k in range(len(prompts[side])) for q in questions]


@torch.no_grad()
def response_activations(loaded, prompt: str, reply: str, layers: list[int]) -> dict[int, np.ndarray]:
    """Mean activation over the reply's tokens at each layer's residual stream (after the block)."""
    tok = loaded.tokenizer
    n_prompt = len(tok(prompt, verbose=False)["input_ids"])
    enc = tok([f"{prompt} {reply}"], return_tensors="pt", truncation=True, max_length=loaded.max_length)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}
    sites = loaded.sites.resolve_all([layer_site(layer) for layer in layers])
    out = capture(loaded.model, sites, **enc)
    end = enc["input_ids"].shape[1]
    start = min(n_prompt, end - 1)
    return {layer: out[layer_site(layer)][0, start:end].float().mean(0).cpu().numpy() for layer in layers}


def trait_response_shard(cfg: PersonaConfig, shard, model, statements) -> dict:
    """Graph node (sharded, on a model actor): answers under contrastive prompts, judged, with their
    response-token activations at every layer of ``cfg.layers``."""
    started = time.perf_counter()
    judge = make_evaluator(cfg.judge, cfg.trait.markers)
    by_id = {q["id"]: q for q in _questions(cfg, statements)}
    prompts = {"positive": cfg.trait.positive_prompts, "negative": cfg.trait.negative_prompts}
    chats = []
    for item in shard.ids:
        side, k, statement_id = item.split(":", 2)
        rng = np.random.default_rng([cfg.seed, int(k), sum(map(ord, item))])
        chats.append([{"role": "system", "content": prompts[side][int(k)]},
                      {"role": "user", "content": opener(by_id[statement_id]["statement"], int(rng.integers(0, 101)),
                                                         rng)}])
    replies = generate_replies(model, chats, cfg.max_tokens, cfg.temperature, cfg.seed)
    rows = []
    for item, messages, answer in zip(shard.ids, chats, replies):
        side, k, statement_id = item.split(":", 2)
        reply = answer.text
        verdict = judge.shows_trait(cfg.trait.name, cfg.trait.description, cfg.trait.markers, reply)
        shows = verdict.value is not None and verdict.value >= 50
        acts = response_activations(model, format_prompt(messages, model.tokenizer), reply, cfg.layers)
        rows.append({"id": item, "side": side, "prompt_index": int(k), "statement_id": statement_id, "reply": reply,
                     "judge": verdict.value, "kept": bool(shows == (side == "positive")),
                     **{f"layer_{layer}": acts[layer].astype(np.float32).tolist() for layer in cfg.layers}})
    table = pa.Table.from_pylist(rows)     # the model the activations came from, for the vectors' card
    table = table.replace_schema_metadata({"model": json.dumps({"source": str(getattr(model, "source", "")),
                                                                **dict(getattr(model, "identity", {}) or {})},
                                                               sort_keys=True, default=str)})
    return {"responses": table, "metrics": {"responses": len(rows), "kept": int(sum(r["kept"] for r in rows)),
                                            "compute_s": time.perf_counter() - started}}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def persona_vector(cfg: PersonaConfig, responses) -> dict:
    """Graph node: the trait's vector per layer (difference of kept means), with its norm, the judge's
    filter counts, and the cosine between the vectors of the two disjoint halves of the prompts."""
    table = responses.to_table() if hasattr(responses, "to_table") else responses
    rows = table.to_pylist()
    kept = [r for r in rows if r["kept"]]
    counts = {f"kept_{s}": sum(1 for r in kept if r["side"] == s) for s in SIDES}
    counts.update({f"dropped_{s}": sum(1 for r in rows if r["side"] == s and not r["kept"]) for s in SIDES})
    for side in SIDES:
        if counts[f"kept_{side}"] == 0:
            raise ValueError(f"trait {cfg.trait.name!r}: the judge kept no {side} answer (of "
                             f"{counts[f'dropped_{side}']}); the model does not show the trait under its {side} "
                             f"prompts, so there is no contrast to take a vector from")

    def mean_difference(layer: int, part: int | None = None) -> np.ndarray:
        def mean(side: str) -> np.ndarray:
            picked = [r[f"layer_{layer}"] for r in kept if r["side"] == side
                      and (part is None or r["prompt_index"] % 2 == part)]
            if not picked:
                raise ValueError(f"trait {cfg.trait.name!r}: no kept {side} answer in half {part} of the prompts; "
                                 "give more contrastive prompts or questions")
            return np.mean(np.asarray(picked, dtype=np.float64), axis=0)
        return mean("positive") - mean("negative")

    vectors, summary, metrics = {}, {"trait": cfg.trait.name, "layers": {}, **counts}, dict(counts)
    for layer in cfg.layers:
        v = mean_difference(layer)
        halves = _cosine(mean_difference(layer, 0), mean_difference(layer, 1))
        vectors[layer_site(layer)] = torch.tensor(v, dtype=torch.float32)
        summary["layers"][str(layer)] = {"norm": float(np.linalg.norm(v)), "halves_cosine": halves}
        metrics[f"layer_{layer}.norm"] = float(np.linalg.norm(v))
        metrics[f"layer_{layer}.halves_cosine"] = halves
    card = vector_card(vectors, kind="persona_vector", name=cfg.trait.name, model=_model_of(table),
                       fitted={"method": "difference of the mean response-token activations, kept positive minus "
                                         "kept negative answers", "judge": cfg.judge.model_dump(mode="json"),
                               "questions": cfg.n_questions, "seed": cfg.seed, **counts})
    return {"vectors": vectors, "card": card, "summary": summary, "metrics": metrics}


def _model_of(table) -> dict:
    meta = (table.schema.metadata or {}).get(b"model")
    return json.loads(meta) if meta else {}


def read_vectors(path: str) -> dict[str, np.ndarray]:
    """A persona-vector file: safetensors with one 1-D tensor per steered site, keyed by the project's
    name (``blocks.L.resid_post``) or its TransformerLens name (``blocks.L.hook_resid_post``); the
    ``vectors.safetensors`` of a persona node, or a file ``tasks.sae.vectors.write_vectors`` wrote."""
    return {k: v.numpy() for k, v in read_open_vectors(path, "persona_vectors").items()}


class VectorFile(BaseModel):
    """A trait's vectors given as a file instead of extracted (e.g. from another study)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    trait: str
    layers: list[int] = Field(min_length=1)


def given_vectors(cfg: VectorFile) -> dict:
    """Graph node: the file's vectors at the steered layers, summarised like extracted ones (no halves)."""
    found = read_vectors(cfg.path)
    vectors = {layer_site(layer): torch.tensor(found[layer_site(layer)], dtype=torch.float32) for layer in cfg.layers}
    summary = {"trait": cfg.trait, "given": cfg.path,
               "layers": {str(layer): {"norm": float(np.linalg.norm(found[layer_site(layer)])),
                                       "halves_cosine": float("nan")} for layer in cfg.layers}}
    return {"vectors": vectors, "summary": summary,
            "metrics": {f"layer_{k}.norm": v["norm"] for k, v in summary["layers"].items()}}
