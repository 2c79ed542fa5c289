"""A small in-process OpenAI-compatible server for the `lm.openai_sampler` tests.

`FakeServer` serves `GET /v1/models` and `POST /v1/completions` from a `http.server` in a thread.
What a completion returns is the test's `answer(body) -> (status, json_or_text, headers)`; every
request body is recorded, and the highest number of completions in flight at once is kept, so the
tests can check the request shape, retries and concurrency against real HTTP.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Answer = Callable[[dict[str, Any]], "tuple[int, Any, dict[str, str]]"]


def ok(text: str, finish_reason: str = "stop", **choice: Any) -> tuple[int, Any, dict[str, str]]:
    """A 200 completions response with one choice."""
    return 200, {"id": "cmpl-1", "object": "text_completion", "model": "m",
                 "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, **choice}]}, {}


class FakeServer:
    """Start with `with FakeServer(answer, models=["m"]) as s:`; `s.url` is the /v1 root."""

    def __init__(self, answer: Answer, models: list[str] | None = None) -> None:
        self.answer = answer
        self.models = models if models is not None else ["m"]
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.paths.append(self.path)
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]},
                               {})
                else:
                    self._send(404, {"error": "not found"}, {})

            def do_POST(self) -> None:
                server.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, headers = server.answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                self._send(status, payload, headers)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
