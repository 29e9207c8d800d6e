"""Chat turns for simulated studies: one reply from a local HF causal LM or from an OpenAI-compatible endpoint.

Two backends, one result type (`Reply`):

- `generate_reply(loaded, messages, ...)`: a Hugging Face causal LM held in a `LoadedModel`. The project's
  Ray Serve app (`interpflow.actors.serve`) answers with this same function, so a local run and a served
  run of the same model, messages and seed give the same text.
- `EndpointChat(url, model, api_key_env=...)`: any OpenAI-compatible `/v1/chat/completions` endpoint, with
  retries (429, 5xx, connection errors), exponential backoff with jitter, `Retry-After`, and an optional
  rate limiter. The API key is read from the named environment variable at call time; it is never stored
  on the object, logged, or put into an exception message.

Messages are OpenAI-style dicts: `{"role": "system" | "user" | "assistant", "content": str}`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

log = logging.getLogger(__name__)

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_MARKERS = ("User:", "System:")       # where a plain-format reply stops: the next turn has begun


@dataclass
class Reply:
    """One assistant turn. `seconds` is the whole call (retries and waits included); `attempts` counts
    HTTP requests made for it (1 for a local model)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    attempts: int = 1


def check_messages(messages: list[dict]) -> None:
    """Raise ValueError unless `messages` is a non-empty list of {"role", "content": str} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_NAMES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': one of {sorted(ROLE_NAMES)}, 'content': str}}, "
                             f"got {str(m)[:80]!r}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(messages: list[dict], tokenizer) -> str:
    """The prompt text for a chat: the tokenizer's chat template when it has one, else a plain transcript
    ("System: ...\\nUser: ...\\nAssistant:") that ends where the assistant's reply begins."""
    check_messages(messages)
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{ROLE_NAMES[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def cut_at_turn_marker(text: str) -> str:
    """`text` up to the first turn marker ("User:", "System:"), stripped."""
    cut = len(text)
    for marker in TURN_MARKERS:
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    return text[:cut].strip()


_GENERATE_LOCK = threading.Lock()   # one generation at a time per process: the seeded RNG state is global


def generate_reply(loaded, messages: list[dict], max_tokens: int, temperature: float,
                   seed: int | None) -> Reply:
    """One assistant reply from the causal LM in `loaded` (a `LoadedModel`).

    temperature 0 is greedy decoding; otherwise plain temperature sampling (no top-k/top-p), seeded by
    `seed` when given (the same seed, model and messages give the same reply). The prompt is cut from the
    left to fit the model's context minus the tokens to generate (a leading bos token is kept); for a model
    whose context is too short for both, `max_tokens` is lowered so that the prompt keeps at least half the
    context (the project's tiny LM has 64 positions). With the plain format the reply stops
    at the next "User:"/"System:" marker; token counts are the prompt's tokens after truncation and the
    tokens the model generated.
    """
    import torch

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{loaded.source} has no tokenizer: it cannot chat")
    start = time.perf_counter()
    templated = has_chat_template(tok)
    prompt = format_prompt(messages, tok)
    ids = tok(prompt, add_special_tokens=not templated, verbose=False)["input_ids"]  # a template has its specials
    limit = loaded.max_length
    max_new = max(1, min(int(max_tokens), limit - min(len(ids), limit // 2)))
    budget = limit - max_new
    if len(ids) > budget:
        keep_bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id and budget > 1
        ids = ([ids[0]] if keep_bos else []) + ids[len(ids) - (budget - keep_bos):]
    input_ids = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampling = temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=pad_id, do_sample=sampling)
    if sampling:
        kwargs.update(temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if not templated:
        kwargs.update(stop_strings=list(TURN_MARKERS), tokenizer=tok)
    with _GENERATE_LOCK, torch.no_grad():
        rng = torch.random.fork_rng(devices=[loaded.device] if str(loaded.device).startswith("cuda") else [],
                                    enabled=seed is not None)
        with rng:
            if seed is not None:
                torch.manual_seed(int(seed))
            out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    new = out[0, input_ids.shape[1]:].tolist()
    while new and new[-1] == pad_id and pad_id != tok.eos_token_id:
        new.pop()   # padding after an early eos is not generated text
    text = tok.decode(new, skip_special_tokens=True)
    text = cut_at_turn_marker(text) if not templated else text.strip()
    return Reply(text=text, prompt_tokens=len(ids), completion_tokens=len(new),
                 seconds=time.perf_counter() - start, attempts=1)


def generate_replies(loaded, chats: list[list[dict]], max_tokens: int, temperature: float,
                     seed: int | None) -> list[Reply]:
    """``generate_reply`` for many chats at once: one batched greedy generation (left-padded) when
    temperature is 0, the model has no chat template and every prompt fits the context with
    ``max_tokens`` to spare; otherwise one chat at a time (sampling is seeded per call, and truncated
    prompts follow ``generate_reply``'s policy). Replies are ``generate_reply``'s up to float rounding."""
    import torch

    tok = loaded.tokenizer
    if not chats:
        return []
    if tok is None or temperature > 0 or len(chats) == 1 or has_chat_template(tok) or max_tokens < 1:
        return [generate_reply(loaded, m, max_tokens, temperature, seed) for m in chats]
    start = time.perf_counter()
    ids = [tok(format_prompt(m, tok), verbose=False)["input_ids"] for m in chats]
    if max(map(len, ids)) + max_tokens > loaded.max_length:
        return [generate_reply(loaded, m, max_tokens, temperature, seed) for m in chats]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=loaded.device)
    with _GENERATE_LOCK, torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=int(max_tokens),
                                    pad_token_id=pad_id, do_sample=False, temperature=None, top_k=None, top_p=None,
                                    stop_strings=list(TURN_MARKERS), tokenizer=tok)
    seconds = (time.perf_counter() - start) / len(chats)
    replies = []
    for row, prompt in zip(out[:, width:].tolist(), ids):
        new = list(row)
        while new and new[-1] == pad_id and pad_id != tok.eos_token_id:
            new.pop()   # padding after a finished sequence is not generated text
        text = cut_at_turn_marker(tok.decode(new, skip_special_tokens=True))
        replies.append(Reply(text=text, prompt_tokens=len(prompt), completion_tokens=len(new), seconds=seconds))
    return replies


# ------------------------------------------------------------------------------------------------ endpoint


class EndpointError(RuntimeError):
    """An endpoint refused a request, or kept failing after all retries."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class EndpointAuthError(EndpointError):
    """The endpoint rejected the API key (401/403), or the key's environment variable is not set."""


class RateLimiter:
    """A thread-safe token bucket: at most `rate` requests per second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int = 1):
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests/second, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate, self.burst = float(rate), int(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is free; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return waited
                wait = (1 - self._tokens) / self.rate
            time.sleep(wait)
            waited += wait

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate}, burst={self.burst})"


RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


def _retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EndpointChat:
    """A client of an OpenAI-compatible chat endpoint (`{url}/chat/completions`).

    url: the API base, e.g. "http://127.0.0.1:8000/v1". api_key_env: the NAME of the environment variable
    holding the key (None: send no key); it is read at each call, so the key never lives on this object.
    Retries 408/429/5xx and connection errors up to `max_retries` times after the first attempt, waiting
    `backoff_s * 2**n` (capped at `backoff_cap_s`, with jitter) or what a `Retry-After` header asks (capped
    at `max_retry_after_s`). limiter: a `RateLimiter`, or a number of requests per second; every attempt
    takes a token. Thread-safe: one client may serve many conversation threads.
    """

    def __init__(self, url: str, model: str, api_key_env: str | None = None, *, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 0.5, backoff_cap_s: float = 30.0,
                 max_retry_after_s: float = 120.0, limiter: RateLimiter | float | None = None,
                 jitter_seed: int | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env or None
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.limiter = RateLimiter(float(limiter)) if isinstance(limiter, (int, float)) else limiter
        self._jitter = random.Random(jitter_seed)
        self._jitter_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"EndpointChat(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"max_retries={self.max_retries}, limiter={self.limiter!r})")

    __str__ = __repr__

    @property
    def endpoint(self) -> str:
        return f"{self.url}/chat/completions"

    def check_key(self) -> None:
        """Raise EndpointAuthError now if the key's environment variable is named but not set (call it before
        a study starts, to fail before any compute)."""
        self._key()

    def _key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointAuthError(
                f"environment variable {self.api_key_env} is not set (or empty): it must hold the API key for "
                f"{self.url}. Set it in the environment of the process that calls the endpoint "
                f"(export {self.api_key_env}=...), or pass api_key_env=None for an endpoint without a key.")
        return key

    def _redact(self, text: str, key: str | None) -> str:
        return text.replace(key, "***") if key else text

    def _backoff(self, failures: int) -> float:
        base = min(self.backoff_cap_s, self.backoff_s * 2 ** (failures - 1))
        with self._jitter_lock:
            return base * (0.5 + 0.5 * self._jitter.random())     # "equal jitter": in [base/2, base]

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float,
             seed: int | None = None) -> Reply:
        """One assistant reply for `messages`. Raises EndpointAuthError (401/403, or no key in the
        environment), EndpointError (another 4xx, a malformed answer, or retries exhausted)."""
        check_messages(messages)
        key = self._key()                                   # before any request
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                                   "temperature": float(temperature), "stream": False}
        if seed is not None:
            payload["seed"] = int(seed)
        body = json.dumps(payload).encode()
        start = time.perf_counter()
        attempts = 0
        last = ""
        while True:
            attempts += 1
            if self.limiter is not None:
                self.limiter.acquire()
            try:
                data = self._post(body, key)
            except EndpointError as exc:                        # auth or another 4xx: not worth retrying
                exc.attempts = attempts
                raise
            except _Retryable as exc:
                last = exc.reason
                if attempts > self.max_retries:
                    raise EndpointError(f"{self.endpoint} failed after {attempts} attempts; last error: {last}",
                                        status=exc.status, attempts=attempts) from None
                wait = (min(exc.retry_after, self.max_retry_after_s) if exc.retry_after is not None
                        else self._backoff(attempts))
                log.warning("chat request to %s failed (%s); retry %d/%d in %.2fs", self.endpoint, last,
                            attempts, self.max_retries, wait)
                time.sleep(wait)
                continue
            return self._reply(data, key, time.perf_counter() - start, attempts)

    def _post(self, body: bytes, key: str | None) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw = exc.read(65536).decode("utf-8", "replace")
            except (OSError, ValueError):
                raw = ""
            excerpt = " ".join(self._redact(raw, key).split())[:300]
            if status in (401, 403):
                how = (f"check that environment variable {self.api_key_env} holds a key this server accepts"
                       if self.api_key_env else
                       "the server needs an API key: pass api_key_env='NAME_OF_ENV_VAR' holding it")
                word = "unauthorized" if status == 401 else "forbidden"
                raise EndpointAuthError(f"{self.endpoint} answered {status} ({word}): {how}. "
                                        f"Server said: {excerpt or '(empty)'}", status=status) from None
            if status in RETRY_STATUSES:
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
                raise _Retryable(f"HTTP {status}: {excerpt[:120] or exc.reason}", status, retry_after) from None
            raise EndpointError(f"{self.endpoint} answered {status}: {excerpt or '(empty body)'}",
                                status=status) from None
        except (OSError, http.client.HTTPException) as exc:     # refused, reset, timed out, cut short
            reason = getattr(exc, "reason", None) or exc
            raise _Retryable(self._redact(f"{type(exc).__name__}: {reason}", key)) from None

    def _reply(self, data: bytes, key: str | None, seconds: float, attempts: int) -> Reply:
        try:
            obj = json.loads(data)
            text = obj["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            excerpt = self._redact(data[:65536].decode("utf-8", "replace"), key)[:300]
            raise EndpointError(f"{self.endpoint} sent an answer that is not a chat completion ({exc}): "
                                f"{excerpt}", attempts=attempts) from None
        usage = obj.get("usage") or {}
        return Reply(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0), seconds=seconds, attempts=attempts)
