"""Where a case's files live: on the GPU host (work folder) and here (results).

Every path is derived from the validated case id alone, so a hook that has
nothing but the flow run's parameters (cancellation, crash) finds the same
pid files the running stages wrote.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from config import MqiConfig


@dataclass(frozen=True)
class RemoteLayout:
    """The case's working folder on the GPU host."""

    root: str
    case_id: str

    @property
    def work_dir(self) -> str:
        return posixpath.join(self.root, self.case_id)

    def _in(self, *parts: str) -> str:
        return posixpath.join(self.work_dir, *parts)

    @property
    def case_dir(self) -> str:
        return self._in("case")

    @property
    def output_dir(self) -> str:
        return self._in("interpreted")

    @property
    def log_dir(self) -> str:
        return self._in("logs")

    @property
    def pid_dir(self) -> str:
        return self._in("pids")

    @property
    def dicom_root(self) -> str:
        return self._in("dicom")

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


def remote_layout(cfg: MqiConfig, case_id: str) -> RemoteLayout:
    return RemoteLayout(cfg.paths.remote_work_root.rstrip("/") or "/", case_id)


def results_dir(cfg: MqiConfig, case_id: str) -> Path:
    """``<results_root>/<case_id>``: RT Dose files, stage logs and the report."""
    return Path(cfg.paths.results_root) / case_id
