"""Where a case's files live: on the GPU host (work folder) and here (results).

Each flow run works in its own remote folder,
``<remote_work_root>/<case_id>/run-<first 8 hex digits of the flow run id>``, so two
runs of one case (changed content, another workflow) never read or overwrite each
other's files, whatever else goes wrong. Every path is derived from the validated
case id and the flow run's id alone, so a hook that has nothing but the flow run
(cancellation, crash) finds the same pid files the running stages wrote, and a
retry of the same flow run (``mqi rerun``) finds the files its first try left.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from config import MqiConfig
from config.models import CASE_PLACEHOLDERS, STEP_PLACEHOLDERS
from config.templates import TemplateError
from flows.naming import short_run_id

if TYPE_CHECKING:
    from flows.case_inspection import Beam

GpuId = int | str
"""A GPU index, or a stand-in such as ``"{gpu}"`` when a cache key is computed."""


class _Folder:
    """A fixed folder inside the run's work folder, read as an attribute."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: RemoteLayout, owner: type | None = None) -> str:
        return posixpath.join(layout.work_dir, self.name)


@dataclass(frozen=True)
class RemoteLayout:
    """One flow run's working folder for its case on the GPU host.

    Attributes:
        root: ``paths.remote_work_root``.
        case_id: The validated case id.
        run: The flow run's short id (``flows.naming.short_run_id``).
    """

    root: str
    case_id: str
    run: str

    def __post_init__(self) -> None:
        # The folder is removed with rm -rf at the end of a run: it must be the
        # run's own folder, never a path that a stray value could widen.
        if not re.fullmatch(r"[0-9a-f]{8}", self.run):
            raise ValueError(f"run {self.run!r} is not a short flow run id (8 hex digits)")

    case_dir = _Folder("case")
    """The uploaded case folder."""
    output_dir = _Folder("interpreted")
    """What the interpreter writes (``plan/``, ``log/<beam>/``)."""
    log_dir = _Folder("logs")
    pid_dir = _Folder("pids")
    """One pid file per running stage: what the hooks kill."""
    dicom_root = _Folder("dicom")
    """RT Dose per beam (``beam_<N>/``): what is downloaded."""

    @property
    def case_root(self) -> str:
        """``<root>/<case_id>``: holds the case's run folders, nothing of its own."""
        return posixpath.join(self.root, self.case_id)

    @property
    def work_dir(self) -> str:
        """``<root>/<case_id>/run-<run>``: everything this run puts on the GPU host."""
        return posixpath.join(self.case_root, f"run-{self.run}")

    def removal_command(self) -> str:
        """The shell command that removes this run's folder (``paths.clean_remote_work_dir``),
        then the case's folder only if no other run's folder is in it: ``rmdir`` refuses
        a folder that is not empty, so another run of the case never loses its files to
        this one. Its exit status is not 0 when the case's folder stays."""
        return (f"rm -rf -- {shlex.quote(self.work_dir)} && "
                f"rmdir -- {shlex.quote(self.case_root)} 2>/dev/null")

    def _in(self, *parts: str) -> str:
        return posixpath.join(self.work_dir, *parts)

    def pid_file(self, step: str, beam: int | None = None) -> str:
        return self._in("pids", f"{step}{'' if beam is None else f'-beam{beam}'}.pid")

    def input_file(self, beam: int) -> str:
        return self._in("moqui", f"beam_{beam}.in")

    def raw_dir(self, beam: int) -> str:
        return self._in("raw", f"beam_{beam}")

    def dicom_dir(self, beam: int) -> str:
        return self._in("dicom", f"beam_{beam}")

    def beam_log_dir(self, beam: int) -> str:
        return posixpath.join(self.output_dir, "log", str(beam))

    @property
    def plan_dir(self) -> str:
        return posixpath.join(self.output_dir, "plan")

    # ------------------------------------------------------------ template values
    # The one place that says what each placeholder means. Which of them a step
    # may use is config.models.STEP_PLACEHOLDERS, the registry `mqi config check`
    # validates templates against: a step is offered exactly those, never fewer.
    def step_values(self, step: str, beam: Beam | None = None,
                    gpu_id: GpuId | None = None) -> dict[str, object]:
        """The values a command template of ``step`` may use, for this case (and beam).

        Raises:
            TemplateError: The step takes a per-beam or per-GPU value and no beam
                or GPU was given (a step used where the workflow cannot supply it).
        """
        offered: dict[str, object] = {
            "case_id": self.case_id, "case_dir": self.case_dir, "work_dir": self.work_dir,
            "output_dir": self.output_dir, "log_dir": self.log_dir}
        if beam is not None:
            offered |= {
                "beam_number": beam.number, "beam_name": beam.name,
                "beam_dir": posixpath.join(self.case_dir, beam.delivery_dir),
                "input_file": self.input_file(beam.number),
                "raw_dir": self.raw_dir(beam.number), "dicom_dir": self.dicom_dir(beam.number)}
        if gpu_id is not None:
            offered["gpu_id"] = gpu_id
        wanted = STEP_PLACEHOLDERS.get(step, CASE_PLACEHOLDERS)
        missing = sorted(wanted - offered.keys())
        if missing:
            raise TemplateError(f"step {step!r} needs {', '.join(missing)}, which this "
                                f"point of the workflow cannot supply")
        return {name: offered[name] for name in sorted(wanted)}

    def moqui_values(self, beam: Beam, gpu_id: GpuId) -> dict[str, object]:
        """The values of ``moqui.input_template`` that the case, beam and GPU decide.

        ``output_format`` and ``random_seed`` (the rest of
        ``config.models.MOQUI_PLACEHOLDERS``) come from the ``moqui`` section itself.
        """
        values: dict[str, object] = {
            "case_id": self.case_id, "gpu_id": gpu_id, "parent_dir": self.work_dir,
            "dicom_dir": self.plan_dir, "log_dir": self.beam_log_dir(beam.number),
            "output_dir": self.raw_dir(beam.number), "beam_number": beam.number,
            "gantry_num": beam.gantry_num if beam.gantry_num is not None else ""}
        return values


def remote_layout(cfg: MqiConfig, case_id: str, flow_run_id: UUID | str,
                  host: str | None = None) -> RemoteLayout:
    """The remote work folder of flow run ``flow_run_id`` of case ``case_id`` on the GPU
    host ``host`` (None: the one, or first, GPU host), which may have its own work root."""
    root = cfg.gpu.host_entry(host or cfg.gpu.primary).remote_work_root \
        or cfg.paths.remote_work_root
    return RemoteLayout(root.rstrip("/") or "/", case_id, short_run_id(flow_run_id))


def results_dir(cfg: MqiConfig, case_id: str) -> Path:
    """``<results_root>/<case_id>``: RT Dose files, stage logs and the report."""
    return Path(cfg.paths.results_root) / case_id
