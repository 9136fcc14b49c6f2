"""The sensor: watch the scan root and start one ``process_case`` run per complete case.

A case folder is complete when a ``_CASE_READY`` marker is in it, or when no
file in it has changed for ``scanner.stability_seconds`` and inspection finds
every file its plan and PlanRange.txt call for. Files still arriving over a
network share never trigger a run; only writes count as activity (created,
modified, moved, deleted, closed after writing), so a process that merely reads
a case (a viewer, a backup, another sensor's inspection) never holds it back. A
settled folder that cannot start is judged once per listing (names, sizes,
times): it is inspected again only when that changes. Each start carries an
idempotency key made of the case id and a digest of the case's content:
duplicate file events, the catch-up scan at start, a periodic rescan, a
restarted sensor or a second sensor all name the same run, and Prefect creates
it once. Changed content (a re-delivered beam) is a new key
and a new run.

    python -m deployments.sensor [--config PATH]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

if sys.platform.startswith("linux"):
    from watchdog.observers.inotify import InotifyObserver

from config import MqiConfig
from deployments.intake import WRITE_EVENTS, Candidate, Verdict, WriteEvents, emit
from deployments.intake_ledger import IntakeEntry, IntakeLedger, IntakeState, ledger_path
from deployments.run_starter import ActiveRun, PrefectStarter
from flows.case_inspection import (
    CaseRejected,
    Signature,
    case_redactor,
    content_digest,
    content_signature,
    folder_shape,
    inspect_case,
    os_problem,
    pseudonym,
)
from flows.commands import CaseIdError, validate_case_id

log = logging.getLogger("mqi.sensor")

StartCase = Callable[[str, str, str], str]
"""start(case_dir, case_id, idempotency_key) -> flow run id"""

# How long the sensor sleeps when every candidate is judged; a file event wakes it.
IDLE_TICK = 1.0
# How often a complete case whose run cannot be created yet (the case's active run
# has not ended, the API does not answer) is tried again; its content is not re-read.
RETRY_START_EVERY = 2.0
# Folders started before a restart whose files are compared each tick (~1.5 ms each).
VERIFY_PER_TICK = 50


class CaseSensor:
    """Tracks candidate case folders and starts each complete one exactly once."""

    def __init__(self, cfg: MqiConfig, start: StartCase | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.root = Path(cfg.scanner.target_directory)
        self.start_case = start or PrefectStarter()
        self.clock = clock
        self.candidates: dict[str, Candidate] = {}
        # Every folder's intake state, as the operator sees it (mqi status) and as a
        # restarted sensor finds it: a started folder unchanged since is not read again.
        self.ledger = IntakeLedger(ledger_path(cfg))
        self.intake: dict[str, IntakeEntry] = self.ledger.entries()
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by file events: someone wrote
        # Case folders with a folder moved in from outside the scan root since the
        # observer started: inotify does not watch inside it (watchdog adds no watch for
        # a moved-in tree), so writes there raise no event.
        self._unwatched: set[str] = set()
        self._observer: BaseObserver | None = None
        self._last_rescan = 0.0
        self._caught_up = False
        self._unverified: list[str] = []  # started before this sensor; files not compared
        self._root_problem: str | None = None
        self._warm = self._warm_failed = False
        self._last_warm_try = float("-inf")

    # ------------------------------------------------------------------ events
    def _case_name(self, path: str) -> str | None:
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        return rel.parts[0] if rel.parts else None

    def moved_in(self, path: str) -> None:
        """A folder came in from outside the root: watch inside it, or else remember that
        no event will tell of writes in it (its listing is then compared instead)."""
        name = self._case_name(path)
        if name is not None and not watch_moved_in(self._observer, path):
            with self._lock:
                self._unwatched.add(name)

    def touch(self, path: str) -> None:
        """A file event somewhere under the root: its case folder is a candidate again."""
        name = self._case_name(path)
        if name is None:
            return
        now = self.clock()
        with self._lock:
            cand = self.candidates.get(name)
            if cand is None:
                self.candidates[name] = Candidate(name, now, now)
            else:
                cand.last_event = now
                cand.quick = False  # a write: compare every file, not only the folders
        self._wake.set()

    def rescan(self) -> None:
        """Make every folder under the root a candidate (catch-up, and missed events)."""
        self._last_rescan = self.clock()
        try:
            names = [e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)
                     or e.is_symlink()]
        except OSError as exc:
            self._say_root_problem(f"cannot read the scan root {self.root}: {exc}")
            return
        now = self.clock()
        with self._lock:
            for name in names:
                # No event time: stability is judged from the files' own mtimes. A
                # started folder's directories alone are compared: the observer reports
                # writes inside it as they happen, and after a restart the files
                # themselves are compared too, a few folders a tick (see _verify).
                self.candidates.setdefault(name, Candidate(name, now, float("-inf"),
                                                           quick=True))
            for cand in self.candidates.values():
                cand.recheck = True  # a judged folder's listing is compared once more
        for gone in set(self.intake) - set(names):  # removed while nobody looked
            with self._lock:
                if gone not in self.candidates:
                    try:
                        self._forget(gone)
                    except sqlite3.Error as exc:  # a full disk: say so, keep watching
                        log.error("the intake ledger %s: %s", self.ledger.path, exc)
        if not self._caught_up:
            # What was written in place while nobody watched (no sensor, or a dead
            # observer) changes no directory: each folder started before is compared
            # file by file once, in the background.
            self._unverified = [n for n, e in self.intake.items()
                                if e.state is IntakeState.STARTED]
            self._caught_up = True

    def _say_root_problem(self, message: str) -> None:
        if self._root_problem != message:
            log.error("%s; waiting for it", message)
            self._root_problem = message

    # -------------------------------------------------------------- intake state
    def _set(self, name: str, state: IntakeState, reason: str | None = None,
             **started: str | None) -> None:
        """Record a folder's intake state; a change of state or reason is logged once and
        emitted once (``mqi.case.<state>``), whatever the number of looks."""
        old = self.intake.get(name)
        entry = IntakeEntry(name, state, reason, **started)  # type: ignore[arg-type]
        said = entry.same_as(old)
        if said and old is not None:
            entry = replace(entry, since=old.since)
            if entry == old:
                return
        self.intake[name] = entry = replace(entry, since=entry.since or time.time())
        self.ledger.put(entry)
        if said:
            return
        shown = name if name.isprintable() else repr(name)
        if state is IntakeState.STARTED:
            pass  # _start says it, with how the case was found complete
        elif state is IntakeState.REFUSED:
            log.warning("case folder %s refused: %s", shown, reason)
        else:
            log.info("case folder %s %s%s", shown, state.lower(),
                     f": {reason}" if reason else "")
        emit(f"mqi.case.{state.lower()}", shown, reason=reason or "",
             flow_run_id=entry.flow_run_id or "")

    def _forget(self, name: str) -> None:
        if self.intake.pop(name, None) is not None:
            self.ledger.forget(name)

    def _warn_if_long(self, cand: Candidate) -> None:
        """The "still waiting after a long time" warning, once per wait."""
        entry = self.intake.get(cand.name)
        if entry is None or entry.state is not IntakeState.WAITING:
            return
        waited = time.time() - entry.since
        if waited >= self.cfg.scanner.incomplete_report_after_seconds \
                and ("incomplete", entry.since) not in cand.reported:
            cand.reported.add(("incomplete", entry.since))
            log.warning("case folder %s is still waiting after %.0f s: %s", cand.name, waited,
                        entry.reason)
            emit("mqi.case.incomplete", cand.name, reason=entry.reason or "",
                 waited_s=round(waited))

    # ---------------------------------------------------------------- decisions
    def step(self) -> bool:
        """Look at every candidate once; start those that are complete.

        Returns:
            True while a candidate needs a look at every tick (files still arriving, a
            run to create again); False when every one left is judged.
        """
        if self.clock() - self._last_rescan >= self.cfg.scanner.rescan_interval_seconds:
            self.rescan()
        self._verify()
        with self._lock:
            names = list(self.candidates)
        busy = False
        for name in names:
            try:
                if self._consider(name):
                    with self._lock:
                        self.candidates.pop(name, None)
                    continue
            except Exception as exc:
                log.exception("case folder %r: unexpected error, will look again: %s", name, exc)
            cand = self.candidates.get(name)
            busy = busy or cand is None or not self._judged(cand)
        return busy

    def _verify(self) -> None:
        """Compare a few more folders started before this sensor, file by file (stats).

        A restart is watching at once: the catch-up compares directories only. Files
        rewritten in place while no sensor ran are found here, ``VERIFY_PER_TICK``
        folders a tick, so that a scan root of 10,000 never stalls the loop.
        """
        now = self.clock()
        with self._lock:
            for name in self._unverified[-VERIFY_PER_TICK:]:
                cand = self.candidates.setdefault(name, Candidate(name, now, float("-inf")))
                cand.quick = False
            del self._unverified[-VERIFY_PER_TICK:]

    def _judged(self, cand: Candidate) -> bool:
        """Whether the candidate's verdict stands without a look. Where no event tells of
        writes (a moved-in folder), its listing is compared once a stability window; a
        case waiting for its active run, or for the API, is looked at again soon."""
        relist = self.cfg.scanner.stability_seconds if cand.name in self._unwatched \
            else math.inf
        if cand.verdict is not None and cand.verdict.key is not None:
            relist = min(relist, RETRY_START_EVERY)
        return cand.judged(self.clock(), relist)

    def _consider(self, name: str) -> bool:
        """True when the candidate is settled (started, unchanged, gone or refused)."""
        cand = self.candidates[name]
        if self._judged(cand):  # nothing written since it was judged: no need to look
            self._warn_if_long(cand)
            return False
        case_dir = self.root / name
        scanner = self.cfg.scanner
        if case_dir.is_symlink():
            self._set(name, IntakeState.REFUSED, "the case folder is a symbolic link; "
                      "links are not accepted")
            return True
        if not case_dir.is_dir():
            self._forget(name)
            return True
        try:
            case_id = validate_case_id(name, self.cfg.cases.id_pattern)
        except CaseIdError as exc:
            self._set(name, IntakeState.REFUSED, str(exc))
            return True  # a name never becomes valid: renaming it makes another folder
        entry = self.intake.get(name)
        started = entry if entry is not None and entry.state is IntakeState.STARTED else None
        if started is not None and cand.quick and started.shape is not None \
                and name not in self._unwatched:  # no event tells of writes in it
            with suppress(OSError):
                if folder_shape(case_dir) == started.shape:
                    return True  # no file came, went or was renamed: not read again
        ignore = {scanner.ready_marker}
        try:
            signature = content_signature(case_dir, ignore)
        except OSError as exc:
            self._set(name, IntakeState.WAITING, f"cannot be read: {os_problem(case_dir, exc)}")
            return False  # looked at again each tick: a permission fixed is no event
        if started is not None and started.listing == signature.listing:
            self._keep_shape(started, case_dir)
            return True  # already started for exactly this content
        marker = (case_dir / scanner.ready_marker).exists()
        event_at = cand.last_event
        seen = (signature, marker)
        verdict = cand.verdict
        if verdict is not None and verdict.seen == seen and verdict.key is not None:
            # Complete and judged: its run waits for the case's active run, or the API.
            return self._start(cand, case_dir, case_id, verdict.key, signature, marker)
        if verdict is None or verdict.seen != seen:  # new content
            if not marker and self._quiet_for(cand, signature) < scanner.stability_seconds:
                self._set(name, IntakeState.ARRIVING, "files are still being written")
                return False
            state, said = self._judge(case_dir, case_id, marker, ignore)
            if state == "start":
                cand.verdict = None
                return self._start(cand, case_dir, case_id, said, signature, marker)
            cand.verdict = Verdict(seen, event_at, state, said, self.clock())
            self._set(name, IntakeState.REFUSED if state == "refused" else IntakeState.WAITING,
                      said)
        # The same listing as judged (a rescan, an event that changed nothing): the same
        # verdict, until the next write.
        assert cand.verdict is not None
        cand.verdict.last_event = event_at
        cand.verdict.listed_at = self.clock()
        cand.recheck = False
        self._warn_if_long(cand)
        return False

    def _quiet_for(self, cand: Candidate, signature: Signature) -> float:
        """Seconds the folder has been quiet, on the sensor's (monotonic) clock.

        A write event is timed on that clock, so a wall-clock jump cannot move it. A
        file's mtime is wall time: its age tells how long a folder found by a scan
        (no event yet) has been quiet, but only while it is not in the future. A file
        dated ahead (the clock was set back, or the share's clock runs ahead) says
        nothing; then the time this very listing has been seen unchanged counts.
        """
        if cand.listing != signature.listing:
            cand.listing, cand.listing_since = signature.listing, self.clock()
        age = time.time() - signature.newest_ns / 1e9
        if age < 0:
            age = self.clock() - cand.listing_since
        return min(self.clock() - cand.last_event, age)

    def _keep_shape(self, entry: IntakeEntry, case_dir: Path) -> None:
        """Remember the started folder's directory shape as it is now (same files)."""
        with suppress(OSError):
            shape = folder_shape(case_dir)
            if shape != entry.shape:
                self._set(entry.folder, IntakeState.STARTED, listing=entry.listing,
                          shape=shape, run_key=entry.run_key, flow_run_id=entry.flow_run_id)

    def _judge(self, case_dir: Path, case_id: str, marker: bool,
               ignore: set[str]) -> tuple[str, str]:
        """("start", run key), or why not: ("waiting" | "refused", reason).

        With the ready marker the case is not inspected here (its run does it); without
        it, inspection must accept it. The key names the content, read whole. A reason
        passes the case's redactor: a patient id never leaves in it.
        """
        try:
            if not marker:
                inspect_case(case_dir, id_pattern=self.cfg.cases.id_pattern,
                             scan_root=self.root, ignore=ignore)
            digest = content_digest(case_dir, ignore)
        except CaseRejected as exc:  # incomplete (may still arrive) or refused for good
            return ("waiting" if exc.waiting else "refused"), \
                case_redactor(case_dir, pseudonym(self.cfg)).redact(exc.reason)
        except OSError as exc:
            return "waiting", f"cannot be read: {os_problem(case_dir, exc)}"
        return "start", f"{case_id}:{digest[:32]}"

    def _start(self, cand: Candidate, case_dir: Path, case_id: str, key: str,
               signature: Signature, marker: bool) -> bool:
        """Create the run for ``key``; True when it exists (now or from before). While
        another run of the case is active the content waits (QUEUED) and runs, once,
        when that run has ended: never two runs of one case at once."""
        name = cand.name
        if content_signature(case_dir, {self.cfg.scanner.ready_marker}) != signature:
            cand.verdict = None
            return False  # changed while we read it: look again later
        shape = folder_shape(case_dir)
        entry = self.intake.get(name)
        if entry is not None and entry.state is IntakeState.STARTED and entry.run_key == key:
            self._set(name, IntakeState.STARTED, listing=signature.listing, shape=shape,
                      run_key=key, flow_run_id=entry.flow_run_id)
            return True
        cand.verdict = Verdict((signature, marker), cand.last_event, "start", "",
                               self.clock(), key=key)
        asked = time.monotonic()
        try:
            active = self._active_runs(case_id)
            ours = next((r for r in active if r.key == key), None)
            if ours is None and active:
                first = active[0]
                self._set(name, IntakeState.QUEUED,
                          f"run {first.short} of this case is {first.state.lower()}; this "
                          f"content starts when it has ended", flow_run_id=first.id)
                return False
            run_id = ours.id if ours else self.start_case(str(case_dir), case_id, key)
        except Exception as exc:  # noqa: BLE001 - the API may be restarting: try again later
            if "start-failed" not in cand.reported:
                cand.reported.add("start-failed")
                log.warning("case %s is complete but its run could not be created yet (%s); "
                            "retrying", case_id, exc)
            return False
        cand.reported.discard("start-failed")
        cand.verdict = None
        self._set(name, IntakeState.STARTED, listing=signature.listing, shape=shape,
                  run_key=key, flow_run_id=run_id)
        log.info("case %s complete (%s): flow run %s (created in %.2f s)", case_id,
                 "ready marker" if marker else
                 f"quiet for {self.cfg.scanner.stability_seconds:g} s", run_id,
                 time.monotonic() - asked)
        return True

    def _active_runs(self, case_id: str) -> list[ActiveRun]:
        find = getattr(self.start_case, "active_runs", None)
        return list(find(case_id)) if find is not None else []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start watching (catch-up scan included). A missing root is waited for."""
        while self._observer is None:
            if not self.root.is_dir() or not os.access(self.root, os.R_OK | os.X_OK):
                self._say_root_problem(f"the scan root {self.root} does not exist or is not "
                                       f"readable")
                return
            observer: BaseObserver
            if self.cfg.scanner.observer == "polling":
                observer = PollingObserver(timeout=self.cfg.scanner.polling_interval_seconds)
            elif sys.platform.startswith("linux"):
                # Full events: a folder moved in from outside is a move with no source,
                # which tells the sensor that no watch covers it (see moved_in).
                observer = InotifyObserver(generate_full_events=True)
            else:
                observer = Observer()
            # Only writes wake the observer: inotify is not even asked for reads.
            observer.schedule(WriteEvents(self.touch, self.moved_in), str(self.root),
                              recursive=True, event_filter=list(WRITE_EVENTS))
            try:
                observer.start()
            except OSError as exc:  # inotify watch limit, root vanished in between
                self._say_root_problem(f"cannot watch {self.root}: {exc}")
                return
            self._observer = observer
            self._caught_up = False  # writes while no observer ran: verify the started
            with self._lock:
                self._unwatched.clear()  # a new observer watches every folder there is
            self._root_problem = None
            self._warm_up()
            log.info("watching %s (%s observer; stable after %g s or on %s)", self.root,
                     self.cfg.scanner.observer, self.cfg.scanner.stability_seconds,
                     self.cfg.scanner.ready_marker)
        self.rescan()

    def _warm_up(self) -> None:
        """Get the client and the deployment ready before a case needs them.

        `mqi up` starts serve and the sensor together, so the deployment is often
        not registered yet when the sensor starts: try again each second until it
        is, instead of leaving the first case to pay for the lookup.
        """
        warm_up = getattr(self.start_case, "warm_up", None)
        if warm_up is None or self._warm or self.clock() - self._last_warm_try < 1.0:
            return
        self._last_warm_try = self.clock()
        try:
            warm_up()
        except Exception as exc:  # noqa: BLE001 - the deployment may not be served yet
            if not self._warm_failed:
                log.info("deployment %s not there yet (%s); looking again each second",
                         getattr(self.start_case, "deployment", "?"),
                         type(exc).__name__ if not str(exc) or str(exc) == "None" else exc)
            self._warm_failed = True
        else:
            self._warm = True

    def stop(self) -> None:
        close = getattr(self.start_case, "close", None)
        if close is not None:
            close()
        self.ledger.close()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)
            self._observer = None

    def run(self, stop: threading.Event, tick: float = 0.25,
            ready: Callable[[], None] = lambda: None) -> None:
        """Watch and decide until ``stop`` is set; ``ready()`` once the first start is done
        (watching, or waiting for a missing root, which is reported).

        It looks each ``tick`` while a case is arriving; when every folder is judged it
        sleeps until a file event, or ``IDLE_TICK`` (stop is noticed within that).
        """
        announced = False
        try:
            while not stop.is_set():
                busy = True
                if self._observer is None or not self._observer.is_alive():
                    self._observer = None
                    self.start()
                if self._observer is not None:
                    self._warm_up()
                    self._wake.clear()  # an event from here on wakes the wait below
                    busy = self.step()
                if not announced:
                    ready()
                    announced = True
                if busy:
                    stop.wait(tick)
                else:
                    self._wake.wait(max(tick, IDLE_TICK))
        finally:  # the observer's threads and the ledger, however the loop ended
            self.stop()


def watch_moved_in(observer: BaseObserver | None, path: str) -> bool:
    """Add inotify watches for a tree moved into the scan root; True when done.

    watchdog watches folders created under a recursive watch but not a tree moved
    in from outside (its own TODO in inotify_c.py): a case delivered by a move,
    the usual way, would raise no event for a later in-place rewrite. Its Inotify
    object can add them (``_add_dir_watch``, under its lock); where watchdog's
    insides differ, False, and the sensor compares that folder's listing instead.
    """
    if observer is None:
        return False
    for emitter in list(getattr(observer, "emitters", ())):
        inotify = getattr(getattr(emitter, "_inotify", None), "_inotify", None)
        add = getattr(inotify, "_add_dir_watch", None)
        lock, mask = getattr(inotify, "_lock", None), getattr(inotify, "_event_mask", None)
        if add is None or lock is None or mask is None:
            continue
        try:
            with lock:
                add(os.fsencode(path), mask, recursive=True)
        except OSError:
            return False  # gone again, or the watch limit: the listing will be compared
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqi-sensor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    args = parser.parse_args(argv)
    from config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.logging.level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from deployments.supervisor import announce_ready

    CaseSensor(cfg).run(stop, ready=announce_ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
