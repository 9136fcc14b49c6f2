"""A test's own writes to the Prefect API, asked again when the server is busy.

Prefect's client asks again after a 429, 502 or 503; a test's plain httpx call did not.
A SQLite server busy with another test file's work answers a write with 503 now and
then (CI on b70b42e: a task run posted by tests/test_status.py), and the test failed
on the server's load rather than on what it tests.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

BUSY = (429, 502, 503)
TRIES = 6


def post(url: str, body: Any, *, client: httpx.Client | None = None,
         timeout: float = 30) -> Any:
    """POST ``body`` as JSON; the answer's JSON (None when empty). A busy answer is asked
    again (0.5, 1, 2, 4, 8 s apart); any other error, or the last busy one, raises."""
    for attempt in range(TRIES):
        response = client.post(url, json=body) if client is not None else \
            httpx.post(url, json=body, timeout=timeout)
        if response.status_code not in BUSY or attempt == TRIES - 1:
            break
        time.sleep(0.5 * 2 ** attempt)
    response.raise_for_status()
    return response.json() if response.content else None
