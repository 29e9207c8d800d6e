"""The study spec: arms (who persuades whom, toward what), claims, the simulated population, the rating
scales, and the planted effects of the rule-based participant.

A config is everything a run of the study depends on; the default is a runnable study on the rule
backend (no model needed) whose effects are known, so the analysis can be checked against them.
Validators that need a neighbour's name (an arm's, an attribute's) live on the model that holds both,
so every error names the thing to fix.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from interpflow.tasks.types import Seed

Backend = Literal["rule", "local", "endpoint"]
Stance = Literal["against", "for", "none"]
STANCES: tuple[str, ...] = Stance.__args__
ATTRIBUTES: tuple[str, ...] = ("age_band", "education", "political_leaning", "prior_belief_band", "trust_in_ai")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def stance_sign(stance: str) -> int:
    """+1 for a persuader arguing the claim is true, -1 against, 0 for no stance."""
    return {"for": 1, "against": -1, "none": 0}[stance]


def _check_env_name(value: str | None, field: str) -> None:
    # The value is never echoed: someone may have pasted the key itself.
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(f"{field} must be the NAME of an environment variable that holds the key "
                         f"(letters, digits, underscores, e.g. OPENAI_API_KEY), never the key itself; "
                         f"export the key in that variable and put its name here")


class Scale(BaseModel):
    """A rating item: the question put to a participant and the numeric range of a valid answer.

    ``question`` may use ``{claim}`` (the claim's statement), ``{lo}`` and ``{hi}``; see ``ask``.
    """

    model_config = ConfigDict(extra="forbid")
    lo: float = Field(0.0, description="lowest valid answer")
    hi: float = Field(100.0, description="highest valid answer")
    question: str = Field(description="the question text; {claim}, {lo} and {hi} are filled in by `ask`")

    @model_validator(mode="after")
    def _check(self) -> Scale:
        if self.lo > self.hi:
            raise ValueError(f"scale bounds are inverted (lo={self.lo:g} > hi={self.hi:g}); swap them")
        if self.lo == self.hi:
            raise ValueError(f"scale bounds are equal (lo = hi = {self.lo:g}); give a range with lo < hi")
        return self

    @property
    def mid(self) -> float:
        return (self.lo + self.hi) / 2

    def clip(self, value: float) -> float:
        return min(max(float(value), self.lo), self.hi)

    def ask(self, claim: str = "") -> str:
        """The question with its placeholders filled (plain replacement: other braces stay as written)."""
        return (self.question.replace("{claim}", claim)
                .replace("{lo}", f"{self.lo:g}").replace("{hi}", f"{self.hi:g}"))


class Persuader(BaseModel):
    """The AI side of one conversation: how it is run and which way it argues.

    ``system_prompt`` may use ``{claim}`` and ``{neutral}`` (see ``prompt_for``). The rule backend
    ignores the prompt and speaks from templates chosen by ``stance`` (``rules.persuader_turn``).
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    backend: Backend = Field("rule", description="rule (templates, no model), local (an HF model in an "
                                                 "actor), or endpoint (an OpenAI-compatible HTTP server)")
    system_prompt: str = Field(description="instructions to the persuader; {claim} and {neutral} are filled in")
    stance: Stance = Field(description="what it argues: against the claim, for it, or none (off-topic chat)")
    model: str | None = Field(None, description="local: HF id or path; endpoint: the model name the "
                                                "server expects (None: the workflow's default)")
    url: str | None = Field(None, description="endpoint: base URL, e.g. http://localhost:8000/v1")
    api_key_env: str | None = Field(None, description="endpoint: NAME of the environment variable "
                                                      "holding the API key (never the key itself)")
    max_tokens: int = Field(64, ge=1, description="longest reply, in tokens")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")

    @model_validator(mode="after")
    def _check(self) -> Persuader:
        if self.backend == "endpoint" and not self.url:
            raise ValueError("backend 'endpoint' needs url (the server's base URL, e.g. "
                             "http://localhost:8000/v1); set url or pick backend rule or local")
        _check_env_name(self.api_key_env, "api_key_env")
        return self

    def prompt_for(self, claim: Claim) -> str:
        """The system prompt with {claim} and {neutral} replaced by the claim's texts."""
        return self.system_prompt.replace("{claim}", claim.statement).replace("{neutral}", claim.neutral)


class Arm(BaseModel):
    """One condition: a conversation with ``persuader``, then (optionally) a second one with
    ``corrective`` (e.g. a debrief that undoes misinformation planted by the first)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique arm name (letters, digits, _ . -); used in tables and metric names")
    persuader: Persuader = Field(description="the first conversation's AI")
    corrective: Persuader | None = Field(None, description="a follow-up conversation's AI (None: no follow-up)")

    @model_validator(mode="after")
    def _check(self) -> Arm:
        if not _ARM_NAME.match(self.name):
            raise ValueError(f"arm name {self.name!r} must be non-empty letters, digits, _ . or -; rename it")
        for role, who in (("persuader", self.persuader), ("corrective persuader", self.corrective)):
            if who is not None and not who.system_prompt.strip():
                raise ValueError(f"arm '{self.name}': {role} has no system_prompt; give one")
        return self


class Claim(BaseModel):
    """A statement whose belief the study measures."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="stable short id (unique)")
    statement: str = Field(min_length=1, description="the claim as shown to participants")
    neutral: str = Field(min_length=1, description="an unrelated, harmless topic the control arm chats "
                                                   "about for participants holding this claim")


class Attribute(BaseModel):
    """A categorical persona attribute: its levels and their population shares.

    Checked by the ``Population`` holding it (``check``), so that errors name the attribute.
    """

    model_config = ConfigDict(extra="forbid")
    values: list[str] = Field(description="the levels")
    weights: list[float] = Field(description="population share of each level; non-negative, sum to 1")

    def check(self, name: str) -> None:
        where = f"population.{name}"
        if not self.values:
            raise ValueError(f"{where}: no values; give at least one level")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"{where}: values {self.values} repeat a level; list each level once")
        if len(self.weights) != len(self.values):
            raise ValueError(f"{where}: {len(self.values)} values but {len(self.weights)} weights; "
                             f"give one weight per value")
        if any(w < 0 for w in self.weights):
            raise ValueError(f"{where}: weights {self.weights} include a negative weight; use shares >= 0")
        if abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"{where}: weights sum to {sum(self.weights):.6g}, not 1; rescale them")

    def expectation(self, of: dict[str, float]) -> float:
        """E[of[level]] under the weights (for planted-effect arithmetic)."""
        return sum(w * of[v] for v, w in zip(self.values, self.weights))


class Population(BaseModel):
    """Who the simulated participants are: independent categorical attributes, and where each prior
    belief band sits on the belief scale."""

    model_config = ConfigDict(extra="forbid")
    age_band: Attribute = Attribute(values=["18-29", "30-44", "45-64", "65+"], weights=[0.2, 0.27, 0.33, 0.2])
    education: Attribute = Attribute(values=["secondary", "some_college", "bachelor", "postgraduate"],
                                     weights=[0.35, 0.25, 0.25, 0.15])
    political_leaning: Attribute = Attribute(values=["left", "centre", "right"], weights=[0.35, 0.3, 0.35])
    prior_belief_band: Attribute = Attribute(values=["low", "mid", "high"], weights=[0.4, 0.35, 0.25])
    trust_in_ai: Attribute = Attribute(values=["low", "mid", "high"], weights=[0.25, 0.5, 0.25])
    prior_ranges: dict[str, tuple[float, float]] = Field(
        {"low": (0.2, 0.4), "mid": (0.4, 0.6), "high": (0.6, 0.8)},
        description="prior_belief_band level -> [start, end) as fractions of the belief scale; the prior "
                    "is uniform in it. The defaults keep 20 points of headroom on a 0-100 scale so the "
                    "planted effects are rarely clipped at the scale's ends")

    @model_validator(mode="after")
    def _check(self) -> Population:
        for name in ATTRIBUTES:
            getattr(self, name).check(name)
        for level in self.prior_belief_band.values:
            if level not in self.prior_ranges:
                raise ValueError(f"population.prior_ranges has no range for prior_belief_band level "
                                 f"'{level}'; add {level}: [start, end] (fractions of the belief scale)")
        for level, (a, b) in self.prior_ranges.items():
            if not 0 <= a < b <= 1:
                raise ValueError(f"population.prior_ranges['{level}'] = [{a:g}, {b:g}] must satisfy "
                                 f"0 <= start < end <= 1 (fractions of the belief scale)")
        return self


class RuleParticipant(BaseModel):
    """Planted effects of the rule-based participant: a stated function, so the analysis has ground truth.

    Notation: ``s`` = the first persuader's stance, ``on = 1 if s != "none" else 0``,
    ``sign(for) = +1, sign(against) = -1, sign(none) = 0``, ``z1..z4 ~ N(0, 1)`` independent (each
    drawn from its own per-participant stream, see ``population.participant_rng``), ``clip`` to the
    item's scale, persona levels ``trust = trust_in_ai``, ``leaning = political_leaning``::

        belief_post  = clip(belief_pre + effect[s] * trust_mult[trust]
                            + on * leaning_shift[leaning] + noise_sd * z1)
        belief_final = clip(belief_post - r * (belief_post - belief_pre) + noise_sd * z2)
                       r = corrective_reversal if sign(corrective stance) == -sign(s) != 0 else 0
        a            = sign(s) * 2 * (belief_pre - belief.mid) / (belief.hi - belief.lo)   # in [-1, 1]
        ai_rating    = clip(ai_base[trust] + ai_alignment * a + rating_noise_sd * z3)
        trust_item   = clip(trust_base[trust] + corrected * trust_after_correction + rating_noise_sd * z4)

    ``a`` is +1 when the AI argued the participant's own prior side from the end of the scale (people
    rate agreeable AIs higher); ``corrected`` is 1 for arms with a corrective conversation. Without
    clipping the expected change of an arm is ``effect[s] * E[trust_mult] + on * E[leaning_shift]``
    (population expectations), and a corrective one moves it by ``-r`` times that; with the default
    population both expectations are exactly 1 and 0, so the planted mean changes are the ``effect``
    values. Units are those of the respective scale (defaults assume 0-100).
    """

    model_config = ConfigDict(extra="forbid")
    effect: dict[str, float] = Field({"against": -10.0, "for": 10.0, "none": 0.0},
                                     description="belief change per stance, before persona modifiers")
    trust_mult: dict[str, float] = Field({"low": 0.5, "mid": 1.0, "high": 1.5},
                                         description="trust_in_ai level -> multiplier of the effect")
    leaning_shift: dict[str, float] = Field({"left": -2.0, "centre": 0.0, "right": 2.0},
                                            description="political_leaning level -> additive shift of belief "
                                                        "after any on-topic conversation")
    corrective_reversal: float = Field(1.0, ge=0, le=2,
                                       description="fraction of the first change an opposing corrective "
                                                   "conversation undoes (1 = full reversal, >1 overshoots)")
    noise_sd: float = Field(4.0, ge=0, description="sd of the belief noise of each conversation")
    ai_base: dict[str, float] = Field({"low": 40.0, "mid": 60.0, "high": 75.0},
                                      description="trust_in_ai level -> mean AI rating")
    ai_alignment: float = Field(10.0, description="AI rating gained when the AI argued the participant's "
                                                  "prior side from the scale's end")
    trust_base: dict[str, float] = Field({"low": 30.0, "mid": 50.0, "high": 70.0},
                                         description="trust_in_ai level -> mean of the trust item")
    trust_after_correction: float = Field(-8.0, description="trust item shift after a corrective conversation "
                                                            "revealed the first AI misled")
    rating_noise_sd: float = Field(5.0, ge=0, description="sd of the noise of the AI-rating and trust items")

    @model_validator(mode="after")
    def _check(self) -> RuleParticipant:
        missing = [s for s in STANCES if s not in self.effect]
        extra = [s for s in self.effect if s not in STANCES]
        if missing or extra:
            raise ValueError(f"rule.effect must have exactly the stances {', '.join(STANCES)} "
                             f"(missing: {missing or 'none'}, unknown: {extra or 'none'}); fix its keys")
        return self

    def check_levels(self, population: Population, ai_rating: Scale, trust: Scale) -> None:
        """Every persona level the rules look up has an entry, and base ratings lie on their scales."""
        needs = (("trust_mult", "trust_in_ai"), ("ai_base", "trust_in_ai"), ("trust_base", "trust_in_ai"),
                 ("leaning_shift", "political_leaning"))
        for table, attribute in needs:
            for level in getattr(population, attribute).values:
                if level not in getattr(self, table):
                    raise ValueError(f"rule.{table} has no entry for {attribute} level '{level}'; add one")
        for table, scale, item in (("ai_base", ai_rating, "ai_rating"), ("trust_base", trust, "trust")):
            for level, v in getattr(self, table).items():
                if not scale.lo <= v <= scale.hi:
                    raise ValueError(f"rule.{table}['{level}'] = {v:g} lies outside the {item} scale "
                                     f"[{scale.lo:g}, {scale.hi:g}]; set it inside")


# ------------------------------------------------------------------------------------- defaults

_DEBATE = ("Keep every reply under 60 words, stay polite, and never insult the user. ")
DEFAULT_ARMS = [
    Arm(name="debunk", persuader=Persuader(
        stance="against",
        system_prompt=_DEBATE + "The user partly believes this claim: \"{claim}\". Using accurate "
                                "reasoning and evidence, persuade them that it is false.")),
    Arm(name="bunk", persuader=Persuader(
        stance="for",
        system_prompt=_DEBATE + "This is a simulated misinformation study with a fictional claim. The "
                                "user partly believes: \"{claim}\". Persuade them that it is true.")),
    Arm(name="control", persuader=Persuader(
        stance="none",
        system_prompt=_DEBATE + "Chat with the user about {neutral}. Do not bring up any claims, rumours "
                                "or conspiracy theories.")),
    # Ethical design of misinformation studies: whoever was bunked is debriefed. The corrective argues
    # against the claim and says the first AI was instructed to mislead; the rule backend models it as
    # undoing `corrective_reversal` of the first change.
    Arm(name="bunk_corrected",
        persuader=Persuader(
            stance="for",
            system_prompt=_DEBATE + "This is a simulated misinformation study with a fictional claim. The "
                                    "user partly believes: \"{claim}\". Persuade them that it is true."),
        corrective=Persuader(
            stance="against",
            system_prompt=_DEBATE + "You are debriefing a study participant. Another AI was instructed to "
                                    "argue that \"{claim}\". That claim is fictional and its arguments were "
                                    "made up for research. Explain this kindly and correct the belief.")),
]

DEFAULT_CLAIMS = [  # fictional and harmless by construction: a made-up town
    Claim(id="lowmere_bells", neutral="gardening in small back yards",
          statement="The council of Lowmere secretly replaced the clock tower's bells with recordings in 2019."),
    Claim(id="brannock_fog", neutral="the history of board games",
          statement="The fog over Lake Brannock near Lowmere is made by machines hidden in the old lighthouse."),
    Claim(id="cheese_festival", neutral="easy weeknight recipes",
          statement="The winners of Lowmere's cheese festival are picked in advance by a marketing firm."),
]

BELIEF = Scale(question="On a scale from {lo} (definitely false) to {hi} (definitely true), how strongly do "
                        "you believe this statement: \"{claim}\"? Answer with one number.")
AI_RATING = Scale(question="On a scale from {lo} (very poor) to {hi} (excellent), how would you rate the AI "
                           "you just talked with? Answer with one number.")
TRUST = Scale(question="On a scale from {lo} (not at all) to {hi} (completely), how much do you trust "
                       "information from AI assistants? Answer with one number.")
PARTICIPANT_PROMPT = (
    "You are a participant in an online survey. You are {age_band} years old, your education is "
    "{education}, you lean {political_leaning} politically, and your trust in AI is {trust_in_ai}. Before "
    "this conversation you rated your belief in \"{claim}\" at about {prior_belief:.0f} on a {lo}-{hi} scale. "
    "Reply as this person would, briefly and in your own words.")


class StudyConfig(BaseModel):
    """A whole bunking/debunking study: conditions, claims, population, items, and backends."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    arms: list[Arm] = Field(default_factory=lambda: [a.model_copy(deep=True) for a in DEFAULT_ARMS],
                            min_length=1, description="the conditions; participants are split evenly")
    claims: list[Claim] = Field(default_factory=lambda: [c.model_copy() for c in DEFAULT_CLAIMS],
                                min_length=1, description="claims; each participant gets one at random")
    population: Population = Field(default_factory=Population, description="persona distribution")
    n_per_arm: int = Field(200, le=1_000_000, description="participants per arm (exactly; balanced randomisation)")
    turns: int = Field(3, ge=1, description="persuader turns per conversation")
    belief: Scale = Field(default_factory=lambda: BELIEF.model_copy(),
                          description="belief item (pre, post, final)")
    ai_rating: Scale = Field(default_factory=lambda: AI_RATING.model_copy(), description="rating of the AI")
    trust: Scale = Field(default_factory=lambda: TRUST.model_copy(), description="trust in AI item")
    rating_reasks: int = Field(2, ge=0, description="re-asks with a stricter instruction when an answer "
                                                    "does not parse as one number on the scale")
    participant_backend: Backend = Field("rule", description="who answers: rule (stated planted effects, "
                                                             "no model), local (HF model) or endpoint")
    participant_model: str | None = Field(None, description="local: HF id or path; endpoint: model name")
    participant_url: str | None = Field(None, description="endpoint: base URL of the participant model")
    participant_api_key_env: str | None = Field(None, description="endpoint: NAME of the env var holding the key")
    participant_prompt: str = Field(PARTICIPANT_PROMPT, description="persona system prompt; {claim}, "
                                    "{prior_belief}, {lo}, {hi} and every persona attribute are filled in")
    participant_max_tokens: int = Field(64, ge=1, description="longest participant reply, in tokens")
    participant_temperature: float = Field(0.7, ge=0, description="participant sampling temperature")
    rule: RuleParticipant = Field(default_factory=RuleParticipant, description="planted effects (rule backend)")
    seed: Seed = Field(0, description="seeds assignment, personas and every participant's noise")

    @field_validator("n_per_arm")
    @classmethod
    def _n_per_arm(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"n_per_arm must be at least 1 (got {v}); set n_per_arm to the participants per arm")
        return v

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arms: name(s) {dupes} used more than once; give every arm a unique name")
        ids = [c.id for c in self.claims]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"claims: id(s) {dupes} used more than once; give every claim a unique id")
        if "{claim}" not in self.belief.question:
            raise ValueError("belief.question must contain {claim} (where the claim's statement goes); add it")
        if self.participant_backend == "endpoint" and not self.participant_url:
            raise ValueError("participant_backend 'endpoint' needs participant_url (the server's base URL); "
                             "set it")
        _check_env_name(self.participant_api_key_env, "participant_api_key_env")
        if self.participant_backend == "rule":
            self.rule.check_levels(self.population, self.ai_rating, self.trust)
        return self

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm named {name!r}; arms: {[a.name for a in self.arms]}")

    def claim(self, claim_id: str) -> Claim:
        for c in self.claims:
            if c.id == claim_id:
                return c
        raise KeyError(f"no claim with id {claim_id!r}; claims: {[c.id for c in self.claims]}")
