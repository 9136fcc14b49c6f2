"""`mqi demo`: the system on the demo profile, and one synthetic case through it.

Once the system is up, a synthetic 3-beam case (labelled SIMULATED) appears in
the scan root in one step, with its ready marker; the sensor starts it like any
other case. Its outcome, RT Dose files and report are printed; with ``once``
the system then stops.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from config import MqiConfig, MqiError
from deployments import server, up
from flows.run_states import FINISHED


class DemoCaseFailed(MqiError):
    """The demo case did not complete."""


def drop_case(cfg: MqiConfig) -> str:
    """Write a synthetic case beside the scan root and move it in whole; its case id."""
    from demo.synthetic_case import write_case

    scan_root = Path(cfg.scanner.target_directory)
    scan_root.mkdir(parents=True, exist_ok=True)
    case_id = time.strftime("DEMO-%Y%m%d-%H%M%S")
    case = write_case(scan_root.parent / ".demo-staging", case_id, beams=3, layers=4)
    os.replace(case, scan_root / case_id)  # appears complete, in one step
    (scan_root / case_id / cfg.scanner.ready_marker).write_text("")
    print(f"dropped a synthetic 3-beam case (SIMULATED): {scan_root / case_id}", flush=True)
    return case_id


def wait_for_case(case_id: str, timeout: float, stopping: Callable[[], bool]) -> str | None:
    """Wait until the case's run has finished; None when it did, else what it is instead."""
    from deployments.status import case_statuses

    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline and not stopping():
        row = next((r for r in case_statuses() if r.case_id == case_id), None)
        if row and row.status in FINISHED:
            break
        time.sleep(1)
    if row is None:
        return f"demo case {case_id}: never started"
    if row.status != "COMPLETED":
        return f"demo case {case_id}: {row.status} {row.reason or ''}".rstrip()
    print(f"demo case {case_id}: COMPLETED in {row.duration_s} s (SIMULATED)")
    return None


def print_results(cfg: MqiConfig, case_id: str) -> None:
    results = Path(cfg.paths.results_root) / case_id
    for dose in sorted(results.glob("dicom/*/*.dcm")):
        print(f"  RT Dose: {dose}")
    print(f"  report:  {results / 'report.md'}")
    print(f"Dashboard: {server.ui_url(cfg)}", flush=True)


def how_to_look(config_file: Path, case_id: str) -> str:
    """How to reach this installation from another terminal: every `mqi` command
    without ``--config`` reads $MQI_CONFIG_PATH or the bundled default, not the demo's."""
    config = shlex.quote(str(config_file))
    return (f"this is the demo installation; look at it with --config:\n"
            f"  mqi status --config {config}\n"
            f"  mqi logs --config {config} {case_id}")


def run_demo(cfg: MqiConfig, config_file: Path, *, once: bool, timeout: float) -> None:
    """The system, up until a signal (or, with ``once``, until the demo case is done).

    Raises:
        DemoCaseFailed: With ``once``, when the demo case did not complete.
        MqiError: What ``up.run_system`` raises.
    """
    problems: list[str] = []

    def scenario(stopping: Callable[[], bool]) -> bool:
        case_id = drop_case(cfg)
        problem = wait_for_case(case_id, timeout, stopping)
        if problem is None:
            print_results(cfg, case_id)
        else:
            problems.append(problem)
            if not once:
                print(f"mqi: {problem}", file=sys.stderr, flush=True)
        print(how_to_look(config_file, case_id), flush=True)
        return once

    up.run_system(cfg, config_file, on_up=scenario)
    if once and problems:
        raise DemoCaseFailed(problems[0])
