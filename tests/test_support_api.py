"""The tests' own API writes ask again while the server answers busy, and only then."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from deployments import busy_retry
from tests.support import api


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[int]]]:
    """A local HTTP server answering POSTs with the statuses queued in its list (then 201)."""
    monkeypatch.setattr(busy_retry.time, "sleep", lambda s: None)  # no waiting between tries
    answers: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0) if answers else 201
            body = json.dumps({"status": status}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/api/x", answers
    finally:
        httpd.shutdown()


def test_busy_answers_are_asked_again_other_errors_are_not(
        server: tuple[str, list[int]]) -> None:
    url, answers = server
    answers += [503, 502, 429]
    assert api.post(url, {"a": 1}) == {"status": 201}
    assert answers == []  # all three busy answers were asked through
    answers += [409, 503]
    with pytest.raises(httpx.HTTPStatusError, match="409"):
        api.post(url, {})
    answers[:] = [503] * api.TRIES  # busy for good: the last one raises
    with pytest.raises(httpx.HTTPStatusError, match="503"):
        api.post(url, {}, client=api.patient_client(timeout=5))
