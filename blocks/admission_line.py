"""Beams of one machine wait for a GPU slot in arrival order, and wake when one is freed.

Prefect's concurrency limit keeps no queue and tells nobody that a slot was freed.
A refused request is told to ask again after a Retry-After (with jitter), whichever
waiter happens to ask first takes a freed slot, and an old case's beam can lose to
newer ones for as long as luck has it. One process's requests for a limit also go
through one Prefect service that awaits each (its sleeps included) before the next,
so a case's second beam cannot even ask while its first waits.

Here the waiting beams of a machine stand in a line, and a bell tells them when a
slot was given back:

- Each waiter holds a ticket file, named so that names sort in arrival order (the
  case's arrival, then the beam's), locked with ``flock`` by its waiter for as long
  as it waits: a waiter that dies leaves the line by itself (the kernel drops its
  lock), and whoever finds such a ticket removes it. A ticket is locked under a
  hidden name and then renamed, so a living waiter's ticket is never seen unlocked.
- Only the first waiters of the line ask the API (as many as the limit has slots: a
  newer beam never passes one that stands further ahead than that), so a freed slot
  goes to one of the oldest, and the API sees a bounded number of requests. The API
  may answer those few in another order than they asked (SQLite's busy handler does);
  a waiter granted a slot while older ones still wait passes it to the first of them.
- A beam done with its slot passes it to the first waiter of the line: the slot's
  lease (its token) goes into a baton file next to that waiter's ticket, and the
  waiter carries on with the lease. The slot never returns to the API between the
  two, so it takes no request (on a busy SQLite server a request can wait seconds)
  and nobody else can take it. Both sides take the baton by renaming it, so exactly
  one of them has it: a waiter that leaves the line takes its baton on the way out
  (and gives that slot back), and a passer that finds the waiter gone takes the
  baton back. A waiter asking the API for a slot keeps looking for a baton while its
  request is under way.
- With nobody waiting the slot goes back to the API, and its giver rings the bell
  (a file's modification time); waiters look at it every ``check_seconds`` (a
  ``stat``, no request) and ask at once when it rang. A slot freed another way (a
  lease that expired, another machine's beam, a larger limit) is found by looking
  again every few seconds.

The line is per machine (a folder under the temporary directory, one per API and
limit): workers on several machines each keep their own, and between machines the
API decides.
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
BATON = ".baton"
BELL = "bell"


def line_folder(api_url: str, limit_name: str) -> Path:
    """The line for one admission limit of one API, on this machine."""
    key = hashlib.sha256(f"{api_url}|{limit_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mqi-admission" / key


class AdmissionLine:
    """A line of waiters in one folder, and its bell; see the module's docstring."""

    def __init__(self, folder: Path, check_seconds: float = 0.05) -> None:
        self.folder = folder
        self.check_seconds = check_seconds

    @contextlib.contextmanager
    def ticket(self, order: str) -> Iterator[Ticket]:
        """Stand in line with a ticket sorted by ``order`` (then by the time of asking);
        leave the line when the block ends, however it ends."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{order}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        hidden = self.folder / f".{name}"
        fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            path = self.folder / name
            os.rename(hidden, path)
            ticket = Ticket(self, path)
            try:
                yield ticket
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                # Out of the line now, so no passer will hand it a baton after this:
                # one handed meanwhile is this waiter's to give back.
                ticket.left_with = ticket.take_baton()
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

    def pass_slot(self, token: str) -> bool:
        """Hand a held slot (``token``: what the taker needs to hold it) to the first
        live waiter; False when there is none (the slot is then the caller's to give
        back to the API)."""
        try:
            names = sorted(n for n in os.listdir(self.folder)
                           if n.endswith(SUFFIX) and not n.startswith("."))
        except FileNotFoundError:
            return False
        for name in names:
            ticket = self.folder / name
            baton = ticket.with_name(name + BATON)
            if not _alive(ticket):
                continue
            draft = self.folder / f".{name}{BATON}-{uuid.uuid4().hex[:8]}"
            draft.write_text(token)
            try:
                os.link(draft, baton)  # fails where a baton already waits for it
            except FileExistsError:
                continue
            finally:
                draft.unlink()
            if _alive(ticket):
                return True  # it takes the baton while waiting or as it leaves
            # It left the line meanwhile: whoever renames the baton first has it.
            mine = self.folder / f".{name}{BATON}-back-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(baton, mine)
            except FileNotFoundError:
                return True  # it took the baton on its way out
            mine.unlink()
        return False

    def ring(self) -> None:
        """Tell the waiters that a slot was given back (or that the line changed)."""
        bell = self.folder / BELL
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            bell.touch(mode=0o600)  # an existing file's mtime becomes now (ns)
        except OSError:
            pass  # a bell that cannot ring costs the waiters a few seconds, nothing more

    def chime(self) -> int:
        """The bell's state now: it has rung when this changes."""
        try:
            return os.stat(self.folder / BELL).st_mtime_ns
        except OSError:
            return 0

    def wait_for_bell(self, since: int, timeout: float, baton: Path | None = None) -> bool:
        """Wait until the bell rings after ``since`` (a ``chime()``), ``baton`` is there,
        or ``timeout`` passes; whether it rang or the baton came."""
        deadline = time.monotonic() + timeout
        while self.chime() == since:
            if baton is not None and baton.exists():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.check_seconds, left))
        return True


class Ticket:
    """One waiter's place in an AdmissionLine."""

    def __init__(self, line: AdmissionLine, path: Path) -> None:
        self.line = line
        self.path = path
        self.baton = path.with_name(path.name + BATON)
        self.left_with: str | None = None
        """A slot's token handed to this waiter as it left the line: to be given back."""

    def ahead(self) -> int:
        return self.line.ahead_of(self.path)

    def take_baton(self) -> str | None:
        """The token of a slot passed to this waiter, if one was; it is ours then."""
        mine = self.path.with_name(f".{self.baton.name}-taken-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.baton, mine)
        except FileNotFoundError:
            return None
        try:
            return mine.read_text()
        finally:
            mine.unlink()


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
        with contextlib.suppress(FileNotFoundError):
            # A slot passed to it and never taken: its lease runs out as a dead
            # holder's does. (A passer that linked it a moment ago finds the ticket
            # gone and takes it back first; if this unlink wins, that slot waits for
            # its lease to run out.)
            ticket.with_name(ticket.name + BATON).unlink()
        return False
    finally:
        os.close(fd)
