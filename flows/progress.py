"""A beam's simulation as the dashboard shows it while it runs: one keyed progress
artifact per beam, and the GPU it holds as a tag of its task run.

The progress artifact (key ``case-<id>-beam-<N>``, flows/naming.py) is made at the
first batch line MOQUI prints, which it prints only once the GPU's lock is held:
a beam that loses the race for an index and chooses again leaves nothing behind.
It is updated by batch, at most once a second (and always at the end).
"""

from __future__ import annotations

import contextvars
import re
import threading
import time
from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from flows.naming import gpu_tag, progress_artifact_key

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")
PROGRESS_CLOSE_SECONDS = 30.0
"""How long a beam's task waits, at its end, for its last progress value to reach the API."""


class BeamProgress:
    """Turns MOQUI's batch lines into a keyed Prefect progress artifact for one beam.

    The API is written from a thread of its own, latest value first. The lines come
    from the loop that reads the simulation's output and sees it end: a write that
    waits (a busy SQLite server took seconds per write under load) held that loop,
    and one that failed (a 503) ended it, killing a simulation that was running well
    and failing its beam. A progress display never does either now: a failed write is
    said once in the log and the next value is tried, and ``close`` (after the GPU is
    handed on) waits a little for the last one.
    """

    def __init__(self, case_id: str, beam: int, gpu: int, simulated: bool) -> None:
        self.beam, self.gpu = beam, gpu
        self.key = progress_artifact_key(case_id, beam)
        self._logger = get_run_logger()
        # The GPU first: the dashboard's artifact cards cut long descriptions short.
        self._label = f"GPU {gpu} — beam {beam}" + (" (SIMULATED)" if simulated else "")
        # Made at the first progress line, not here: this runs between a GPU being
        # ours and the simulation starting, where every API call is GPU time lost.
        self._artifact: UUID | None = None
        self._shown = 0.0
        self._last_update = 0.0
        self._changed = threading.Condition()
        self._wanted: tuple[float, str] | None = None  # not yet written
        self._busy = False  # a write is under way
        self._closed = False
        self._failed_said = False
        self._sender: threading.Thread | None = None

    def line(self, stream: str, text: str) -> None:
        match = PROGRESS.search(text)
        if not match:
            self._logger.info("[beam %d] %s%s", self.beam,
                              "stderr: " if stream == "stderr" else "", text)
            return
        done, total = int(match.group(1)), int(match.group(2))
        percent = 100.0 * done / max(total, 1)
        # At most one API update a second (and always the last): lines can be many.
        if percent >= 100 or (percent - self._shown >= 1 and
                              time.monotonic() - self._last_update >= 1.0):
            self._set(percent)
            self._logger.info("[beam %d] %d of %d batches (%.0f%%)", self.beam, done, total,
                              percent)

    def _set(self, percent: float, note: str = "") -> None:
        self._shown = percent
        self._last_update = time.monotonic()
        with self._changed:
            if self._closed:
                return  # the beam's task is ending: nothing more is shown
            self._wanted = (percent, note)  # an older value not yet sent is dropped
            if self._sender is None:
                # The copied context carries the run's Prefect settings and logger.
                self._sender = threading.Thread(
                    target=contextvars.copy_context().run, args=(self._send,), daemon=True,
                    name=f"mqi-progress-beam{self.beam}")
                self._sender.start()
            self._changed.notify_all()

    def _send(self) -> None:
        while True:
            with self._changed:
                while self._wanted is None and not self._closed:
                    self._changed.wait()
                if self._wanted is None:
                    return
                (percent, note), self._wanted = self._wanted, None
                self._busy = True
            try:
                self._write(percent, note)
            except Exception as exc:  # noqa: BLE001 - a display: the simulation goes on
                if not self._failed_said:
                    self._failed_said = True
                    self._logger.warning("beam %d: could not update its progress on the "
                                         "dashboard (%s); the simulation goes on",
                                         self.beam, exc)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _write(self, percent: float, note: str) -> None:
        if self._artifact is None:
            # Called from a sync context, so Prefect's sync_compatible returns the id itself.
            self._artifact = cast(UUID, create_progress_artifact(
                progress=percent, key=self.key, description=self._label + note))
            return
        update_progress_artifact(self._artifact, progress=percent,
                                 description=self._label + note)

    def finish(self, failed: bool = False) -> None:
        """The simulation ended: FAILED where it failed, else 100%.

        Not to be called for a lost race for the GPU's lock (nothing ran on it).
        """
        if failed:
            self._set(self._shown, " — FAILED")
        elif self._shown < 100:
            self._set(100.0)

    def close(self, timeout: float = PROGRESS_CLOSE_SECONDS) -> None:
        """Wait up to ``timeout`` for the last value to be written, then stop sending.
        Called once the GPU is handed on: the dashboard's 100% costs no GPU time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (self._wanted is not None or self._busy) and self._sender is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            self._closed = True
            self._wanted = None
            self._changed.notify_all()


def label_gpu(index: int, name: str) -> None:
    """Name the running task run ``name`` and tag it ``gpu:<index>``, for good.

    Prefect's API cannot change a task run's tags, and the server takes a task
    run's name and tags from the copy the engine sends with each state change:
    a rename through the API alone is undone when the task ends. So both go into
    the engine's own copy here (a lost race's next choice replaces them) and reach
    the server with the task's next state; ``stages._name_task_run`` shows the
    name meanwhile. Outside a task run: nothing.
    """
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return
    run = context.task_run
    run.name = name
    run.tags = [t for t in run.tags if not t.startswith("gpu:")] + [gpu_tag(index)]
