"""Scale: a backlog of cases is worked through a bounded number at a time.

`mqi up` with `cases.max_concurrent: 3` and 12 cases dropped at once: never more
than 3 flow runs Running at any moment (from the API's state history of every
run), the others wait Scheduled (QUEUED), all complete, each once.
"""

from __future__ import annotations

import os
from datetime import datetime

import httpx
import pytest
import yaml

from demo.synthetic_case import write_case
from tests.support.pipeline import Installation, stop, wait_for, write_installation
from tests.test_up import flow_runs

pytestmark = pytest.mark.integration


def running_intervals(api: str, run_id: str) -> list[tuple[datetime, datetime]]:
    """When the run was Running, from its state history (a retry is a second interval)."""
    response = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10)
    response.raise_for_status()
    states = sorted(response.json(), key=lambda s: s["timestamp"])
    out, since = [], None
    for state in states:
        at = datetime.fromisoformat(state["timestamp"])
        if state["type"] == "RUNNING" and since is None:
            since = at
        elif state["type"] != "RUNNING" and since is not None:
            out.append((since, at))
            since = None
    assert since is None, f"run {run_id} is still Running"
    return out


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at a tie
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


@pytest.fixture
def inst(tmp_path, sshd) -> Installation:
    installation = write_installation(tmp_path / "mqi", sshd)
    data = yaml.safe_load(installation.config.read_text())
    data["scanner"].update(stability_seconds=1.0)
    data["cases"]["max_concurrent"] = 3
    installation.config.write_text(yaml.safe_dump(data, sort_keys=False))
    installation.set_control(duration=0.5, batches=2, gpus=2)
    return installation


@pytest.mark.scenario(budget=240)
def test_a_backlog_runs_at_most_max_concurrent_cases_at_once(inst: Installation, tmp_path):
    api = inst.api_url
    staging = tmp_path / "staging"
    names = [f"backlog-{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        write_case(staging, name, beams=1, layers=1, spots_per_layer=10, seed=i,
                   ready_marker="_CASE_READY")
    up = inst.start_up()
    try:
        for name in names:
            os.replace(staging / name, inst.scan_root / name)
        queued_seen = wait_for(lambda: sum(
            1 for n in names for r in flow_runs(api, n)
            if r["state"]["type"] == "SCHEDULED"), 60, "cases waiting Scheduled")
        status = inst.mqi("status")
        assert "QUEUED" in status.stdout, status.stdout

        def finished() -> bool:
            runs = [r for n in names for r in flow_runs(api, n)]
            return len(runs) == len(names) and all(
                r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                for r in runs)

        wait_for(finished, 240, "every case to finish", interval=1.0)
        runs = {n: flow_runs(api, n) for n in names}
        assert all(len(r) == 1 for r in runs.values()), "a case ran twice"
        assert all(r[0]["state"]["type"] == "COMPLETED" for r in runs.values()), runs
        intervals = [iv for r in runs.values() for iv in running_intervals(api, r[0]["id"])]
    finally:
        stop(up, grace=90)
    assert len(intervals) == len(names)
    assert most_at_once(intervals) <= 3
    assert most_at_once(intervals) >= 2  # the bound, not a crawl one at a time
    assert queued_seen >= 1
