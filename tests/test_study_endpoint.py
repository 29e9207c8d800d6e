"""Chat backends of simulated studies: `EndpointChat` against a flaky local OpenAI-compatible server (retries,
Retry-After, auth errors, key hygiene), `generate_reply` on the tiny LM, and the Ray Serve chat app."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from support_endpoint import FlakyServer

from interpflow.tasks.study.chat import (EndpointAuthError, EndpointChat, EndpointError, RateLimiter, Reply,
                                         cut_at_turn_marker, format_prompt, generate_reply)

torch.set_num_threads(1)

MESSAGES = [{"role": "system", "content": "You argue for recycling."},
            {"role": "user", "content": "Why should I recycle?"}]
SECRET = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"


def client(url: str, **kwargs) -> EndpointChat:
    kwargs = {"backoff_s": 0.001, "backoff_cap_s": 0.01, "timeout_s": 10, **kwargs}
    return EndpointChat(url, "canned", **kwargs)


# ------------------------------------------------------------------------------------------ EndpointChat


def test_retries_through_500s_and_429s():
    n = 25
    with FlakyServer(p500=0.2, p429=0.2, seed=1) as server:
        chat = client(server.url, max_retries=10, jitter_seed=0)
        replies = [chat.chat(MESSAGES, max_tokens=8, temperature=0.0, seed=i) for i in range(n)]
    assert all(isinstance(r, Reply) and r.text == "Because." for r in replies)
    assert all(r.prompt_tokens == 8 and r.completion_tokens == 2 for r in replies)
    attempts = [r.attempts for r in replies]
    assert sum(attempts) == len(server.requests)            # every request is counted once
    assert sum(attempts) > n and max(attempts) > 1          # about 40% of the requests failed and were retried
    assert [b["seed"] for b in server.requests][-1] == n - 1 and server.requests[0]["max_tokens"] == 8


def test_retries_exhausted_says_how_many_attempts():
    with FlakyServer(p500=1.0) as server:
        chat = client(server.url, max_retries=2)
        with pytest.raises(EndpointError) as info:
            chat.chat(MESSAGES, max_tokens=8, temperature=0.0)
    assert "after 3 attempts" in str(info.value) and info.value.attempts == 3 and len(server.requests) == 3
    assert "HTTP 500" in str(info.value)


def test_connection_refused_is_retried_then_reported():
    with FlakyServer() as server:
        url = server.url
    chat = client(url, max_retries=1)      # the server is gone: nothing listens on that port now
    with pytest.raises(EndpointError, match="after 2 attempts"):
        chat.chat(MESSAGES, max_tokens=8, temperature=0.0)


def test_other_4xx_fails_at_once_with_status_and_redacted_body(monkeypatch):
    monkeypatch.setenv("STUDY_TEST_KEY", SECRET)
    with FlakyServer(status=400) as server:     # the stub echoes the Authorization header into its body
        chat = client(server.url, api_key_env="STUDY_TEST_KEY")
        with pytest.raises(EndpointError) as info:
            chat.chat(MESSAGES, max_tokens=8, temperature=0.0)
    message = str(info.value)
    assert info.value.status == 400 and "400" in message and len(server.requests) == 1
    assert "Bearer ***" in message and SECRET not in message


def test_wrong_key_is_an_auth_error_that_never_shows_the_key(monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("STUDY_TEST_KEY", SECRET)
    with FlakyServer(key="sk-the-right-one", p500=0.5, seed=3) as server:
        chat = client(server.url, api_key_env="STUDY_TEST_KEY", max_retries=3)
        with pytest.raises(EndpointAuthError) as info:
            chat.chat(MESSAGES, max_tokens=8, temperature=0.0)
        monkeypatch.setenv("STUDY_TEST_KEY", "sk-the-right-one")     # read at call time: a fixed env fixes it
        assert chat.chat(MESSAGES, max_tokens=8, temperature=0.0).text == "Because."
    message = str(info.value)
    assert "STUDY_TEST_KEY" in message and "401" in message and info.value.status == 401
    assert SECRET not in message and SECRET not in repr(info.value)
    assert SECRET not in repr(chat) and SECRET not in str(chat) and SECRET not in str(vars(chat))
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err


def test_missing_key_fails_before_any_request(monkeypatch):
    monkeypatch.delenv("STUDY_TEST_KEY", raising=False)
    with FlakyServer() as server:
        chat = client(server.url, api_key_env="STUDY_TEST_KEY")
        with pytest.raises(EndpointAuthError, match="STUDY_TEST_KEY is not set"):
            chat.check_key()
        with pytest.raises(EndpointAuthError, match="STUDY_TEST_KEY"):
            chat.chat(MESSAGES, max_tokens=8, temperature=0.0)
    assert server.requests == []


def test_rate_limiter_spaces_requests():
    limiter = RateLimiter(rate=40, burst=1)
    start = time.monotonic()
    for _ in range(5):
        limiter.acquire()
    assert time.monotonic() - start >= 4 / 40 * 0.9       # the first is free, then one per 1/40 s
    with FlakyServer() as server:
        chat = client(server.url, limiter=50.0)
        start = time.monotonic()
        for _ in range(4):
            chat.chat(MESSAGES, max_tokens=4, temperature=0.0)
    assert time.monotonic() - start >= 3 / 50 * 0.9 and len(server.requests) == 4


def test_bad_messages_are_rejected_before_any_request():
    with FlakyServer() as server:
        with pytest.raises(ValueError, match="messages\\[0\\]"):
            client(server.url).chat([{"role": "wizard", "content": "hi"}], max_tokens=4, temperature=0.0)
    assert server.requests == []


# --------------------------------------------------------------------------------- local generation


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    from interpflow.tasks import text_corpus, tiny_lm

    corpus = text_corpus.make_corpus(text_corpus.CorpusConfig(n_examples=200))
    pre = tiny_lm.train_tiny_lm(tiny_lm.TinyLMConfig(steps=30, n_layer=1, threads=1), corpus)
    path = tmp_path_factory.mktemp("chat_lm") / "lm"
    pre.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(tiny_lm_path):
    from interpflow.tasks.models import ModelConfig, load_model

    return load_model(tiny_lm_path, ModelConfig())


def test_plain_prompt_format_and_turn_markers(loaded):
    assert format_prompt(MESSAGES, loaded.tokenizer) == (
        "System: You argue for recycling.\nUser: Why should I recycle?\nAssistant:")
    assert cut_at_turn_marker(" it saves energy.\nUser: and?") == "it saves energy."
    assert cut_at_turn_marker("fine System: x User: y") == "fine"


def test_generate_reply_is_seeded_and_fits_the_context(loaded):
    greedy = [generate_reply(loaded, MESSAGES, 12, 0.0, None) for _ in range(2)]
    assert greedy[0].text == greedy[1].text and greedy[0].completion_tokens > 0
    sampled = [generate_reply(loaded, MESSAGES, 12, 1.0, seed) for seed in (7, 7, 8)]
    assert sampled[0].text == sampled[1].text and sampled[0].text != sampled[2].text
    long = [{"role": "user", "content": "alpha beta gamma " * 200}]
    reply = generate_reply(loaded, long, 16, 0.7, 0)        # far longer than the tiny LM's 64 positions
    assert reply.prompt_tokens + reply.completion_tokens <= loaded.max_length
    assert reply.prompt_tokens == loaded.max_length - 16
    huge = generate_reply(loaded, long, 10_000, 0.7, 0)      # max_tokens lowered: the prompt keeps half
    assert huge.prompt_tokens >= loaded.max_length // 2 and huge.completion_tokens <= loaded.max_length // 2


# ------------------------------------------------------------------------------------------ Ray Serve


def test_build_app_checks_model_and_key_before_deploying(tiny_lm_path, tmp_path, monkeypatch):
    from interpflow.actors.serve import build_app

    monkeypatch.delenv("STUDY_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="STUDY_UNSET_KEY is not set"):
        build_app(tiny_lm_path, api_key_env="STUDY_UNSET_KEY")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_app(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("STUDY_UNSET_KEY", SECRET)
    assert SECRET not in repr(build_app(tiny_lm_path, api_key_env="STUDY_UNSET_KEY")._bound_deployment.init_args)


@pytest.fixture(scope="module")
def served(ray_local, tiny_lm_path):
    """The tiny LM behind the Serve chat app, with a required API key."""
    import os
    import socket

    from ray import serve

    from interpflow.actors import serve as chat_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["STUDY_SERVE_KEY"] = "sk-serve-right"     # read by build_app in this process only
    start = time.perf_counter()
    try:
        url = chat_serve.start(tiny_lm_path, port=port, api_key_env="STUDY_SERVE_KEY", threads=1,
                               ready_timeout_s=90)
        startup = time.perf_counter() - start
        print(f"\nServe chat app up in {startup:.1f}s at {url}")
        yield url, startup
    finally:
        serve.shutdown()
        os.environ.pop("STUDY_SERVE_KEY", None)


def test_serve_answers_chat_completions_like_the_local_backend(served, loaded, monkeypatch):
    url, startup = served
    assert startup < 60
    monkeypatch.setenv("STUDY_CLIENT_KEY", "sk-serve-right")
    chat = EndpointChat(url, "tiny", api_key_env="STUDY_CLIENT_KEY", timeout_s=30, max_retries=2)
    reply = chat.chat(MESSAGES, max_tokens=12, temperature=0.0)
    assert reply.text and reply.prompt_tokens > 0 and 0 < reply.completion_tokens <= 12 and reply.attempts == 1
    local = generate_reply(loaded, MESSAGES, 12, 0.0, None)
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == (
        local.text, local.prompt_tokens, local.completion_tokens)
    seeded = [chat.chat(MESSAGES, max_tokens=12, temperature=1.0, seed=5).text for _ in range(2)]
    assert seeded[0] == seeded[1] == generate_reply(loaded, MESSAGES, 12, 1.0, 5).text


def test_serve_rejects_a_wrong_key_and_bad_requests(served, monkeypatch):
    import urllib.error
    import urllib.request

    url, _ = served
    monkeypatch.setenv("STUDY_CLIENT_KEY", "sk-serve-wrong")
    chat = EndpointChat(url, "tiny", api_key_env="STUDY_CLIENT_KEY", timeout_s=30, max_retries=0)
    with pytest.raises(EndpointAuthError, match="STUDY_CLIENT_KEY") as info:
        chat.chat(MESSAGES, max_tokens=4, temperature=0.0)
    assert "sk-serve-wrong" not in str(info.value)
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(f"{url}/models", timeout=10)
    assert no_key.value.code == 401
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": "Bearer sk-serve-right"})
    with urllib.request.urlopen(request, timeout=10) as response:
        listed = json.loads(response.read())["data"][0]
    assert listed["object"] == "model" and listed["id"] == "lm"      # the folder's name, never its absolute path
    bad = urllib.request.Request(f"{url}/chat/completions", data=json.dumps({"messages": []}).encode(), method="POST",
                                 headers={"Authorization": "Bearer sk-serve-right", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=10)
    assert info.value.code == 400 and "messages" in json.loads(info.value.read())["error"]["message"]
