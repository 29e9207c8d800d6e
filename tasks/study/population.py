"""The simulated participants: stable ids, balanced arm assignment, claims and personas.

Every random quantity of a participant comes from its own generator, seeded by (stream, study seed,
participant index), so a participant is the same whether it is generated alone, with others, in any
shard layout or order. Only the arm assignment looks at the whole population (a balanced permutation).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .config import ATTRIBUTES, StudyConfig

# One independent random stream per purpose. Seeds are always 3 integers: numpy's SeedSequence treats
# [a, b] and [a, b, 0] alike, so seeds of different lengths could collide.
STREAMS: dict[str, int] = {"persona": 1, "assignment": 2, "update": 3, "corrective": 4, "ratings": 5}


def participant_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """The generator of one participant's ``stream`` (see ``STREAMS``); independent of everyone else's."""
    return np.random.default_rng([STREAMS[stream], seed, index])


def participant_id(index: int) -> str:
    return f"p{index:06d}"


def persona_of(cfg: StudyConfig, index: int) -> dict:
    """Participant ``index``'s claim, persona attributes and prior belief (not its arm).

    Inverse-CDF draws from one uniform per attribute, in the fixed order of ``ATTRIBUTES``, then one for
    the position of the prior inside its band's range, then one for the claim (uniform over claims).
    """
    u = participant_rng(cfg.seed, index, "persona").random(len(ATTRIBUTES) + 2)
    persona: dict = {}
    for name, ui in zip(ATTRIBUTES, u):
        attribute = getattr(cfg.population, name)
        k = int(np.searchsorted(np.cumsum(attribute.weights), ui, side="right"))
        persona[name] = attribute.values[min(k, len(attribute.values) - 1)]
    start, end = cfg.population.prior_ranges[persona["prior_belief_band"]]
    fraction = start + u[-2] * (end - start)
    persona["prior_belief"] = cfg.belief.lo + fraction * (cfg.belief.hi - cfg.belief.lo)
    persona["claim"] = cfg.claims[min(int(u[-1] * len(cfg.claims)), len(cfg.claims) - 1)].id
    return persona


def assign_arms(cfg: StudyConfig) -> list[str]:
    """Balanced randomisation: exactly ``n_per_arm`` of each arm, in a seeded random order."""
    blocks = np.repeat(np.arange(len(cfg.arms)), cfg.n_per_arm)
    order = np.random.default_rng([STREAMS["assignment"], cfg.seed, 0]).permutation(blocks)
    return [cfg.arms[k].name for k in order]


def participants(cfg: StudyConfig) -> pa.Table:
    """One row per participant: participant, index, arm, claim, the persona attributes, prior_belief.

    Deterministic for ``cfg.seed``; the table's metadata records how arms were assigned.
    """
    arms = assign_arms(cfg)
    rows = [persona_of(cfg, i) for i in range(len(arms))]
    columns = {
        "participant": pa.array([participant_id(i) for i in range(len(arms))], pa.string()),
        "index": pa.array(np.arange(len(arms), dtype=np.int64)),
        "arm": pa.array(arms, pa.string()),
        "claim": pa.array([r["claim"] for r in rows], pa.string()),
        **{name: pa.array([r[name] for r in rows], pa.string()) for name in ATTRIBUTES},
        "prior_belief": pa.array([r["prior_belief"] for r in rows], pa.float64()),
    }
    meta = {"assignment": "balanced random permutation", "assignment_seed": str(cfg.seed),
            "assignment_stream": json.dumps([STREAMS["assignment"], cfg.seed, 0]),
            "n_per_arm": str(cfg.n_per_arm), "arms": json.dumps([a.name for a in cfg.arms])}
    return pa.table(columns).replace_schema_metadata(meta)


def persona_dict(row: dict) -> dict:
    """The persona attributes of a participants-table row (what prompts and rules look at)."""
    return {name: row[name] for name in ATTRIBUTES}
