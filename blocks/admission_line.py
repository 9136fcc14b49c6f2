"""Beams of one machine wait for a GPU slot in arrival order: a line of ticket files.

Prefect's concurrency limit keeps no queue. A refused request is told to ask again
after a Retry-After (up to ``gpu.max_slot_wait_seconds``, with jitter), so a freed
slot waits that long for its next holder, whichever waiter happens to ask first
takes it, and an old case's beam can lose to newer ones for as long as luck has it.
And one process's requests for a limit go through one Prefect service that awaits
each (its sleeps included) before the next, so a case's second beam cannot even ask
while its first waits.

Here the waiting beams of a machine stand in a line. Each holds a ticket file, named
so that names sort in arrival order (the case's arrival, then the beam's) and locked
with ``flock`` by its waiter for as long as it waits: a waiter that dies leaves the
line by itself (the kernel drops its lock), and whoever finds such a ticket removes
it. Only the head of the line asks the API, and it asks often, so a freed slot goes
to the oldest waiting beam within a fraction of a second — and the API sees one
asker per machine instead of one per waiting beam.

The line is per machine (a folder under the temporary directory, one per API and
limit): several workers on several machines each keep their own line, and between
machines the API decides as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".ticket"


def line_folder(api_url: str, limit_name: str) -> Path:
    """The line for one admission limit of one API, on this machine."""
    key = hashlib.sha256(f"{api_url}|{limit_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mqi-admission" / key


class AdmissionLine:
    """A line of waiters in one folder; see the module's docstring."""

    def __init__(self, folder: Path, check_seconds: float = 0.05) -> None:
        self.folder = folder
        self.check_seconds = check_seconds

    @contextlib.contextmanager
    def ticket(self, order: str) -> Iterator[Ticket]:
        """Stand in line with a ticket sorted by ``order`` (then by the time of asking);
        leave the line when the block ends, however it ends."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{order}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        # Locked under a hidden name, then renamed: a ticket is never seen unlocked
        # while its waiter lives (an unlocked ticket is taken for a dead waiter's).
        hidden = self.folder / f".{name}"
        fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            path = self.folder / name
            os.rename(hidden, path)
            try:
                yield Ticket(self, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                hidden.unlink()
            os.close(fd)

    def ahead_of(self, path: Path) -> int:
        """How many live waiters stand before ``path``; dead waiters' tickets are removed."""
        try:
            names = sorted(n for n in os.listdir(self.folder)
                           if n.endswith(SUFFIX) and not n.startswith("."))
        except FileNotFoundError:
            return 0
        ahead = 0
        for name in names:
            if name >= path.name:
                break
            if _alive(self.folder / name):
                ahead += 1
        return ahead


class Ticket:
    """One waiter's place in an AdmissionLine."""

    def __init__(self, line: AdmissionLine, path: Path) -> None:
        self.line = line
        self.path = path

    def ahead(self) -> int:
        return self.line.ahead_of(self.path)

    def wait_turn(self) -> None:
        """Return once no live waiter stands before this ticket."""
        while self.ahead():
            time.sleep(self.line.check_seconds)


def _alive(ticket: Path) -> bool:
    """Whether a ticket's waiter still holds it; a dead waiter's ticket is removed."""
    try:
        fd = os.open(ticket, os.O_RDONLY)
    except FileNotFoundError:
        return False  # its waiter left the line a moment ago
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        with contextlib.suppress(FileNotFoundError):
            ticket.unlink()  # no one holds it: its waiter died without leaving
        return False
    finally:
        os.close(fd)
