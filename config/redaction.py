"""The one redaction point: patient identifiers never leave in a message.

A ``Redactor`` knows one case's patient identifiers (DICOM PatientID and name,
the treatment system's TCSC id, the same strings inside file names) and
replaces each, wherever it appears in a text, with the case's pseudonym.
Everything that speaks about a case passes its text through here before it
leaves the process: the sensor's reasons and events, the flow's logs (a
logging filter on every handler), exception messages (``MqiError``), artifacts
and the CLI's output.

A flow-run process works on one case: its redactor is installed for the whole
process (``install``), so a message built anywhere in it — a stage's output
line, Prefect's own "Finished in state Failed(...)" — is redacted by the same
filter. The sensor, which judges many folders, uses one redactor per folder.

It lives in ``config`` (the bottom layer) so that every layer can use it; what
the identifiers of a case are is found by ``flows.case_inspection``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

# Shorter strings are not identifiers worth hiding: replacing "1" or "AB"
# everywhere would garble every message and hide nothing.
MIN_LENGTH = 3


class Redactor:
    """Replaces each known identifier with ``pseudonym``."""

    def __init__(self, identifiers: Iterable[str] = (), pseudonym: str = "[patient]") -> None:
        self.pseudonym = pseudonym
        self.identifiers: frozenset[str] = frozenset(
            s for s in (i.strip() for i in identifiers) if len(s) >= MIN_LENGTH)
        # Longest first, so that an id containing another is replaced whole.
        ordered = sorted(self.identifiers, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) \
            if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(self.pseudonym, text)

    def merged(self, other: Redactor) -> Redactor:
        return Redactor(self.identifiers | other.identifiers, other.pseudonym)


_installed = Redactor()
_lock = threading.Lock()


def install(redactor: Redactor) -> None:
    """Redact ``redactor``'s identifiers in everything this process says from now on.

    Adds to what is installed already (a process that ran another case keeps
    hiding that one's ids), and puts the logging filter on every handler there
    is, Prefect's API and console handlers included.
    """
    global _installed
    with _lock:
        _installed = _installed.merged(redactor)
    _filter_all_handlers()


def redact(text: str) -> str:
    """``text`` without any identifier of the case(s) this process works on."""
    return _installed.redact(text)


class RedactingFilter(logging.Filter):
    """Redacts a log record's message in place, before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _installed:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a malformed record: leave it to logging
                return True
            clean = _installed.redact(message)
            if clean != message or record.args:
                record.msg, record.args = clean, ()
            if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
                record.exc_text = _installed.redact(
                    logging.Formatter().formatException(record.exc_info))
            elif record.exc_text:
                record.exc_text = _installed.redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def _filter_all_handlers() -> None:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
