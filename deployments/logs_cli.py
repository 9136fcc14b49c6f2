"""`mqi logs CASE_ID [--step S] [--beam N]`: a case's stage logs, patient ids redacted.

The full output of every remote stage is kept as a file in the case's results
folder (``<results_root>/<case>/logs/<step>.log``, ``<step>-beam<N>.log``:
flows/remote_stage.py); those are printed when they are there. Otherwise
(another machine's results folder, a stage that runs no command such as
``inspect``) the log lines the newest flow run of the case sent to the Prefect
API are printed instead.

Everything printed passes the case's redactor, made from its folder (the scan
root's, or the one its flow run names). Where that folder is gone, the ids the
logs themselves show in ``.ptn``/``.mgn`` file names are redacted, and that is
said on stderr.

Nothing here imports Prefect at module level (the CLI sets the API address first).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import MqiConfig, MqiError
from config.redaction import Redactor
from flows.case_inspection import ID_BEARING_SUFFIXES, case_redactor, pseudonym
from flows.commands import CaseIdError, validate_case_id
from flows.layout import results_dir
from flows.naming import run_name

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

LOG_FILE = re.compile(r"(?P<step>[A-Za-z0-9_]+?)(?:-beam(?P<beam>\d+))?\.log")
TASK_RUN = re.compile(r"(?P<step>[A-Za-z0-9_]+?)(?:-beam(?P<beam>\d+))?(?:-gpu\d+)?")
ID_IN_NAME = re.compile(r"[\w.-]+(?:" + "|".join(re.escape(s) for s in ID_BEARING_SUFFIXES)
                        + r")\b", re.IGNORECASE)


class NoLogs(MqiError):
    """The case, or the stage asked for, has no logs here nor on the API."""


@dataclass(frozen=True)
class StageLogText:
    """One stage's log: where it came from, and its lines."""

    title: str
    lines: list[str]


def wanted(step: str, beam: str | None, want_step: str | None, want_beam: int | None) -> bool:
    if want_step is not None and step != want_step:
        return False
    return want_beam is None or (beam is not None and int(beam) == want_beam)


def from_results(cfg: MqiConfig, case_id: str, step: str | None,
                 beam: int | None) -> list[StageLogText]:
    """The stage log files in the case's results folder that match, in name order."""
    folder = results_dir(cfg, case_id) / "logs"
    found = []
    for path in sorted(folder.glob("*.log")) if folder.is_dir() else []:
        match = LOG_FILE.fullmatch(path.name)
        if match and wanted(match["step"], match["beam"], step, beam):
            text = path.read_text(encoding="utf-8", errors="replace")
            found.append(StageLogText(str(path), text.splitlines()))
    return found


def newest_run(client: SyncPrefectClient, case_id: str) -> Any | None:
    """The case's newest flow run (any state), or None."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name(case_id)])),
        sort=FlowRunSort.START_TIME_DESC, limit=1)
    return runs[0] if runs else None


def from_api(client: SyncPrefectClient, run: Any, step: str | None,
             beam: int | None) -> list[StageLogText]:
    """The log lines the run and its matching task runs sent to the API, per task run."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)
    names = {}
    for task in tasks:
        match = TASK_RUN.fullmatch(task.name)
        if match and wanted(match["step"], match["beam"], step, beam):
            names[task.id] = task.name
    by_task: dict[Any, list[str]] = {}
    for log in _all_logs(client, LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))):
        if log.task_run_id in names or (log.task_run_id is None and step is None):
            stamp = log.timestamp.strftime("%H:%M:%S") if log.timestamp else ""
            by_task.setdefault(log.task_run_id, []).append(f"{stamp} {log.message}")
    out = []
    for task_id, lines in by_task.items():
        what = f"task run {names[task_id]}" if task_id is not None else "the flow run itself"
        out.append(StageLogText(f"{what} of flow run {run.name} ({run.id}), from the "
                                f"Prefect API", lines))
    return out


def _all_logs(client: SyncPrefectClient, log_filter: Any) -> Iterator[Any]:
    page = 200
    offset = 0
    while True:
        logs = client.read_logs(log_filter=log_filter, limit=page, offset=offset)
        yield from logs
        if len(logs) < page:
            return
        offset += page


def redactor_for(cfg: MqiConfig, case_dir: Path | None) -> Redactor | None:
    """The case's redactor from its folder; None where no folder can be read."""
    if case_dir is None or not case_dir.is_dir():
        return None
    return case_redactor(case_dir, pseudonym(cfg))


def from_file_names(cfg: MqiConfig, logs: list[StageLogText]) -> Redactor:
    """The ids the logs show in ``.ptn``/``.mgn`` names (``02_<id>_<plan>_...``)."""
    ids = set()
    for log in logs:
        for line in log.lines:
            for name in ID_IN_NAME.findall(line):
                parts = Path(name).stem.split("_")
                if len(parts) >= 3:
                    ids.add(parts[1])
    return Redactor(ids, pseudonym(cfg) or "[patient]")


def case_logs(cfg: MqiConfig, case_id: str, step: str | None = None,
              beam: int | None = None) -> Iterator[str]:
    """The lines ``mqi logs`` prints: a header per stage log, then its lines, redacted.

    Raises:
        MqiError: The case id is not valid, or there are no such logs.
    """
    try:
        validate_case_id(case_id, cfg.cases.id_pattern)
    except CaseIdError as exc:
        raise NoLogs(str(exc)) from None
    logs = from_results(cfg, case_id, step, beam)
    case_dir = Path(cfg.scanner.target_directory) / case_id
    where = f"{results_dir(cfg, case_id) / 'logs'}"
    if not logs or not case_dir.is_dir():
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = newest_run(client, case_id)
            if run is not None:
                given = (run.parameters or {}).get("case_dir")
                if given and not case_dir.is_dir():
                    case_dir = Path(str(given))
                if not logs:
                    logs = from_api(client, run, step, beam)
                    where += " nor on the Prefect API"
    if not logs:
        what = f"step {step}" if step else "stage"
        what += f", beam {beam}" if beam is not None else ""
        raise NoLogs(f"case {case_id}: no {what} logs in {where}")
    redactor = redactor_for(cfg, case_dir)
    if redactor is None:
        print(f"mqi: the folder of case {case_id} is gone: only the patient ids its logs "
              f"show in file names are redacted", file=sys.stderr)
        redactor = from_file_names(cfg, logs)
    for log in logs:
        yield f"==> {redactor.redact(log.title)} <=="
        for line in log.lines:
            yield redactor.redact(line)
