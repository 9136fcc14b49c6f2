"""A test's own writes to the Prefect API, asked again when the server is busy.

Prefect's client asks again after a 429, 502 or 503; a test's plain httpx call did not.
A SQLite server busy with another test file's work answers a write with 503 now and
then (CI on b70b42e: a task run posted by tests/test_status.py), and the test failed
on the server's load rather than on what it tests. The asking again is the sensor's
transport (deployments/busy_retry.py), with Prefect's statuses and longer waits.
"""

from __future__ import annotations

from typing import Any

import httpx

from deployments.busy_retry import BusyRetryTransport

BUSY = frozenset({429, 502, 503})
DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
TRIES = len(DELAYS) + 1


def patient_client(**kwargs: Any) -> httpx.Client:
    """An httpx client whose requests are asked again on a busy answer (0.5, 1, 2, 4,
    8 s apart); the last busy answer is returned."""
    return httpx.Client(transport=BusyRetryTransport(httpx.HTTPTransport(), DELAYS, BUSY),
                        **kwargs)


def post(url: str, body: Any, *, client: httpx.Client | None = None,
         timeout: float = 30) -> Any:
    """POST ``body`` as JSON through ``client`` (a patient_client of its own when none
    is given); the answer's JSON (None when empty). Any error status raises."""
    if client is None:
        with patient_client(timeout=timeout) as own:
            return post(url, body, client=own)
    response = client.post(url, json=body)
    response.raise_for_status()
    return response.json() if response.content else None
