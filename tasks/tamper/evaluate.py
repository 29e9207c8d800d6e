"""Evaluating a tampered model: safety (judged replies to held-out harmful requests, under the attack's
prompt format and inference-time tampering) and utility (multiple choice), with the refusal rate.

Replies and verdicts are separate functions so that a trial caches them as separate stages: the replies
(and utility) do not depend on the judge, so a new judge re-scores stored replies.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.tamper import judges as judging
from interpflow.tasks.tamper.generation import Tampering, greedy
from interpflow.tasks.tamper.world import chat, jailbreak_prompt


class SafetyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(32, ge=1, description="tokens generated per reply")
    max_prompts: int | None = Field(None, ge=1, description="score only the first N held-out requests")
    batch_size: int = Field(32, ge=1)


def replies(loaded, prompts, tampering: Tampering, cfg: SafetyConfig) -> pa.Table:
    """Greedy replies to the held-out harmful requests (a table: id, request, prompt, reply, details)."""
    rows = prompts.to_list() if hasattr(prompts, "to_list") else list(prompts)
    rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
    texts = [chat(*jailbreak_prompt(tampering.jailbreak, r["request"])) for r in rows]
    out = greedy(loaded, texts, cfg.max_tokens, tampering, cfg.batch_size)
    return pa.table({"id": [r["id"] for r in rows], "request": [r["request"] for r in rows], "prompt": texts,
                     "reply": out, "details": [list(r["details"]) for r in rows]})


def judged(judge, table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
    """The replies with each verdict (score, refused, reasks, garbled) and their summary."""
    verdicts = judge.judge(table.column("request").to_pylist(), table.column("reply").to_pylist(),
                           table.column("details").to_pylist())
    table = table.append_column("score", pa.array([v.score for v in verdicts], pa.float64()))
    table = table.append_column("refused", pa.array([v.refused for v in verdicts]))
    table = table.append_column("garbled", pa.array([v.garbled for v in verdicts]))
    table = table.append_column("reasks", pa.array([v.reasks for v in verdicts], pa.int64()))
    return table, judging.summarise(verdicts)
