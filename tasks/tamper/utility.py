"""Utility of a (possibly attacked) model: zero-shot multiple-choice accuracy on MMLU-Pro-format questions.

A question has three columns (``MC_COLUMNS``): ``question`` (str), ``options`` (a list of at least two
strings; MMLU-Pro has up to ten) and ``answer``: the correct option as a letter (``"A"``, ``"B"``, ...,
MMLU-Pro's ``answer`` column) or as a 0-based int index. MMLU-Pro's extra columns (``answer_index``,
``category``, ...) are allowed and ignored; ``answer`` is the one that counts.

Scoring (no generation, so it works for the project's tiny LM, which follows no answer format): the prompt
is ``mc_prompt`` as one user turn of ``tasks.study.chat.format_prompt`` (the tokenizer's chat template, else
the plain "User: ...\\nAssistant:" transcript), optionally after a system turn (``UtilityConfig.system``).
Each option is scored by the mean log-probability per token of the continuation ``" " + option text`` after
that prompt (mean, not sum, so long options are not penalised for their length); the prediction is the
argmax, first option on ties. Continuation tokens are found as lm-evaluation-harness does: encode prompt
+ continuation and the prompt alone, and take the tokens past the prompt's length, so tokenizers that
merge across the boundary or mark word starts (sentencepiece) still score the option's own tokens.

A sequence longer than the model's context (``LoadedModel.max_length``; the tiny LM has 64 positions) keeps
its continuation and loses prompt tokens from the left (a leading bos is kept); ``truncated`` counts them.
Pure computation apart from loading data, so it runs in any worker and is tested without Ray.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.types import Seed

MC_COLUMNS = ("question", "options", "answer")
LETTERS = string.ascii_uppercase


class UtilityConfig(BaseModel):
    """Which multiple-choice questions measure utility, and how many are scored."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(None, description="None: the embedded generated questions (a dataset input of "
                                                 "the workflow); else a save_to_disk folder, a JSONL/JSON/CSV/"
                                                 "Parquet file, or a hub id (e.g. TIGER-Lab/MMLU-Pro)")
    split: str = Field("test", description="split of a hub dataset or a DatasetDict folder")
    max_questions: int | None = Field(200, ge=1, description="score a seeded random subset of this many "
                                                             "questions (None: all)")
    batch_size: int = Field(16, ge=1, description="(question, option) sequences per forward pass")
    seed: Seed = Field(0, description="seeds the subset drawn when there are more than max_questions")
    system: str | None = Field(None, description="a system turn before the question (e.g. the system prompt "
                                                 "the model was aligned with); None: the user turn alone")


def _rows(data) -> list[dict]:
    if isinstance(data, list):
        return data
    if hasattr(data, "to_pylist"):          # pyarrow.Table
        return data.to_pylist()
    return data.to_list() if hasattr(data, "to_list") else list(data)   # datasets.Dataset


def _column_names(data) -> list[str]:
    if hasattr(data, "column_names"):       # datasets.Dataset and pyarrow.Table
        return list(data.column_names)
    rows = _rows(data)
    return list(rows[0]) if rows else []


def answer_index(answer: Any, n_options: int) -> int | None:
    """The 0-based option index of ``answer`` (a letter or an int index), or None if it names no option."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, np.integer)):
        index = int(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    else:
        return None
    return index if 0 <= index < n_options else None


def check_mc_dataset(data) -> None:
    """Raise ValueError unless every row is a valid MMLU-Pro-format question (see the module docstring)."""
    missing = [c for c in MC_COLUMNS if c not in _column_names(data)]
    if missing:
        raise ValueError(f"utility dataset lacks column(s) {missing}; it needs {', '.join(MC_COLUMNS)} "
                         "(MMLU-Pro format)")
    rows = _rows(data)
    if not rows:
        raise ValueError("utility dataset holds no questions")
    for i, row in enumerate(rows):
        options = row["options"]
        if not isinstance(row["question"], str):
            raise ValueError(f"utility dataset row {i}: question must be a string, got {row['question']!r:.60}")
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options) \
                or not 2 <= len(options) <= len(LETTERS):
            raise ValueError(f"utility dataset row {i}: options must be a list of 2 to {len(LETTERS)} strings, "
                             f"got {str(options)[:80]!r}")
        if answer_index(row["answer"], len(options)) is None:
            raise ValueError(f"utility dataset row {i}: answer {row['answer']!r} is outside its {len(options)} "
                             f"options (A-{LETTERS[len(options) - 1]}, or an index 0-{len(options) - 1})")


def load_mc_dataset(cfg: UtilityConfig, default=None):
    """The questions of ``cfg.source`` as a validated ``datasets.Dataset``; with ``source=None`` the
    ``default`` dataset (the embedded questions the workflow passes in), validated the same way."""
    if cfg.source is None:
        if default is None:
            raise ValueError("utility.source is None (the embedded questions) but no default dataset was given")
        data = default
    else:
        from interpflow.tasks.datasets_io import DatasetSource, load_source

        data = load_source(DatasetSource(path=cfg.source, split=cfg.split))
    check_mc_dataset(data)
    return data


def mc_prompt(question: str, options: list[str]) -> str:
    """MMLU-style prompt: the question, one ``"A. option"`` line per option, then ``"Answer:"``."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options)]
    return "\n".join(lines + ["Answer:"])


def question_prompt(question: str, options: list[str], tokenizer, system: str | None = None) -> str:
    """The full prompt text an option's continuation is scored after."""
    from interpflow.tasks.study.chat import format_prompt

    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": mc_prompt(question, options)}]
    return format_prompt(messages, tokenizer)


def subset(data, cfg: UtilityConfig) -> tuple[list[dict], list[int]]:
    """The rows scored and their indices in ``data``: all, or a seeded sorted random ``max_questions``."""
    rows = _rows(data)
    indices = list(range(len(rows)))
    if cfg.max_questions is not None and len(rows) > cfg.max_questions:
        rng = np.random.default_rng(cfg.seed)
        indices = sorted(int(i) for i in rng.choice(len(rows), size=cfg.max_questions, replace=False))
    return [rows[i] for i in indices], indices


def _encode(tokenizer, prompt: str, continuation: str, templated: bool) -> tuple[list[int], list[int]]:
    """Prompt ids and continuation ids, split as lm-evaluation-harness does (see the module docstring)."""
    special = not templated               # a chat template writes its own special tokens
    whole = tokenizer(prompt + continuation, add_special_tokens=special, verbose=False)["input_ids"]
    context = tokenizer(prompt, add_special_tokens=special, verbose=False)["input_ids"]
    split = min(len(context), len(whole) - 1)      # at least one continuation token
    return whole[:split], whole[split:]


def _fit(context: list[int], cont: list[int], limit: int, bos: int | None) -> tuple[list[int], list[int], bool]:
    """Cut the context from the left (keeping a leading bos) so that context + continuation fit ``limit``."""
    cont = cont[: limit - 1]
    budget = limit - len(cont)
    if len(context) <= budget:
        return context, cont, False
    keep_bos = bos is not None and context[0] == bos and budget > 1
    return ([context[0]] if keep_bos else []) + context[len(context) - (budget - keep_bos):], cont, True


def continuation_logprobs(loaded, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Mean log-probability per token of each continuation after its context, batched (right padding)."""
    import torch

    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            seqs = [c + k for c, k in chunk]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for i, (context, cont) in enumerate(chunk):
                targets = torch.tensor(cont, dtype=torch.long)
                at = torch.arange(len(context) - 1, len(context) - 1 + len(cont))   # position predicting each
                out.append(float(logp[i, at, targets].mean()))
    return out


def mc_accuracy(loaded, data, cfg: UtilityConfig) -> dict:
    """Zero-shot multiple-choice accuracy of ``loaded`` (a ``tasks.models.LoadedModel``) on ``data``.

    Returns ``accuracy``, ``n`` (questions scored), ``chance`` (mean of 1/number of options: the accuracy
    of guessing), ``truncated`` (sequences whose prompt was cut to fit the context) and ``predictions``:
    per question its ``index`` in ``data``, ``predicted`` and ``answer`` letters, ``correct`` and the
    option ``scores`` (mean log-probability per continuation token).
    """
    check_mc_dataset(data)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{loaded.source} has no tokenizer: it cannot answer questions")
    from interpflow.tasks.study.chat import has_chat_template

    templated = has_chat_template(tok)
    rows, indices = subset(data, cfg)
    limit = loaded.max_length
    pairs, truncated = [], 0
    for row in rows:
        prompt = question_prompt(row["question"], row["options"], tok, cfg.system)
        for option in row["options"]:
            context, cont = _encode(tok, prompt, " " + option.strip(), templated)
            context, cont, cut = _fit(context, cont, limit, tok.bos_token_id)
            pairs.append((context, cont))
            truncated += cut
    scores = continuation_logprobs(loaded, pairs, cfg.batch_size)
    predictions, at = [], 0
    for index, row in zip(indices, rows):
        n = len(row["options"])
        option_scores = scores[at:at + n]
        at += n
        predicted = int(np.argmax(option_scores))
        answer = answer_index(row["answer"], n)
        predictions.append({"index": index, "predicted": LETTERS[predicted], "answer": LETTERS[answer],
                            "correct": predicted == answer, "scores": option_scores})
    return {"accuracy": float(np.mean([p["correct"] for p in predictions])), "n": len(predictions),
            "chance": float(np.mean([1.0 / len(r["options"]) for r in rows])), "truncated": truncated,
            "predictions": predictions}
