"""`mqi archive [--dry-run] [--case ID]`: the archiver in the foreground, as `mqi run`
runs process_case: in this process, its run recorded on the Prefect server.

``use_config`` (deployments/foreground.py) must have run first: it points this
process, and the flow in it, at the configuration and its API.
"""

from __future__ import annotations

from config import MqiError


class ArchiveNotDone(MqiError):
    """The archiver could not run, or some cases could not be archived."""


def run_archiver(dry_run: bool, case_id: str | None, debug: bool = False) -> list[str]:
    """Run ``archive_cases`` here; return its lines (one per case, and the pruning).

    Raises:
        ArchiveNotDone: Naming each case that could not be archived (the others were),
            or why nothing ran (another archiver at work, a bad case id...).
    """
    from deployments.foreground import _quiet_tracebacks
    from flows.archiver import ArchiveReport, ArchivingFailed, archive_cases

    if not debug:
        _quiet_tracebacks()
    state = archive_cases(dry_run=dry_run, case_id=case_id, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, ArchiveReport):
        return result.lines() or [f"nothing to archive{' (dry run)' if dry_run else ''}"]
    if isinstance(result, ArchivingFailed):
        raise ArchiveNotDone("\n".join([*result.report.lines(), str(result)]))
    raise ArchiveNotDone(f"the archiver ended {state.type.value}" +
                         (f": {state.message}" if state.message else ""))
