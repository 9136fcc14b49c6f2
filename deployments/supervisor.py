"""Supervision of `mqi up`'s children: the Prefect server, the serve process, the sensor.

A child that dies is restarted with exponential backoff up to
``processes.restart.max_restarts`` times; past that the supervisor gives up
with the reason. Stopping sends SIGTERM to every descendant, the deepest first
(flow-run processes, then serve), the Prefect server last, and SIGKILL to
whatever is left after a grace period: nothing is left behind.
Children are also told by the kernel (PR_SET_PDEATHSIG) to stop when the
supervisor itself dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blocks import procfs
from config import MqiError
from config.models import RestartPolicy

log = logging.getLogger("mqi.up")
PR_SET_PDEATHSIG = 1
READY_FILE_ENV = "MQI_READY_FILE"


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In a child before exec: ask the kernel for SIGTERM when our parent dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def announce_ready() -> None:
    """In a supervised child: tell `mqi up` this process now does its job."""
    path = os.environ.get(READY_FILE_ENV)
    if path:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(tmp, path)


def _announced(child: Child) -> bool:
    try:
        return child.ready_file is not None and \
            child.ready_file.read_text().strip() == str(child.pid)
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` on this machine (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for proc in procfs.all_stats():
        children.setdefault(proc.ppid, []).append(proc.pid)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path
    ready: Callable[[], bool] | None = None
    # The child writes its pid here (announce_ready) once it does its job; spawn
    # waits for that, so "mqi up is up" means cases are picked up from then on.
    ready_file: Path | None = None
    ready_timeout: float = 90.0
    # Stopped after every other child (the Prefect server: the others report to it
    # while they stop).
    stop_last: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class ChildFailed(MqiError):
    """A child would not start, or died more often than the restart policy allows."""


class Supervisor:
    def __init__(self, children: list[Child], policy: RestartPolicy) -> None:
        self.children = children
        self.policy = policy

    def spawn(self, child: Child) -> None:
        child.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **child.env}
        if child.ready_file is not None:
            child.ready_file.parent.mkdir(parents=True, exist_ok=True)
            child.ready_file.unlink(missing_ok=True)
            env[READY_FILE_ENV] = str(child.ready_file)
        with open(child.log_file, "ab") as out:
            child.proc = subprocess.Popen(
                child.argv, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)
        log.info("%s started (pid %d, log %s)", child.name, child.proc.pid, child.log_file)
        ready = child.ready or (child.ready_file and (lambda: _announced(child)))
        if not ready:
            return
        deadline = time.monotonic() + child.ready_timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise ChildFailed(f"{child.name} exited with code {child.proc.returncode} "
                                  f"while starting:\n{_tail(child.log_file)}")
            if ready():
                return
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} was not ready within {child.ready_timeout:g} s:\n"
                          f"{_tail(child.log_file)}")

    def start_all(self) -> None:
        for child in self.children:
            self.spawn(child)

    def watch(self, stop: Callable[[], bool], tick: float = 0.5) -> str | None:
        """Restart dead children until ``stop()``; return why it gave up, or None."""
        while not stop():
            for child in self.children:
                if child.proc is None or child.proc.poll() is None:
                    continue
                code = child.proc.returncode
                if child.restarts >= self.policy.max_restarts:
                    return (f"{child.name} exited with code {code} and was restarted "
                            f"{child.restarts} time(s) already (processes.restart."
                            f"max_restarts); giving up. Last lines of {child.log_file}:\n"
                            f"{_tail(child.log_file)}")
                delay = min(self.policy.backoff_initial_seconds * 2 ** child.restarts,
                            self.policy.backoff_max_seconds)
                child.restarts += 1
                log.warning("%s exited with code %s; restart %d of %d in %.1f s", child.name,
                            code, child.restarts, self.policy.max_restarts, delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not stop():
                    time.sleep(0.1)
                if stop():
                    break
                try:
                    self.spawn(child)
                except ChildFailed as exc:
                    log.error("%s", exc)
            time.sleep(tick)
        return None

    def stop_all(self, grace: float = 20.0) -> None:
        """Stop every child and its descendants: the deepest first, the API last.

        Order matters. A flow run stopped while serve and the Prefect server are still
        there records its own end (Crashed: resumed by the next `mqi up`), kills its
        remote processes and ships its logs, then exits. Signalled all at once, the
        forkserver it was forked from dies first and serve takes the run for dead
        (exit 255) while it still runs, and with the server gone the run retries a
        dead API until it is SIGKILLed, leaving tracebacks in every log. So each child
        marked ``stop_last`` (the server) is stopped after the others, and within the
        others each depth of the process tree, deepest first, is SIGTERMed and waited
        for (up to ``grace`` for the others, ``grace`` again for the last). A process
        that ignores SIGTERM (multiprocessing's resource tracker: it ends when its
        users do) is not waited for in its wave; whatever still lives at the end is
        SIGKILLed, with a warning.
        """
        for last in (False, True):
            wave = [c for c in reversed(self.children)
                    if c.proc is not None and c.stop_last == last]
            if wave:
                self._stop_wave(wave, time.monotonic() + grace)
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.wait(5)

    def _stop_wave(self, wave: list[Child], deadline: float) -> None:
        levels: list[list[int]] = []  # depth below the child -> pids
        for child in wave:
            assert child.proc is not None
            for depth, pids in enumerate(_levels(child.proc.pid)):
                if depth >= len(levels):
                    levels.append([])
                levels[depth] += pids
        targets = [p for pids in levels for p in pids]
        for depth in range(len(levels) - 1, -1, -1):
            for pid in levels[depth]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if depth == 0:  # and whatever else is in the children's own groups
                _term_group_rest(wave, signalled=set(targets))
            for child in wave:  # reap the children as they go
                if child.proc is not None:
                    child.proc.poll()
            while time.monotonic() < deadline and any(
                    _alive(p) and not _ignores_sigterm(p) for p in levels[depth]):
                time.sleep(0.05)
                for child in wave:
                    if child.proc is not None:
                        child.proc.poll()
        # What ignored SIGTERM usually ends once its users have: a moment for that.
        settle = min(deadline, time.monotonic() + 2.0)
        while time.monotonic() < settle and any(_alive(p) for p in targets):
            time.sleep(0.05)
        for pid in targets:
            if _alive(pid):
                log.warning("process %d ignored SIGTERM; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _term_group_rest(wave: list[Child], signalled: set[int]) -> None:
    """SIGTERM what lives in the process groups of ``wave``'s children and was not
    signalled already (a process that left the tree but kept the group).

    Not killpg: that would signal each child and its descendants a second time, and a
    second SIGTERM is not harmless. Prefect's runner answers one that lands while it is
    already stopping with ``sys.exit(0)`` wherever its loop happens to be, which left
    "Task exception was never retrieved … SystemExit" tracebacks in serve.log."""
    groups = {c.proc.pid for c in wave if c.proc is not None and c.proc.poll() is None}
    for proc in procfs.all_stats():
        if proc.alive and proc.pgrp in groups and proc.pid not in signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)


def _levels(pid: int) -> list[list[int]]:
    """``pid`` and its live descendants by depth: [[pid], [children], [grandchildren], ...]."""
    children: dict[int, list[int]] = {}
    for proc in procfs.all_stats():
        if proc.alive:
            children.setdefault(proc.ppid, []).append(proc.pid)
    levels, current = [], [pid]
    while current:
        levels.append(current)
        current = [c for p in current for c in children.get(p, [])]
    return levels


def _ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` has SIGTERM ignored (SigIgn in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _alive(pid: int) -> bool:
    found = procfs.stat(pid)
    return found is not None and found.alive


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
