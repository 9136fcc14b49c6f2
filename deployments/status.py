"""Case status from the Prefect API (the state store) and the sensor's intake ledger.

A case's status is that of its newest ``process_case`` flow run (``case-<id>``):
QUEUED, RUNNING_<step>, COMPLETED, FAILED, CRASHED or CANCELLED, with the steps
running now, the GPUs its simulations hold or held, when it started, how long
it took, how often it ran ("try N") and, for a failure, the reason the flow run
recorded. Beside the runs stand the scan-root folders the sensor has not started
(yet): ARRIVING, WAITING, REFUSED or QUEUED in its ledger, with the ledger's
reason and since when. A folder with both (new content WAITING, say) shows its
intake row right above its run row.

How it is read, so that 1,000 cases answer in well under a second
(``python -m bench.status`` measures it):

- The flow runs: one count, then every page at once (the API serves 200 a page).
  The server spends about half a millisecond on each run it sends, so nothing is
  read twice and no filter is left for later.
- The task runs in bulk, a few flow runs a request, never one request per case:
  every task run of each unfinished case (the steps running, the GPUs held) and,
  of a finished case, only its simulation task runs (``run_moqui_sim-beam<N>-gpu<I>``:
  the GPUs it held).
- The answers are read as JSON, not validated into Prefect's models: that alone
  cost about 0.2 ms a run.

GPUs of a finished case are read for every case that is not COMPLETED (FAILED,
CRASHED, CANCELLED: the ones an operator looks into) and for the newest
``COMPLETED_GPUS`` COMPLETED cases. Those of all 1,000 would more than double the
time (2 to 3 simulations a case, each as dear as a flow run); an older COMPLETED
case's GPUs are ``None`` ("…" in the table) and ``mqi status --all-gpus`` reads
them all.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from flows.naming import FLOW_NAME, case_id_from_run_name, gpu_from_task_run_name

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter

    from deployments.intake_ledger import IntakeEntry

from flows.run_states import FAILED, FINISHED

PAGE = 200
"""The most the API serves a request (its default limit)."""
COMPLETED_GPUS = 50
"""How many of the newest COMPLETED cases get their GPUs read (see the module's text)."""
SIMULATION_PREFIX = "run_moqui_sim-beam"
"""What every simulation task run's name starts with (``simulation_task_run_name``):
narrows the server's answer; ``gpu_from_task_run_name`` reads the name exactly."""
RUNS_PER_REQUEST = 40
"""Flow runs a task-run request asks for: their simulations (one a beam, a few
more for retries) or their task runs RUNNING fit in one page."""

T = TypeVar("T")


@dataclass
class CaseStatus:
    case_id: str
    status: str
    steps: list[str]
    gpus: list[str] | None
    """``beam N: GPU I`` per beam; None where they were not read (an older COMPLETED case)."""
    started: str | None
    duration_s: float | None
    reason: str | None
    flow_run_id: str
    """The run of a run row, the active run of a QUEUED intake row, else "" (null in JSON)."""
    case_dir: str | None
    attempts: int = 1
    """How often this flow run ran: `mqi rerun` retries the same run."""
    source: str = "run"
    """``run`` (a flow run) or ``intake`` (a folder the sensor has not started)."""
    qa: str | None = None
    """The dose QA verdict (``PASS``, ``REVIEW``, ``FAIL``, ``NOT ASSESSED``) from the run's
    ``qa:`` tag; None before compare_dose said it, or without it in the workflow."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flow_run_id": self.flow_run_id or None}


def _label(state_type: str, running: list[str]) -> str:
    if state_type in ("SCHEDULED", "PENDING", "PAUSED"):
        return "QUEUED"
    if state_type == "RUNNING":
        step = running[0].split("-beam")[0] if running else "starting"
        return f"RUNNING_{step}"
    return state_type


def case_statuses(only_failed: bool = False, limit: int = 2000, *,
                  ledger: Path | None = None,
                  completed_gpus: int | None = COMPLETED_GPUS) -> list[CaseStatus]:
    """The newest flow run of every case, newest first, with the intake rows of ``ledger``.

    Args:
        only_failed: Only cases whose newest run FAILED, CRASHED or was CANCELLED,
            and folders the sensor REFUSED: what needs the operator.
        limit: At most this many flow runs are read (the newest).
        ledger: The sensor's intake ledger (``intake_ledger.ledger_path``); None, or
            a path where none exists (no sensor on this machine): no intake rows.
        completed_gpus: GPUs are read for this many of the newest COMPLETED cases;
            None: for all of them.
    """
    runs = _run(_read_runs(only_failed, limit, completed_gpus))
    return merged(runs, intake_rows(ledger, only_failed) if ledger is not None else [])


def intake_rows(ledger: Path, only_failed: bool = False) -> list[tuple[float, CaseStatus]]:
    """A row for each folder of the ledger not STARTED (only_failed: REFUSED), with its
    ``since``; none where there is no ledger."""
    from deployments.intake_ledger import IntakeLedger, IntakeState

    return [(e.since, _intake_row(e)) for e in IntakeLedger.read(ledger).values()
            if e.state != IntakeState.STARTED
            and (not only_failed or e.state == IntakeState.REFUSED)]


def merged(runs: list[tuple[float, CaseStatus]],
           intake: list[tuple[float, CaseStatus]]) -> list[CaseStatus]:
    """Run and intake rows, each with its time, newest case first; a case's intake row
    comes right above its run row, the pair placed by the newer of the two times."""
    groups: dict[str, list[tuple[float, CaseStatus]]] = {}
    for when, row in [*intake, *runs]:  # intake first within a case
        groups.setdefault(row.case_id, []).append((when, row))
    ordered = sorted(groups.values(), key=lambda group: max(when for when, _ in group),
                     reverse=True)
    return [row for group in ordered for _, row in group]


def _intake_row(entry: IntakeEntry) -> CaseStatus:
    folder = Path(entry.folder)
    return CaseStatus(
        case_id=folder.name or entry.folder, status=str(entry.state), steps=[], gpus=[],
        started=(datetime.fromtimestamp(entry.since, UTC).isoformat(timespec="seconds")
                 if entry.since else None),
        duration_s=None, reason=entry.reason,
        # the run a QUEUED folder waits for; another state's run (if the ledger kept
        # one) is the run row's, shown below it
        flow_run_id=(entry.flow_run_id or "") if entry.state == "QUEUED" else "",
        case_dir=entry.folder if folder.is_absolute() else None, source="intake")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end from sync code, also where this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _read_runs(only_failed: bool, limit: int,
                     completed_gpus: int | None) -> list[tuple[float, CaseStatus]]:
    """Each case's newest flow run as a row, with the time it was created."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        newest = await _newest_runs(client, only_failed, limit)
        active = [r["id"] for r in newest.values() if _state(r) not in FINISHED]
        finished = [r for r in newest.values() if _state(r) in FINISHED]
        completed = [r["id"] for r in finished if _state(r) == "COMPLETED"]
        gpus_of = active + [r["id"] for r in finished if _state(r) != "COMPLETED"] + \
            completed[:completed_gpus]  # newest first; [:None] is all
        running_of = _chunks(active, RUNS_PER_REQUEST)
        answers = await asyncio.gather(
            *(_task_runs(client, chunk, state="RUNNING") for chunk in running_of),
            *(_task_runs(client, chunk, name_like=SIMULATION_PREFIX)
              for chunk in _chunks(gpus_of, RUNS_PER_REQUEST)))
    running: dict[str, list[str]] = {}
    simulations: dict[str, list[dict[str, Any]]] = {run_id: [] for run_id in gpus_of}
    for index, answer in enumerate(answers):
        for task in answer:
            if index < len(running_of):
                running.setdefault(task["flow_run_id"], []).append(task["name"])
            else:
                simulations[task["flow_run_id"]].append(task)
    return [(_created(run).timestamp(),
             _run_row(case_id, run, running.get(run["id"], []), simulations.get(run["id"])))
            for case_id, run in newest.items()]


async def _newest_runs(client: PrefectClient, only_failed: bool,
                       limit: int) -> dict[str, dict[str, Any]]:
    """Case id -> its newest flow run (JSON), newest case first."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    if only_failed:
        # The failed runs, then all runs of their cases (a newer one means the failure is
        # past): two small reads instead of every run.
        failed = await _flow_runs(client, limit, FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(s) for s in FAILED]))))
        names = sorted({run["name"] for run in failed})
        answers = await asyncio.gather(*(
            _flow_runs(client, limit, FlowRunFilter(name=FlowRunFilterName(any_=chunk)))
            for chunk in _chunks(names, PAGE)))
        runs = [run for answer in answers for run in answer]
    else:
        runs = await _flow_runs(client, limit)
    newest: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=_created, reverse=True):
        case_id = case_id_from_run_name(run["name"])
        if case_id is not None:
            newest.setdefault(case_id, run)
    if only_failed:
        newest = {c: r for c, r in newest.items() if _state(r) in FAILED}
    return newest


async def _post(client: PrefectClient, path: Any, body: dict[str, Any]) -> Any:
    response = await client.request("POST", path, json=body)
    response.raise_for_status()
    return response.json()


async def _flow_runs(client: PrefectClient, limit: int,
                     flow_runs: FlowRunFilter | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` flow runs of process_case (JSON) that ``flow_runs`` selects,
    all pages asked for at once."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    which = {"flows": FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])).model_dump(
        mode="json", exclude_unset=True)}
    if flow_runs is not None:
        which["flow_runs"] = flow_runs.model_dump(mode="json", exclude_unset=True)
    count = await _post(client, "/flow_runs/count", which)
    # The order Prefect's own clients use; a run created meanwhile moves the later pages
    # by one (read twice, counted once below), never past a run.
    sort = FlowRunSort.EXPECTED_START_TIME_DESC.value
    pages = await asyncio.gather(*(
        _post(client, "/flow_runs/filter", {**which, "sort": sort,
                                            "limit": min(PAGE, limit - offset),
                                            "offset": offset})
        for offset in range(0, min(count, limit), PAGE)))
    unique = {run["id"]: run for page in pages for run in page}
    return list(unique.values())


async def _task_runs(client: PrefectClient, flow_run_ids: list[str], *,
                     name_like: str | None = None,
                     state: str | None = None) -> list[dict[str, Any]]:
    """The task runs (JSON) of these flow runs whose name has ``name_like`` / in ``state``."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    tasks = TaskRunFilter(
        name=TaskRunFilterName(like_=name_like) if name_like is not None else None,
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType(state)]))
        if state is not None else None)
    body: dict[str, Any] = {
        "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids]))
        .model_dump(mode="json", exclude_unset=True),
        "task_runs": tasks.model_dump(mode="json", exclude_none=True), "limit": PAGE}
    out: list[dict[str, Any]] = []
    while True:  # one page, but for cases of unusually many beams or retries
        page = await _post(client, "/task_runs/filter", {**body, "offset": len(out)})
        out.extend(page)
        if len(page) < PAGE:
            return out


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _created(item: dict[str, Any]) -> datetime:
    return _when(item.get("created")) or datetime.min.replace(tzinfo=UTC)


def _state(run: dict[str, Any]) -> str:
    return str((run.get("state") or {}).get("type") or "PENDING")


def _run_row(case_id: str, run: dict[str, Any], running: list[str],
             simulations: list[dict[str, Any]] | None) -> CaseStatus:
    """A run row from the flow run, the names of its task runs RUNNING and its
    simulation task runs (None: not read)."""
    state_type = _state(run)
    # Only an unfinished run has steps running: a crashed run's task runs may stay RUNNING.
    running = sorted(running) if state_type not in FINISHED else []
    gpus = None
    if simulations is not None:
        # The GPU a simulation holds is part of its task run's name (set by the task
        # once it holds the index); the newest run of each beam counts.
        held: dict[int, int] = {}
        for task in sorted(simulations, key=_created):
            if (beam_gpu := gpu_from_task_run_name(task["name"])) is not None:
                held[beam_gpu[0]] = beam_gpu[1]
        gpus = [f"beam {beam}: GPU {gpu}" for beam, gpu in sorted(held.items())]
    reason = None
    if state_type in FAILED:
        reason = re.sub(r"^Flow run encountered an exception: (\w+: )?", "",
                        ((run.get("state") or {}).get("message") or "").strip()) or None
    start = _when(run.get("start_time"))
    duration = run.get("total_run_time") or None  # seconds; 0 before it ran
    if state_type == "RUNNING" and start is not None:
        duration = (datetime.now(UTC) - start).total_seconds()
    return CaseStatus(
        case_id=case_id, status=_label(state_type, running), steps=running, gpus=gpus,
        started=start.isoformat(timespec="seconds") if start else None,
        duration_s=round(duration, 1) if duration is not None else None,
        reason=reason, flow_run_id=str(run["id"]),
        case_dir=(run.get("parameters") or {}).get("case_dir"),
        attempts=max(1, run.get("run_count") or 1), qa=qa_from_tags(run.get("tags") or []))


def qa_from_tags(tags: list[str]) -> str | None:
    """``qa:review`` → ``REVIEW``, ``qa:not-assessed`` → ``NOT ASSESSED``; None without one."""
    found = [t.removeprefix("qa:") for t in tags if t.startswith("qa:")]
    return found[-1].replace("-", " ").upper() if found else None


def shown(text: str) -> str:
    """Text as one table cell: repr'd when it holds control characters (a newline too)."""
    return text if text.isprintable() else repr(text)


def format_table(rows: list[CaseStatus], only_failed: bool = False) -> str:
    """Human-readable lines, one a row: case, status, GPUs, started, duration, reason."""
    if not rows:
        return "no failed cases" if only_failed else "no cases yet"
    lines = [f"{'CASE':<34} {'STATUS':<26} {'QA':<12} {'GPU':<22} {'STARTED':<20} "
             f"{'DURATION':>9}  REASON"]
    for r in rows:
        reason = shown(r.reason)[:120] if r.reason else ""
        duration = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        gpus = "…" if r.gpus is None else ", ".join(
            g.replace("beam ", "b").replace(": GPU ", "→") for g in r.gpus) or "-"
        status = r.status if r.attempts == 1 else f"{r.status} (try {r.attempts})"
        lines.append(f"{shown(r.case_id):<34} {status:<26} {r.qa or '-':<12} {gpus:<22} "
                     f"{r.started or '-':<20} {duration:>9}  {reason}")
    if any(r.gpus is None for r in rows):
        lines.append("(GPU …: not read for older COMPLETED cases; `mqi status --all-gpus` "
                     "reads them)")
    return "\n".join(lines)
