"""What the sensor knows of each case folder it has not started yet, and how it says so.

A folder is a Candidate from its first event until its run starts; once it has
settled and cannot start, its Verdict (waiting or refused, or complete and waiting to start) is kept
with the listing it was judged on, so it is inspected again only when that
changes. Reasons and events never carry a file's name, which can carry a
patient id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from flows.case_inspection import Signature

log = logging.getLogger("mqi.sensor")

# What someone writing does. Opening, reading (inotify's access) and closing
# without writing are someone reading: they are not activity.
WRITE_EVENTS: tuple[type[FileSystemEvent], ...] = (
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, FileMovedEvent,
    DirMovedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent)
WRITE_EVENT_TYPES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED,
                               EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED})


class WriteEvents(FileSystemEventHandler):
    """Hands the sensor the paths someone wrote, and the folders moved in whole."""

    def __init__(self, touch: Callable[[str], None], moved_in: Callable[[str], None]) -> None:
        self.touch = touch
        self.moved_in = moved_in

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in WRITE_EVENT_TYPES:
            return  # opened, accessed, closed without writing: someone only reading
        if event.event_type == EVENT_TYPE_MOVED and event.is_directory and not event.src_path:
            self.moved_in(os.fsdecode(event.dest_path))
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.touch(os.fsdecode(path))


@dataclass
class Verdict:
    """Why a settled folder was not started, and what it was judged on."""

    # the folder's listing and whether the ready marker was there
    seen: tuple[Signature, bool] | None
    last_event: float  # the candidate's last_event when judged
    state: str  # waiting (a piece may still arrive), refused, or start (see key)
    reason: str
    listed_at: float  # when the listing was last found unchanged
    key: str | None = None
    """Complete, with this run key: its run waits for the case's active run, or the API."""


@dataclass
class Candidate:
    """A case folder the sensor has seen and not yet started for its current content."""

    name: str
    first_seen: float
    last_event: float
    reported: set[object] = field(default_factory=set)
    verdict: Verdict | None = None
    recheck: bool = False  # a rescan asks: did the listing change without an event?
    quick: bool = False
    """Found by a rescan, no write seen since: a started folder's directories suffice."""
    listing: str | None = None
    listing_since: float = 0.0
    """The listing last looked at, and since when (sensor clock) it has been the same."""

    def judged(self, now: float, relist_every: float) -> bool:
        """True while the last verdict stands without a look: no event since, no rescan
        asking, and its listing was compared less than ``relist_every`` ago."""
        return self.verdict is not None and not self.recheck \
            and self.last_event == self.verdict.last_event \
            and now - self.verdict.listed_at < relist_every


def emit(event: str, case_id: str, **payload: object) -> None:
    """A Prefect event about a case (the automations' and the UI's view of the sensor).

    Every text in it has passed the case's redactor (``config.redaction``) already.
    """
    try:
        from prefect.events import emit_event

        emit_event(event=event, resource={"prefect.resource.id": f"mqi.case.{case_id}",
                                          "prefect.resource.name": case_id},
                   payload={k: str(v) for k, v in payload.items()})
    except Exception as exc:  # noqa: BLE001 - an event is a courtesy, never a crash
        log.debug("could not emit %s: %s", event, exc)
