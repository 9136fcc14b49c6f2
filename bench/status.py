"""Status benchmark: how long `mqi status` takes to read 1,000 cases from Prefect.

    python -m bench.status [--cases 1000] [--repeat 5] [--no-baseline]

Starts a real Prefect server (SQLite in a temporary folder, as `mqi up` does)
and fills it through the API with ``process_case`` flow runs named
``case-<id>``, in the mix a busy installation has: mostly COMPLETED, some
FAILED with a message, a few CRASHED, RUNNING (with a RUNNING task run),
queued, retried in place (``mqi rerun``: "try 2") and superseded by a newer run
of the same case. Each run has up to 10 task runs, among them one
``run_moqui_sim-beam<N>-gpu<I>`` per beam; and writes an intake ledger (every
case STARTED, a few folders WAITING, ARRIVING, REFUSED or QUEUED).

Then times ``case_statuses`` as ``mqi status`` calls it (with the ledger), with
``--failed`` and with ``--all-gpus`` (the median wall time of ``--repeat`` calls,
after one warm-up call, and the CPU time each call cost the server and this
process: on a shared machine the wall time moves with the load, the CPU time
much less), and the former implementation, kept here as the baseline: every
flow run page by page, then all task runs of each case, one request per case.
Prints the figures, their ratio, whether ``--all-gpus`` gives the former's rows,
and whether the target (< 1 s for 1,000 cases) is met. Filling the server takes
a few minutes (it is a real one, on SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from flows.naming import FLOW_NAME, run_name, simulation_task_run_name

TARGET_S = 1.0


def start_server(work: Path) -> tuple[Any, str]:
    """A real Prefect server on SQLite under ``work``: (process, API URL)."""
    import yaml

    from config import DEFAULT_PATH
    from config.loader import parse_config
    from deployments import server
    from tests.support.sshd import free_port

    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["paths"]["data_dir"] = str(work / "data")
    data["prefect"]["server_port"] = free_port()
    data["prefect"]["server_host"] = "127.0.0.1"
    cfg = parse_config(data, work / "mqi.yaml")
    proc = server.start_server(cfg, work / "server.log")
    return proc, cfg.prefect.effective_api_url


# --- filling the server ---------------------------------------------------------------

def _plan(cases: int, seed: int = 7) -> list[dict[str, Any]]:
    """What each case looks like: its final state, beams, and what came before."""
    rng = random.Random(seed)
    plans = []
    for i in range(cases):
        roll = rng.random()
        final = ("COMPLETED" if roll < 0.86 else "FAILED" if roll < 0.93 else
                 "CRASHED" if roll < 0.95 else "RUNNING" if roll < 0.975 else "SCHEDULED")
        plans.append({
            "case_id": f"{datetime(2024, 1, 1) + timedelta(hours=i):%Y%m%d_%H}-pt{i:04d}",
            "final": final, "beams": rng.randint(1, 4),
            # `mqi rerun` on a failed run: the same run, run_count 2
            "retried": final == "COMPLETED" and rng.random() < 0.03,
            # new content after a failure: a second flow run of the same case
            "superseded": final != "SCHEDULED" and rng.random() < 0.05})
    return plans


def _task_names(beams: int) -> list[str]:
    names = ["inspect", "upload", "run_interpreter"]
    names += [simulation_task_run_name(b, (b - 1) % 2) for b in range(1, beams + 1)]
    return names + ["download", "verify", "report"]


class _Filler:
    """Creates the runs through the REST API, ``parallel`` requests at a time.

    Flow runs are orchestrated by the server (created, then set to their final
    state: start time, run count and run time come from its rules). Task runs are
    recorded as a Prefect 3 client records them: from ``prefect.task-run.*``
    events, which the server's task-run recorder writes in bulk (so they are
    posted in batches, not one request each).
    """

    def __init__(self, http: httpx.AsyncClient, flow_id: str, parallel: int) -> None:
        self.http = http
        self.flow_id = flow_id
        self.gate = asyncio.Semaphore(parallel)
        self.events: list[dict[str, Any]] = []
        self.task_runs = 0

    async def post(self, path: str, body: Any) -> Any:
        for attempt in range(30):
            try:
                async with self.gate:
                    response = await self.http.post(path, json=body)
            except httpx.TransportError:  # a connection the server closed: as Prefect's client
                if attempt == 29:
                    raise
                continue
            # SQLite answers "database is locked" under concurrent writes: the server says
            # 503 and Prefect's own clients retry, as this does
            if response.status_code != 503:
                break
            await asyncio.sleep(min(1.0, 0.05 * (attempt + 1)))
        response.raise_for_status()
        return response.json() if response.content else None

    async def set_state(self, run_id: str, state: str, message: str | None = None) -> None:
        await self.post(f"/flow_runs/{run_id}/set_state", {
            "state": {"type": state, "message": message}, "force": True})

    def task(self, run_id: str, name: str, state: str) -> None:
        """Queue the event a client emits when one of ``run_id``'s task runs ends in ``state``."""
        now = datetime.now(UTC).isoformat()
        state_name = state.capitalize()
        self.task_runs += 1
        self.events.append({
            "id": str(uuid.uuid4()), "occurred": now, "event": f"prefect.task-run.{state_name}",
            "resource": {
                "prefect.resource.id": f"prefect.task-run.{uuid.uuid4()}",
                "prefect.resource.name": name, "prefect.run-count": "1",
                "prefect.state-name": state_name, "prefect.state-type": state,
                "prefect.state-timestamp": now, "prefect.orchestration": "client"},
            "related": [{"prefect.resource.id": f"prefect.flow-run.{run_id}",
                         "prefect.resource.role": "flow-run"}],
            "payload": {
                "intended": {"from": "RUNNING", "to": state}, "initial_state": None,
                "validated_state": {"type": state, "name": state_name, "message": None,
                                    "state_details": {}, "data": None},
                "task_run": {
                    "name": name, "task_key": f"flows.stages.{name.split('-')[0]}",
                    "dynamic_key": name, "tags": [], "run_count": 1, "flow_run_run_count": 1,
                    "empirical_policy": {"max_retries": 0, "retry_delay_seconds": 0.0,
                                         "retries": 0, "retry_delay": 0},
                    "task_inputs": {"case_dir": [], "cfg": [], "upstream": []},
                    "expected_start_time": now, "start_time": now,
                    "end_time": None if state == "RUNNING" else now,
                    "total_run_time": 0.0}}})

    async def run(self, plan: dict[str, Any], final: str) -> None:
        case_id = plan["case_id"]
        run = await self.post("/flow_runs/", {
            "flow_id": self.flow_id, "name": run_name(case_id),
            "parameters": {"case_dir": f"/data/scan/{case_id}", "workflow": "default_qa"},
            "tags": ["mqi", f"case:{case_id}"],
            "state": {"type": "SCHEDULED" if final == "SCHEDULED" else "RUNNING"}})
        run_id = run["id"]
        if final == "SCHEDULED":
            return
        names = _task_names(plan["beams"])
        last = 3 + plan["beams"] - 1  # the last beam's simulation
        if final == "RUNNING":  # in the middle of the last beam's simulation
            for name in names[:last]:
                self.task(run_id, name, "COMPLETED")
            self.task(run_id, names[last], "RUNNING")
            return
        if final in ("FAILED", "CRASHED"):  # the last beam failed
            for name in names[:last]:
                self.task(run_id, name, "COMPLETED")
            self.task(run_id, names[last], "FAILED")
            message = ("Flow run encountered an exception: MoquiError: beam "
                       f"{plan['beams']}: tps_env exited with status 139 on GPU 1"
                       if final == "FAILED" else "Flow run infrastructure exited with "
                       "non-zero status code -9.")
            await self.set_state(run_id, final, message)
            return
        for name in names:
            self.task(run_id, name, "COMPLETED")
        if plan["retried"]:
            await self.set_state(run_id, "FAILED", "Flow run encountered an exception: x")
            await self.set_state(run_id, "SCHEDULED")
            await self.set_state(run_id, "RUNNING")
        await self.set_state(run_id, "COMPLETED")

    async def case(self, plan: dict[str, Any]) -> None:
        if plan["superseded"]:  # the older run must be created first
            await self.run(plan, "FAILED")
        await self.run(plan, plan["final"])

    async def flush(self) -> None:
        events, self.events = self.events, []
        await asyncio.gather(*(self.post("/events", events[i:i + 500])
                               for i in range(0, len(events), 500)))


async def fill(api: str, cases: int, parallel: int = 4) -> dict[str, int]:
    """Create the flow and ``cases`` cases' flow and task runs; returns counts."""
    limits = httpx.Limits(max_connections=parallel)
    async with httpx.AsyncClient(base_url=api, timeout=60, limits=limits) as http:
        flow = (await http.post("/flows/", json={"name": FLOW_NAME})).json()
        filler = _Filler(http, flow["id"], parallel)
        plans = _plan(cases)
        # cases in creation order, so that the newest case is the last one created
        for start in range(0, len(plans), parallel):
            await asyncio.gather(*(filler.case(p) for p in plans[start:start + parallel]))
            if len(filler.events) >= 500:
                await filler.flush()
            if start and start % 200 == 0:
                print(f"  {start} cases created", flush=True)
        await filler.flush()
        # the recorder writes task runs a few seconds after their events
        deadline = time.monotonic() + 300
        while True:
            counts = {kind: (await http.post(f"/{kind}/count", json={})).json()
                      for kind in ("flow_runs", "task_runs")}
            if counts["task_runs"] >= filler.task_runs or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
    return counts


# --- the baseline: the former query loop ----------------------------------------------

def old_case_statuses(only_failed: bool = False, limit: int = 2000) -> list[Any]:
    """The former ``case_statuses``: one task-run request per case."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    from deployments.status import CaseStatus, _label
    from flows.naming import case_id_from_run_name, gpu_from_task_run_name

    with get_client(sync_client=True) as client:
        runs: list[Any] = []
        while len(runs) < limit:
            page = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200, offset=len(runs))
            runs.extend(page)
            if len(page) < 200:
                break
        newest: dict[str, Any] = {}
        for run in sorted(runs, key=lambda r: r.created or datetime.min.replace(tzinfo=UTC),
                          reverse=True):
            case_id = case_id_from_run_name(run.name)
            if case_id is not None:
                newest.setdefault(case_id, run)
        out = []
        for case_id, run in newest.items():
            state_type = run.state.type.value if run.state else "PENDING"
            if only_failed and state_type not in ("FAILED", "CRASHED", "CANCELLED"):
                continue
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            running = sorted(t.name for t in tasks
                             if t.state is not None and t.state.type == StateType.RUNNING)
            held: dict[int, int] = {}
            for t in sorted(tasks, key=lambda t: t.created or datetime.min.replace(tzinfo=UTC)):
                if (beam_gpu := gpu_from_task_run_name(t.name)) is not None:
                    held[beam_gpu[0]] = beam_gpu[1]
            gpus = [f"beam {beam}: GPU {gpu}" for beam, gpu in sorted(held.items())]
            reason = None
            if state_type in ("FAILED", "CRASHED", "CANCELLED") and run.state:
                reason = re.sub(r"^Flow run encountered an exception: (\w+: )?", "",
                                (run.state.message or "").strip()) or None
            duration = run.total_run_time.total_seconds() if run.total_run_time else None
            if state_type == "RUNNING" and run.start_time:
                duration = (datetime.now(UTC) - run.start_time).total_seconds()
            out.append(CaseStatus(
                case_id=case_id, status=_label(state_type, running), steps=running, gpus=gpus,
                started=run.start_time.isoformat(timespec="seconds") if run.start_time else None,
                duration_s=round(duration, 1) if duration is not None else None,
                reason=reason, flow_run_id=str(run.id),
                case_dir=(run.parameters or {}).get("case_dir"),
                attempts=max(1, run.run_count or 1)))
        return out


# --- measuring ------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far; 0 without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timing:
    """Median wall seconds of a call, and the CPU seconds it cost the server and this
    process: on a shared machine the wall time moves with the load, the CPU time less."""

    def __init__(self, call: Callable[[], list[Any]], repeat: int, server_pid: int) -> None:
        self.rows = call()  # warm-up: imports, the client's first connection
        seconds = []
        server_cpu, client_cpu = _cpu_seconds(server_pid), time.process_time()
        for _ in range(repeat):
            began = time.perf_counter()
            self.rows = call()
            seconds.append(time.perf_counter() - began)
        self.server_cpu = (_cpu_seconds(server_pid) - server_cpu) / repeat
        self.client_cpu = (time.process_time() - client_cpu) / repeat
        self.wall = statistics.median(seconds)

    def line(self, label: str, note: str) -> str:
        return (f"{label:<22}{self.wall:8.3f}{self.server_cpu:12.3f}{self.client_cpu:12.3f}"
                f"  {len(self.rows)} rows{note}")


def _comparable(rows: list[Any]) -> list[tuple[Any, ...]]:
    """What both implementations must agree on (a RUNNING row's duration moves on)."""
    return [(r.case_id, r.status, r.steps, r.gpus, r.started, r.reason, r.flow_run_id,
             r.case_dir, r.attempts, r.duration_s if not r.status.startswith("RUNNING")
             else None) for r in rows]


def write_ledger(path: Path, cases: int) -> int:
    """The sensor's ledger beside the runs: every case STARTED, a few folders not (yet).

    Returns how many rows ``mqi status`` shows from it.
    """
    from deployments.intake_ledger import IntakeEntry, IntakeLedger, IntakeState

    ledger = IntakeLedger(path)
    shown = 0
    for plan in _plan(cases):
        ledger.put(IntakeEntry(plan["case_id"], IntakeState.STARTED, since=time.time()))
        if plan["final"] == "RUNNING":  # new content while it runs
            ledger.put(IntakeEntry(plan["case_id"], IntakeState.QUEUED, "waits for its run",
                                   since=time.time()))
            shown += 1
    for i, (state, reason) in enumerate(
            [(IntakeState.WAITING, "no RTPLAN yet")] * 10 + [(IntakeState.ARRIVING, None)] * 3
            + [(IntakeState.REFUSED, "two RTPLANs: plan_a.dcm, plan_b.dcm")] * 5):
        ledger.put(IntakeEntry(f"new-{i:02d}", state, reason, since=time.time()))
        shown += 1
    ledger.close()
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the former per-case implementation")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.status import COMPLETED_GPUS, case_statuses

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-status-"))
    proc, api = start_server(work)
    try:
        began = time.perf_counter()
        counts = asyncio.run(fill(api, args.cases))
        ledger = work / "intake.sqlite3"
        intake = write_ledger(ledger, args.cases)
        print(f"filled in {time.perf_counter() - began:.0f} s: {args.cases} cases, "
              f"{counts['flow_runs']} flow runs, {counts['task_runs']} task runs; "
              f"{intake} folders in the intake ledger not started", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            status = Timing(lambda: case_statuses(ledger=ledger), args.repeat, proc.pid)
            failed = Timing(lambda: case_statuses(only_failed=True, ledger=ledger),
                            args.repeat, proc.pid)
            all_gpus = Timing(lambda: case_statuses(completed_gpus=None), args.repeat, proc.pid)
            print(f"{'':<22}{'wall s':>8}{'server CPU':>12}{'client CPU':>12}  (median wall "
                  f"of {args.repeat} calls; CPU s per call)")
            print(status.line("mqi status", f"; GPUs of the newest {COMPLETED_GPUS} COMPLETED"))
            print(failed.line("mqi status --failed", ""))
            print(all_gpus.line("mqi status --all-gpus", "; no ledger"))
            if not args.no_baseline:
                # about 20 s a call: fewer repetitions
                former = Timing(old_case_statuses, min(args.repeat, 3), proc.pid)
                print(former.line("former (per case)", f"; median of {min(args.repeat, 3)}"))
                print(f"ratio former / mqi status: {former.wall / status.wall:.1f}x wall, "
                      f"{former.server_cpu / status.server_cpu:.1f}x server CPU; "
                      f"former / --all-gpus: {former.wall / all_gpus.wall:.1f}x wall")
                same = _comparable(former.rows) == _comparable(all_gpus.rows)
                print(f"--all-gpus rows the same as the former's: {'yes' if same else 'NO'}")
        print(f"target: < {TARGET_S:g} s for {args.cases} cases -> "
              f"{'met' if status.wall < TARGET_S else 'NOT met'} ({status.wall:.3f} s; "
              f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
