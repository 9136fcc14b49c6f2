"""Case status from the Prefect API (the state store): one line per case.

A case's status is that of its newest ``process_case`` flow run (``case-<id>``):
QUEUED, RUNNING_<step>, COMPLETED, FAILED, CRASHED or CANCELLED, with the steps
running now, the GPUs its simulations hold or held, when it started, how long
it took and, for a failure, the reason the flow run recorded.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from flows.naming import FLOW_NAME, case_id_from_run_name, gpu_from_task_run_name


@dataclass
class CaseStatus:
    case_id: str
    status: str
    steps: list[str]
    gpus: list[str]
    started: str | None
    duration_s: float | None
    reason: str | None
    flow_run_id: str
    case_dir: str | None
    attempts: int = 1
    """How often this flow run ran: `mqi rerun` retries the same run."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(state_type: str, running: list[str]) -> str:
    if state_type in ("SCHEDULED", "PENDING", "PAUSED"):
        return "QUEUED"
    if state_type == "RUNNING":
        step = running[0].split("-beam")[0] if running else "starting"
        return f"RUNNING_{step}"
    return state_type


def case_statuses(only_failed: bool = False, limit: int = 2000) -> list[CaseStatus]:
    """The newest flow run of every case, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs: list[Any] = []
        while len(runs) < limit:  # the API serves at most 200 a page
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
            # The GPU a simulation holds is part of its task run's name (set by the
            # task once it holds the index); the newest run of each beam counts.
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


def format_table(rows: list[CaseStatus], only_failed: bool = False) -> str:
    """Human-readable lines: case, status, steps, GPUs, started, duration, reason."""
    if not rows:
        return "no failed cases" if only_failed else "no cases yet"
    lines = [f"{'CASE':<34} {'STATUS':<26} {'GPU':<22} {'STARTED':<20} {'DURATION':>9}  REASON"]
    for r in rows:
        reason = (r.reason or "").splitlines()[0][:120] if r.reason else ""
        duration = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        gpus = ", ".join(g.replace("beam ", "b").replace(": GPU ", "→") for g in r.gpus) or "-"
        status = r.status if r.attempts == 1 else f"{r.status} (try {r.attempts})"
        lines.append(f"{r.case_id:<34} {status:<26} {gpus:<22} {r.started or '-':<20} "
                     f"{duration:>9}  {reason}")
    return "\n".join(lines)
