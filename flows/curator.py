"""The GPU curator: a scheduled look at the GPU pool, and the repair of what drifted.

Every ``curator.interval_seconds`` (deployment ``curate_gpus/curate-gpus``, served
by ``mqi up``) it reads the GPU host once (flows/gpu_survey.py) and

- records the table artifact ``gpu-pool``: per GPU its memory, utilisation,
  temperature, compute processes, which case and beam hold it by our lock (or
  that a foreign process does) and whether a simulation could have it now;
- emits ``mqi.gpu.status`` per GPU (resource ``mqi.gpu.<uuid>``) and
  ``mqi.gpu.warning`` when a threshold is newly crossed: too hot, too little free
  memory, a process no run owns, a GPU gone or back, a host that does not answer;
- sizes the GPU admission limit to the GPUs our simulations can have (``GpuPool.set_limit``);
- finds and repairs drift (flows/drift.py): stale processes holding GPU locks,
  zombie RUNNING runs, leftover work folders of long-COMPLETED runs.

What it saw last (the GPUs, the warnings in force) is kept in a Prefect Variable,
so "gone", "back" and "newly crossed" are judged against the previous look,
whichever process ran it. ``mqi gpus`` prints the same table (``gpu_report``).
See docs/curator.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger

from blocks.errors import CommandError, HostError
from blocks.gpu_pool import GpuPool, GpuQueryError
from blocks.host import Host
from config import MqiConfig, MqiError
from config.redaction import redact
from flows.curator_runs import RunIndex, read_runs
from flows.drift import (
    Repair,
    crash_zombie,
    kill_stale,
    leftover_folders,
    newest_logs,
    remove_folder,
    stale_processes,
    utcnow,
    zombie_runs,
)
from flows.gpu_survey import HostSurvey, survey
from flows.gpu_table import GpuRow, GpuWarning, gpu_rows, vanished_row
from flows.settings import flow_config, flow_host, flow_pool

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

CURATOR_FLOW = "curate_gpus"
CURATOR_DEPLOYMENT = "curate-gpus"
ARTIFACT_KEY = "gpu-pool"
STATUS_EVENT = "mqi.gpu.status"
WARNING_EVENT = "mqi.gpu.warning"
LIMIT_EVENT = "mqi.gpu.limit"
REPAIR_EVENT = "mqi.curator.repair"

log = logging.getLogger("mqi.curator")
Logger = logging.Logger | logging.LoggerAdapter[Any]


# --------------------------------------------------------------------------- state
@dataclass
class LastLook:
    """What the previous curator run saw, kept in a Prefect Variable between runs.

    Attributes:
        gpus: UUID → (index, name) of the GPUs the host reported last.
        missing: UUID → (index, name) of GPUs seen once and not reported since.
        warnings: The warnings in force (``<kind>:<uuid or host>``): a warning
            event is emitted only when one is newly crossed.
        looked: False before the first look (nothing to compare with).
    """

    gpus: dict[str, tuple[int, str]] = field(default_factory=dict)
    missing: dict[str, tuple[int, str]] = field(default_factory=dict)
    warnings: set[str] = field(default_factory=set)
    looked: bool = False


def state_variable(cfg: MqiConfig, pooled: bool = False) -> str:
    """The Variable's name: one per installation (per GPU limit), as Prefect allows names;
    ``pooled``: one per host of several (``cfg`` is then that host's view)."""
    name = "mqi_curator_" + re.sub(r"[^a-z0-9_]+", "_", cfg.gpu.concurrency_limit.lower())
    return name + ("_" + re.sub(r"[^a-z0-9_]+", "_", cfg.gpu.host.lower()) if pooled else "")


def _artifact_key(cfg: MqiConfig, pooled: bool) -> str:
    """``gpu-pool``; with several GPU hosts ``gpu-pool-<host>``, one table per host."""
    return ARTIFACT_KEY + (f"-{cfg.gpu.host.lower().replace('_', '-')}" if pooled else "")


def load_last_look(cfg: MqiConfig, pooled: bool = False) -> LastLook:
    from prefect.variables import Variable

    value = Variable.get(state_variable(cfg, pooled), default=None)
    if not isinstance(value, str):
        return LastLook()
    try:
        data = json.loads(value)
        return LastLook(gpus={u: (int(i), str(n)) for u, (i, n) in data["gpus"].items()},
                        missing={u: (int(i), str(n)) for u, (i, n) in data["missing"].items()},
                        warnings=set(data["warnings"]), looked=bool(data.get("looked", True)))
    except (ValueError, KeyError, TypeError):
        return LastLook()  # unreadable (an older form): start afresh


def save_last_look(cfg: MqiConfig, look: LastLook, pooled: bool = False) -> None:
    from prefect.types import MAX_VARIABLE_VALUE_LENGTH
    from prefect.variables import Variable

    data: dict[str, Any] = {"gpus": look.gpus, "missing": look.missing,
                            "warnings": sorted(look.warnings), "looked": look.looked}
    text = json.dumps(data, separators=(",", ":"))
    if len(text) > MAX_VARIABLE_VALUE_LENGTH - 100:  # a very large host: names can go
        data["gpus"] = {u: (i, "") for u, (i, _) in look.gpus.items()}
        data["missing"] = {u: (i, "") for u, (i, _) in look.missing.items()}
        text = json.dumps(data, separators=(",", ":"))
    Variable.set(state_variable(cfg, pooled), text, overwrite=True)


# -------------------------------------------------------------------------- report
@dataclass
class CuratorReport:
    """What one curator run saw and did (the flow's result).

    Attributes:
        host: The GPU host.
        answered: False when the host (or its GPU query) did not answer.
        gpus: GPUs reported.
        usable: Of those, usable by a simulation now.
        slots: Of those, what the admission limit counts (selected, and usable now or
            held by a run of ours).
        limit: The admission limit after this run (None when it was not read).
        warnings: Warnings newly crossed (each emitted as an event).
        repairs: Drift found, and what was done about it.
        dry_run: Nothing was repaired.
    """

    host: str
    answered: bool = True
    gpus: int = 0
    usable: int = 0
    limit: int | None = None
    slots: int = 0
    warnings: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    dry_run: bool = False


def host_name(host: Host) -> str:
    """The GPU host as tables and events name it: its hostname (this machine's for local)."""
    return str(getattr(host, "hostname", "") or socket.gethostname())


def _case_ids(found: HostSurvey) -> set[str]:
    return {f.case_id for f in found.folders} | {p.case_id for p in found.pid_files}


def compare(rows: list[GpuRow], last: LastLook, host: str) -> tuple[list[GpuRow], LastLook]:
    """Add rows for GPUs gone since the last look and warnings for GPUs back or new;
    return the rows and what this look leaves for the next one."""
    now = {r.uuid: (r.index, r.name) for r in rows}
    missing = {u: v for u, v in {**last.missing, **last.gpus}.items() if u not in now} \
        if last.looked else {}
    for row in rows:
        if not last.looked or row.uuid in last.gpus:
            continue
        if row.uuid in last.missing:
            row.warnings.append(GpuWarning("returned", f"GPU {row.index} ({row.uuid}) is "
                                                       f"reported by {host} again"))
        else:
            row.warnings.append(GpuWarning("appeared", f"GPU {row.index} ({row.uuid}) is new "
                                                       f"on {host}"))
    gone = [vanished_row(host, u, i, n) for u, (i, n) in sorted(missing.items(),
                                                                 key=lambda kv: kv[1][0])]
    return rows + gone, LastLook(gpus=now, missing=missing, warnings=set(), looked=True)


# ---------------------------------------------------------------------- the look
def gpu_report(cfg: MqiConfig, host: Host, pool: GpuPool,
               client: SyncPrefectClient | None, *, pooled: bool = False
               ) -> tuple[list[GpuRow], list[str]]:
    """The table ``mqi gpus`` prints: rows, and notes to print below them.

    Args:
        client: A Prefect client when the API answers (task-run names, GPUs gone
            since the curator's last look); None reads the host alone.
        pooled: ``cfg`` is the view of one of several GPU hosts (its own last look).

    Raises:
        HostError: The host did not answer, or its GPU query failed.
        GpuQueryError: The GPU query printed something that is not nvidia-smi CSV.
    """
    found = survey(host, pool, cfg.paths.remote_work_root)
    notes = []
    runs = None
    last = LastLook()
    if client is not None:
        runs = read_runs(client, _case_ids(found))
        last = load_last_look(cfg, pooled)
    else:
        notes.append("(no Prefect API: task runs not shown)")
    rows = gpu_rows(host_name(host), found, pool, cfg.curator.max_temperature_c, runs)
    rows, _ = compare(rows, last, host_name(host))
    if client is not None:
        limit = _limit(client, pool.limit_name)
        notes.append(f"admission limit {pool.limit_name}: "
                     f"{'not created yet' if limit is None else limit}")
    return rows, notes


class GpuReadError(MqiError):
    """The GPU host's GPUs could not be read (`mqi gpus`)."""


def gpus_now(cfg: MqiConfig, with_api: bool) -> tuple[list[GpuRow], list[str]]:
    """``gpu_report`` for the host(s) and pool the configuration describes (`mqi gpus`).

    With several GPU hosts, every host's rows; a host that does not answer is a note
    (its GPUs are out of the pool until it does), unless none answers.

    Args:
        with_api: The Prefect API answers (``PREFECT_API_URL`` points at it).

    Raises:
        GpuReadError: The host (every host, with several) did not answer, or its GPU
            query failed.
    """
    from prefect.client.orchestration import get_client

    from blocks.factory import gpu_host, gpu_pool
    from flows.placement import host_view

    names = cfg.gpu.host_names if cfg.gpu.several_hosts else [None]
    rows: list[GpuRow] = []
    notes: list[str] = []
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(get_client(sync_client=True)) if with_api else None
        for name in names:
            view = host_view(cfg, name) if name is not None else cfg
            host = gpu_host(view)
            try:
                found, said = gpu_report(view, host, gpu_pool(view), client,
                                         pooled=name is not None)
            except (HostError, GpuQueryError) as exc:
                failures.append(f"could not read the GPUs of {host_name(host)}: {exc}")
                continue
            finally:
                host.close()
            rows += found
            notes += [n for n in said if n not in notes]
    if failures and not rows and len(failures) == len(names):
        raise GpuReadError("; ".join(failures))
    return rows, notes + [f"{f} (its GPUs are out of the pool)" for f in failures]


@flow(name=CURATOR_FLOW, flow_run_name="curate-gpus")
def curate_gpus(dry_run: bool | None = None) -> CuratorReport:
    """Look at the GPU pool, record it, warn, size the admission limit, repair drift.

    Args:
        dry_run: Report drift without repairing it; None: ``curator.dry_run``.
    """
    cfg = flow_config()
    logger = get_run_logger()
    if cfg.gpu.several_hosts and cfg.curator.enabled:
        return curate_pool(cfg, cfg.curator.dry_run if dry_run is None else dry_run, logger)
    host = flow_host(cfg)
    if not cfg.curator.enabled:
        logger.info("curator.enabled is false: not looking at the GPUs")
        return CuratorReport(host=host_name(host))
    return curate(cfg, host, flow_pool(cfg), cfg.curator.dry_run if dry_run is None else dry_run,
                  logger)


def curate_pool(cfg: MqiConfig, dry_run: bool, logger: Logger) -> CuratorReport:
    """Several GPU hosts: one look per host (its own table ``gpu-pool-<host>``, state and
    repairs, in its own work root), then the admission limit sized to their sum; a host
    that does not answer counts for nothing until it answers again."""
    from prefect.client.orchestration import get_client

    from flows.placement import host_view, pool_hosts

    hosts = pool_hosts(cfg)
    reports = [curate(host_view(cfg, h.name), h.host, h.pool, dry_run, logger, pooled=True)
               for h in hosts]
    total = CuratorReport(host=", ".join(r.host for r in reports), dry_run=dry_run,
                          answered=any(r.answered for r in reports),
                          gpus=sum(r.gpus for r in reports),
                          usable=sum(r.usable for r in reports),
                          slots=sum(r.slots for r in reports if r.answered),
                          warnings=[w for r in reports for w in r.warnings],
                          repairs=[m for r in reports for m in r.repairs])
    with get_client(sync_client=True) as client:
        if total.slots < 1:
            total.limit = _limit(client, hosts[0].pool.limit_name)
            logger.info("no GPU host answers with a GPU: admission limit left at %s",
                        total.limit)
        else:
            total.limit, note = _set_limit(client, hosts[0].pool, total.slots, logger)
            logger.info("%s (GPU hosts: %s)", note, total.host)
    return total


def curate(cfg: MqiConfig, host: Host, pool: GpuPool, dry_run: bool,
           logger: Logger, *, pooled: bool = False) -> CuratorReport:
    """One curator run (the flow's body; the flow loads what it works with).

    ``pooled``: ``cfg`` is the view of one of several GPU hosts; its state and table are
    its own, and the limit is sized by ``curate_pool`` for all of them."""
    from prefect.client.orchestration import get_client

    name = cfg.gpu.host if pooled else host_name(host)
    last = load_last_look(cfg, pooled)
    report = CuratorReport(host=name, dry_run=dry_run)
    try:
        found = survey(host, pool, cfg.paths.remote_work_root)
    except (HostError, GpuQueryError) as exc:
        return _unanswered(cfg, name, last, exc, report, logger, pooled)
    with get_client(sync_client=True) as client:
        runs = read_runs(client, _case_ids(found))
        repairs = _repair(cfg, host, name, found, runs, client, dry_run, logger, pooled)
        if any(r.done and r.kind == "stale-process" for r in repairs):
            found = survey(host, pool, cfg.paths.remote_work_root)  # the locks freed
            runs = read_runs(client, _case_ids(found))
        rows = gpu_rows(name, found, pool, cfg.curator.max_temperature_c, runs)
        rows, look = compare(rows, last, name)
        report.slots = _slots(pool, rows)
        report.limit, limit_note = (None, "admission limit sized with the other GPU hosts") \
            if pooled else _size_limit(client, pool, rows, logger)
    report.gpus = len(found.gpus)
    report.usable = sum(r.usable for r in rows)
    report.repairs = [r.message for r in repairs]
    warnings = {f"{w.kind}:{r.uuid}": (r, w) for r in rows for w in r.warnings}
    look.warnings = set(warnings)
    new = {k: v for k, v in warnings.items() if k not in last.warnings}
    report.warnings = [w.message for _, w in new.values()]
    for message in report.warnings:
        logger.warning("%s", redact(message))
    for message in report.repairs:
        logger.warning("%s", redact(message))
    _record(name, rows, report, limit_note, _artifact_key(cfg, pooled))
    _emit(name, rows, new.values(), repairs)
    save_last_look(cfg, look, pooled)
    logger.info("%s: %d GPU(s), %d usable now; %s", name, report.gpus, report.usable,
                limit_note)
    return report


def _unanswered(cfg: MqiConfig, name: str, last: LastLook, exc: Exception,
                report: CuratorReport, logger: Logger, pooled: bool = False) -> CuratorReport:
    """The host did not answer: warn (once), show the GPUs last seen, keep them for the
    next look, and leave the limit alone: a host back from a reboot must not count as
    every GPU gone and back."""
    from prefect.events import emit_event

    kind = "gpu-query-failed" if isinstance(exc, CommandError | GpuQueryError) \
        else "host-unreachable"
    if isinstance(exc, CommandError):  # its message would repeat the whole survey script
        said = [ln for ln in (exc.result.stdout + "\n" + exc.result.stderr).splitlines()
                if ln.strip()]
        first = f"exit code {exc.result.exit_code}" + (f": {said[-1].strip()}" if said else "")
    else:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    message = (f"GPU host {name} does not answer: {first}" if kind == "host-unreachable"
               else f"the GPU query on {name} failed: {first}")
    report.answered = False
    key = f"{kind}:{name}"
    if key not in last.warnings:
        report.warnings.append(message)
        logger.warning("%s", redact(message))
        emit_event(WARNING_EVENT, resource=_host_resource(name),
                   payload={"kind": kind, "message": redact(message)})
    rows = [GpuRow(host=name, index=i, uuid=u, name=n, memory_used_mib=None,
                   memory_free_mib=None, memory_total_mib=None, utilization_pct=None,
                   temperature_c=None, why=f"the host does not answer ({kind})")
            for u, (i, n) in sorted({**last.gpus}.items(), key=lambda kv: kv[1][0])]
    _record(name, rows, report, "its GPUs are out of the admission limit" if pooled
            else "admission limit left as it was", _artifact_key(cfg, pooled))
    # what it reported last stays for the next look; only the warning in force changes
    save_last_look(cfg, LastLook(gpus=last.gpus, missing=last.missing, warnings={key},
                                 looked=last.looked), pooled)
    return report


def _repair(cfg: MqiConfig, host: Host, name: str, found: HostSurvey, runs: RunIndex,
            client: SyncPrefectClient, dry_run: bool, logger: Logger,
            pooled: bool = False) -> list[Repair]:
    if not found.groups:
        # Without the process table every group looks dead: each quiet running case
        # would pass for a zombie. Judge nothing rather than crash live runs.
        logger.warning("the process table of %s could not be read (ps): stale processes, "
                       "zombie runs and leftover folders not judged this time", name)
        return []
    # One repair that fails (an SSH hiccup, a run deleted meanwhile) is said and
    # skipped: the rest of the look — the limit, the table, the events — still happens.
    def tried(kind: str, case_id: str, subject: str, fix: Callable[[], Repair]) -> Repair:
        try:
            return fix()
        except Exception as exc:  # noqa: BLE001 - reported as a repair not done
            return Repair(kind, case_id, subject, f"{kind} of case {case_id} ({subject}) "
                          f"failed: {type(exc).__name__}: {exc}", False)

    repairs = [tried("stale-process", p.case_id, str(p.pgid),
                     partial(kill_stale, cfg, host, found, runs, p, dry_run))
               for p in stale_processes(cfg, found, runs)]
    now = utcnow()
    quiet = cfg.curator.zombie_after_seconds
    heard = newest_logs(client, runs.running, now - timedelta(seconds=quiet))
    repairs += [tried("zombie-run", run.case_id, str(run.id),
                      partial(crash_zombie, client, name, run, stages, why, quiet, dry_run))
                for run, stages, why in zombie_runs(cfg, found, runs, heard, now)
                # one host of several judges only the runs whose stages ran on it
                if not pooled or any(p.case_id == run.case_id and p.short == run.folder
                                     for p in found.pid_files)]
    repairs += [tried("leftover-folder", folder.case_id, folder.path,
                      partial(remove_folder, cfg, host, folder, run, dry_run))
                for folder, run in leftover_folders(cfg, found, runs, now)]
    return repairs


def _limit(client: SyncPrefectClient, limit_name: str) -> int | None:
    from prefect.exceptions import ObjectNotFound

    try:
        return int(client.read_global_concurrency_limit_by_name(limit_name).limit)
    except ObjectNotFound:
        return None


def _size_limit(client: SyncPrefectClient, pool: GpuPool, rows: list[GpuRow],
                logger: Logger) -> tuple[int | None, str]:
    """Size the admission limit to the GPUs our simulations can have: present, in
    ``gpu.indices``, and usable now or held by a run of ours (a GPU of ours that runs a
    simulation is not lost to the pool). At least 1 while any GPU is there: a request
    for more slots than the limit fails instead of waiting, so with every GPU taken by
    foreign processes one beam waits for one, saying why (GpuPool.choose_index)."""
    present = [r for r in rows if r.memory_total_mib is not None
               and (pool.indices is None or r.index in pool.indices)]
    if not present:
        now = _limit(client, pool.limit_name)
        return now, f"admission limit {pool.limit_name} left at {now}: no GPU selected"
    return _set_limit(client, pool, max(1, _slots(pool, rows)), logger)


def _slots(pool: GpuPool, rows: list[GpuRow]) -> int:
    """GPUs present, selected, and usable now or held by a run of ours."""
    return sum(bool(r.usable or r.held_by_us) for r in rows if r.memory_total_mib is not None
               and (pool.indices is None or r.index in pool.indices))


def _set_limit(client: SyncPrefectClient, pool: GpuPool, slots: int,
               logger: Logger) -> tuple[int, str]:
    from prefect.events import emit_event

    before = pool.set_limit(slots)
    if before != slots:
        logger.warning("admission limit %s: %s → %s GPU(s)", pool.limit_name, before, slots)
        emit_event(LIMIT_EVENT, resource={"prefect.resource.id": f"mqi.gpu-limit.{pool.limit_name}",
                                          "prefect.resource.name": pool.limit_name},
                   payload={"before": before, "after": slots})
        return slots, f"admission limit {pool.limit_name}: {before} → {slots}"
    return slots, f"admission limit {pool.limit_name}: {slots}"


def _host_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"mqi.gpu-host.{name}", "prefect.resource.name": name}


def _gpu_resource(row: GpuRow) -> dict[str, str]:
    return {"prefect.resource.id": f"mqi.gpu.{row.uuid}",
            "prefect.resource.name": f"GPU {row.index} on {row.host}",
            "mqi.gpu.index": str(row.index), "mqi.gpu.host": row.host}


def _emit(name: str, rows: list[GpuRow], new: Any, repairs: list[Repair]) -> None:
    from prefect.events import emit_event

    for row in rows:
        if row.memory_total_mib is not None:  # a GPU gone has no status, only its warning
            emit_event(STATUS_EVENT, resource=_gpu_resource(row), payload=row.as_record())
    for row, warning in new:
        emit_event(WARNING_EVENT, resource=_gpu_resource(row),
                   payload={"kind": warning.kind, "message": redact(warning.message),
                            "index": row.index, "host": row.host})
    for repair in repairs:
        related = [{"prefect.resource.id": f"prefect.flow-run.{repair.flow_run_id}",
                    "prefect.resource.role": "flow-run"}] if repair.flow_run_id else []
        emit_event(REPAIR_EVENT, resource={"prefect.resource.id": f"mqi.case.{repair.case_id}",
                                           "prefect.resource.name": repair.case_id},
                   related=related,
                   payload={"kind": repair.kind, "subject": repair.subject, "done": repair.done,
                            "message": redact(repair.message), "host": name})


def _record(name: str, rows: list[GpuRow], report: CuratorReport, limit_note: str,
            key: str = ARTIFACT_KEY) -> None:
    """The ``gpu-pool`` table artifact (Prefect keeps every version under the key)."""
    from prefect.artifacts import create_table_artifact

    lines = [f"GPU pool of **{name}**: {report.gpus} GPU(s), {report.usable} usable now; "
             f"{limit_note}."]
    if not report.answered:
        lines = [f"GPU host **{name}** did not answer; the GPUs it reported last are listed."]
    for message in report.repairs:
        lines.append(f"- {'(dry run) ' if report.dry_run else ''}{message}")
    table = [row.as_record() for row in rows] or [{"host": name, "index": None, "why": "no GPU"}]
    create_table_artifact(table=table, key=key, description=redact("\n".join(lines)))

