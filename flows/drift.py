"""Drift between what Prefect believes and what the GPU host runs, and its repair.

Three kinds, each found from one ``HostSurvey`` and the ``RunIndex`` of the runs
behind it (docs/curator.md#drift):

- **stale processes** (and the GPU locks they hold): a live process group that a
  stage of one of our runs started (its pid file says so) while every run
  working in that folder has ended. The kernel frees a lock only when its
  holder dies, so a simulation that outlived its run — its flow-run process
  killed, the hook never run — keeps its GPU for good. Repair: kill the group.
- **zombie runs**: a ``process_case`` run RUNNING in Prefect whose remote stage
  has no process left on the host, and that has said nothing (no log line, no
  state change) for ``curator.zombie_after_seconds``. Nothing will ever finish
  it. Repair: mark it (and its running stages) Crashed with the reason, so
  ``mqi rerun`` can run the case again.
- **leftover folders**: the work folder of a run that COMPLETED more than
  ``curator.remove_work_dirs_after_hours`` ago (kept by
  ``paths.clean_remote_work_dir: false``, or a removal that failed). Repair:
  ``RemoteLayout.removal_command`` — only paths the layout derives from a valid
  case id and short run id under ``paths.remote_work_root``, never anything else.

Nothing is repaired with ``dry_run``: each finding is reported as what would be done.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from blocks.host import Host
from config import MqiConfig
from flows.curator_runs import RunIndex, RunInfo, StageTask
from flows.gpu_survey import HostSurvey, PidFile, RunFolder
from flows.layout import RemoteLayout

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger("mqi.curator")


@dataclass(frozen=True)
class Repair:
    """One drift found, and what was done about it.

    Attributes:
        kind: ``stale-process``, ``zombie-run`` or ``leftover-folder``.
        case_id: The case it concerns.
        subject: What: a process group, a flow run id, a folder.
        message: Says what was found and done (or would be, in a dry run).
        done: False in a dry run, or when the repair was refused or failed.
        flow_run_id: The run concerned, where there is one.
    """

    kind: str
    case_id: str
    subject: str
    message: str
    done: bool
    flow_run_id: str | None = None


def _work_dir(cfg: MqiConfig, case_id: str, short: str) -> RemoteLayout | None:
    """The layout of a folder the survey found; None for a name that is not a case id."""
    if not re.fullmatch(cfg.cases.id_pattern, case_id):
        return None
    return RemoteLayout(cfg.paths.remote_work_root.rstrip("/") or "/", case_id, short)


def stale_processes(cfg: MqiConfig, survey: HostSurvey, runs: RunIndex) -> list[PidFile]:
    """Live process groups our runs' stages started, in folders no active run uses."""
    found = []
    # A pid file outlives its group, and the number may since belong to a stage of a
    # run that is active now: such a group is never stale, whatever old file names it.
    in_use = {p.pgid for p in survey.pid_files
              if any(r.active for r in runs.users(p.case_id, p.short))}
    for pid_file in survey.pid_files:
        if pid_file.pgid in in_use or not survey.group_alive(pid_file.pgid):
            continue
        users = runs.users(pid_file.case_id, pid_file.short)
        # no known run: another installation's, or a deleted run — not ours to judge
        if users and not any(r.active for r in users):
            found.append(pid_file)
    return found


def kill_stale(cfg: MqiConfig, host: Host, survey: HostSurvey, runs: RunIndex,
               pid_file: PidFile, dry_run: bool) -> Repair:
    """Kill one stale process group, after checking it is still the one our stage started.

    A pid file outlives its group: after the group died its number may have been
    given to someone else's processes — or to another run's simulation. The group
    is killed only while one of its members' command lines names THIS run's folder
    (every stage our wrapper starts names it; the lock folder would not do: every
    simulation of every run names that).
    """
    assert pid_file.pgid is not None
    layout = _work_dir(cfg, pid_file.case_id, pid_file.short)
    users = runs.users(pid_file.case_id, pid_file.short)
    newest = users[0]
    gpus = [i for i, h in survey.holders.items() if h.pgid == pid_file.pgid]
    what = (f"process group {pid_file.pgid} of case {pid_file.case_id} "
            f"({pid_file.step}{f' beam {pid_file.beam}' if pid_file.beam else ''}, "
            f"run-{pid_file.short})" + (f" holding GPU {', '.join(map(str, gpus))}"
                                        if gpus else ""))
    why = f"its run {newest.name} ({newest.id}) is {newest.state}"
    mark = layout.work_dir + "/" if layout else None
    if mark is None or not any(mark in a for a in survey.group_args(pid_file.pgid)):
        return Repair("stale-process", pid_file.case_id, str(pid_file.pgid),
                      f"{what} is alive although {why}, but none of its command lines names "
                      f"the run's folder: not killed (its number may belong to someone "
                      f"else now)", False, newest.id)
    if dry_run:
        return Repair("stale-process", pid_file.case_id, str(pid_file.pgid),
                      f"would kill {what}: {why}", False, newest.id)
    host.kill_process_group(pid_file.pgid)
    return Repair("stale-process", pid_file.case_id, str(pid_file.pgid),
                  f"killed {what}: {why}" + ("; its GPU lock is free again" if gpus else ""),
                  True, newest.id)


def zombie_runs(cfg: MqiConfig, survey: HostSurvey, runs: RunIndex,
                last_heard: dict[str, datetime],
                now: datetime) -> list[tuple[RunInfo, list[StageTask], str]]:
    """RUNNING runs with remote stages whose processes are gone, quiet for long enough.

    Args:
        last_heard: Flow run id → its newest log line (``newest_logs``).
        now: This machine's clock (Prefect's timestamps are compared with it).

    Returns:
        (run, its RUNNING remote stages, why their processes are gone) for each zombie.
    """
    quiet = timedelta(seconds=cfg.curator.zombie_after_seconds)
    found = []
    for run in runs.running:
        files = [p for p in survey.pid_files
                 if p.case_id == run.case_id and p.short == run.folder]
        if any(survey.group_alive(p.pgid) for p in files):
            continue  # its remote work goes on
        stages = [s for s in runs.stages.get(run.id, []) if s.step in cfg.remote_commands]
        heard = [t for t in (run.changed, last_heard.get(run.id),
                             *(s.started for s in runs.stages.get(run.id, []))) if t]
        if not stages or (heard and now - max(heard) < quiet):
            continue  # between stages, or it spoke lately (a stage waiting for a GPU does)
        own = [p for s in stages for p in files if p.step == s.step and p.beam == s.beam]
        if any(survey.now - p.mtime < quiet.total_seconds() for p in own):
            continue  # just started (two machines' clocks: judged on the host's own)
        if own:
            why = (f"its process group{'s' if len(own) > 1 else ''} "
                   f"{', '.join(str(p.pgid) for p in own)} on the GPU host "
                   f"{'are' if len(own) > 1 else 'is'} gone (pid file "
                   f"{', '.join(p.path for p in own)})")
        else:
            why = ("it has no pid file on the GPU host (none in "
                   f"{cfg.paths.remote_work_root.rstrip('/')}/{run.case_id}/run-{run.folder}/pids)")
        found.append((run, stages, why))
    return found


def crash_zombie(client: SyncPrefectClient, host_name: str, run: RunInfo,
                 stages: list[StageTask], why: str, quiet_s: float, dry_run: bool) -> Repair:
    """Mark a zombie run and its running stages Crashed, saying why and what to do."""
    from prefect.states import Crashed

    names = ", ".join(s.name for s in stages)
    message = (f"marked Crashed by the GPU curator: Prefect had {names} RUNNING, but {why} "
               f"on {host_name}, and the run had said nothing for over {quiet_s:g} s; "
               f"`mqi rerun {run.case_id}` runs the case again")
    if dry_run:
        return Repair("zombie-run", run.case_id, run.id,
                      f"{run.name} ({run.id}) would be {message}", False, run.id)
    for stage in stages:
        client.set_task_run_state(UUID(stage.id), Crashed(message=message), force=True)
    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return Repair("zombie-run", run.case_id, run.id, f"{run.name} ({run.id}) {message}", True,
                  run.id)


def newest_logs(client: SyncPrefectClient, runs: list[RunInfo],
                since: datetime) -> dict[str, datetime]:
    """Flow run id → the time of its newest log line after ``since`` (runs with none left out)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    found: dict[str, datetime] = {}
    for run in runs:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[UUID(run.id)]),
            timestamp=LogFilterTimestamp.model_validate({"after_": since})), limit=1,
            sort=LogSort.TIMESTAMP_DESC)
        if logs:
            stamp = logs[0].timestamp
            found[run.id] = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return found


def leftover_folders(cfg: MqiConfig, survey: HostSurvey, runs: RunIndex,
                     now: datetime) -> list[tuple[RunFolder, RunInfo]]:
    """Folders whose newest run COMPLETED long enough ago, with no process left in them."""
    hours = cfg.curator.remove_work_dirs_after_hours
    if hours is None:
        return []
    found = []
    for folder in survey.folders:
        users = runs.users(folder.case_id, folder.short)
        if not users or any(r.active for r in users):
            continue
        newest = users[0]
        if newest.state != "COMPLETED" or newest.ended is None \
                or now - newest.ended < timedelta(hours=hours):
            continue
        if any(survey.group_alive(p.pgid) for p in survey.pid_files
               if p.case_id == folder.case_id and p.short == folder.short):
            continue  # stale_processes deals with those first
        found.append((folder, newest))
    return found


def remove_folder(cfg: MqiConfig, host: Host, folder: RunFolder, run: RunInfo,
                  dry_run: bool) -> Repair:
    """Remove a leftover run folder (and the case's folder when nothing else is in it)."""
    layout = _work_dir(cfg, folder.case_id, folder.short)
    age = f"{run.name} COMPLETED at {run.ended:%Y-%m-%d %H:%M} UTC" if run.ended else run.name
    if layout is None or layout.work_dir != folder.path:
        return Repair("leftover-folder", folder.case_id, folder.path,
                      f"{folder.path} is not a run folder of a valid case id: left alone",
                      False, run.id)
    if dry_run:
        return Repair("leftover-folder", folder.case_id, folder.path,
                      f"would remove {folder.path}: {age}", False, run.id)
    done = host.run(f"{layout.removal_command()}; [ ! -e {shlex.quote(layout.work_dir)} ]",
                    stream=False, check=False, timeout=300)
    if not done.ok:
        return Repair("leftover-folder", folder.case_id, folder.path,
                      f"could not remove {folder.path}: {done.tail(3)}", False, run.id)
    return Repair("leftover-folder", folder.case_id, folder.path,
                  f"removed {folder.path}: {age}", True, run.id)


def utcnow() -> datetime:
    return datetime.now(UTC)
