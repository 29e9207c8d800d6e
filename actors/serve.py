"""An OpenAI-compatible chat server for one Hugging Face causal LM, on Ray Serve.

    POST /v1/chat/completions   {"messages": [...], "max_tokens": 64, "temperature": 0.7, "seed": 1}
    GET  /v1/models

The deployment loads the model once (`load_model`) and answers with `tasks.study.chat.generate_reply`, the
same function the local backend of a study calls, so a served model and a local one reply alike. Any
OpenAI-compatible client works against it, `interpflow.tasks.study.chat.EndpointChat` included.

With `api_key_env`, requests must carry `Authorization: Bearer <key>` (else 401). The key is read from that
environment variable in the process that builds the app; only its SHA-256 digest travels to the replica,
so the key is never in Ray's deployment config, the dashboard, or a log.

    import ray
    from interpflow.actors import serve as chat_serve
    ray.init()
    url = chat_serve.start("/models/tiny-lm", port=8000)    # "http://127.0.0.1:8000/v1"
    ...
    chat_serve.stop()
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations (Request)
# at run time, and string annotations of methods of a Serve ingress class do not resolve (422 on every call).

import hashlib
import hmac
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from interpflow.tasks.models import ModelConfig

log = logging.getLogger(__name__)

APP_NAME = "interpflow-chat"
api = FastAPI(title="interpflow chat", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers or None)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@serve.deployment(name="ChatModel", max_ongoing_requests=16, health_check_period_s=10)
@serve.ingress(api)
class ChatModel:
    """One replica holds one loaded model; generation is serialised inside `generate_reply`."""

    def __init__(self, model: str, cfg: dict, key_digest: str | None, served_name: str, threads: int | None):
        import torch

        from interpflow.tasks.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(model, ModelConfig(**cfg))
        if self.loaded.tokenizer is None:
            raise ValueError(f"{model} has no tokenizer: it cannot be served as a chat model")
        self.key_digest = key_digest
        self.served_name = served_name

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if self.key_digest is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token and hmac.compare_digest(_digest(token.strip()), self.key_digest):
            return None
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                      **{"WWW-Authenticate": "Bearer"})

    @api.get("/v1/models")
    def models(self, request: Request):
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": 0,
                                            "owned_by": "interpflow"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("stream"):
            return _error(400, "stream=true is not supported by this server")
        if int(body.get("n") or 1) != 1:
            return _error(400, "only n=1 is supported")
        try:
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 64)
            temperature = float(1.0 if body.get("temperature") is None else body["temperature"])
            seed = None if body.get("seed") is None else int(body["seed"])
        except (TypeError, ValueError) as exc:
            return _error(400, f"bad max_tokens/temperature/seed: {exc}")
        try:
            return await self._complete(body.get("messages"), max_tokens, temperature, seed)
        except ValueError as exc:
            return _error(400, str(exc))

    async def _complete(self, messages: Any, max_tokens: int, temperature: float, seed: int | None) -> dict:
        import asyncio

        from interpflow.tasks.study.chat import check_messages, generate_reply

        check_messages(messages)
        reply = await asyncio.to_thread(generate_reply, self.loaded, messages, max_tokens, temperature, seed)
        finish = "length" if reply.completion_tokens >= max_tokens else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        }


def build_app(model: str, cfg: ModelConfig | None = None, api_key_env: str | None = None, *,
              served_name: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
              threads: int | None = None) -> Application:
    """The Serve application for `model` (a local HF folder or hub id). Checks the model source and the key's
    environment variable now, in the caller's process, before anything is deployed. `served_name` is the model
    id clients see (default `default_served_name(model)`: a folder's base name, or the hub id)."""
    from interpflow.tasks.models import check_model_source

    check_model_source(model)
    digest = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"environment variable {api_key_env} is not set (or empty): set it to the API key "
                             f"clients must send (export {api_key_env}=...), or serve without --api-key-env")
        digest = _digest(key)
    cfg = cfg or ModelConfig()
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    return ChatModel.options(ray_actor_options=options).bind(
        model, cfg.model_dump(), digest, served_name or default_served_name(model), threads)


def default_served_name(model: str) -> str:
    """The id GET /v1/models shows: a local folder's base name (never its absolute path, which would tell
    every client where the model lives on the server), else the hub id."""
    from pathlib import Path

    from interpflow.tasks.models import is_local

    if is_local(model):
        return Path(model).expanduser().resolve().name or "model"
    return model


def start(model: str, host: str = "127.0.0.1", port: int = 8000, *, cfg: ModelConfig | None = None,
          api_key_env: str | None = None, served_name: str | None = None, name: str = APP_NAME,
          num_cpus: float = 1, num_gpus: float = 0, threads: int | None = None, ready_timeout_s: float = 120,
          blocking: bool = False, on_ready: Callable[[str], None] | None = None) -> str:
    """Deploy the chat app on the current Ray cluster (the caller runs `ray.init`) and return its base URL,
    e.g. "http://127.0.0.1:8000/v1". Returns once the model is loaded and the HTTP proxy answers.

    Serve's HTTP proxy binds `host:port` the first time Serve starts on a cluster; a later `start` on the same
    cluster keeps that proxy (Serve ignores new HTTP options), so stop() first to change them.
    blocking=True serves until Ctrl-C (calling `on_ready(url)` once up), then stops the app.
    """
    app = build_app(model, cfg, api_key_env, served_name=served_name, num_cpus=num_cpus, num_gpus=num_gpus,
                    threads=threads)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    running = _proxy_address()
    if running is not None and running != (host, port):
        raise RuntimeError(f"Ray Serve already runs its HTTP proxy on {running[0]}:{running[1]} in this cluster, "
                           f"not {host}:{port}: stop() it first, or start on that host and port")
    serve.run(app, name=name, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}/v1"
    _wait_ready(url, ready_timeout_s)
    if on_ready is not None:
        on_ready(url)
    if blocking:
        _serve_until_interrupted(name)
    return url


def _serve_until_interrupted(name: str) -> None:
    """Sleep until Ctrl-C or SIGTERM (e.g. `kill PID`, a container stop), then delete the app."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("stopping the chat app %s", name)
        stop(name)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _proxy_address() -> tuple[str, int] | None:
    """(host, port) of the running Serve HTTP proxy, or None where Ray's (private) client does not say."""
    try:
        config = serve.context._get_global_client().http_config
        return str(config.host), int(config.port)
    except Exception:  # noqa: BLE001 - a private API: its absence only skips this check
        return None


def _wait_ready(url: str, timeout_s: float) -> None:
    """Poll GET /v1/models until the proxy routes to the app (401 counts: the app answered)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
            if exc.code not in (404, 500, 502, 503, 504):      # the app answered, but wrongly: no point waiting
                raise RuntimeError(f"the chat server at {url} answered GET /models with {exc.code}") from None
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"the chat server at {url} did not answer within {timeout_s:.0f}s (last: {last})")


def stop(name: str | None = None) -> None:
    """Delete the app `name`, or with no name shut Serve down on this cluster (proxy and all apps)."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)
