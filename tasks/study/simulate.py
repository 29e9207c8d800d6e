"""The conversation driver: one shard of participants through their study, with any backend.

Per participant (all randomness seeded by the study seed and the participant's index, so a result
never depends on which shard or actor ran it):

1. belief before: the persona's prior (rule participant) or an elicited rating (model participant);
2. ``turns`` exchanges with the arm's persuader (rule templates, a local HF model, or an endpoint);
3. belief after; with a corrective arm, a second conversation and the belief after it;
4. ratings of the AI and of trust in AI.

A rule participant's beliefs follow the stated function of ``config.RuleParticipant`` whatever the
persuader said (planted effects for validation); a model participant answers in its own words and its
ratings are parsed (``ratings.elicit``: bounded re-asks, unparseable answers counted).

Endpoint conversations of a shard run in a thread pool of ``concurrency`` participants (network-bound;
the client retries 429/5xx with backoff and rate-limits); local-model conversations run one at a time
in the model actor that holds the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from .chat import EndpointChat, Reply, generate_reply
from .config import ATTRIBUTES, Persuader, StudyConfig
from .population import participant_rng, persona_dict
from .ratings import elicit
from .rules import participant_turn, persuader_turn, rule_corrective, rule_ratings, rule_update
from .rules import RESULTS_SCHEMA

TRANSCRIPT = pa.list_(pa.struct([("phase", pa.string()), ("turn", pa.int32()), ("speaker", pa.string()),
                                 ("text", pa.string())]))
SCHEMA = pa.schema([*RESULTS_SCHEMA, ("transcript", TRANSCRIPT), ("prompt_tokens", pa.int64()),
                    ("completion_tokens", pa.int64()), ("model_calls", pa.int64()), ("attempts", pa.int64()),
                    ("generation_s", pa.float64()), ("seconds", pa.float64())])


class Simulation(BaseModel):
    """The study plus how its shards run (concurrency does not change any participant's result)."""

    model_config = ConfigDict(extra="forbid")
    study: StudyConfig
    concurrency: int = Field(4, ge=1, description="endpoint conversations in flight per shard")
    requests_per_s: float | None = Field(None, gt=0, description="endpoint rate limit per shard (None: none)")
    max_retries: int = Field(5, ge=0, description="endpoint retries on 429/5xx/connection errors")


class Talker(Protocol):
    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int | None) -> Reply: ...


class LocalTalker:
    """A HF model held in this process (the model actor's)."""

    def __init__(self, loaded):
        self.loaded = loaded

    def chat(self, messages, *, max_tokens, temperature, seed=None) -> Reply:
        return generate_reply(self.loaded, messages, max_tokens, temperature, seed)


def participant_ids(cfg: Simulation, participants: pa.Table, **_) -> list[str]:
    return participants.column("participant").to_pylist()


class _Usage:
    def __init__(self):
        self.prompt = self.completion = self.calls = self.attempts = 0
        self.seconds = 0.0

    def add(self, reply: Reply) -> str:
        self.prompt += reply.prompt_tokens
        self.completion += reply.completion_tokens
        self.calls += 1
        self.attempts += reply.attempts
        self.seconds += reply.seconds
        return reply.text


class Backends:
    """The talkers a shard needs, built once per shard (endpoint clients share a rate limiter)."""

    def __init__(self, sim: Simulation, model=None):
        self.sim, self.model = sim, model
        self._cache: dict[tuple, Talker] = {}

    def talker(self, backend: str, model: str | None, url: str | None, key_env: str | None) -> Talker | None:
        if backend == "rule":
            return None
        cache_key = (backend, model, url, key_env)
        if cache_key not in self._cache:
            if backend == "local":
                if self.model is None:
                    raise RuntimeError("a local backend needs the model actor's model; run this node on the "
                                       "study's model pool")
                self._cache[cache_key] = LocalTalker(self.model)
            else:
                client = EndpointChat(url, model or "default", key_env, max_retries=self.sim.max_retries,
                                      limiter=self.sim.requests_per_s)
                client.check_key()
                self._cache[cache_key] = client
        return self._cache[cache_key]

    def persuader(self, p: Persuader) -> Talker | None:
        return self.talker(p.backend, p.model, p.url, p.api_key_env)

    def participant(self) -> Talker | None:
        s = self.sim.study
        return self.talker(s.participant_backend, s.participant_model, s.participant_url, s.participant_api_key_env)


def _converse(study: StudyConfig, persuader: Persuader, talker: Talker | None, claim, phase: str,
              reply_as_participant, transcript: list, usage: _Usage, seed: int) -> None:
    """`turns` exchanges: the persuader speaks, the participant answers."""
    history = [{"role": "system", "content": persuader.prompt_for(claim)}]
    for turn in range(study.turns):
        if talker is None:
            text = persuader_turn(persuader, claim, turn, corrective=phase == "corrective")
        else:
            prompt = history + ([] if len(history) > 1 else [{"role": "user", "content": "Hello."}])
            text = usage.add(talker.chat(prompt, max_tokens=persuader.max_tokens,
                                         temperature=persuader.temperature, seed=seed + turn))
        history.append({"role": "assistant", "content": text})
        transcript.append({"phase": phase, "turn": turn, "speaker": "persuader", "text": text})
        answer = reply_as_participant(text, turn)
        history.append({"role": "user", "content": answer})
        transcript.append({"phase": phase, "turn": turn, "speaker": "participant", "text": answer})


def simulate_participant(sim: Simulation, row: dict, backends: Backends) -> dict:
    study = sim.study
    started = time.perf_counter()
    arm, claim = study.arm(row["arm"]), study.claim(row["claim"])
    persona, index = persona_dict(row), int(row["index"])
    seed = study.seed * 1_000_003 + index * 101
    usage, transcript, unparseable = _Usage(), [], 0
    participant = backends.participant()
    stance = arm.persuader.stance

    if participant is None:   # rule participant: replies by template, beliefs by the stated function
        def reply(text, turn):
            return participant_turn(turn)

        pre = float(row["prior_belief"])
        _converse(study, arm.persuader, backends.persuader(arm.persuader), claim, "main", reply, transcript,
                  usage, seed)
        post = rule_update(study.rule, persona, stance, pre, study.belief, participant_rng(study.seed, index, "update"))
        final = None
        if arm.corrective is not None:
            _converse(study, arm.corrective, backends.persuader(arm.corrective), claim, "corrective", reply,
                      transcript, usage, seed + 50)
            final = rule_corrective(study.rule, stance, arm.corrective.stance, pre, post, study.belief,
                                    participant_rng(study.seed, index, "corrective"))
        ai, trust = rule_ratings(study.rule, persona, stance, pre, arm.corrective is not None, study.belief,
                                 study.ai_rating, study.trust, participant_rng(study.seed, index, "ratings"))
    else:                     # model participant: it speaks, and its ratings are elicited and parsed
        system = study.participant_prompt.format(**persona, claim=claim.statement,
                                                 prior_belief=float(row["prior_belief"]),
                                                 lo=f"{study.belief.lo:g}", hi=f"{study.belief.hi:g}")
        memory = [{"role": "system", "content": system}]
        calls = [0]

        def say(message: str) -> str:
            memory.append({"role": "user", "content": message})
            calls[0] += 1
            text = usage.add(participant.chat(memory, max_tokens=study.participant_max_tokens,
                                              temperature=study.participant_temperature, seed=seed + 500 + calls[0]))
            memory.append({"role": "assistant", "content": text})
            return text

        def rate(scale, phase: str) -> float | None:
            nonlocal unparseable
            value, asked, answers = elicit(say, scale.ask(claim.statement), scale, study.rating_reasks)
            unparseable += sum(1 for _ in answers) - (1 if value is not None else 0)
            transcript.append({"phase": phase, "turn": -1, "speaker": "participant", "text": answers[-1]})
            return value

        def reply(text, turn):
            return say(text)

        pre = rate(study.belief, "belief_pre")
        _converse(study, arm.persuader, backends.persuader(arm.persuader), claim, "main", reply, transcript,
                  usage, seed)
        post = rate(study.belief, "belief_post")
        final = None
        if arm.corrective is not None:
            _converse(study, arm.corrective, backends.persuader(arm.corrective), claim, "corrective", reply,
                      transcript, usage, seed + 50)
            final = rate(study.belief, "belief_final")
        ai = rate(study.ai_rating, "ai_rating")
        trust = rate(study.trust, "trust")

    return {"participant": row["participant"], "index": index, "arm": arm.name, "claim": claim.id,
            **{a: persona[a] for a in ATTRIBUTES}, "belief_pre": pre, "belief_post": post, "belief_final": final,
            "ai_rating": ai, "trust": trust, "unparseable": unparseable, "transcript": transcript,
            "prompt_tokens": usage.prompt, "completion_tokens": usage.completion, "model_calls": usage.calls,
            "attempts": usage.attempts, "generation_s": usage.seconds, "seconds": time.perf_counter() - started}


def simulate_shard(sim: Simulation, shard, participants: pa.Table, model: Any = None) -> dict:
    """Every participant of one shard; `model` is the model actor's LoadedModel for local backends."""
    started = time.perf_counter()
    rows = participants.filter(pc.is_in(participants.column("participant"),
                                        value_set=pa.array(list(shard.ids), pa.string()))).to_pylist()
    backends = Backends(sim, model)
    uses_endpoint = any(b == "endpoint" for b in _backends_of(sim.study))
    if uses_endpoint and sim.concurrency > 1:
        with ThreadPoolExecutor(sim.concurrency) as pool:
            results = list(pool.map(lambda r: simulate_participant(sim, r, backends), rows))
    else:
        results = [simulate_participant(sim, r, backends) for r in rows]
    table = pa.Table.from_pylist(results, schema=SCHEMA)
    seconds = time.perf_counter() - started

    def total(column: str) -> float:
        return pc.sum(table.column(column)).as_py() or 0

    return {"results": table,
            "metrics": {"participants": table.num_rows, "unparseable": int(total("unparseable")),
                        "completion_tokens": int(total("completion_tokens")), "model_calls": int(total("model_calls")),
                        "generation_s": float(total("generation_s")), "compute_s": seconds}}


def persuaders(study: StudyConfig) -> list[Persuader]:
    """Every persuader of the study (each arm's, and its corrective's)."""
    return [p for arm in study.arms for p in (arm.persuader, arm.corrective) if p is not None]


def _backends_of(study: StudyConfig) -> list[str]:
    return [study.participant_backend, *(p.backend for p in persuaders(study))]


def local_models(study: StudyConfig) -> set[str | None]:
    """The model ids/paths local backends ask for (None: the study's default model)."""
    models = {study.participant_model} if study.participant_backend == "local" else set()
    return models | {p.model for p in persuaders(study) if p.backend == "local"}


def uses_local_model(study: StudyConfig) -> bool:
    return "local" in _backends_of(study)
