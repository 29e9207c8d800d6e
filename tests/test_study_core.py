"""Human-study simulation core (issue #7): the analysis recovers the rule backend's planted effects, bad
specs fail naming the field, randomisation is balanced and shard-independent, ratings parse strictly,
and the bundled spec loads. No Ray, no model."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

import interpflow
from interpflow.tasks.study import (
    AnalysisConfig, Claim, Persuader, Scale, StudyConfig, analyse, elicit, parse_rating, participants,
    persona_of, persuader_turn, planted_effects, rule_answer, simulate_rule_study,
)

SEEDS = [0, 1, 2]
SPEC = Path(interpflow.__file__).resolve().parent / "workflows" / "specs" / "human_study.yaml"


@functools.cache
def study(seed: int) -> tuple[StudyConfig, pa.Table, dict]:
    cfg = StudyConfig(seed=seed)
    results = simulate_rule_study(cfg)
    return cfg, results, analyse(AnalysisConfig(seed=seed, n_boot=1000), results)


def arm_row(out: dict, arm: str) -> dict:
    (row,) = [r for r in out["arms"].to_pylist() if r["arm"] == arm]
    return row


def inside(value: float, lo: float, hi: float, widen: float = 1.0) -> bool:
    """value in [lo, hi], or in that interval stretched to ``widen`` times its half-width."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * widen
    return mid - half <= value <= mid + half


# ---------------------------------------------------------------------------- (a) planted effects

@pytest.mark.parametrize("seed", SEEDS)
def test_analysis_recovers_planted_effects(seed):
    """Each arm's planted change, and the corrective's final change, net change and reversal, lie in
    their 95% CIs. A 95% CI misses 5% of the time, so the contrasts (secondary, 3 per seed) are checked
    against their CIs stretched to twice the half-width (~4 SE): at 95%, seed 0's debunk - control
    (-11.02, CI -11.97..-10.14) misses -10 by chance, as a coverage check over 150 seeds confirms."""
    cfg, _, out = study(seed)
    planted = planted_effects(cfg)
    assert planted["debunk"]["change"] == -10 and planted["bunk"]["change"] == 10
    assert planted["control"]["change"] == 0 and planted["bunk_corrected"]["reversal"] == 1.0
    for arm, effects in planted.items():
        row = arm_row(out, arm)
        assert row["n"] == cfg.n_per_arm
        assert inside(effects["change"], row["ci_low"], row["ci_high"]), (arm, row)
        if "reversal" in effects:
            assert row["corrective"]
            assert inside(effects["final_change"], row["final_ci_low"], row["final_ci_high"]), row
            assert inside(effects["net_change"], row["net_ci_low"], row["net_ci_high"]), row
            assert inside(effects["reversal"], row["reversal_ci_low"], row["reversal_ci_high"]), row
        else:
            assert not row["corrective"] and np.isnan(row["reversal"])
    contrasts = {(r["a"], r["b"]): r for r in out["contrasts"].to_pylist()}
    for (a, b), row in contrasts.items():
        assert inside(planted[a]["change"] - planted[b]["change"], row["ci_low"], row["ci_high"], widen=2), row
    assert contrasts[("bunk", "debunk")]["hedges_g"] > 2        # a planted 20-point gap is large
    metrics = out["metrics"]
    assert metrics["debunk.mean_change"] == arm_row(out, "debunk")["mean_change"]
    assert metrics["unparseable"] == 0 and metrics["n"] == 4 * cfg.n_per_arm


def test_analysis_outputs_and_figures():
    _, results, out = study(0)
    for name in ("pre_post", "change_hist"):
        buf = io.BytesIO()
        out[name].savefig(buf, format="png")
        assert buf.tell() > 1000
    assert all(isinstance(v, float) for v in out["metrics"].values())
    # the same numbers whatever the row order or shard layout of the results
    shuffled = results.take(np.random.default_rng(5).permutation(results.num_rows))
    again = analyse(AnalysisConfig(seed=0, n_boot=1000), shuffled)
    for name in ("arms", "contrasts", "regression"):
        pd.testing.assert_frame_equal(again[name].to_pandas(), out[name].to_pandas())


def test_analysis_skips_unparsed_beliefs():
    _, results, _ = study(0)
    post = results.column("belief_post").to_pylist()
    post[:10] = [None] * 10
    broken = results.set_column(results.schema.get_field_index("belief_post"), "belief_post",
                                pa.array(post, pa.float64()))
    out = analyse(AnalysisConfig(n_boot=200), broken)
    assert out["metrics"]["n_missing"] == 10
    assert sum(r["n"] for r in out["arms"].to_pylist()) == results.num_rows - 10


# -------------------------------------------------------------------------- (e) regression

def test_regression_recovers_persona_effects():
    _, _, out = study(0)
    coef = {(r["model"], r["term"]): r for r in out["regression"].to_pylist()}
    # trust multiplies the effect: x1.5 (high) and x0.5 (low) of +-10, against the reference 'mid'
    for model, sign in (("bunk", 1), ("debunk", -1)):
        for term, planted in (("trust_in_ai=high", 5 * sign), ("trust_in_ai=low", -5 * sign),
                              ("political_leaning=right", 2), ("political_leaning=left", -2)):
            r = coef[(model, term)]
            assert inside(planted, r["ci_low"], r["ci_high"]), (model, term, r)
    high = coef[("bunk", "trust_in_ai=high")]
    assert high["ci_low"] > 0 and high["se"] < 1.5                 # detected, not just covered
    pooled = coef[("pooled", "arm=debunk")]
    assert inside(-10, pooled["ci_low"], pooled["ci_high"], widen=2)   # vs reference arm 'control' (see above)


# -------------------------------------------------------------------------- (b) bad input

def persuader(**kw) -> dict:
    return {"stance": "against", "system_prompt": "argue", **kw}


@pytest.mark.parametrize("fields, fragments", [
    ({"arms": [{"name": "shy", "persuader": persuader(system_prompt="  ")}]},
     ["arm 'shy'", "system_prompt", "give one"]),
    ({"arms": [{"name": "late", "persuader": persuader(), "corrective": persuader(system_prompt="")}]},
     ["arm 'late'", "corrective persuader has no system_prompt"]),
    ({"n_per_arm": 0}, ["n_per_arm must be at least 1"]),
    ({"n_per_arm": -5}, ["n_per_arm must be at least 1"]),
    ({"belief": {"lo": 100, "hi": 0, "question": "{claim}?"}}, ["belief", "inverted", "lo=100 > hi=0", "swap"]),
    ({"trust": {"lo": 5, "hi": 5, "question": "q"}}, ["trust", "lo < hi"]),
    ({"population": {"trust_in_ai": {"values": ["low", "high"], "weights": [0.5, 0.4]}}},
     ["population.trust_in_ai", "sum to 0.9", "rescale"]),
    ({"population": {"education": {"values": ["a", "b"], "weights": [1.0]}}},
     ["population.education", "one weight per value"]),
    ({"population": {"age_band": {"values": ["a", "b"], "weights": [1.5, -0.5]}}},
     ["population.age_band", "negative"]),
    ({"arms": [{"name": "x", "persuader": persuader(backend="openai")}]},
     ["persuader.backend", "'rule', 'local' or 'endpoint'"]),
    ({"participant_backend": "gpt"}, ["participant_backend", "'rule', 'local' or 'endpoint'"]),
    ({"arms": [{"name": "x", "persuader": persuader(backend="endpoint")}]}, ["backend 'endpoint' needs url"]),
    ({"participant_backend": "endpoint"}, ["participant_url"]),
    ({"arms": [{"name": "x", "persuader": persuader()}, {"name": "x", "persuader": persuader()}]},
     ["arms", "['x']", "unique"]),
    ({"claims": []}, ["claims", "at least 1"]),
    ({"arms": []}, ["arms", "at least 1"]),
    ({"belief": {"question": "How sure are you?"}}, ["belief.question", "{claim}"]),
    ({"rule": {"effect": {"for": 1.0}}}, ["rule.effect", "against", "none"]),
    ({"population": {"trust_in_ai": {"values": ["low", "total"], "weights": [0.5, 0.5]}}},
     ["rule.trust_mult", "'total'"]),
])
def test_bad_study_names_the_field(fields, fragments):
    with pytest.raises(ValidationError) as err:
        StudyConfig(**fields)
    text = " ".join(str(err.value).split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_api_key_is_never_echoed():
    secret = "sk-live-0123456789abcdef"
    with pytest.raises(ValidationError) as err:
        Persuader(**persuader(backend="endpoint", url="http://h:1/v1", api_key_env=secret))
    assert "api_key_env" in str(err.value) and "NAME" in str(err.value)
    assert secret not in str(err.value)
    with pytest.raises(ValidationError) as err:
        StudyConfig(participant_api_key_env=secret)
    assert "participant_api_key_env" in str(err.value) and secret not in str(err.value)
    assert Persuader(**persuader(backend="endpoint", url="http://h:1/v1", api_key_env="MY_KEY")).api_key_env


def test_bad_analysis_input():
    with pytest.raises(ValueError, match=r"analysis.contrasts.*'nope'.*bunk_corrected"):
        AnalysisConfig(contrasts=[("bunk", "nope")]).check_against(StudyConfig())
    _, results, _ = study(0)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['belief_post'\]"):
        analyse(AnalysisConfig(n_boot=100), results.drop_columns(["belief_post"]))
    with pytest.raises(ValueError, match="no rows"):
        analyse(AnalysisConfig(n_boot=100), results.slice(0, 0))


# -------------------------------------------------------------------------- (c) randomisation

def test_balanced_deterministic_randomisation():
    cfg = StudyConfig(n_per_arm=50, seed=7)
    table = participants(cfg)
    counts = {a: table.column("arm").to_pylist().count(a) for a in ("debunk", "bunk", "control", "bunk_corrected")}
    assert counts == dict.fromkeys(counts, 50)
    assert table.column("participant").to_pylist()[:2] == ["p000000", "p000001"]
    assert table.schema.metadata[b"assignment_seed"] == b"7"
    assert participants(cfg).equals(table, check_metadata=True)
    other = participants(StudyConfig(n_per_arm=50, seed=8))
    assert other.column("arm").to_pylist() != table.column("arm").to_pylist()
    assert other.column("trust_in_ai").to_pylist() != table.column("trust_in_ai").to_pylist()


def test_persona_depends_only_on_seed_and_index():
    cfg = StudyConfig(n_per_arm=20, seed=3)
    rows = participants(cfg).to_pylist()
    bigger = participants(StudyConfig(n_per_arm=60, seed=3)).to_pylist()
    for i in (0, 17, 79):
        alone = persona_of(cfg, i)
        assert {k: rows[i][k] for k in alone} == alone
        assert {k: bigger[i][k] for k in alone} == alone
    lo, hi = {"low": (20, 40), "mid": (40, 60), "high": (60, 80)}[rows[0]["prior_belief_band"]]
    assert lo <= rows[0]["prior_belief"] < hi


def test_rule_results_do_not_depend_on_shards():
    cfg = StudyConfig(n_per_arm=15, seed=4)
    people = participants(cfg)
    whole = simulate_rule_study(cfg, people)
    shards = [simulate_rule_study(cfg, people.take(np.arange(i, people.num_rows, 4))) for i in (3, 1, 0, 2)]
    merged = pa.concat_tables(shards).sort_by("participant")
    assert merged.equals(whole.sort_by("participant"))


def test_persona_shares_follow_weights():
    table = participants(StudyConfig(n_per_arm=1000))
    trust = table.column("trust_in_ai").to_pylist()
    assert abs(trust.count("mid") / len(trust) - 0.5) < 0.03


# -------------------------------------------------------------------------- (d) ratings

SCALE = Scale(question="{claim}?")


@pytest.mark.parametrize("text, expected", [
    ("73", 73.0), ("I'd say 73/100", 73.0), ("73%", 73.0), ("73 out of 100", 73.0), ("42.5", 42.5),
    ("On a scale from 0 to 100, I'd say 73.", 73.0), ("On a 0-100 scale: 73", 73.0), ("0", 0.0), ("100", 100.0),
    ("0 = false, 100 = true, so 55", 55.0), ("73. Yes, 73.", 73.0), ("In 2023 I would say 40", 40.0),
    ("150", None), ("-5", None), ("none", None), ("", None), ("60 or maybe 70", None), ("7/10", None),
    ("somewhere 20-30", None), ("the 3rd option", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text, SCALE) == expected


def test_parse_rating_on_a_short_scale():
    likert = Scale(lo=1, hi=7, question="q")
    assert parse_rating("5/7", likert) == 5 and parse_rating("1-7: 4", likert) == 4
    assert parse_rating("10", likert) is None
    assert parse_rating(rule_answer(63.25), SCALE) == 63.2


def scripted(*answers):
    asked: list[str] = []
    replies = iter(answers)

    def ask(question: str) -> str:
        asked.append(question)
        return next(replies)

    return ask, asked


def test_elicit_reasks_until_parsed():
    ask, asked = scripted("Hard to say.", "60 or 70", "65")
    value, attempts, raws = elicit(ask, "Belief?", SCALE, reasks=2)
    assert (value, attempts, raws) == (65.0, 3, ["Hard to say.", "60 or 70", "65"])
    assert asked[0] == "Belief?" and "single number from 0 to 100" in asked[1] and "digits only" in asked[2]

    ask, asked = scripted("50")
    assert elicit(ask, "Belief?", SCALE, reasks=2) == (50.0, 1, ["50"]) and len(asked) == 1

    ask, asked = scripted("no", "still no", "never")
    assert elicit(ask, "Belief?", SCALE, reasks=1) == (None, 2, ["no", "still no"]) and len(asked) == 2


# -------------------------------------------------------------------------- transcripts and spec

def test_rule_persuader_templates():
    claim = Claim(id="c", statement="The lake glows at night.", neutral="knitting")
    cfg = StudyConfig()
    debunk, control = cfg.arm("debunk").persuader, cfg.arm("control").persuader
    assert "The lake glows at night" in persuader_turn(debunk, claim, 0)
    assert persuader_turn(debunk, claim, 0) != persuader_turn(debunk, claim, 1)
    assert "knitting" in persuader_turn(control, claim, 0) and "glows" not in persuader_turn(control, claim, 0)
    debrief = persuader_turn(cfg.arm("bunk_corrected").corrective, claim, 0, corrective=True)
    assert "fictional" in debrief
    assert '"The lake glows at night."' in debunk.prompt_for(claim)
    assert "knitting" in control.prompt_for(claim)


def test_bundled_spec_loads_into_the_models():
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["workflow"] == "human_study" and spec["run"] == {"store": ".interpflow/store"}
    study_cfg, analysis_cfg = StudyConfig(**spec["study"]), AnalysisConfig(**spec["analysis"])
    analysis_cfg.check_against(study_cfg)
    assert study_cfg.model_dump() == StudyConfig().model_dump()     # the spec spells out the defaults
    assert analysis_cfg == AnalysisConfig()
