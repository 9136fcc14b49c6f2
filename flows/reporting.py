"""What a case leaves to be seen: stage log files and the case report (report.md).

Logs sent to the Prefect API cost per line, so each stage's full output is
kept as a file in the case's results folder, and only what a person needs to
follow (progress, errors, summaries) goes to the API. Nothing here names the
patient: the case id and, where config allows, a pseudonymous hash. A beam's
progress is flows/progress.py; the report on the flow run, flows/case_report.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from config import MqiConfig

if TYPE_CHECKING:
    from flows.case_inspection import CaseInfo
    from flows.outcomes import SimulationOutcome


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


def render_report(cfg: MqiConfig, info: CaseInfo, workflow: str,
                  sims: dict[int, SimulationOutcome],
                  files: dict[str, dict[str, str]], seconds: float) -> str:
    """The case report (markdown): plan, beams, GPU used, durations, result files."""
    sim = " — SIMULATED" if cfg.simulated else ""
    lines = [f"# MQI verification report: case {info.case_id}{sim}", ""]
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
