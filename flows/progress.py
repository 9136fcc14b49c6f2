"""A beam's simulation as the dashboard shows it while it runs: one keyed progress
artifact per beam, and the GPU it holds as a tag of its task run.

The progress artifact (key ``case-<id>-beam-<N>``, flows/naming.py) is made at the
first batch line MOQUI prints, which it prints only once the GPU's lock is held:
a beam that loses the race for an index and chooses again leaves nothing behind.
It is updated by batch, at most once a second (and always at the end).
"""

from __future__ import annotations

import re
import time
from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from flows.naming import gpu_tag, progress_artifact_key

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


class BeamProgress:
    """Turns MOQUI's batch lines into a keyed Prefect progress artifact for one beam."""

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
        if self._artifact is None:
            # Called from a sync task, so Prefect's sync_compatible returns the id itself.
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
