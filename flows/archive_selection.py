"""Which cases the archiver may take, from their process_case runs in the Prefect API.

A case is due when its newest ``case-<id>`` run COMPLETED more than
``archiver.keep_days`` ago, no run of it is active (scheduled, pending, running,
paused, cancelling), and its folder in the scan root has not changed since that
run started (new content waits for its own run). A case whose newest run FAILED,
CRASHED or was CANCELLED is left alone unless ``archiver.include_failed``. Every
case left alone says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from config import MqiConfig
from flows.case_inspection import content_digest
from flows.commands import CaseIdError, validate_case_id
from flows.layout import results_dir
from flows.naming import FLOW_NAME, case_id_from_run_name, run_name
from flows.run_states import ACTIVE, FAILED

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

PAGE = 200


class Verdict(StrEnum):
    DUE = "due"
    NOT_DUE = "not due"
    LEFT_ALONE = "left alone"
    GONE = "gone"
    """Neither folder is there any more (archived before, or removed by hand)."""


class Candidate(BaseModel):
    """One case and what the archiver makes of it."""

    case_id: str
    verdict: Verdict
    reason: str = ""
    run_id: str = ""
    state: str = ""
    ended: datetime | None = None
    age_days: float | None = None
    input_dir: str | None = None
    """The case folder in the scan root, when it is there and ``include_inputs``."""
    results_dir: str | None = None


def process_case_runs(client: SyncPrefectClient,
                      case_id: str | None = None) -> Iterator[FlowRun]:
    """Every process_case flow run (of ``case_id`` only, when given), page by page."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    which = None if case_id is None else FlowRunFilter(
        name=FlowRunFilterName(any_=[run_name(case_id)]))
    offset = 0
    while True:
        page = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=which, sort=FlowRunSort.ID_DESC, limit=PAGE, offset=offset)
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def select_cases(cfg: MqiConfig, client: SyncPrefectClient, now: datetime,
                 only: str | None = None) -> list[Candidate]:
    """Every case with a process_case run (or ``only`` that one), judged, by case id."""
    runs: dict[str, list[FlowRun]] = {}
    for run in process_case_runs(client, only):
        case_id = case_id_from_run_name(run.name)
        if case_id is not None:
            runs.setdefault(case_id, []).append(run)
    if only is not None and only not in runs:
        return [Candidate(case_id=only, verdict=Verdict.LEFT_ALONE,
                          reason="no process_case run of it is known")]
    return [judge(cfg, case_id, runs[case_id], now) for case_id in sorted(runs)]


def _state(run: FlowRun) -> str:
    return run.state.type.value if run.state is not None else "PENDING"


def judge(cfg: MqiConfig, case_id: str, runs: list[FlowRun], now: datetime) -> Candidate:
    """What the archiver makes of one case, given all its runs."""
    newest = max(runs, key=lambda r: r.created or datetime.min.replace(tzinfo=now.tzinfo))
    seen = Candidate(case_id=case_id, verdict=Verdict.LEFT_ALONE, run_id=str(newest.id),
                     state=_state(newest))
    try:
        validate_case_id(case_id, cfg.cases.id_pattern)
    except CaseIdError:
        return seen.model_copy(update={"reason": "its id does not match cases.id_pattern"})
    folder = Path(cfg.scanner.target_directory) / case_id
    if folder.is_symlink():
        return seen.model_copy(update={"reason": "its folder in the scan root is a link"})
    results = results_dir(cfg, case_id)
    if results.is_symlink():
        return seen.model_copy(update={"reason": "its results folder is a link"})
    seen.input_dir = str(folder) if cfg.archiver.include_inputs and folder.is_dir() else None
    seen.results_dir = str(results) if results.is_dir() else None
    active = sorted({_state(r) for r in runs if _state(r) in ACTIVE})
    if active:
        return seen.model_copy(update={"reason": f"it has an active run ({', '.join(active)})"})
    if seen.input_dir is None and seen.results_dir is None:
        if folder.is_dir():  # its input stays (archiver.include_inputs is off): not gone
            return seen.model_copy(update={"reason": "nothing of it is left to archive; "
                                                     "its folder stays in the scan root"})
        return seen.model_copy(update={"verdict": Verdict.GONE,
                                       "reason": "nothing of it is left to archive"})
    if seen.state in FAILED and not cfg.archiver.include_failed:
        return seen.model_copy(update={"reason": f"its newest run is {seen.state} "
                                                 f"(archiver.include_failed is off)"})
    if seen.state != "COMPLETED" and seen.state not in FAILED:
        return seen.model_copy(update={"reason": f"its newest run is {seen.state}"})
    ended = _plain(newest.end_time or (newest.state.timestamp if newest.state else None)
                   or newest.created or now)
    seen.ended = ended
    seen.age_days = (now - ended).total_seconds() / 86400
    keep = cfg.archiver.keep_days
    if now - ended < timedelta(days=keep):
        return seen.model_copy(update={
            "verdict": Verdict.NOT_DUE,
            "reason": f"{seen.state} {seen.age_days:.1f} days ago; archived after {keep}"})
    if seen.input_dir is not None and _changed_since_run(cfg, folder, newest):
        return seen.model_copy(update={
            "reason": "its folder in the scan root changed after its last run started "
                      "(new content is processed before anything is archived)"})
    return seen.model_copy(update={"verdict": Verdict.DUE, "reason": f"{seen.state} "
                                   f"{seen.age_days:.1f} days ago (keep_days {keep})"})


def _plain(when: datetime) -> datetime:
    """A stdlib datetime in UTC (Prefect's own datetime type does its arithmetic its way)."""
    return datetime.fromtimestamp(when.timestamp(), UTC)


def _newest_change(folder: Path) -> float:
    """The newest mtime or ctime in ``folder``, its sub-folders and files (stats only):
    a file added, rewritten, removed or renamed, even with an old mtime, moves it."""
    newest = 0.0
    for dirpath, _, filenames in os.walk(folder):
        for path in (dirpath, *(os.path.join(dirpath, n) for n in filenames)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            newest = max(newest, st.st_mtime, st.st_ctime)
    return newest


def _changed_since_run(cfg: MqiConfig, folder: Path, run: FlowRun) -> bool:
    """True when the case folder may hold content its last run did not process.

    The stats say first; when they say "changed" and the run was made for a known
    content digest (the sensor's idempotency key), the content itself decides:
    a folder touched but not changed is archived all the same.
    """
    started = run.start_time or run.created
    if started is None or _newest_change(folder) <= started.timestamp():
        return False
    case_id = folder.name
    key = run.idempotency_key or ""
    if not key.startswith(f"{case_id}:"):
        return True
    made_for = key.removeprefix(f"{case_id}:")[:32]
    try:
        return content_digest(folder, ignore={cfg.scanner.ready_marker})[:32] != made_for
    except OSError:
        return True


def active_states(client: SyncPrefectClient, case_id: str) -> list[str]:
    """The states of the case's runs that have not ended: asked again right before
    anything is deleted (a rerun may have started meanwhile)."""
    return sorted({_state(r) for r in process_case_runs(client, case_id)
                   if _state(r) in ACTIVE})
