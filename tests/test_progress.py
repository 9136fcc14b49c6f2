"""A beam's progress display never holds up or ends the simulation it shows."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from flows import progress as progress_module
from flows.progress import BeamProgress


class Api:
    """Stands in for Prefect's artifact calls: each write waits for ``go`` and fails
    while ``failing``; the values that got through are kept."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()
        self.failing = False
        self.attempts = 0
        self.written: list[tuple[float, str]] = []

    def create(self, progress: float, key: str, description: str) -> str:
        self._write(progress, description)
        return "artifact-id"

    def update(self, artifact_id: Any, progress: float, description: str) -> None:
        assert artifact_id == "artifact-id"
        self._write(progress, description)

    def _write(self, progress: float, description: str) -> None:
        self.attempts += 1
        self.entered.set()
        assert self.go.wait(30)
        if self.failing:
            raise RuntimeError("503 Service Unavailable")
        self.written.append((progress, description))


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Api:
    fake = Api()
    monkeypatch.setattr(progress_module, "create_progress_artifact", fake.create)
    monkeypatch.setattr(progress_module, "update_progress_artifact", fake.update)
    monkeypatch.setattr(progress_module, "get_run_logger",
                        lambda: logging.getLogger("test.progress"))
    return fake


def batch(i: int, n: int = 4) -> str:
    return f"Generating particles for ({i} of {n} batches)"


def test_a_write_that_waits_holds_nothing_up_and_the_last_value_lands(api: Api) -> None:
    shown = BeamProgress("c1", 2, 1, simulated=True)
    shown.line("stdout", batch(1))  # the first write starts, and waits for the API
    assert api.entered.wait(10)
    for i in (2, 3, 4):  # the output keeps being read meanwhile
        shown.line("stdout", batch(i))
    shown.finish()
    assert api.written == []  # (still held by the API: the lines above did not wait)
    api.go.set()
    shown.close()
    # the first value, then the latest: the ones in between were passed over
    assert api.written == [(25.0, "GPU 1 — beam 2 (SIMULATED)"),
                           (100.0, "GPU 1 — beam 2 (SIMULATED)")]


def test_a_failing_api_is_said_once_and_never_raises(api: Api,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    api.failing = True
    api.go.set()
    shown = BeamProgress("c1", 3, 0, simulated=False)
    with caplog.at_level(logging.WARNING, logger="test.progress"):
        for tried, i in enumerate((1, 4), start=1):  # 100% is always sent
            shown.line("stdout", batch(i, 4))  # never raises
            deadline = time.monotonic() + 10
            while api.attempts < tried and time.monotonic() < deadline:  # each one tried
                time.sleep(0.01)
        shown.finish(failed=True)
        shown.close(5)
    assert api.attempts == 3 and api.written == []
    said = [r.getMessage() for r in caplog.records if "could not update" in r.getMessage()]
    assert said == ["beam 3: could not update its progress on the dashboard (503 Service "
                    "Unavailable); the simulation goes on"]


def test_close_gives_up_on_an_api_that_does_not_answer(api: Api) -> None:
    shown = BeamProgress("c1", 1, 0, simulated=False)
    shown.line("stdout", batch(4))
    assert api.entered.wait(10)
    shown.close(0.2)  # returns though the write still waits
    api.go.set()
