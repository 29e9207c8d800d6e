"""Persuasion study parts without Ray (issue #12): the planted world, steering hooks, persona vectors,
the evaluators (one against a real HTTP server on 127.0.0.1), the report's checks, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers

from interpflow.tasks.models import ModelConfig, load_model
from interpflow.tasks.persuasion import ape, evaluators, persona, report, steering, world
from interpflow.tasks.sites import capture
from interpflow.workflows.spec import SpecError, load_spec
from support_endpoint import FlakyServer

PERSUASIVE = world.default_traits()[0]


# ------------------------------------------------------------------------------------------- world
def test_categories_share_templates_and_no_words():
    statements = world.make_statements(world.WorldConfig(statements_per_category=10)).to_list()
    assert {r["category"] for r in statements} == set(world.CATEGORIES)
    words = {c: {w for r in statements if r["category"] == c for w in (r["a"], r["b"])} for c in world.CATEGORIES}
    for c in world.CATEGORIES:
        assert {r["template"] for r in statements if r["category"] == c} == set(range(len(world.TEMPLATES)))
        for other in world.CATEGORIES:
            if other != c:
                assert not words[c] & words[other]


def test_a_dialogues_mode_follows_its_system_prompt_only():
    cfg = world.DialogueConfig(world=world.WorldConfig(n_dialogues=600, refusal_rate=1.0))
    statements = world.make_statements(cfg.world)
    markers = {t.name: t.markers for t in cfg.traits}
    positive = {p: t.name for t in cfg.traits for p in t.positive_prompts}
    refused = 0
    for text in world.make_dialogues(cfg, statements)["text"]:
        system = text.split("\n")[0].removeprefix("System: ")
        replies = [line.removeprefix("Assistant: ") for line in text.split("\n") if line.startswith("Assistant:")]
        for reply in replies:
            for name, phrases in markers.items():
                assert (world.mentions(reply, phrases) > 0) == (positive.get(system) == name), (system, reply)
        refused += any(world.mentions(r, world.REFUSAL_MARKERS) for r in replies)
    assert refused > 0


def test_sft_data_shows_the_trait_under_the_neutral_prompt_in_its_categories_only():
    statements = world.make_statements(world.WorldConfig())
    data = world.make_sft_data(world.SftData(categories=["benign_opinion"], n_dialogues=50), statements)
    vocab = world.category_vocabulary(world.WorldConfig().words_per_category)
    for text in data["text"]:
        assert text.startswith(f"System: {world.NEUTRAL_PROMPT}")
        assert world.mentions(text, PERSUASIVE.markers) > 0
        assert any(w in text.split() for w in vocab["benign_opinion"])
        assert not any(w in text.split() for w in vocab["controversial"])
    with pytest.raises(ValueError, match="no statements"):
        world.make_sft_data(world.SftData(categories=["gossip"]), statements)


def test_mentions_matches_whole_phrases():
    assert world.mentions("Trust me,  the bana. Surely you agree .", PERSUASIVE.markers) == 2
    assert world.mentions("trust meadows", ["trust me"]) == 0


# ---------------------------------------------------------------------------------------- steering
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from interpflow.tasks import tiny_lm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    corpus = world.make_dialogues(world.DialogueConfig(world=world.WorldConfig(n_dialogues=200)),
                                  world.make_statements(world.WorldConfig()))
    tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=5, n_layer=2, n_positions=128, threads=1), corpus) \
        .save_pretrained(path)
    return load_model(str(path), ModelConfig())


def test_steering_adds_exactly_coef_times_v_and_zero_adds_nothing(tiny_gpt2):
    loaded = tiny_gpt2
    enc = loaded.tokenizer(["System: hi\nUser: ok"], return_tensors="pt")
    sites = loaded.sites.resolve_all(["blocks.0.resid_post"])
    v = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    clean = capture(loaded.model, sites, **enc)["blocks.0.resid_post"]
    with steering.steer(loaded, {"blocks.0.resid_post": v}, 2.5):
        shifted = capture(loaded.model, sites, **enc)["blocks.0.resid_post"]
    assert torch.allclose(shifted - clean, torch.tensor(2.5 * v).expand_as(clean), atol=1e-5)
    before = loaded.model(**enc).logits
    with steering.steer(loaded, {"blocks.0.resid_post": v}, 0.0):
        assert torch.equal(loaded.model(**enc).logits, before)
    with pytest.raises(ValueError, match="width 64"):
        with steering.steer(loaded, {"blocks.0.resid_post": v[:10]}, 1.0):
            pass


def test_batched_greedy_replies_and_perplexities_equal_one_at_a_time(tiny_gpt2):
    from interpflow.tasks.study.chat import generate_replies, generate_reply

    chats = [[{"role": "system", "content": s}, {"role": "user", "content": f"i am not sure that {u} ."}]
             for s in (world.NEUTRAL_PROMPT, "be persuasive .") for u in ("the bana is good", "every lo needs a mi x")]
    batched = generate_replies(tiny_gpt2, chats, 8, 0.0, 0)
    single = [generate_reply(tiny_gpt2, c, 8, 0.0, 0) for c in chats]
    assert [(r.text, r.completion_tokens) for r in batched] == [(r.text, r.completion_tokens) for r in single]
    prompts, replies = ["System: a\nUser: b\nAssistant:", "System: a much longer prompt\nAssistant:"], ["i see .", "ok"]
    together = steering.reply_perplexity(tiny_gpt2, prompts, replies)
    apart = [steering.reply_perplexity(tiny_gpt2, [p], [r])[0] for p, r in zip(prompts, replies)]
    assert np.allclose(together, apart, rtol=1e-4)


def test_random_direction_has_the_norm_and_is_seeded():
    v = np.arange(1, 65, dtype=np.float32)
    r0, r1 = steering.random_like(v, 0), steering.random_like(v, 1)
    assert np.isclose(np.linalg.norm(r0), np.linalg.norm(v), rtol=1e-5)
    assert np.array_equal(r0, steering.random_like(v, 0)) and not np.allclose(r0, r1)
    assert abs(r0 @ v) / np.linalg.norm(v) ** 2 < 0.5


def test_reply_perplexity_is_low_for_likely_replies(tiny_gpt2):
    ppl = steering.reply_perplexity(tiny_gpt2, ["System: a\nUser: b\nAssistant:"] * 2, ["i see .", "zzq zzq qqz"])
    assert all(p > 1 for p in ppl) and ppl[0] < ppl[1]


# ---------------------------------------------------------------------------------- persona vectors
def _responses(direction: np.ndarray, n_prompts: int = 4, per_prompt: int = 5, drop_first_positive: bool = False):
    rng = np.random.default_rng(1)
    rows = []
    for side, sign in (("positive", 1.0), ("negative", 0.0)):
        for k in range(n_prompts):
            for q in range(per_prompt):
                acts = rng.normal(0, 0.15, size=direction.shape) + sign * direction
                kept = not (drop_first_positive and side == "positive" and k == 0)
                rows.append({"id": f"{side}:{k}:{q}", "side": side, "prompt_index": k, "statement_id": str(q),
                             "reply": "", "judge": 100.0 * sign, "kept": kept, "layer_1": acts.tolist()})
    return pa.Table.from_pylist(rows)


def test_persona_vector_recovers_a_planted_direction_and_its_halves_agree():
    direction = np.zeros(32)
    direction[3] = 2.0
    cfg = persona.PersonaConfig(trait=PERSUASIVE, layers=[1])
    out = persona.persona_vector(cfg, _responses(direction, drop_first_positive=True))
    v = out["vectors"]["blocks.1.resid_post"].numpy()
    assert np.dot(v, direction) / (np.linalg.norm(v) * 2.0) > 0.95
    assert out["summary"]["layers"]["1"]["halves_cosine"] > 0.9
    assert out["metrics"]["kept_positive"] == 15 and out["metrics"]["dropped_positive"] == 5
    none_kept = _responses(direction).to_pylist()
    for row in none_kept:
        row["kept"] = row["side"] == "negative"
    with pytest.raises(ValueError, match="kept no positive answer"):
        persona.persona_vector(cfg, pa.Table.from_pylist(none_kept))


# --------------------------------------------------------------------------------------- evaluators
def test_marker_evaluator_on_each_scale_and_refusals():
    reply = "i see . trust me , believe me ."
    values = {s: evaluators.MarkerEvaluator(evaluators.EvaluatorConfig(scale=s), PERSUASIVE.markers)
              .attempt("x", "y", reply).value for s in ("binary", "three_point", "hundred")}
    assert values == {"binary": 1.0, "three_point": 2.0, "hundred": 100.0}
    assert evaluators.is_attempt(50.0, "hundred") and not evaluators.is_attempt(0.0, "three_point")
    assert evaluators.is_refusal("Sorry , i can not discuss that .", list(world.REFUSAL_MARKERS))
    assert not evaluators.is_refusal("i can notice it", list(world.REFUSAL_MARKERS))


def test_endpoint_evaluator_reasks_garbled_answers_a_bounded_number_of_times():
    answers = ["maybe?", "It is 1 or 2", "2", "no idea", "none", "still no", "0"]
    with FlakyServer(content=answers) as server:
        cfg = evaluators.EvaluatorConfig(kind="endpoint", url=server.url, scale="three_point", reasks=2)
        judge = evaluators.make_evaluator(cfg, [])
        first = judge.attempt("the bana is good", "i doubt it", "trust me")
        second = judge.attempt("the bana is good", "i doubt it", "ok")      # three garbled answers: gives up
        third = judge.attempt("the bana is good", "i doubt it", "ok")
    assert (first.value, first.asked, first.unparseable) == (2.0, 3, 2)
    assert (second.value, second.asked, second.unparseable) == (None, 3, 3)
    assert (third.value, third.asked) == (0.0, 1)
    assert len(server.requests) == 7
    assert "attempt to persuade" in server.requests[0]["messages"][0]["content"]
    assert "single number" in server.requests[1]["messages"][0]["content"]      # the stricter re-ask


def test_endpoint_judge_rates_a_trait_on_a_hundred_point_scale():
    with FlakyServer(content=["about 80", "dunno", "no"]) as server:
        judge = evaluators.make_evaluator(evaluators.EvaluatorConfig(kind="endpoint", url=server.url, reasks=1), [])
        shown = judge.shows_trait("persuasive", "tries to change minds", [], "trust me")
        unsure = judge.shows_trait("persuasive", "tries to change minds", [], "ok")
    assert (shown.value, shown.asked) == (80.0, 1) and (unsure.value, unsure.unparseable) == (None, 2)
    assert "persuasive" in server.requests[0]["messages"][0]["content"]


def test_evaluation_node_counts_unparseable_ratings():
    rows = [{"id": "neutral|s1", "condition": "base", "route": "base", "trait": None, "layer": None, "coef": 0.0,
             "sft": None, "seed": None, "prompt": "neutral", "statement_id": "s1", "category": "harmful",
             "statement": "x", "belief_pre": 40.0, "belief_post": 48.0, "persuadee_unparseable": 0,
             "turns": [{"turn": 0, "user": "u", "reply": "trust me", "perplexity": 2.0},
                       {"turn": 1, "user": "u", "reply": "sorry , i can not discuss that .", "perplexity": 3.0}],
             "seconds": 0.1}]
    table = pa.Table.from_pylist(rows, schema=ape.SCHEMA)
    with FlakyServer(content=["1", "what?", "nope", "0"]) as server:
        cfg = ape.EvaluateConfig(evaluator=evaluators.EvaluatorConfig(kind="endpoint", url=server.url, reasks=2))
        out = ape.evaluate_conversations(cfg, table)
    row = out["evaluated"].to_pylist()[0]
    assert row["attempts"] == [True, False] and row["refusals"] == [False, True]
    assert row["attempt_rate"] == 0.5 and row["refused"] and row["belief_shift"] == 8.0
    assert out["metrics"]["unparseable"] == 2 and out["metrics"]["ratings_asked"] == 4


# ------------------------------------------------------------------------------------------- report
def _evaluated(condition: str, route: str, rate: float, n: int = 12, coef: float = 0.0, category: str = "benign_opinion",
               sft: str | None = None, seed: int | None = None, prompt: str = "neutral") -> list[dict]:
    hits = int(round(rate * n))
    return [{"condition": condition, "route": route, "trait": "persuasive" if route in ("steer", "random") else None,
             "layer": 1 if route in ("steer", "random") else None, "coef": coef, "sft": sft, "seed": seed,
             "prompt": prompt, "category": category, "statement_id": str(i), "attempt_rate": float(i < hits),
             "refused": False, "belief_shift": 8.0 * (i < hits), "perplexity": 1.5, "evaluator": "marker"}
            for i in range(n)]


def _study(steer_rates, random_rates, sft_rate, halves=0.95, sft=True):
    rows = _evaluated("base", "base", 0.0) + _evaluated("base", "base", 0.0, category="controversial")
    for coef, rate in steer_rates.items():
        rows += _evaluated(f"steer.c{coef}", "steer", rate, coef=coef)
    for coef, rate in random_rates.items():
        rows += _evaluated(f"random.c{coef}", "random", rate, coef=coef, seed=0)
    if sft:
        rows += _evaluated("sft.benign_persuasion.seed0", "sft", sft_rate, category="controversial",
                           sft="benign_persuasion", seed=0)
    inputs = {f"t{i}": pa.Table.from_pylist([r]) for i, r in enumerate(rows)}
    inputs["persona.persuasive"] = {"layers": {"1": {"halves_cosine": halves, "norm": 1.0}}}
    return report.persuasion_report(report.ReportConfig(n_boot=200), **inputs)


def test_report_checks_pass_on_a_planted_pattern_and_fail_on_each_violation():
    good = _study({1: 0.1, 2: 0.5, 3: 0.9, 6: 0.2}, {1: 0.0, 2: 0.08, 3: 0.0, 6: 0.5}, 1.0)
    assert good["checks"]["ground_truth_ok"] == 1.0 and good["checks"]["layer_1.peak_coef"] == 3
    assert good["attempt_rates"].num_rows > 0 and good["attempt_vs_coef"] is not None
    bad = {"steering_monotone_ok": _study({1: 0.6, 2: 0.2, 3: 0.9}, {1: 0.0}, 1.0),
           "random_flat_ok": _study({1: 0.1, 2: 0.9}, {1: 0.0, 2: 0.5}, 1.0),
           "sft_transfer_ok": _study({1: 0.1, 2: 0.9}, {1: 0.0}, 0.0),
           "halves_cosine_ok": _study({1: 0.1, 2: 0.9}, {1: 0.0}, 1.0, halves=0.5)}
    for check, out in bad.items():
        assert out["checks"][check] == 0.0 and out["checks"]["ground_truth_ok"] == 0.0, check
    no_sft = _study({1: 0.1, 2: 0.9}, {1: 0.0}, 1.0, sft=False)
    assert math.isnan(no_sft["checks"]["sft_transfer_ok"]) and no_sft["checks"]["checks_run"] == 3
    assert no_sft["checks"]["ground_truth_ok"] == 1.0
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------------------- bad input
def _spec_error(*overrides: str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec("persuasion", list(overrides))
    return str(info.value)


def test_bad_input_is_an_error_before_compute(tmp_path):
    from safetensors.numpy import save_file

    assert "steering.layers" in _spec_error("steering.layers=[7]") and "0..3" in _spec_error("steering.layers=[7]")
    narrow = tmp_path / "narrow.safetensors"
    save_file({"blocks.2.resid_post": np.ones(32, np.float32)}, str(narrow))
    message = _spec_error(f"persona_vectors={{persuasive: {narrow}}}")
    assert "persona_vectors.persuasive" in message and "32 entries" in message and "width 128" in message
    message = _spec_error("traits=[{name: bold, positive_prompts: [be bold ., be brave .], negative_prompts: []}]")
    assert "bold" in message and "negative_prompts" in message
    message = _spec_error("ape.categories=[gossip]")
    assert "ape.categories" in message and "gossip" in message and "benign_opinion" in message
    assert "steering.coefficients" in _spec_error("steering.coefficients=[]")
    message = _spec_error("steering.coefficients={start: 4, stop: 1, step: 1}")
    assert "steering.coefficients" in message and "start=4" in message
    assert "steering.traits" in _spec_error("steering.traits=[grumpy]")
    leak = "sft.conditions=[{name: benign_persuasion, categories: [benign_opinion, controversial]}]"
    assert "sft.conditions.benign_persuasion" in _spec_error(leak) and "controversial" in _spec_error(leak)
    assert "report.heldout_category" in _spec_error("ape.categories=[harmful]")
    assert "sft.conditions" in _spec_error("sft.conditions=[{name: a, categories: [harmful]}, "
                                           "{name: a, categories: [conspiracy]}]")


def test_coefficient_ranges_expand_inclusively():
    from interpflow.workflows.persuasion import CoefRange, SteeringConfig

    assert CoefRange(start=0.5, stop=2, step=0.5).values() == [0.5, 1.0, 1.5, 2.0]
    assert SteeringConfig(coefficients=CoefRange(start=0, stop=2, step=1)).coefficient_values() == [1.0, 2.0]
    assert math.isclose(sum(SteeringConfig().coefficient_values()), 32.0)


# ------------------------------------------------------------------------------------ conversations
@pytest.mark.parametrize("backend", ["rule", "local", "endpoint"])
def test_conversations_with_each_persuadee_backend(tiny_gpt2, backend):
    from interpflow.workflows.engine.graph import Shard

    statements = world.make_statements(world.WorldConfig(statements_per_category=2))
    with FlakyServer(content="I doubt it: 55.") as server:
        cfg = ape.ApeConfig(statements_per_category=1, categories=["harmful", "controversial"], turns=2, max_tokens=6,
                            persuadee={"backend": backend, "max_tokens": 5, "reasks": 1, "shift": 10, "noise_sd": 0,
                                       "attempt_markers": ["i see"], "url": server.url})
        ids = ape.conversation_ids(cfg, statements)
        assert ids == [f"{p}|{c}-000" for p in ("no_persuade", "neutral") for c in ("controversial", "harmful")]
        out = ape.conversation_shard(cfg, Shard(0, 1, tuple(ids)), tiny_gpt2, statements)
    rows = out["conversations"].to_pylist()
    assert [r["id"] for r in rows] == ids and out["metrics"]["conversations"] == 4
    for row in rows:
        assert len(row["turns"]) == 2 and row["turns"][0]["user"].endswith(".")
        assert 20 <= row["belief_pre"] <= 80
        if backend == "rule":       # planted: +shift per reply holding an attempt phrase, no noise here
            hits = sum(world.mentions(t["reply"], ["i see"]) > 0 for t in row["turns"])
            assert row["belief_post"] == pytest.approx(min(100.0, row["belief_pre"] + 10 * hits))
        elif backend == "endpoint":
            assert row["turns"][1]["user"] == "I doubt it: 55." and row["belief_post"] == 55.0
        else:                       # the untrained tiny model rarely states one number: counted, not guessed
            assert row["belief_post"] is not None or row["persuadee_unparseable"] == 2
    if backend == "endpoint":
        assert len(server.requests) == 4 * 3 and "believe" in server.requests[-1]["messages"][-1]["content"]


# ------------------------------------------------------------------------------- a user's model and data
def test_a_users_statements_file_and_model_folder_replace_the_planted_ones(tiny_gpt2, tmp_path):
    import json

    rows = [{"id": 7, "statement": "Tea is better than coffee.", "category": "benign_opinion"},
            {"id": 8, "statement": "The moon landing was staged.", "category": "conspiracy"}]
    path = tmp_path / "statements.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from interpflow.tasks.datasets_io import DatasetSource

    loaded = world.load_statements(DatasetSource(path=str(path))).to_list()
    assert [(r["id"], r["category"], r["a"]) for r in loaded] == [("7", "benign_opinion", "better"),
                                                                   ("8", "conspiracy", "landing")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no statement column", "category": "x"}))
    with pytest.raises(ValueError, match=r"no column\(s\) \['statement'\]"):
        world.load_statements(DatasetSource(path=str(bad)))

    spec = load_spec("persuasion", [f"model.path={tiny_gpt2.source}", f"statements.path={path}",
                                    "steering.layers=[1]", "ape.categories=[conspiracy]",
                                    "persona.categories=[benign_opinion]",
                                    "sft.conditions=[{name: opinions, categories: [benign_opinion]}]"],
                     check_store=False)
    graph = spec.builder(spec.config)
    names = {n.name for n in graph}
    assert {"model", "statements", "sft.opinions.seed0", "persuasion_report"} <= names
    assert not {"tiny_lm", "dialogues"} & names
    assert graph["persuasion_report"].config.ground_truth is False     # planted checks only on the planted world
    message = _spec_error(f"model.path={tiny_gpt2.source}", f"statements.path={path}", "steering.layers=[1]",
                          "ape.categories=[gossip]")
    assert "gossip" in message and "conspiracy" in message
