"""A local OpenAI-compatible stub server for endpoint tests: failures at set rates, auth, delays."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyServer:
    """An OpenAI-compatible stub on 127.0.0.1: fails with 500 or 429 (Retry-After: 0) at set rates drawn from a
    seeded RNG, otherwise answers a canned completion. `key`: the Bearer key it accepts (None: any).
    `status`: answer every request with this status (and echo the request's Authorization header).
    `content`: the completion's text (a list: the answers in turn, cycling); `delay_s`: seconds each answer takes; `revoke_after`: the key stops
    working after this many answered requests (401 from then on)."""

    def __init__(self, p500: float = 0.0, p429: float = 0.0, seed: int = 0, key: str | None = None,
                 status: int | None = None, content: str | list[str] = "Because.", delay_s: float = 0.0,
                 revoke_after: int | None = None):
        self.p500, self.p429, self.key, self.status = p500, p429, key, status
        self.content, self.delay_s, self.revoke_after = content, delay_s, revoke_after
        self.answered = 0
        self.rng = random.Random(seed)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # keep the test output quiet
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                auth = self.headers.get("Authorization", "")
                with outer.lock:
                    outer.requests.append(body)
                    draw = outer.rng.random()
                if outer.status is not None:
                    return self._send(outer.status, {"error": {"message": f"no; you sent {auth!r}"}})
                revoked = outer.revoke_after is not None and outer.answered >= outer.revoke_after
                if outer.key is not None and (auth != f"Bearer {outer.key}" or revoked):
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if draw < outer.p500:
                    return self._send(500, {"error": {"message": "internal error"}})
                if draw < outer.p500 + outer.p429:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                words = " ".join(m["content"] for m in body["messages"]).split()
                time.sleep(outer.delay_s)
                with outer.lock:
                    outer.answered += 1
                    answers = [outer.content] if isinstance(outer.content, str) else outer.content
                    content = answers[(outer.answered - 1) % len(answers)]
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": len(words), "completion_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FlakyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
