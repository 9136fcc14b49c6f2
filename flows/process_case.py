"""The case pipeline: one flow run per case, one task run per stage.

    inspect ─► upload ─► workflow steps (case steps in order; per-beam steps in
    parallel across beams, each simulation on one concrete GPU) ─► download ─►
    verify ─► report

Stages that ran before for the same inputs are not repeated (flows/caching.py):
a rerun of a case that failed in beam 2 re-runs beam 2 and what follows it, and
nothing else. The stage tasks are in flows/stages.py.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed

from blocks.errors import HostAuthenticationError, HostKeyError
from blocks.factory import MissingSecretError
from config import ConfigError, MqiConfig, MqiError
from config.models import BEAM_STEPS, GPU_STEP
from config.redaction import install
from config.templates import TemplateError
from flows import case_report
from flows.case_inspection import CaseInfo, CaseRejected, case_redactor, pseudonym
from flows.commands import CaseIdError, render_step_command, validate_case_id
from flows.layout import RemoteLayout, remote_layout, results_dir
from flows.naming import (
    FLOW_NAME,
    INVALID_RUN_NAME,
    SIMULATED_TAG,
    case_tag,
    patient_tag,
    run_name,
)
from flows.outcomes import CaseFailed, CaseOutcome, SimulationOutcome, StageFailed
from flows.settings import flow_config, flow_host, flow_pool, hook_attempt, result_storage
from flows.stages import (
    beam_step,
    case_step,
    download_stage,
    inspect_stage,
    report_stage,
    simulate_beam,
    upload_stage,
    verify_stage,
)


def _options(cfg: MqiConfig, step: str) -> dict[str, Any]:
    """Prefect task options (retries with backoff) from the step's policy in config."""
    policy = cfg.policy(step)
    retries = policy.retries or 0
    delay = policy.retry_delay_seconds or 0
    factor = policy.backoff_factor or 1
    return {"retries": retries,
            "retry_delay_seconds": [delay * factor ** i for i in range(retries)] or 0,
            "retry_condition_fn": may_heal,
            # One result store for every process that may run or rerun this case.
            "result_storage": result_storage(cfg)}


P = ParamSpec("P")
R = TypeVar("R")

WILL_NOT_HEAL: tuple[type[Exception], ...] = (
    HostAuthenticationError, HostKeyError, MissingSecretError, ConfigError, TemplateError,
    CaseIdError, CaseRejected)
"""Failures a retry cannot fix: refused credentials or host key, a missing key file or
secret, a configuration or template error, a rejected case. They end the stage at once."""


def may_heal(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry unless the failure is one that will not heal."""
    return not isinstance(state.result(raise_on_failure=False), WILL_NOT_HEAL)


# ------------------------------------------------------------------------- hooks
def kill_remote_processes(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: kill this flow run's remote process groups.

    Runs in the parent (serve/worker) process with no task context, or in the
    flow-run process when the engine itself reports the crash
    (docs/prefect-behaviours.md#hooks-without-task-context): everything comes
    from the flow run (its id and the case id in its parameters) and the
    configuration, and running it twice is harmless. Only this run's pid folder
    is read: another run of the same case is not this run's to kill.
    """
    logger = logging.getLogger("mqi.process_case")
    attempt = hook_attempt(flow_run)
    cfg = flow_config(attempt)
    case_id = Path(str(flow_run.parameters.get("case_dir", ""))).name
    try:
        validate_case_id(case_id, cfg.cases.id_pattern)
    except CaseIdError:
        return
    layout = remote_layout(cfg, case_id, flow_run.parameters.get("resume") or flow_run.id)
    host = flow_host(cfg, attempt)
    listed = host.run(f"ls -1 -- {shlex.quote(layout.pid_dir)}", check=False, stream=False)
    for name in listed.stdout.split():
        if name.endswith(".pid"):
            killed = host.kill_pid_file(f"{layout.pid_dir}/{name}")
            logger.warning("case %s is %s: killed remote %s: %s", case_id, state.name, name,
                           killed)


def _flow_run_id() -> str:
    """This flow run's id: what names its remote work folder and enters its cache keys."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        raise RuntimeError("process_case runs only as a flow run (no flow run id)")
    return str(run_id)


def _run_name() -> str:
    from prefect.runtime import flow_run

    name = Path(str(flow_run.parameters.get("case_dir", ""))).name
    try:
        return run_name(validate_case_id(name, flow_config().cases.id_pattern))
    except CaseIdError:
        return INVALID_RUN_NAME  # never put an unchecked folder name anywhere


def _through_redaction(fn: Callable[P, R]) -> Callable[P, R]:
    """Make every failure of the flow an ``MqiError``, whose message is redacted as it
    is made: Prefect stores a failed flow's message (and notifications quote it) from
    the exception's text, and an ``OSError`` names its file — whose name can carry a
    patient id. The original stays as the cause, for the run log (redacted there by
    the logging filter)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MqiError:
            raise
        except Exception as exc:
            raise MqiError(f"{type(exc).__name__}: {exc}") from exc

    return run


# -------------------------------------------------------------------------- flow
@flow(name=FLOW_NAME, flow_run_name=_run_name,
      on_cancellation=[kill_remote_processes, case_report.report_end],
      on_crashed=[kill_remote_processes, case_report.report_end])
@_through_redaction
@case_report.reported
def process_case(case_dir: str, workflow: str = "default_qa",
                 resume: str | None = None) -> CaseOutcome:
    """Process one case folder end to end. Fails with the stage, beam and reason.

    Args:
        case_dir: The case folder (its name is the case id).
        workflow: The configured workflow to run.
        resume: The id of an ended flow run of this case whose remote folder and
            finished stages this run takes over: what `mqi rerun` passes when that
            run cannot be retried itself (made by `mqi run`, its deployment gone).
    """
    started = time.time()
    cfg = flow_config()
    # Before anything about the case is said: its patient ids are replaced in every
    # message, log line and state this process makes (config/redaction.py).
    install(case_redactor(case_dir, pseudonym(cfg)))
    page = case_report.begin(cfg, case_dir, workflow)  # the report on the flow run
    logger = get_run_logger()
    if workflow not in cfg.workflows:
        raise ValueError(f"no workflow {workflow!r} (configured: {', '.join(cfg.workflows)})")
    info = inspect_stage(case_dir)
    page.inspected(info)
    _tag_run(info)
    case_id, digest = info.case_id, info.manifest_digest
    # Passed to every remote stage as an input (not read inside the tasks): it is part
    # of their cache keys, so a retry of this run resumes and another run starts afresh
    # in its own, empty folder (flows/stages.py).
    run_id = resume or _flow_run_id()
    layout = remote_layout(cfg, case_id, run_id)
    page.done("upload", upload_stage.with_options(**_options(cfg, "upload"))(
        info.case_dir, case_id, digest, run_id, layout.case_dir))

    steps = cfg.workflows[workflow]
    sims: dict[int, SimulationOutcome] = {}
    failures: list[str] = []
    i = 0
    while i < len(steps) and not failures:
        step = steps[i]
        if step not in BEAM_STEPS:
            command = render_step_command(cfg, step, layout.step_values(step))
            page.done(step, case_step.with_options(**_options(cfg, step))(
                step, case_id, digest, run_id, command))
            i += 1
            continue
        if GPU_STEP in steps[i:] and not sims:
            # The admission limit must exist (`mqi run` may come before any `mqi up`);
            # sizing it to the GPUs is `mqi up`'s and the curator's work, not each case's.
            flow_pool(cfg).ensure_limit_exists(flow_host(cfg))
        chain = []  # consecutive per-beam steps run as one chain per beam, beams in parallel
        while i < len(steps) and steps[i] in BEAM_STEPS:
            chain.append(steps[i])
            i += 1
        sims, failures = _run_beam_chains(cfg, info, run_id, layout, chain)
    if failures:
        raise CaseFailed(case_id, failures)

    beams = [b.number for b in info.beams]
    downloaded = download_stage.with_options(**_options(cfg, "download"))(
        case_id, digest, run_id, tuple(steps), tuple(sorted(sims)))
    page.done("download", downloaded)
    files = verify_stage(case_id, beams)
    page.done("verify", files)
    report = report_stage(info, workflow, sims, files, started)
    page.done("report", report)
    if cfg.paths.clean_remote_work_dir:
        # check=False: the case's folder stays while another run's folder is in it
        flow_host(cfg).run(layout.removal_command(), stream=False, check=False)
    logger.info("case %s COMPLETED%s: results in %s", case_id,
                " (SIMULATED)" if cfg.simulated else "", results_dir(cfg, case_id))
    return CaseOutcome(case_id=case_id, results=str(results_dir(cfg, case_id)), report=report,
                       gpus={b: s.gpu for b, s in sims.items()},
                       download_seconds=downloaded.seconds)


def _run_beam_chains(cfg: MqiConfig, info: CaseInfo, run_id: str, layout: RemoteLayout,
                     chain: list[str]) -> tuple[dict[int, SimulationOutcome], list[str]]:
    """Run every beam's chain of steps, beams in parallel; return sim results and failures.

    A beam's next step is submitted only once its previous step completed, so a
    failed beam leaves no task run waiting for it: the run's graph ends with the
    failure instead of a downstream task Pending for ever.
    """
    case_id, digest = info.case_id, info.manifest_digest
    beams = {beam.number: beam for beam in info.beams}

    def submit(beam_number: int, position: int) -> PrefectFuture[Any]:
        step, beam = chain[position], beams[beam_number]
        if step == GPU_STEP:
            return simulate_beam.with_options(**_options(cfg, step)).submit(
                case_id, digest, run_id, beam)
        command = render_step_command(cfg, step, layout.step_values(step, beam))
        return beam_step.with_options(**_options(cfg, step)).submit(
            step, case_id, digest, run_id, beam.number, command)

    running = {submit(number, 0): (number, 0) for number in beams}
    sims: dict[int, SimulationOutcome] = {}
    failures: list[str] = []
    while running:
        future = next(as_completed(list(running)))
        beam_number, position = running.pop(future)
        step = chain[position]
        try:
            outcome = future.result()
        except StageFailed as exc:  # already names the step and the beam
            failures.append(exc.summary)
            case_report.current().failed_stage(step, beam_number, exc)
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            first = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"{step} [beam {beam_number}]: {type(exc).__name__}: {first}")
            case_report.current().failed_stage(step, beam_number, exc)
        else:
            case_report.current().done(step, outcome, beam_number)
            if step == GPU_STEP:
                sims[beam_number] = outcome
            if position + 1 < len(chain):
                running[submit(beam_number, position + 1)] = (beam_number, position + 1)
            continue
        not_run = chain[position + 1:]
        if not_run:
            get_run_logger().warning("beam %d: %s not run, because %s failed", beam_number,
                                     ", ".join(not_run), step)
    return sims, failures


def _tag_run(info: CaseInfo) -> None:
    """Label the flow run with the case id (and the pseudonym, where config allows)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    cfg = flow_config()
    tags = {case_tag(info.case_id)}
    if cfg.cases.patient_id_in_logs == "hash":
        tags.add(patient_tag(info.patient_hash))
    if cfg.simulated:
        tags.add(SIMULATED_TAG)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, tags=sorted(set(run.tags) | tags))
