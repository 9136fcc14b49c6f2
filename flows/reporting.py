"""What a case leaves to be seen: stage log files, per-beam progress, the case report.

Logs sent to the Prefect API cost per line, so each stage's full output is
kept as a file in the case's results folder, and only what a person needs to
follow (progress, errors, summaries) goes to the API. Nothing here names the
patient: the case id and, where config allows, a pseudonymous hash.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from config import MqiConfig

if TYPE_CHECKING:
    from flows.case_inspection import CaseInfo
    from flows.dose_qa import DoseQaOutcome
    from flows.outcomes import SimulationOutcome

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


class StageLog:
    """A stage's whole output, appended to a file as it arrives."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")

    def write(self, stream: str, line: str) -> None:
        self._fh.write(f"{stream}: {line}\n" if stream == "stderr" else f"{line}\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ProgressReporter:
    """Turns MOQUI's batch lines into a Prefect progress artifact for one beam."""

    def __init__(self, case_id: str, beam: int, gpu: int, simulated: bool) -> None:
        self.beam, self.gpu = beam, gpu
        self._logger = get_run_logger()
        self._label = f"case {case_id} beam {beam} on GPU {gpu}" + \
            (" (SIMULATED)" if simulated else "")
        # Made at the first progress line, not here: this runs between a GPU being
        # ours and the simulation starting, where every API call is GPU time lost.
        self._artifact: UUID | None = None
        self._shown = 0.0
        self._last_update = 0.0

    def line(self, stream: str, text: str) -> None:
        match = PROGRESS.search(text)
        if not match:
            self._logger.info("[beam %d] %s%s", self.beam,
                              "stderr: " if stream == "stderr" else "", text)
            return
        done, total = int(match.group(1)), int(match.group(2))
        percent = 100.0 * done / max(total, 1)
        # At most one API update a second (and always the last): lines can be many.
        if percent >= 100 or (percent - self._shown >= 1 and
                              time.monotonic() - self._last_update >= 1.0):
            self._set(percent)
            self._logger.info("[beam %d] %d of %d batches (%.0f%%)", self.beam, done, total,
                              percent)

    def _set(self, percent: float, note: str = "") -> None:
        self._shown = percent
        self._last_update = time.monotonic()
        if self._artifact is None:
            # Called from a sync task, so Prefect's sync_compatible returns the id itself.
            self._artifact = cast(UUID, create_progress_artifact(
                progress=percent, description=self._label + note))
            return
        update_progress_artifact(self._artifact, progress=percent,
                                 description=self._label + note)

    def finish(self, failed: bool = False) -> None:
        if failed:
            self._set(self._shown, " — FAILED")
        elif self._shown < 100:
            self._set(100.0)


def render_report(cfg: MqiConfig, info: CaseInfo, workflow: str,
                  sims: dict[int, SimulationOutcome],
                  files: dict[str, dict[str, str]], seconds: float,
                  qa: DoseQaOutcome | None = None) -> str:
    """The case report (markdown): the dose QA verdict first, then plan, beams, GPU used,
    durations, result files."""
    from flows.dose_qa import report_section

    sim = " — SIMULATED" if cfg.simulated else ""
    lines = [f"# MQI verification report: case {info.case_id}{sim}", ""]
    lines += report_section(qa)
    if cfg.simulated:
        lines += ["> **SIMULATED**: produced by the bundled simulators, not by MOQUI. "
                  "Not for clinical use.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| case id | `{info.case_id}` |",
        f"| plan | {info.plan_label or '(no label)'} (`{info.plan_file}`) |",
    ]
    if cfg.cases.patient_id_in_logs == "hash":
        lines.append(f"| patient (pseudonym) | `{info.patient_hash}` |")
    lines += [
        f"| workflow | {workflow}: {' → '.join(cfg.workflows[workflow])} |",
        f"| treatment beams | {len(info.beams)} (setup beams excluded: {info.setup_beams}) |",
        f"| case content | {len(info.manifest)} files, {info.total_bytes / 1e6:.1f} MB, "
        f"digest `{info.manifest_digest[:16]}` |",
        f"| wall time | {seconds:.1f} s |",
        "",
        "## Beams", "",
        "| beam | name | machine | gantry | GPU | simulation (s) | waited for GPU (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for beam in info.beams:
        s = sims.get(beam.number)
        lines.append(f"| {beam.number} | {beam.name} | {beam.machine} | {beam.gantry_num} | "
                     + (f"{s.gpu} | {s.seconds:.1f} | {s.waited:.1f} |" if s
                        else "— | — | — |"))
    lines += ["", "## Result files", "", "| beam | file | SHA-256 |", "|---|---|---|"]
    for beam_key, entries in sorted(files.items(), key=lambda kv: int(kv[0])):
        for name, digest in entries.items():
            lines.append(f"| {beam_key} | `{name}` | `{digest}` |")
    lines += ["", f"Stage logs: `{Path(cfg.paths.results_root) / info.case_id / 'logs'}`", ""]
    return "\n".join(lines)
