"""The case report on the flow run: one markdown artifact that says where a case stands.

Its key is ``case-<case id>`` (``report_artifact_key``: made key-safe where the id
is not). It is made on the flow run itself — not on a task — as soon as the run
starts ("IN PROGRESS", every stage listed), rewritten in place as each stage
ends, and ends as one of:

- COMPLETED: the case report (report.md, as the ``report`` stage wrote it) and
  the stages with what each did;
- FAILED: which stages finished, which failed (the stage, the beam, the telling
  line), the last lines of that stage's log, the path of the full log, and the
  ``mqi rerun`` command that runs it again (finished stages are reused);
- CANCELLED / CRASHED: written by the flow's state hooks from what the API
  knows of the run's task runs (flows/process_case.py).

One artifact per flow run: a retry of the run (``mqi rerun``) rewrites the same
one; each new run of the case makes a new version of the key. Everything in it
passes the case's redaction first; nothing here may fail a case (an API that
does not answer costs the report an update, never the case its result).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast
from uuid import UUID

from config import DEFAULT_PATH, ENV_VAR
from config.models import BEAM_STEPS, LOCAL_STEPS
from config.redaction import Redactor, redact
from flows.commands import CaseIdError, validate_case_id
from flows.naming import report_artifact_key

if TYPE_CHECKING:
    from config import MqiConfig
    from flows.case_inspection import CaseInfo

log = logging.getLogger("mqi.case_report")

TAIL_LINES = 20
"""How many of the failed stage's last log lines the report shows."""

WAITING, DONE, FAILED, NOT_RUN = "waiting", "done", "FAILED", "not run"


@dataclass
class Row:
    """One stage (or one beam's step) in the report's table."""

    label: str
    status: str = WAITING
    note: str = ""


@dataclass(frozen=True)
class Failure:
    """A stage that failed, with what the report shows of it."""

    label: str
    reason: str
    log_path: str | None = None
    detail: str = ""


def beam_label(step: str, beam: int | None) -> str:
    """``step`` or ``step [beam N]``: as StageFailed.label names a stage."""
    return step if beam is None else f"{step} [beam {beam}]"


def rerun_command(case_id: str, workflow: str, config_path: str | None) -> str:
    """The `mqi rerun` command line that runs this case again (deployments/cli.py)."""
    words = ["mqi", "rerun"]
    if config_path and Path(config_path).resolve() != DEFAULT_PATH.resolve():
        words += ["--config", config_path]
    if workflow != "default_qa":
        words += ["--workflow", workflow]
    return shlex.join([*words, case_id])


class CaseReport:
    """The report of one flow run of one case, published as it changes."""

    def __init__(self, case_id: str, workflow: str, steps: Iterable[str], *,
                 simulated: bool, flow_run_id: UUID | None, rerun: str,
                 redactor: Callable[[str], str] = redact) -> None:
        self.case_id, self.workflow, self.steps = case_id, workflow, list(steps)
        self.simulated, self.flow_run_id, self.rerun = simulated, flow_run_id, rerun
        self.key = report_artifact_key(case_id)
        self.status = "IN PROGRESS"
        self.message = ""
        self.completed_text = ""
        self.failures: list[Failure] = []
        self._redact = redactor
        self._artifact: UUID | None = None
        self._warned = False
        self.rows: dict[str, Row] = {}
        # Steps on this machine (compare_dose) come after the results are back.
        remote = [s for s in self.steps if s not in LOCAL_STEPS]
        for label in ["inspect", "upload",
                      *(f"{s} [each beam]" if s in BEAM_STEPS else s for s in remote),
                      "download", "verify", *(s for s in self.steps if s in LOCAL_STEPS),
                      "report"]:
            self.rows[label] = Row(label)

    # --------------------------------------------------------------- what happened
    def inspected(self, info: CaseInfo) -> None:
        """Inspection passed: list each beam's steps in place of "[each beam]"."""
        rows: dict[str, Row] = {}
        for label, row in self.rows.items():
            step = label.removesuffix(" [each beam]")
            if step == label:
                rows[label] = row
                continue
            for beam in info.beams:
                rows[beam_label(step, beam.number)] = Row(beam_label(step, beam.number))
        self.rows = rows
        self.done("inspect", f"{len(info.beams)} treatment beam(s), {len(info.manifest)} files, "
                             f"{info.total_bytes / 1e6:.1f} MB")

    def done(self, stage: str, outcome: object = None, beam: int | None = None) -> None:
        """A stage (``beam``: of that beam) ended well; ``outcome`` is what it returned."""
        label = beam_label(stage, beam)
        row = self.rows.setdefault(label, Row(label))  # a stage not foreseen is added
        row.status, row.note = DONE, _note(outcome)
        self.publish()

    def failed_stage(self, stage: str, beam: int | None, exc: BaseException) -> None:
        """A stage (of one beam) failed; the case goes on with its other beams."""
        self._record(stage, beam, exc)
        self.publish()

    def finished(self, outcome: Any) -> None:
        """The flow returned: COMPLETED, with the report the ``report`` stage wrote."""
        self.status = "COMPLETED"
        path = getattr(outcome, "report", None)
        try:
            self.completed_text = Path(path).read_text() if path else ""
        except OSError as exc:
            self.completed_text = f"(report.md could not be read: {exc.strerror})"
        self.publish()

    def ended_with(self, exc: BaseException) -> None:
        """The flow raised: FAILED with why (interrupted, when it was not a failure)."""
        from flows.outcomes import CaseFailed, StageFailed

        if not isinstance(exc, Exception):  # cancelled, killed: the state hooks say which
            self.status, self.message = "INTERRUPTED", type(exc).__name__
        else:
            self.status = "FAILED"
            if isinstance(exc, StageFailed):
                self._record(exc.step, exc.beam, exc)
            elif not isinstance(exc, CaseFailed) or not self.failures:
                # the first stage not done yet is the one that was running
                stage = next((r.label for r in self.rows.values() if r.status == WAITING),
                             "process_case")
                self._record(stage, None, exc, label=stage)
        if self.failures:
            self.message = f"{', '.join(f.label for f in self.failures)} failed"
        for row in self.rows.values():
            if row.status == WAITING:
                row.status = NOT_RUN
        self.publish()

    def _record(self, stage: str, beam: int | None, exc: BaseException,
                label: str | None = None) -> None:
        from flows.outcomes import StageFailed

        label = label or beam_label(stage, beam)
        if isinstance(exc, StageFailed):
            failure = Failure(label, exc.reason, exc.log_path, exc.detail)
        else:
            text = str(exc).strip()
            failure = Failure(label, f"{type(exc).__name__}: {text.splitlines()[0]}"
                              if text else type(exc).__name__)
        self.failures = [f for f in self.failures if f.label != label] + [failure]
        # a stage listed once for the case that failed for one beam (verify) is that row
        key = label if label in self.rows or stage not in self.rows else stage
        row = self.rows.setdefault(key, Row(key))
        row.status, row.note = FAILED, failure.reason if key == label else \
            f"{label}: {failure.reason}"

    # -------------------------------------------------------------------- rendering
    def render(self) -> str:
        """The whole report as markdown (not yet redacted)."""
        sim = " — SIMULATED" if self.simulated else ""
        lines: list[str] = []
        if self.status == "COMPLETED" and self.completed_text:
            body = self.completed_text.rstrip().splitlines()
            lines += [body[0], "", "**Status: COMPLETED**", *body[1:], ""]
        else:
            lines += [f"# Case {self.case_id}: {self.status}{sim}", ""]
            if self.simulated:
                lines += ["> **SIMULATED**: produced by the bundled simulators, not by MOQUI. "
                          "Not for clinical use.", ""]
            lines += ["| | |", "|---|---|", f"| case id | `{self.case_id}` |",
                      f"| workflow | {self.workflow}: {' → '.join(self.steps)} |",
                      f"| status | **{self.status}**"
                      + (f": {_cell(self.message)}" if self.message else "") + " |",
                      f"| updated | {time.strftime('%Y-%m-%d %H:%M:%S %Z')} |", ""]
        lines += self._failure_lines()
        lines += ["## Stages", "", "| stage | status | detail |", "|---|---|---|"]
        lines += [f"| {r.label} | {r.status} | {_cell(r.note)} |" for r in self.rows.values()]
        lines.append("")
        if self.status != "COMPLETED" and self.status != "IN PROGRESS":
            lines += ["## Run it again", "",
                      "Stages that completed for the same inputs are reused, not repeated:",
                      "", "```", self.rerun, "```", ""]
        return "\n".join(lines)

    def _failure_lines(self) -> list[str]:
        lines: list[str] = []
        for f in self.failures:
            lines += [f"## {f.label} FAILED", "", f"**Reason:** {_cell(f.reason)}", ""]
            if f.log_path:
                lines += [f"Full log: `{f.log_path}`", ""]
            tail = _tail(f.log_path, TAIL_LINES) if f.log_path else None
            if tail is None and f.detail:
                tail = f.detail.splitlines()[-TAIL_LINES:]
            if tail:
                lines += [f"Last {len(tail)} lines of the log:", "", "````text", *tail,
                          "````", ""]
        return lines

    # ------------------------------------------------------------------- publishing
    def publish(self) -> None:
        """Write the report to the API: made on the first call, rewritten after."""
        markdown = self._redact(self.render())
        description = self._redact(f"Case {self.case_id}: {self.status}" + (
            f" ({', '.join(f.label for f in self.failures)})" if self.failures else ""))
        try:
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

            with get_client(sync_client=True) as client:
                if self._artifact is None:
                    self._artifact = find_report(client, self.key, self.flow_run_id)
                if self._artifact is None:
                    # flow_run_id given, not taken from a context: the hooks have none,
                    # and a report made inside a task would hang off that task.
                    self._artifact = client.create_artifact(ArtifactCreate(
                        key=self.key, type="markdown", data=markdown,
                        description=description, flow_run_id=self.flow_run_id)).id
                else:
                    client.update_artifact(self._artifact, ArtifactUpdate(
                        data=markdown, description=description))
        except Exception as exc:  # noqa: BLE001 - the report never fails the case
            if not self._warned:
                log.warning("case %s: the case report could not be written to the API: %s",
                            self.case_id, redact(str(exc)))
                self._warned = True


def find_report(client: Any, key: str, flow_run_id: UUID | None) -> UUID | None:
    """The case report artifact of this flow run (a retry's earlier attempt), if any."""
    if flow_run_id is None:
        return None
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
        sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0].id if found else None


def _note(outcome: object) -> str:
    """What a stage's result says in a few words."""
    from flows.outcomes import DownloadOutcome, SimulationOutcome, StepOutcome, UploadOutcome

    if isinstance(outcome, str):
        return outcome
    if isinstance(outcome, SimulationOutcome):
        where = f" on {outcome.host}" if outcome.host else ""  # one of several GPU hosts
        return (f"GPU {outcome.gpu}{where}, {outcome.seconds:.1f} s "
                f"(waited {outcome.waited:.1f} s)")
    if isinstance(outcome, UploadOutcome):
        return (f"{outcome.files} file(s), {outcome.bytes / 1e6:.1f} MB in "
                f"{outcome.seconds:.1f} s ({outcome.skipped} already there)")
    if isinstance(outcome, StepOutcome):
        return f"{outcome.seconds:.1f} s"
    if isinstance(outcome, DownloadOutcome):
        return f"{len(outcome.checksums)} file(s) in {outcome.seconds:.1f} s"
    if isinstance(outcome, dict):  # verify: beam → {file: sha}
        return f"{sum(len(v) for v in outcome.values())} RT Dose file(s) checked"
    return ""


def _cell(text: str) -> str:
    """Text for one markdown table cell (or one line): no pipes, no line breaks."""
    return " ".join(text.replace("|", "\\|").split())


def _tail(path: str, n: int) -> list[str] | None:
    """The last ``n`` lines of a stage's log file; None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    return [ln.replace("````", "'''") for ln in lines[-n:]]


# ------------------------------------------------------------ the flow's side of it
_CURRENT: contextvars.ContextVar[CaseReport | None] = contextvars.ContextVar(
    "mqi_case_report", default=None)


class _NoReport(CaseReport):
    """What ``current()`` gives where no report is kept: every call does nothing."""

    def __init__(self) -> None:
        super().__init__("none", "", (), simulated=False, flow_run_id=None, rerun="")

    def publish(self) -> None:
        return None


def current() -> CaseReport:
    """This flow run's report (or one that ignores every call, outside a report)."""
    return _CURRENT.get() or _NoReport()


def begin(cfg: MqiConfig, case_dir: str, workflow: str) -> CaseReport:
    """Start this flow run's report: IN PROGRESS, every stage of ``workflow`` listed.

    Call it once the case's redactor is installed. A case folder whose name fails
    the id check gets no report (its name must never reach the API).
    """
    from prefect.runtime import flow_run

    try:
        case_id = validate_case_id(Path(case_dir).name, cfg.cases.id_pattern)
    except CaseIdError:
        return current()
    run_id = flow_run.id
    report = CaseReport(case_id, workflow, cfg.workflows.get(workflow, []),
                        simulated=cfg.simulated, flow_run_id=UUID(run_id) if run_id else None,
                        rerun=rerun_command(case_id, workflow, config_source()))
    _CURRENT.set(report)
    report.publish()
    return report


def config_source() -> str | None:
    """The configuration file this installation runs on, for the rerun command."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    try:
        from blocks.published_config import PublishedConfig
        from flows.naming import CONFIG_BLOCK

        # Called from sync code: Prefect's async_dispatch returns the block itself.
        block = cast(PublishedConfig, PublishedConfig.load(CONFIG_BLOCK))
        source = block.source
    except Exception:  # noqa: BLE001 - the command is then given without --config
        return None
    return str(source) if source else None


P = ParamSpec("P")
R = TypeVar("R")


def reported(fn: Callable[P, R]) -> Callable[P, R]:
    """Finish the report ``begin`` started in ``fn``: COMPLETED, or FAILED with why."""

    # Only module-level names in here: serve pickles the flow (this closure with it)
    # by value, and a ContextVar does not pickle.
    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _open()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _close(token, exc)
            raise
        _close(token, None, result)
        return result

    return run


def _open() -> contextvars.Token[CaseReport | None]:
    return _CURRENT.set(None)


def _close(token: contextvars.Token[CaseReport | None], exc: BaseException | None,
           result: object = None) -> None:
    try:
        if exc is not None:
            current().ended_with(exc)
        else:
            current().finished(result)
    except Exception as problem:  # noqa: BLE001 - the report never changes the outcome
        log.warning("the case report could not be finished: %s", redact(str(problem)))
    finally:
        _CURRENT.reset(token)


# -------------------------------------------------------- cancelled and crashed runs
STATE_WORDS = {"COMPLETED": DONE, "FAILED": FAILED, "CRASHED": "CRASHED",
               "CANCELLED": "CANCELLED", "RUNNING": "was running",
               "CANCELLING": "was running"}


def report_end(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: the report says CANCELLED or CRASHED, and what the
    API knows of each stage then. Runs with no run context (the parent process), so
    everything comes from the flow run, the configuration and the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.case_inspection import case_redactor, pseudonym
    from flows.settings import flow_config, hook_attempt

    try:
        cfg = flow_config(hook_attempt(flow_run))
        case_dir = str(flow_run.parameters.get("case_dir", ""))
        case_id = validate_case_id(Path(case_dir).name, cfg.cases.id_pattern)
    except Exception:  # noqa: BLE001 - no report without a checked id (nor a config)
        return
    workflow = str(flow_run.parameters.get("workflow") or "default_qa")
    # Not installed: this process (serve) works for many cases.
    redactor: Redactor = case_redactor(case_dir, pseudonym(cfg))
    report = CaseReport(case_id, workflow, cfg.workflows.get(workflow, []),
                        simulated=cfg.simulated, flow_run_id=flow_run.id,
                        rerun=rerun_command(case_id, workflow, config_source()),
                        redactor=lambda text: redact(redactor.redact(text)))
    report.status = state.type.value if state is not None else "ENDED"
    report.message = (state.message or "") if state is not None else ""
    try:
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run.id])), limit=200)
    except Exception:  # noqa: BLE001 - the report then lists the stages as planned
        tasks = []
    seen = {t.name: t for t in sorted(tasks, key=lambda t: t.created.timestamp()
                                                if t.created else 0.0)}
    if seen:
        report.rows = {}
        for name, task in seen.items():
            kind = task.state.type.value if task.state else "PENDING"
            report.rows[name] = Row(name, STATE_WORDS.get(kind, kind.lower()),
                                    task.state.message or "" if task.state else "")
    report.publish()
