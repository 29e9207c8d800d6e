"""The rule backend: participants whose belief and ratings follow a stated function (``RuleParticipant``),
and a template persuader, so a study runs end to end without a model and its effects are known.

Each function takes the generator it draws from; pass ``participant_rng(seed, index, stream)`` with the
stream named in its docstring, so a participant's numbers depend on nothing but the seed and its index
(not on shards, order, or which functions ran before).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from .config import ATTRIBUTES, Claim, Persuader, RuleParticipant, Scale, StudyConfig, stance_sign
from .population import participant_rng, participants, persona_dict


def rule_update(cfg: RuleParticipant, persona: dict, stance: str, belief_pre: float, scale: Scale,
                rng: np.random.Generator) -> float:
    """Belief after a conversation with a persuader of ``stance`` (stream ``"update"``)::

        clip(belief_pre + effect[stance] * trust_mult[trust_in_ai]
             + [stance != "none"] * leaning_shift[political_leaning] + noise_sd * z)
    """
    on = stance != "none"
    change = cfg.effect[stance] * cfg.trust_mult[persona["trust_in_ai"]]
    change += cfg.leaning_shift[persona["political_leaning"]] if on else 0.0
    return scale.clip(belief_pre + change + cfg.noise_sd * rng.standard_normal())


def reversal_of(cfg: RuleParticipant, stance: str, corrective_stance: str) -> float:
    """The fraction of the first change a corrective undoes: ``corrective_reversal`` if it argues the
    opposite way of the first persuader, else 0 (an off-topic or same-side follow-up undoes nothing)."""
    first, second = stance_sign(stance), stance_sign(corrective_stance)
    return cfg.corrective_reversal if first != 0 and second == -first else 0.0


def rule_corrective(cfg: RuleParticipant, stance: str, corrective_stance: str, belief_pre: float,
                    belief_post: float, scale: Scale, rng: np.random.Generator) -> float:
    """Belief after the corrective conversation (stream ``"corrective"``)::

        clip(belief_post - r * (belief_post - belief_pre) + noise_sd * z),  r = reversal_of(...)
    """
    r = reversal_of(cfg, stance, corrective_stance)
    return scale.clip(belief_post - r * (belief_post - belief_pre) + cfg.noise_sd * rng.standard_normal())


def rule_ratings(cfg: RuleParticipant, persona: dict, stance: str, belief_pre: float, corrected: bool,
                 belief: Scale, ai_rating: Scale, trust: Scale, rng: np.random.Generator) -> tuple[float, float]:
    """(AI rating, trust item) at the end of the study (stream ``"ratings"``)::

        a         = sign(stance) * 2 * (belief_pre - belief.mid) / (belief.hi - belief.lo)
        ai_rating = clip(ai_base[trust_in_ai] + ai_alignment * a + rating_noise_sd * z1)
        trust     = clip(trust_base[trust_in_ai] + corrected * trust_after_correction + rating_noise_sd * z2)
    """
    level = persona["trust_in_ai"]
    z1, z2 = rng.standard_normal(2)
    a = stance_sign(stance) * 2 * (belief_pre - belief.mid) / (belief.hi - belief.lo)
    rating = ai_rating.clip(cfg.ai_base[level] + cfg.ai_alignment * a + cfg.rating_noise_sd * z1)
    shift = cfg.trust_after_correction if corrected else 0.0
    return rating, trust.clip(cfg.trust_base[level] + shift + cfg.rating_noise_sd * z2)


# ------------------------------------------------------------------------------------ transcripts

_PERSUADER = {
    "against": ('Let\'s look at the claim "{claim}" together. When people have checked it, the evidence '
                "has not held up.",
                "It traces back to a few anonymous posts, and the public records that would show it "
                "simply don't.",
                "Stories like this spread because they are memorable, not because they are true. On "
                "balance it is very unlikely."),
    "for": ('Have you noticed how many people talk about "{claim}"? There are signs worth taking seriously.',
            "Several locals say they saw things that the official account never explains.",
            "When an official story has this many gaps, the simplest explanation is that the claim is true."),
    "none": ("Let's talk about {neutral}. What got you interested in it?",
             "A lot of people enjoy {neutral} because it is relaxing and easy to start.",
             "If you try something new with {neutral} this week, I'd love to hear how it goes."),
}
_DEBRIEF = ('Before you go: the AI you talked with earlier was instructed to argue that "{claim}". That '
            "claim is fictional and its arguments were made up for this study.",
            "Nothing it told you about this is true; there is no evidence for the claim at all.",
            "Thank you for taking part. It is completely normal to be persuaded by confident arguments.")
_PARTICIPANT = ("Hmm, I'm not sure about that.", "Okay, that's interesting.", "I'll think about it.")


def persuader_turn(persuader: Persuader, claim: Claim, turn: int, corrective: bool = False) -> str:
    """The rule persuader's message at ``turn`` (0-based): templates by stance, cycling; a corrective
    that argues against the claim speaks as a debrief."""
    lines = _DEBRIEF if corrective and persuader.stance == "against" else _PERSUADER[persuader.stance]
    text = lines[turn % len(lines)]
    return text.replace("{claim}", claim.statement.rstrip(".")).replace("{neutral}", claim.neutral)


def participant_turn(turn: int) -> str:
    """The rule participant's short reply at ``turn``; its belief moves by the rules, not by the text."""
    return _PARTICIPANT[turn % len(_PARTICIPANT)]


def rule_answer(value: float) -> str:
    """How a rule participant answers a rating question (parsed back by ``ratings.parse_rating``)."""
    return f"{value:.1f}"


# ------------------------------------------------------------------------------------- whole study

def simulate_participant(cfg: StudyConfig, row: dict) -> dict:
    """One participant of the rule backend, without any conversation: a row of the results table."""
    arm = cfg.arm(row["arm"])
    persona = persona_dict(row)
    index, pre = int(row["index"]), float(row["prior_belief"])
    stance = arm.persuader.stance
    post = rule_update(cfg.rule, persona, stance, pre, cfg.belief, participant_rng(cfg.seed, index, "update"))
    final = None
    if arm.corrective is not None:
        final = rule_corrective(cfg.rule, stance, arm.corrective.stance, pre, post, cfg.belief,
                                participant_rng(cfg.seed, index, "corrective"))
    ai, trust = rule_ratings(cfg.rule, persona, stance, pre, arm.corrective is not None, cfg.belief,
                             cfg.ai_rating, cfg.trust, participant_rng(cfg.seed, index, "ratings"))
    return {"participant": row["participant"], "index": index, "arm": arm.name, "claim": row["claim"],
            **persona, "belief_pre": pre, "belief_post": post, "belief_final": final,
            "ai_rating": ai, "trust": trust, "unparseable": 0}


RESULTS_SCHEMA = pa.schema([
    ("participant", pa.string()), ("index", pa.int64()), ("arm", pa.string()), ("claim", pa.string()),
    *[(name, pa.string()) for name in ATTRIBUTES],
    ("belief_pre", pa.float64()), ("belief_post", pa.float64()), ("belief_final", pa.float64()),
    ("ai_rating", pa.float64()), ("trust", pa.float64()), ("unparseable", pa.int64()),
])


def simulate_rule_study(cfg: StudyConfig, people: pa.Table | None = None) -> pa.Table:
    """Every participant (or those of ``people``, e.g. one shard of ``participants(cfg)``) through the
    rule backend: the results table ``analysis.analyse`` reads, in the order of ``people``."""
    people = participants(cfg) if people is None else people
    rows = [simulate_participant(cfg, r) for r in people.to_pylist()]
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def planted_effects(cfg: StudyConfig) -> dict[str, dict[str, float]]:
    """Per arm, what the rules plant on average over the population (clipping ignored):

    ``change`` = E[post - pre] = effect[s] * E[trust_mult] + [s != none] * E[leaning_shift]; for arms
    with a corrective also ``final_change`` = E[final - post] = -r * change, ``net_change`` =
    E[final - pre] = (1 - r) * change and ``reversal`` = r.
    """
    pop, rule = cfg.population, cfg.rule
    out: dict[str, dict[str, float]] = {}
    for arm in cfg.arms:
        s = arm.persuader.stance
        change = rule.effect[s] * pop.trust_in_ai.expectation(rule.trust_mult)
        change += pop.political_leaning.expectation(rule.leaning_shift) if s != "none" else 0.0
        out[arm.name] = {"change": change}
        if arm.corrective is not None:
            r = reversal_of(rule, s, arm.corrective.stance)
            out[arm.name].update(final_change=-r * change, net_change=(1 - r) * change, reversal=r)
    return out


class PlantedCheck(BaseModel):
    """The planted effects of a rule-participant study (``planted_effects``), checked against the analysis."""

    model_config = ConfigDict(extra="forbid")
    planted: dict[str, dict[str, float]] = Field(default_factory=dict, description="arm -> effect name -> value")
    level: float = Field(0.95, gt=0, lt=1, description="the analysis' CI level")


def check_planted(cfg: PlantedCheck, arms: pa.Table) -> dict:
    """Ground truth: each planted effect (change; for corrective arms also the final change, net change
    and reversal) lies inside its CI in the analysis' per-arm table.

    With m effects, m separate 95% intervals all cover by chance only ~0.95^m of the time (0.63 for
    9), so ``ground_truth_ok`` uses family-wise (Bonferroni) intervals: each 95% interval widened about
    its centre by z(1 - 0.05/2m) / z(0.975). ``inside`` reports the plain intervals too.
    """
    from scipy.stats import norm

    columns = {"change": ("ci_low", "ci_high"), "final_change": ("final_ci_low", "final_ci_high"),
               "net_change": ("net_ci_low", "net_ci_high"), "reversal": ("reversal_ci_low", "reversal_ci_high")}
    rows = {r["arm"]: r for r in arms.to_pylist()}
    m = sum(len(effects) for effects in cfg.planted.values())
    alpha = 1 - cfg.level
    widen = float(norm.ppf(1 - alpha / (2 * max(m, 1))) / norm.ppf(1 - alpha / 2))
    checks = []
    for arm, effects in sorted(cfg.planted.items()):
        for name, value in sorted(effects.items()):
            low, high = (rows[arm][c] for c in columns[name])
            centre, half = (low + high) / 2, (high - low) / 2 * widen
            checks.append({"arm": arm, "effect": name, "planted": value, "ci_low": low, "ci_high": high,
                           "inside": bool(low <= value <= high),
                           "inside_familywise": bool(centre - half <= value <= centre + half)})
    ok = bool(checks) and all(c["inside_familywise"] for c in checks)
    return {"checks": pa.Table.from_pylist(checks),
            "metrics": {"ground_truth_ok": float(ok), "effects_checked": len(checks),
                        "effects_inside_ci": sum(c["inside"] for c in checks),
                        "effects_inside_familywise_ci": sum(c["inside_familywise"] for c in checks)}}
