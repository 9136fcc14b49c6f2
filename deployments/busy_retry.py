"""An HTTP transport that re-sends, within milliseconds, a request the API answered "busy".

Prefect's server answers 503 when its SQLite database is locked by another writer
for a moment (and 502/503 through a proxy while restarting). Prefect's client
retries those after 2 s, then 4 s, ...; for the sensor's one call per case that is
longer than the whole start-latency target. Requests the sensor sends this way are
safe to repeat: a run is created with an idempotency key.
"""

from __future__ import annotations

import logging
import time

import httpx

BUSY = frozenset({502, 503})
DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)

log = logging.getLogger(__name__)


class BusyRetryTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, delays: tuple[float, ...] = DELAYS,
                 busy: frozenset[int] = BUSY) -> None:
        self.inner = inner
        self.delays = delays
        self.busy = busy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in self.delays:
            response = self.inner.handle_request(request)
            if response.status_code not in self.busy:
                return response
            response.read()
            response.close()
            log.debug("%s %s: %d; asking again in %g s", request.method, request.url.path,
                      response.status_code, delay)
            time.sleep(delay)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
