"""What Prefect knows about the runs behind the GPU host's folders, pid files and locks.

A run folder is named by the short id of the flow run that works in it
(flows/layout.py): its own id, or, for a run that took over an ended run's
folder (``mqi rerun`` of a run made by ``mqi run``), the id in its ``resume``
parameter. ``RunIndex`` maps each short id to the runs using that folder, and
keeps the remote-stage task runs Prefect believes are RUNNING.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from flows.naming import FLOW_NAME, SIMULATION_TASK, case_id_from_run_name, run_name, short_run_id
from flows.run_states import ACTIVE
from flows.run_states import FINISHED as ENDED

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

PAGE = 200
"""Prefect's largest page of runs."""
_STAGE_TASK = re.compile(r"(?P<step>[A-Za-z_][A-Za-z0-9_]*?)(?:-beam(?P<beam>\d+))?(?:-gpu\d+)?")


@dataclass(frozen=True)
class RunInfo:
    """One ``process_case`` flow run, as far as the curator needs it.

    Attributes:
        id: The flow run's id.
        name: ``case-<case_id>``.
        case_id: From the name.
        state: Its state type (``RUNNING``, ``COMPLETED``, ...).
        folder: The short id of the run folder it works in (``resume`` or its own id).
        changed: When its state last changed.
        ended: When it ended; None while active.
    """

    id: str
    name: str
    case_id: str
    state: str
    folder: str
    changed: datetime | None
    ended: datetime | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass(frozen=True)
class StageTask:
    """A task run of a remote stage that Prefect believes is RUNNING.

    Attributes:
        id: The task run's id.
        flow_run_id: Its flow run.
        name: Its name (``run_moqui_sim-beam2-gpu0``, ``run_interpreter``, ...).
        step: The step, from the name.
        beam: The beam, for per-beam steps.
        started: When it entered RUNNING.
    """

    id: str
    flow_run_id: str
    name: str
    step: str
    beam: int | None
    started: datetime | None


@dataclass
class RunIndex:
    """The runs that use the folders the curator found, and the RUNNING ones.

    Attributes:
        by_folder: Short id of a run folder → the runs working in it, newest first.
        running: Every RUNNING ``process_case`` run.
        stages: Flow run id → its remote-stage task runs that are RUNNING.
    """

    by_folder: dict[str, list[RunInfo]] = field(default_factory=dict)
    running: list[RunInfo] = field(default_factory=list)
    stages: dict[str, list[StageTask]] = field(default_factory=dict)

    def users(self, case_id: str, short: str) -> list[RunInfo]:
        """The runs of ``case_id`` that work in folder ``run-<short>``, newest first."""
        return [r for r in self.by_folder.get(short, []) if r.case_id == case_id]

    def simulation(self, case_id: str, short: str, beam: int | None) -> str | None:
        """``case-<id> › run_moqui_sim-beam<N>-gpu<I>``: the running simulation task run
        of that folder and beam, as Prefect names it; None when there is none."""
        for run in self.users(case_id, short):
            for stage in self.stages.get(run.id, []):
                if stage.step == "run_moqui_sim" and stage.beam == beam:
                    return f"{run.name} › {stage.name}"
        return None


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _info(run: Any) -> RunInfo | None:
    case_id = case_id_from_run_name(run.name or "")
    if case_id is None:
        return None
    try:
        folder = short_run_id((run.parameters or {}).get("resume") or run.id)
    except ValueError:
        return None
    state = run.state
    return RunInfo(id=str(run.id), name=run.name, case_id=case_id,
                   state=state.type.value if state else "SCHEDULED", folder=folder,
                   changed=_when(state.timestamp) if state else None,
                   ended=_when(run.end_time) if state and state.type.value in ENDED else None)


def _read(client: SyncPrefectClient, **filters: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
    found: list[Any] = []
    while True:
        page = client.read_flow_runs(flow_filter=flows, limit=PAGE, offset=len(found),
                                     **filters)
        found += page
        if len(page) < PAGE:
            return found


def read_runs(client: SyncPrefectClient, case_ids: Iterable[str]) -> RunIndex:
    """Every run of these cases, the RUNNING runs of any case, and their running stages."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    names = sorted({run_name(c) for c in case_ids})
    raw = [run for i in range(0, len(names), 50)
           for run in _read(client, flow_run_filter=FlowRunFilter(
               name=FlowRunFilterName(any_=names[i:i + 50])))]
    raw += _read(client, flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    index = RunIndex()
    runs = {info.id: info for info in map(_info, raw) if info is not None}
    for info in sorted(runs.values(), key=lambda r: r.changed or datetime.min.replace(tzinfo=UTC),
                       reverse=True):
        index.by_folder.setdefault(info.folder, []).append(info)
    index.running = [r for r in runs.values() if r.state == "RUNNING"]
    ids = [UUID(r.id) for r in index.running]
    for i in range(0, len(ids), 50):
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[i:i + 50])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.RUNNING]))), limit=PAGE)
        for task in tasks:
            stage = stage_task(task)
            if stage is not None:
                index.stages.setdefault(stage.flow_run_id, []).append(stage)
    return index


def stage_task(task: Any) -> StageTask | None:
    """A task run as a remote stage (``<step>[-beam<N>][-gpu<I>]``); None for another."""
    match = _STAGE_TASK.fullmatch(task.name or "")
    if match is None or task.flow_run_id is None:
        return None
    sim = SIMULATION_TASK.fullmatch(task.name)
    beam = match.group("beam") or (sim.group(1) if sim else None)
    state = task.state
    return StageTask(id=str(task.id), flow_run_id=str(task.flow_run_id), name=task.name,
                     step=match.group("step"), beam=int(beam) if beam else None,
                     started=_when(state.timestamp) if state else None)
