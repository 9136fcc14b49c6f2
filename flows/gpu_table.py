"""The GPU pool as a table: one row per GPU — what it is doing, who holds it by our
locks, whether a simulation could have it now, and what is wrong with it.

The same rows are the curator's ``gpu-pool`` table artifact, its ``mqi.gpu.status``
events and ``mqi gpus``' lines. Everything here is decided from one
``HostSurvey`` (and, where the API answers, the runs Prefect knows), so the
three always agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from blocks.gpu_pool import ComputeApp, GpuInfo, GpuPool
from config.redaction import redact
from flows.curator_runs import RunIndex
from flows.gpu_survey import HostSurvey, PidFile

FOREIGN = "foreign process"
ARGS_SHOWN = 160
"""Longest command line of a lock holder shown in a cell."""


@dataclass(frozen=True)
class GpuWarning:
    """One threshold crossed, for one GPU or for the host.

    Attributes:
        kind: ``hot``, ``low-memory``, ``foreign-process``, ``vanished``, ``returned``,
            ``host-unreachable`` or ``gpu-query-failed``.
        message: Says what and how much, in words.
    """

    kind: str
    message: str


@dataclass
class GpuRow:
    """One GPU of the pool, as the table, the events and ``mqi gpus`` show it.

    Attributes:
        host: The GPU host (its hostname).
        index: The CUDA index (PCI bus order).
        uuid: The GPU's UUID: what events name it by.
        name: The model.
        memory_used_mib: nvidia-smi's memory.used.
        memory_free_mib: memory.free (used + free < total: the driver reserves some).
        memory_total_mib: memory.total.
        utilization_pct: GPU utilisation; None where unknown.
        temperature_c: Core temperature; None where unknown.
        processes: The compute processes on it: ``pid (MiB)``, ours or not.
        held_by: Which case and beam hold it by our lock, the holder's command line
            when it is not one of our runs, ``foreign process``, or "".
        held_by_us: A run of ours holds its lock.
        task_run: The running simulation's task run as Prefect names it, or "".
        usable: A simulation could be given it now.
        why: Why not, when not usable.
        warnings: The thresholds it crosses now.
    """

    host: str
    index: int
    uuid: str
    name: str
    memory_used_mib: int | None
    memory_free_mib: int | None
    memory_total_mib: int | None
    utilization_pct: int | None
    temperature_c: int | None
    processes: str = ""
    held_by: str = ""
    held_by_us: bool = False
    task_run: str = ""
    usable: bool = False
    why: str = ""
    warnings: list[GpuWarning] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        """A flat dict (the artifact's row, an event's payload), redacted."""
        data = asdict(self)
        data["warnings"] = "; ".join(w.message for w in self.warnings)
        return {k: redact(v) if isinstance(v, str) else v for k, v in data.items()}


def _holder_text(survey: HostSurvey, pid_file: PidFile | None, pid: int, pgid: int) -> str:
    if pid_file is not None:
        beam = f" beam {pid_file.beam}" if pid_file.beam is not None else ""
        return f"case {pid_file.case_id}{beam} (run-{pid_file.short})"
    args = " ".join(survey.group_args(pgid)) or "?"
    if len(args) > ARGS_SHOWN:
        args = args[:ARGS_SHOWN - 1] + "…"
    return f"pid {pid}, not a run of ours: {args}"


def our_groups(survey: HostSurvey) -> dict[int, PidFile]:
    """Live process group → the pid file of our run's stage that started it."""
    return {pf.pgid: pf for pf in survey.pid_files
            if pf.pgid is not None and survey.group_alive(pf.pgid)}


def gpu_rows(host: str, survey: HostSurvey, pool: GpuPool, max_temperature_c: float,
             runs: RunIndex | None = None) -> list[GpuRow]:
    """One row per GPU the host reports, in index order.

    Args:
        host: The GPU host's name, for the rows.
        survey: One look at the host.
        pool: Which indices are ours, the memory floor, whether foreign processes count.
        max_temperature_c: Above this a GPU is ``hot``.
        runs: The runs Prefect knows (task-run names); None without the API.
    """
    ours = our_groups(survey)
    rows = []
    for gpu in sorted(survey.gpus, key=lambda g: g.index):
        apps = [a for a in survey.apps if a.gpu_uuid == gpu.uuid]
        rows.append(_row(host, gpu, apps, survey, ours, pool, max_temperature_c, runs))
    return rows


def _row(host: str, gpu: GpuInfo, apps: list[ComputeApp], survey: HostSurvey,
         ours: dict[int, PidFile], pool: GpuPool, max_temperature_c: float,
         runs: RunIndex | None) -> GpuRow:
    row = GpuRow(host=host, index=gpu.index, uuid=gpu.uuid, name=gpu.name,
                 memory_used_mib=gpu.memory_used_mib, memory_free_mib=gpu.memory_free_mib,
                 memory_total_mib=gpu.memory_total_mib, utilization_pct=gpu.utilization_pct,
                 temperature_c=gpu.temperature_c)
    row.processes = ", ".join(
        f"{a.pid}" + (f" ({a.used_memory_mib} MiB)" if a.used_memory_mib is not None else "")
        for a in apps)
    holder = survey.holders.get(gpu.index)
    holder_file = ours.get(holder.pgid) if holder is not None else None
    if holder is not None:
        row.held_by = _holder_text(survey, holder_file, holder.pid, holder.pgid)
        row.held_by_us = holder_file is not None
        if holder_file is not None and runs is not None:
            row.task_run = runs.simulation(holder_file.case_id, holder_file.short,
                                           holder_file.beam) or ""
    foreign = [a for a in apps if _foreign(a, survey, ours, holder.pgid if holder else None)]
    if foreign and holder is None:
        row.held_by = FOREIGN
    selected = pool.indices is None or gpu.index in pool.indices
    free = gpu.memory_free_mib
    if not selected:
        row.why = "not in gpu.indices"
    elif holder is not None:
        row.why = "in use by " + ("a simulation" if holder_file else "a process we did not start")
    elif foreign and pool.skip_gpus_with_foreign_processes:
        row.why = f"{FOREIGN} ({', '.join(str(a.pid) for a in foreign)})"
    elif free < pool.min_free_memory_mib:
        row.why = f"{free} MiB free < gpu.min_free_memory_mib {pool.min_free_memory_mib}"
    row.usable = not row.why
    if gpu.temperature_c is not None and gpu.temperature_c > max_temperature_c:
        row.warnings.append(GpuWarning("hot", f"GPU {gpu.index} at {gpu.temperature_c} °C, above "
                                            f"curator.max_temperature_c {max_temperature_c:g}"))
    if free < pool.min_free_memory_mib and holder_file is None and selected:
        row.warnings.append(GpuWarning(
            "low-memory", f"GPU {gpu.index} has {free} MiB free, below "
                          f"gpu.min_free_memory_mib {pool.min_free_memory_mib}, and no run of "
                          f"ours holds it"))
    if foreign:
        row.warnings.append(GpuWarning(
            "foreign-process", f"GPU {gpu.index} is busy with a process no run owns (pid "
                               f"{', '.join(str(a.pid) for a in foreign)})"))
    return row


def _foreign(app: ComputeApp, survey: HostSurvey, ours: dict[int, PidFile],
             holder_pgid: int | None) -> bool:
    """Whether a compute process belongs to no run of ours.

    A process the host's process table does not show (another pid namespace) is
    taken to be the lock holder's when the GPU's lock is held, and foreign when not.
    """
    pgid = survey.groups.get(app.pid)
    if pgid is None:
        return holder_pgid is None
    return pgid not in ours and pgid != holder_pgid


def vanished_row(host: str, uuid: str, index: int, name: str) -> GpuRow:
    """The row of a GPU the previous look saw and this one does not."""
    return GpuRow(host=host, index=index, uuid=uuid, name=name, memory_used_mib=None,
                  memory_free_mib=None, memory_total_mib=None, utilization_pct=None,
                  temperature_c=None, why="vanished: the host no longer reports it",
                  warnings=[GpuWarning("vanished", f"GPU {index} ({uuid}) is no longer "
                                                 f"reported by {host}")])


COLUMNS: tuple[tuple[str, str], ...] = (
    ("HOST", "host"), ("GPU", "index"), ("NAME", "name"), ("USED", "memory_used_mib"),
    ("FREE", "memory_free_mib"), ("TOTAL", "memory_total_mib"), ("UTIL", "utilization_pct"),
    ("TEMP", "temperature_c"), ("PROCESSES", "processes"), ("HELD BY", "held_by"),
    ("TASK RUN", "task_run"), ("WARNINGS", "warnings"), ("USABLE", "usable"))
"""The terminal table's columns (the UUID is in the artifact and the events)."""
_UNITS = {"memory_used_mib": " MiB", "memory_free_mib": " MiB", "memory_total_mib": " MiB",
          "utilization_pct": " %", "temperature_c": " °C"}
_RIGHT = {"index", *_UNITS}


def _cell(row: GpuRow, key: str) -> str:
    if key == "usable":
        text = "yes" if row.usable else f"no: {row.why}"
    elif key == "warnings":
        text = ", ".join(w.kind for w in row.warnings)
    else:
        value = getattr(row, key)
        text = "" if value is None else f"{value}{_UNITS.get(key, '')}"
    text = redact(text) or "-"
    return text if text.isprintable() else repr(text)


def format_table(rows: list[GpuRow], notes: list[str] | None = None) -> str:
    """Aligned plain text, one line a GPU (no colours: fine in a pipe), notes below."""
    header = [title for title, _ in COLUMNS]
    cells = [[_cell(r, key) for _, key in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(COLUMNS))]
    last = len(COLUMNS) - 1

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if COLUMNS[i][1] in _RIGHT else v if i == last else v.ljust(w)
               for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(out).rstrip()

    lines = [line(header), *(line(c) for c in cells)] if rows else ["no GPU reported"]
    lines += [redact(n) for n in notes or []]
    return "\n".join(lines)
