"""The sensor's ledger: each case folder's intake state, kept in the data dir.

One row per folder in the scan root that the sensor has looked at: its state
(ARRIVING, WAITING, REFUSED, QUEUED, STARTED), the reason, since when, and for
a started folder the run key, the flow run and the folder's signature when it
was started. The sensor is the only writer; ``mqi status`` reads it beside the
flow runs. A restarted sensor loads it so that a folder it started, unchanged
since, is never read again (its signature is compared from stats alone).

SQLite (the standard library's) in WAL mode: a reader never blocks the sensor,
a crash loses at most the row being written, and 10,000 folders cost one small
file, not a rewrite of all of them at each change.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from dataclasses import astuple, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path

from config import MqiConfig, MqiError


class LedgerError(MqiError):
    """The ledger cannot be opened or read; the message names the file."""


class IntakeState(StrEnum):
    ARRIVING = "ARRIVING"
    """Files are still being written (inside the stability window)."""
    WAITING = "WAITING"
    """Settled but not startable yet: a piece is missing or the folder cannot be read."""
    REFUSED = "REFUSED"
    """Can never start as it is (bad id, a link, no plan, two plans, ...)."""
    QUEUED = "QUEUED"
    """New content waits for the case's active run to end."""
    STARTED = "STARTED"
    """A flow run exists for the folder's current content."""


@dataclass(frozen=True)
class IntakeEntry:
    folder: str
    state: IntakeState
    reason: str | None = None
    since: float = 0.0
    """Wall-clock time (epoch seconds) this state and reason began."""
    listing: str | None = None
    """The folder's signature (``Signature.listing``) when it was started."""
    shape: str | None = None
    """Its directories' shape (``folder_shape``) then: what a rescan compares."""
    run_key: str | None = None
    flow_run_id: str | None = None

    def same_as(self, other: IntakeEntry | None) -> bool:
        """Whether ``other`` says the same to an operator (state, reason, run)."""
        return other is not None and (self.state, self.reason, self.flow_run_id) == \
            (other.state, other.reason, other.flow_run_id)


_COLUMNS = tuple(f.name for f in fields(IntakeEntry))
# Built once from the dataclass's own field names (no outside text reaches them).
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM intake"  # noqa: S608
_UPSERT = (f"INSERT OR REPLACE INTO intake ({', '.join(_COLUMNS)}) "  # noqa: S608
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS intake (
    folder TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT,
    since REAL NOT NULL,
    listing TEXT,
    shape TEXT,
    run_key TEXT,
    flow_run_id TEXT
)
"""


def ledger_path(cfg: MqiConfig) -> Path:
    """One ledger per scan root: another root's folders of the same name are others."""
    root = os.path.abspath(os.path.expanduser(str(cfg.scanner.target_directory)))
    tag = hashlib.blake2b(root.encode(errors="surrogateescape"), digest_size=6).hexdigest()
    return Path(cfg.paths.data_dir) / "sensor" / f"intake-{tag}.sqlite3"


class IntakeLedger:
    """The rows of one scan root's folders, used by one thread at a time."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                self._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Made where the sensor is built, used in its loop's thread: one at a time.
                self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the sensor's intake ledger {path}: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> dict[str, IntakeEntry]:
        """Every row of the ledger at ``path``; empty when there is none (yet)."""
        if not path.is_file():
            return {}
        ledger = cls(path, readonly=True)
        try:
            return ledger.entries()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # created, no table yet
                return {}
            raise LedgerError(f"cannot read the sensor's intake ledger {path}: {exc}") \
                from None
        finally:
            ledger.close()

    def entries(self) -> dict[str, IntakeEntry]:
        rows = self._db.execute(_SELECT).fetchall()
        out = {}
        for row in rows:
            entry = IntakeEntry(*row)
            out[entry.folder] = replace(entry, state=IntakeState(entry.state))
        return out

    def put(self, entry: IntakeEntry) -> None:
        """Write ``entry`` (``since`` = now when it is 0)."""
        if not entry.since:
            entry = replace(entry, since=time.time())
        self._db.execute(
            _UPSERT, tuple(str(v) if isinstance(v, IntakeState) else v for v in astuple(entry)))

    def forget(self, folder: str) -> None:
        self._db.execute("DELETE FROM intake WHERE folder = ?", (folder,))

    def close(self) -> None:
        self._db.close()
