"""What stages return and how they fail: typed, so no caller parses a message.

Task results are persisted (pickled) for the cache and exceptions cross from a
task to its flow, so every class here pickles with all its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from config import MqiError
from config.redaction import redact


class StageFailed(MqiError):
    """A stage did not succeed.

    ``str(exc)`` is the whole message (summary, then the last lines of output);
    ``summary`` is its first line, which names the stage, the beam and why.

    Attributes:
        step: The stage or workflow step (``upload``, ``run_moqui_sim``, ...).
        reason: Why, in a few words (``exit code 3``, ``log contains 'FATAL ERROR'``).
        beam: The beam number, for per-beam steps.
        exit_code: The command's exit status, when a command ran to its end.
        log_path: The local file holding the stage's full output.
        detail: The telling output line and the tail of the output.
    """

    def __init__(self, step: str, reason: str, *, beam: int | None = None,
                 exit_code: int | None = None, log_path: str | None = None,
                 detail: str = "") -> None:
        self.step = step
        self.reason = redact(reason)  # stage output can name the case's files
        self.beam = beam
        self.exit_code = exit_code
        self.log_path = log_path
        self.detail = redact(detail)
        super().__init__(self.summary + (f"\n{detail}" if detail else ""))

    @property
    def label(self) -> str:
        """``step`` or ``step [beam N]``."""
        return self.step if self.beam is None else f"{self.step} [beam {self.beam}]"

    @property
    def summary(self) -> str:
        """One line: the stage, the beam, the reason and where the full log is."""
        where = f"; full log: {self.log_path}" if self.log_path else ""
        return f"{self.label} failed: {self.reason}{where}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_stage_failed, (self.step, self.reason, self.beam, self.exit_code,
                                        self.log_path, self.detail))


def _rebuild_stage_failed(step: str, reason: str, beam: int | None, exit_code: int | None,
                          log_path: str | None, detail: str) -> StageFailed:
    return StageFailed(step, reason, beam=beam, exit_code=exit_code, log_path=log_path,
                       detail=detail)


class CaseFailed(MqiError):
    """One or more beams failed; the message lists each with its reason."""

    def __init__(self, case_id: str, failures: list[str]) -> None:
        self.case_id = case_id
        self.failures = list(failures)
        super().__init__(f"case {case_id}: " + "; ".join(self.failures))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CaseFailed, (self.case_id, self.failures))


@dataclass(frozen=True)
class UploadOutcome:
    """What ``upload`` moved to the GPU host."""

    files: int
    skipped: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class StepOutcome:
    """A workflow step that ran to success (``beam`` is None for case steps)."""

    step: str
    seconds: float
    beam: int | None = None


@dataclass(frozen=True)
class SimulationOutcome:
    """One beam's MOQUI run: which GPU index it held, for how long, after what wait."""

    beam: int
    gpu: int
    seconds: float
    waited: float
    host: str | None = None
    """Which of several GPU hosts (``gpu.hosts``) ran it; None with one GPU host."""


@dataclass(frozen=True)
class DownloadOutcome:
    """The result files brought back, with the SHA-256 the GPU host computed."""

    checksums: dict[str, str]
    seconds: float


@dataclass(frozen=True)
class CaseOutcome:
    """A case that COMPLETED: where its results are and which GPU each beam used."""

    case_id: str
    results: str
    report: str
    gpus: dict[int, int] = field(default_factory=dict)
    download_seconds: float = 0.0
