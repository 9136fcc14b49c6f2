"""Faults of the Prefect server under `mqi up`: killed and restarted while three cases
run (3), and unreachable (stopped, not dead: connections hang) while cases arrive (4)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from blocks import procfs
from deployments.supervisor import descendants
from tests.faults.conftest import (
    TERMINAL,
    drop_case,
    flow_runs,
    sim_starts,
    state_of,
)
from tests.support.pipeline import Installation, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OUTAGE = 8.0
"""How long the API is unreachable. The sensor asks again every 2 s for as long as it
takes (deployments/sensor.py RETRY_START_EVERY): the length changes nothing but the wait."""


def server_pid(up_pid: int) -> int:
    found = [p for p in descendants(up_pid)
             if b"prefect\x00server\x00start" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(found) == 1, found
    return found[0]


def gpu_slots(api: str) -> dict[str, int]:
    limits = httpx.post(f"{api}/v2/concurrency_limits/filter", timeout=10, json={}).json()
    return {lim["name"]: lim["active_slots"] for lim in limits
            if lim["name"].startswith("mqi-gpu")}


def finished(api: str, cases: list[str]) -> bool:
    return all(state_of(api, c) in TERMINAL for c in cases)


@pytest.mark.scenario(budget=360)
def test_server_killed_under_three_cases_then_unreachable_while_two_arrive(
        up_inst: Installation, tmp_path):
    inst, api = up_inst, up_inst.api_url
    inst.set_control(duration=2.0, batches=2)
    up = inst.start_up()
    try:
        # 3: kill -9 of the server while three cases run
        first = [f"srv-kill-{i}" for i in range(3)]
        for i, case in enumerate(first):
            drop_case(inst, tmp_path / "staging", case, beams=2, seed=20 + i)
        wait_for(lambda: all(state_of(api, c) == "RUNNING" for c in first)
                 and len(inst.events("tps_env")) >= 2, 120, "three cases running, two "
                 "simulating")
        killed = server_pid(up.pid)
        os.kill(killed, signal.SIGKILL)
        cut_at = time.monotonic()
        wait_for(lambda: not (procfs.stat(killed) and procfs.stat(killed).alive), 10,
                 "the server to die")
        wait_for(lambda: finished(api, first), 300, "the three cases to finish")
        recovered = time.monotonic() - cut_at
        for case in first:
            runs = flow_runs(api, case)
            assert [r["state"]["type"] for r in runs] == ["COMPLETED"], (case, runs)
        assert gpu_slots(api) and not any(gpu_slots(api).values()), gpu_slots(api)
        starts = sim_starts(inst)
        print(f"\nserver kill -9: 3 cases COMPLETED {recovered:.1f} s after; "
              f"simulation starts per beam: {starts}")

        # 4: the API unreachable (SIGSTOP: it accepts nothing, answers nothing) while
        # two cases arrive; they start once it is back
        group = os.getpgid(server_pid(up.pid))
        os.killpg(group, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            second = [f"api-down-{i}" for i in range(2)]
            for i, case in enumerate(second):
                drop_case(inst, tmp_path / "staging", case, beams=1, seed=30 + i)
            time.sleep(OUTAGE)
        finally:
            os.killpg(group, signal.SIGCONT)
        wait_for(lambda: finished(api, second), 300, "the two late cases to finish")
        back = time.monotonic() - stopped_at - OUTAGE
        for case in second:
            runs = flow_runs(api, case)
            assert [r["state"]["type"] for r in runs] == ["COMPLETED"], (case, runs)
        print(f"API unreachable {OUTAGE:g} s: both cases COMPLETED {back:.1f} s after it "
              f"was back")
        stop(up, grace=90)
        assert up.returncode == 0
        # (The logs of serve and housekeeping do show the connection errors of the
        # outage itself: those are the fault's, not a shutdown's.)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        with contextlib.suppress(Exception):
            for pid in descendants(up.pid):
                os.kill(pid, signal.SIGKILL)
