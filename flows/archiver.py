"""The archiver: finished cases out of the scan root and the results root, into one
verified archive each (docs/archiver.md).

    archive_cases(dry_run=False, case_id=None)

Scheduled by the ``archive-cases`` deployment on ``archiver.schedule_cron``, or
run by hand with `mqi archive`. Which cases: flows/archive_selection.py; the
files: flows/archive_files.py. A case that cannot be archived (full disk,
unreadable file, checksum mismatch...) keeps every original and says why; the
others are archived all the same, and the flow run then ends Failed, naming each
failed case. The next run tries again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from config import MqiConfig, MqiError
from config.redaction import install
from flows.archive_files import (
    INPUT,
    RESULTS,
    ArchiveError,
    append_index,
    archive_name,
    check_report,
    check_unchanged,
    collect,
    delete_originals,
    exclusive,
    pack,
    scan,
)
from flows.archive_selection import Candidate, Verdict, active_states, select_cases
from flows.case_inspection import case_redactor, pseudonym
from flows.commands import validate_case_id
from flows.naming import ARCHIVER_FLOW
from flows.settings import flow_config


class Outcome(BaseModel):
    """What became of one case (or would, in a dry run)."""

    case_id: str
    action: str
    """archived, would archive, failed, left alone, not due, gone."""
    reason: str = ""
    age_days: float | None = None
    input_files: int = 0
    input_bytes: int = 0
    result_files: int = 0
    result_bytes: int = 0
    archive: str | None = None
    archive_bytes: int | None = None
    deletes: list[str] = []
    """The folders deleted (or that a dry run would delete)."""

    def line(self) -> str:
        """One line for the log and the terminal."""
        text = f"case {self.case_id}: {self.action}"
        if self.age_days is not None:
            text += f" (ended {self.age_days:.1f} days ago)"
        if self.action in ("archived", "would archive"):
            text += (f": input {self.input_files} files, {_mb(self.input_bytes)}; results "
                     f"{self.result_files} files, {_mb(self.result_bytes)}; → {self.archive}")
            if self.archive_bytes is not None:
                text += f" ({_mb(self.archive_bytes)})"
            verb = "deleted" if self.action == "archived" else "would delete"
            text += f"; {verb}: {', '.join(self.deletes) or 'nothing'}"
        elif self.reason:
            text += f": {self.reason}"
        return text


class ArchiveReport(BaseModel):
    dry_run: bool
    outcomes: list[Outcome]
    pruned_runs: int | None = None
    """Flow runs deleted (or that would be); None: pruning is off or was not asked for."""
    not_due: int = 0
    """Cases with a COMPLETED run younger than ``keep_days`` (not listed one by one)."""
    keep_days: int = 0

    def lines(self) -> list[str]:
        out = [o.line() for o in self.outcomes]
        if self.not_due:
            out.append(f"{self.not_due} case(s) not due yet (archiver.keep_days "
                       f"{self.keep_days})")
        if self.pruned_runs is not None:
            verb = "would delete" if self.dry_run else "deleted"
            out.append(f"{verb} {self.pruned_runs} finished flow run(s) older than "
                       f"archiver.prune_runs_after_days")
        return out

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "failed"]


class ArchivingFailed(MqiError):
    """Some cases could not be archived (the others were); ``report`` says all."""

    def __init__(self, report: ArchiveReport | dict[str, Any]) -> None:
        self.report = ArchiveReport.model_validate(report)
        failed = self.report.failed
        super().__init__(f"{len(failed)} case(s) could not be archived: " +
                         "; ".join(f"{o.reason}" for o in failed))

    def __reduce__(self) -> tuple[object, ...]:
        return (ArchivingFailed, (self.report.model_dump(mode="json"),))


def _mb(size: int) -> str:
    """A size as people read it: 37.4 kB, 45.1 MB, 1.20 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size} B"


def _run_name() -> str:
    from prefect.runtime import flow_run

    return "archive-dry-run" if flow_run.parameters.get("dry_run") else "archive"


def _sizes(folder: str | None, case_id: str) -> tuple[int, int]:
    if folder is None:
        return 0, 0
    found = scan(Path(folder), case_id)
    return len(found), sum(st.st_size for st in found.values())


def _plan(cfg: MqiConfig, case: Candidate, now: datetime) -> Outcome:
    """What archiving ``case`` would do, from stats alone (a dry run)."""
    outcome = Outcome(case_id=case.case_id, action="would archive", age_days=case.age_days,
                      archive=str(Path(cfg.archiver.archive_dir) /
                                  archive_name(case.case_id, now)),
                      deletes=[d for d in (case.input_dir, case.results_dir) if d])
    try:
        outcome.input_files, outcome.input_bytes = _sizes(case.input_dir, case.case_id)
        outcome.result_files, outcome.result_bytes = _sizes(case.results_dir, case.case_id)
    except ArchiveError as exc:
        return Outcome(case_id=case.case_id, action="would fail", reason=str(exc),
                       age_days=case.age_days)
    return outcome


@task(name="archive-case", task_run_name="archive-{case.case_id}", cache_policy=NO_CACHE,
      persist_result=False)
def archive_case(case: Candidate, now: datetime) -> Outcome:
    """Archive one due case: manifest, pack, read back and verify, index, delete.

    Raises:
        ArchiveError: Naming the case and the problem; nothing was deleted (unless
            the deletion itself failed, which it says).
    """
    cfg = flow_config()
    archive_dir = Path(cfg.archiver.archive_dir)
    case_id = case.case_id
    if case.input_dir:
        # Every message from here on hides the case's patient ids, whatever builds it.
        install(case_redactor(case.input_dir, pseudonym(cfg)))
    # The manifests are read whole before anything is packed: what the archive is
    # checked against is what was there, not what packing happened to read.
    inputs = collect(Path(case.input_dir), INPUT, case_id) if case.input_dir else None
    results = collect(Path(case.results_dir), RESULTS, case_id) if case.results_dir else None
    if results is not None:
        listed = check_report(results, case_id, required=case.state == "COMPLETED")
        get_run_logger().info("case %s: %d result file(s) checked against report.md",
                              case_id, listed)
    sets = [s for s in (inputs, results) if s is not None]
    packed = pack(case_id, sets, archive_dir, now)
    try:
        check_unchanged(sets, case_id)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            active = active_states(client, case_id)
        if active:
            raise ArchiveError(case_id, f"a run of it became active meanwhile "
                                        f"({', '.join(active)})")
        outcome = Outcome(
            case_id=case_id, action="archived", age_days=case.age_days,
            input_files=len(inputs.entries) if inputs else 0,
            input_bytes=inputs.bytes if inputs else 0,
            result_files=len(results.entries) if results else 0,
            result_bytes=results.bytes if results else 0,
            archive=str(packed.path), archive_bytes=packed.size)
        record = {
            "case_id": case_id, "archived_at": now.isoformat(timespec="seconds"),
            "archive": str(packed.path), "sha256": packed.sha256,
            "archive_bytes": packed.size, "input_files": outcome.input_files,
            "input_bytes": outcome.input_bytes, "result_files": outcome.result_files,
            "result_bytes": outcome.result_bytes, "inputs_included": inputs is not None,
            "flow_run_id": case.run_id, "run_state": case.state,
            "run_ended": case.ended.isoformat(timespec="seconds") if case.ended else None}
        try:
            append_index(archive_dir, record)
        except OSError as exc:
            raise ArchiveError(case_id, f"cannot write the archive index: "
                                        f"{exc.strerror or type(exc).__name__}") from None
    except BaseException:
        packed.path.unlink(missing_ok=True)  # not indexed, nothing deleted: take it back
        raise
    outcome.deletes = delete_originals(sets, case_id)
    get_run_logger().info("%s", outcome.line())
    return outcome


@flow(name=ARCHIVER_FLOW, flow_run_name=_run_name, log_prints=False)
def archive_cases(dry_run: bool = False, case_id: str | None = None) -> ArchiveReport:
    """Archive every case whose newest run COMPLETED more than ``archiver.keep_days`` ago.

    Args:
        dry_run: Only say what would be done (case, age, sizes, what would be
            deleted); change nothing.
        case_id: Only this case (and then also say why it is not due).

    Raises:
        ArchivingFailed: One or more cases could not be archived (the others were).
    """
    from prefect.client.orchestration import get_client

    cfg = flow_config()
    log = get_run_logger()
    if case_id is not None:
        validate_case_id(case_id, cfg.cases.id_pattern)
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        candidates = select_cases(cfg, client, now, only=case_id)
    outcomes: list[Outcome] = []
    due = [c for c in candidates if c.verdict == Verdict.DUE]
    for case in candidates:
        if case.verdict == Verdict.DUE:
            continue
        if case.verdict == Verdict.LEFT_ALONE or case_id is not None:
            outcomes.append(Outcome(case_id=case.case_id, action=str(case.verdict),
                                    reason=case.reason, age_days=case.age_days))
            log.info("%s", outcomes[-1].line())
    waiting = sum(c.verdict == Verdict.NOT_DUE for c in candidates)
    if waiting and case_id is None:
        log.info("%d case(s) not due yet (keep_days %d)", waiting, cfg.archiver.keep_days)
    pruned: int | None = None
    if dry_run:
        for case in due:
            outcomes.append(_plan(cfg, case, now))
            log.info("%s", outcomes[-1].line())
        if case_id is None and cfg.archiver.prune_runs_after_days:
            pruned = len(_prunable(cfg, candidates, set(), now))
    else:
        with exclusive(Path(cfg.archiver.archive_dir)):
            for case in due:
                state = archive_case(case, now, return_state=True)
                if state.is_completed():
                    outcomes.append(state.result())
                    continue
                problem = state.message or state.type.value
                error = state.result(raise_on_failure=False)
                if isinstance(error, ArchiveError):
                    problem = str(error)
                outcomes.append(Outcome(case_id=case.case_id, action="failed",
                                        reason=problem, age_days=case.age_days))
                log.error("%s", problem)
            if case_id is None and cfg.archiver.prune_runs_after_days:
                archived = {o.case_id for o in outcomes if o.action == "archived"}
                pruned = _prune(cfg, candidates, archived, now)
                log.info("deleted %d finished flow run(s) older than %d days", pruned,
                         cfg.archiver.prune_runs_after_days)
    outcomes.sort(key=lambda o: o.case_id)
    report = ArchiveReport(dry_run=dry_run, outcomes=outcomes, pruned_runs=pruned,
                           not_due=waiting if case_id is None else 0,
                           keep_days=cfg.archiver.keep_days)
    if report.failed:
        raise ArchivingFailed(report)
    if not due:
        log.info("nothing to archive")
    return report


def _prunable(cfg: MqiConfig, candidates: list[Candidate], archived: set[str],
              now: datetime) -> list[Any]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from flows.run_pruning import prunable_runs

    days = cfg.archiver.prune_runs_after_days or 0
    # A case still here keeps its newest run: status, rerun and the archiver's clock.
    keep = {UUID(c.run_id) for c in candidates
            if c.run_id and c.verdict != Verdict.GONE and c.case_id not in archived}
    if flow_run.id:
        keep.add(UUID(flow_run.id))
    with get_client(sync_client=True) as client:
        return prunable_runs(client, now - timedelta(days=days), [ARCHIVER_FLOW], keep)


def _prune(cfg: MqiConfig, candidates: list[Candidate], archived: set[str],
           now: datetime) -> int:
    from prefect.client.orchestration import get_client

    from flows.run_pruning import delete_runs

    runs = _prunable(cfg, candidates, archived, now)
    with get_client(sync_client=True) as client:
        return delete_runs(client, runs)
