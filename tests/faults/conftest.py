"""What the fault tests share: an installation for `mqi up` with tight timings, and
readers of what the system left behind (its logs, its runs, its results)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from blocks import procfs
from config import get_config
from demo.synthetic_case import write_case
from flows.naming import run_name
from tests.support.pipeline import Installation, serving, write_installation

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")

# What a shutdown or a fault must never leave in a log: a traceback of our own, the
# half-imported module of a process killed while importing, an un-awaited cancellation.
LOG_ERRORS = re.compile(r"Traceback|ImportError|CancelledError|partially initialized")
RECORD_START = re.compile(r"^\d\d:\d\d:\d\d")


def tune(inst: Installation, **changes: Any) -> None:
    """Change sections of the installation's YAML (one level deep)."""
    data = yaml.safe_load(inst.config.read_text())
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def up_inst(tmp_path: Path, sshd) -> Installation:
    """An installation for `mqi up` (server, serve, sensor) with short windows."""
    inst = write_installation(tmp_path / "mqi", sshd)
    tune(inst, scanner={"stability_seconds": 1.0, "rescan_interval_seconds": 5.0},
         processes={"start": ["server", "serve", "sensor"],
                    "restart": {"max_restarts": 3, "backoff_initial_seconds": 0.5,
                                "backoff_max_seconds": 2.0}})
    inst.set_control(duration=0.5, batches=2)
    return inst


def drop_case(inst: Installation, staging: Path, case_id: str, beams: int = 1,
              seed: int = 1, inflate: int = 1) -> Path:
    """A complete case moved into the scan root with its ready marker (its spot logs
    ``inflate`` times as long, for a case of some MB)."""
    staged = write_case(staging, case_id, beams=beams, layers=2, spots_per_layer=50, seed=seed)
    for ptn in staged.rglob("*.ptn"):
        ptn.write_bytes(ptn.read_bytes() * inflate)
    target = inst.scan_root / case_id
    os.replace(staged, target)
    (target / "_CASE_READY").write_text("")
    return target


def flow_runs(api: str, case_id: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flow_runs": {"name": {"any_": [run_name(case_id)]}}, "limit": 50})
    response.raise_for_status()
    return response.json()


def state_of(api: str, case_id: str) -> str | None:
    try:
        runs = flow_runs(api, case_id)
    except httpx.HTTPError:
        return None  # the server is away (some faults take it down)
    return runs[0]["state"]["type"] if len(runs) == 1 else None


def log_errors(inst: Installation) -> dict[str, list[str]]:
    """Lines of the installation's logs (`mqi up`'s own and its children's) that show
    an error of the kind no fault may produce, each with the lines after it, by log
    file."""
    found: dict[str, list[str]] = {}
    logs = [inst.root / "up.log", *sorted((inst.root / "data" / "logs").glob("*.log"))]
    for path in logs:
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            # each finding with what follows it: a traceback's frames name its cause
            bad = ["\n".join(lines[i:i + 25]) for i, ln in enumerate(lines)
                   if LOG_ERRORS.search(ln) and not (path.name == "server.log" and
                                                     _sqlite_busy(lines, i))]
            if bad:
                found[path.name] = bad
    return found


def _sqlite_busy(lines: list[str], start: int) -> bool:
    """Whether the server's log record around line ``start`` is Prefect's embedded
    SQLite refusing a write under load ("database is locked"; the client asks again,
    docs/prefect-behaviours.md#sqlite-and-postgresql): not a fault of ours. The record
    runs to the next line that starts with a time."""
    end = next((j for j in range(start + 1, len(lines)) if RECORD_START.match(lines[j])),
               len(lines))
    return any("database is locked" in ln for ln in lines[start:end])


def sim_starts(inst: Installation) -> dict[str, int]:
    """Beam -> how many times a simulation of it started (the simulators' record)."""
    counts: dict[str, int] = {}
    for e in inst.events("tps_env"):
        if e["event"] == "start":
            counts[e["beam"]] = counts.get(e["beam"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, sshd) -> Iterator[Installation]:
    """One installation and its Prefect server for a module; flows run in this process."""
    from blocks.factory import gpu_host, gpu_pool

    with serving(write_installation(tmp_path_factory.mktemp("mqi"), sshd)) as inst:
        # The GPU limit, as `mqi up` makes it at its start.
        with gpu_host(get_config()) as host:
            gpu_pool(get_config()).ensure_limit(host)
        yield inst


@pytest.fixture
def fresh_pipe(pipe: Installation) -> Iterator[Installation]:
    """The module's installation with the simulators reset and its own config restored."""
    pipe.set_control()
    pipe.record.unlink(missing_ok=True)
    shutil.rmtree(pipe.state, ignore_errors=True)
    original = pipe.config.read_text()
    try:
        yield pipe
    finally:
        pipe.config.write_text(original)
        get_config.cache_clear()


def retune(inst: Installation, **changes: Any) -> None:
    """``tune`` for a running installation whose config this process has loaded."""
    tune(inst, **changes)
    get_config.cache_clear()


def run_case(case_dir: Path, workflow: str = "default_qa") -> Any:
    """process_case in this process (as `mqi run` does); its final state."""
    from flows.process_case import process_case

    return process_case(case_dir=str(case_dir), workflow=workflow, return_state=True)


def gpu_slots(inst: Installation) -> dict[str, int]:
    """The installation's GPU concurrency limits and their active slots."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=100)
    return {lim.name: lim.active_slots for lim in limits
            if lim.name.startswith(get_config().gpu.concurrency_limit)}


def alive(pid: int) -> bool:
    found = procfs.stat(pid)
    return found is not None and found.alive


def events(api: str, prefix: str) -> list[dict[str, Any]]:
    """Prefect events whose name starts with ``prefix`` (the last hour)."""
    response = httpx.post(f"{api}/events/filter", timeout=10, json={
        "filter": {"event": {"prefix": [prefix]}}, "limit": 50})
    response.raise_for_status()
    return response.json()["events"]
