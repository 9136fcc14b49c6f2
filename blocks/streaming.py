"""Turning a command's output into lines while it runs.

Both hosts read stdout and stderr in chunks as they arrive, hand every complete
line to a callback at once (so progress shows up in the Prefect run log while
the command is still running) and keep the whole output for the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

LineCallback = Callable[[str, str], None]
"""Called as ``callback(stream, line)`` with ``stream`` "stdout" or "stderr"."""

_fallback_logger = logging.getLogger("mqi.command")


def prefect_line_logger(prefix: str) -> LineCallback:
    """Return a callback that logs each line to the current Prefect run's logger.

    Outside a flow or task run (a CLI check, a benchmark) it logs to the
    ``mqi.command`` logger instead, so a host can be used without Prefect running.
    """
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
    except MissingContextError:
        logger = _fallback_logger

    def log_line(stream: str, line: str) -> None:
        logger.info("%s %s: %s", prefix, stream, line)

    return log_line


class OutputCollector:
    """Collects one stream's bytes and emits complete lines as they arrive."""

    def __init__(self, stream: str, callback: LineCallback | None) -> None:
        self.stream = stream
        self._callback = callback
        self._chunks: list[bytes] = []
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Add a chunk; every line it completes goes to the callback now."""
        if not data:
            return
        self._chunks.append(data)
        if self._callback is None:
            return
        buf = self._pending + data
        *lines, self._pending = buf.split(b"\n")
        for raw in lines:
            self._callback(self.stream, raw.decode("utf-8", "replace").rstrip("\r"))

    def mute(self) -> None:
        """Stop calling the callback (keep collecting): used while tearing a run down."""
        self._callback = None

    def close(self) -> None:
        """Flush a last line that had no newline."""
        if self._callback is not None and self._pending:
            self._callback(self.stream, self._pending.decode("utf-8", "replace").rstrip("\r"))
        self._pending = b""

    def text(self) -> str:
        """Everything collected, decoded (undecodable bytes replaced)."""
        return b"".join(self._chunks).decode("utf-8", "replace")
