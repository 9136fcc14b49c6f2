"""Fault 10: the wall clock jumps (NTP step, an operator setting the time, a share whose
clock runs ahead). The stability window is measured on the sensor's monotonic clock:
a jump either way neither starts a case whose files are still arriving nor holds a
quiet case back for the length of the jump."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from config import DEFAULT_PATH
from config.loader import parse_config
from demo.synthetic_case import write_case
from deployments.sensor import CaseSensor

pytestmark = [pytest.mark.integration, pytest.mark.faults]

WINDOW = 5.0
HOUR = 3600.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sensor(tmp_path: Path, clock: Clock) -> tuple[CaseSensor, list[str]]:
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["scanner"].update(target_directory=str(tmp_path / "scan"), stability_seconds=WINDOW,
                           rescan_interval_seconds=HOUR)
    data["paths"]["data_dir"] = str(tmp_path / "data")
    cfg = parse_config(data, tmp_path / "mqi.yaml")
    started: list[str] = []

    def start(case_dir: str, case_id: str, key: str) -> str:
        started.append(case_id)
        return f"run-{len(started)}"

    return CaseSensor(cfg, start=start, clock=clock), started


def date_files(case: Path, offset: float) -> None:
    """Every file's mtime ``offset`` seconds from now (as if written under another clock)."""
    when = time.time() + offset
    for path in case.rglob("*"):
        os.utime(path, (when, when))


def test_wall_clock_set_back_does_not_hold_a_quiet_case_for_the_jump(tmp_path, prefect_api):
    """Files written, then the clock set back an hour: their mtimes are an hour in the
    future. The case starts one window (monotonic) after its last write, not an hour."""
    (tmp_path / "scan").mkdir()
    clock = Clock()
    cs, started = sensor(tmp_path, clock)
    try:
        case = write_case(tmp_path / "scan", "back-case", beams=1, layers=1, spots_per_layer=10)
        date_files(case, +HOUR)
        cs.touch(str(case / "RP.dcm"))  # the last write, seen by the observer
        clock.now += WINDOW / 2
        cs.step()
        assert started == []  # inside the window: still arriving
        clock.now += WINDOW
        cs.step()
        assert started == ["back-case"]
    finally:
        cs.stop()


def test_wall_clock_set_forward_does_not_start_a_case_still_arriving(tmp_path, prefect_api):
    """A write a moment ago, then the clock set forward an hour: the files look an hour
    old, but the window counts from the write on the monotonic clock."""
    (tmp_path / "scan").mkdir()
    clock = Clock()
    cs, started = sensor(tmp_path, clock)
    try:
        case = write_case(tmp_path / "scan", "fwd-case", beams=1, layers=1, spots_per_layer=10)
        date_files(case, -HOUR)
        cs.touch(str(case / "RP.dcm"))
        clock.now += WINDOW / 2
        cs.step()
        assert started == []
        clock.now += WINDOW
        cs.step()
        assert started == ["fwd-case"]
    finally:
        cs.stop()


def test_a_case_found_by_the_catch_up_scan_with_future_mtimes_waits_one_window(
        tmp_path, prefect_api):
    """No event at all (found by the scan at start) and every file dated in the future:
    nothing says how long it has been quiet, so the sensor watches it for one window."""
    (tmp_path / "scan").mkdir()
    clock = Clock()
    cs, started = sensor(tmp_path, clock)
    try:
        case = write_case(tmp_path / "scan", "scan-case", beams=1, layers=1, spots_per_layer=10)
        date_files(case, +HOUR)
        cs.rescan()  # the catch-up scan at start
        cs.step()
        assert started == []
        clock.now += WINDOW + 0.5
        cs.step()
        assert started == ["scan-case"]
    finally:
        cs.stop()
