"""Cases processed in this process: `mqi run`, `mqi rerun`, and the API `mqi status` reads.

``use_config`` must run before Prefect is imported (Prefect reads its settings
at import), which is why nothing here imports Prefect at module level.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import ENV_VAR, MqiConfig, MqiError, load_config
from deployments import server

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from deployments.status import CaseStatus

from flows.run_states import FAILED as RERUNNABLE


class CaseNotRun(MqiError):
    """A case could not be (re)run, or its run did not complete."""


def use_config(config_file: Path, need_server: str | None = None) -> MqiConfig:
    """Load the config and point this process (and the flows in it) at it and its API.

    Args:
        config_file: The configuration.
        need_server: Why a running server is required (no in-process fallback then).

    Raises:
        ConfigError: The file is invalid.
        ServerError: ``prefect.api_url`` is set and does not answer, or ``need_server``
            and no server answers.
    """
    cfg = load_config(config_file)
    os.environ[ENV_VAR] = str(config_file)
    api = cfg.prefect.effective_api_url
    if need_server and not server.is_healthy(api):
        raise server.ServerError(f"no Prefect server answers at {api}: {need_server}; "
                                 f"start `mqi up` first")
    if cfg.prefect.api_url is not None or server.is_healthy(api):
        if not server.is_healthy(api):
            raise server.ServerError(f"the Prefect API at {api} (prefect.api_url) is not "
                                     f"reachable")
        os.environ.update(server.client_env(cfg))
    else:
        # No server running: Prefect's in-process server on the same database, so
        # what this run records is there when `mqi up` starts.
        env = server.server_env(cfg)
        env.pop("PREFECT_API_URL")
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.update(env)
        server.prefect_home(cfg).mkdir(parents=True, exist_ok=True)
        print(f"mqi: no Prefect server at {api}; using an in-process one on "
              f"{server.prefect_home(cfg)}", file=sys.stderr)
    return cfg


class _WithoutTracebacks(logging.Formatter):
    """Formats as ``inner`` does, leaving out exception tracebacks (the run log keeps them)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _quiet_tracebacks() -> None:
    """The terminal gets Prefect's lines without tracebacks: a failed case ends with its
    one-line reason. The API log (the dashboard) and --debug keep them whole."""
    from prefect.logging.handlers import APILogHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler | _WithoutTracebacks) and \
                    not isinstance(handler.formatter, _WithoutTracebacks):
                handler.setFormatter(_WithoutTracebacks(handler.formatter))


def shown(name: str) -> str:
    """A name as the terminal shows it: repr'd when it holds control characters."""
    return name if name.isprintable() else repr(name)


def process(case_dir: str, workflow: str, debug: bool = False) -> str | None:
    """Run process_case here; print where a COMPLETED case's results are.

    Returns:
        None when the case COMPLETED, else what became of it.
    """
    from flows.process_case import process_case

    if not debug:
        _quiet_tracebacks()
    state = process_case(case_dir=case_dir, workflow=workflow, return_state=True)
    name = shown(Path(case_dir).name)
    if state.is_completed():
        outcome = state.result()
        print(f"case {name}: COMPLETED — results in {outcome.results} "
              f"(report: {outcome.report})")
        return None
    return f"case {name}: {state.type.value}" + (f": {state.message}" if state.message else "")


def run_case(case_dir: Path, workflow: str, debug: bool = False) -> None:
    """Process one case folder here.

    Raises:
        CaseNotRun: It is not a folder, or its run did not complete (said why).
    """
    if not case_dir.is_dir():
        raise CaseNotRun(f"not a case folder: {shown(str(case_dir))}")
    _refuse_a_second_active_run(case_dir.name)
    problem = process(str(case_dir.absolute()), workflow, debug)
    if problem is not None:
        raise CaseNotRun(problem)


def _refuse_a_second_active_run(name: str) -> None:
    """One case never has two runs at once, whoever starts them."""
    from prefect.client.orchestration import get_client

    from deployments.run_starter import active_runs

    with get_client(sync_client=True) as client:
        active = active_runs(client, name)
    if active:
        raise CaseNotRun(f"case {shown(name)} has an active run ({active[0].id}, "
                         f"{active[0].state}); not starting a second one")


def chosen_for_rerun(case_id: str | None, *, force: bool) -> list[CaseStatus]:
    """The runs to repeat: every failed case (no ``case_id``), or the one named.

    A COMPLETED case is chosen only with ``force`` (otherwise that is said, and none is).

    Raises:
        CaseNotRun: The named case is unknown, queued or running.
    """
    from deployments.status import case_statuses

    # Every failed case needs only failed runs read (and those cases' newer runs).
    rows = case_statuses(only_failed=case_id is None)
    if case_id is None:
        chosen = [r for r in rows if r.status in RERUNNABLE]
        if not chosen:
            print("no failed cases")
        return chosen
    chosen = [r for r in rows if r.case_id == case_id][:1]
    if not chosen:
        raise CaseNotRun(f"no run of case {case_id!r} is known")
    status = chosen[0].status
    if status == "COMPLETED" and not force:
        print(f"case {case_id} is already COMPLETED (use --force to run it again)")
        return []
    if status == "QUEUED" or status.startswith("RUNNING"):
        raise CaseNotRun(f"case {case_id} is {status}; not starting a second run")
    return chosen


def rerun(rows: list[CaseStatus], workflow: str, *, wait: bool = True,
          poll: float = 1.0) -> None:
    """Retry each case's failed flow run on the deployment's infrastructure.

    The same flow run is scheduled again (as ``prefect flow-run retry`` does) and
    serve or a worker resumes it: stages that completed for the same inputs come
    from the result store. A new run is created instead — and said so — when the
    content changed since, another workflow is asked for, or the old run cannot
    be picked up any more (made by ``mqi run``, or its deployment was deleted or
    moved to a work pool since).

    Raises:
        CaseNotRun: Naming every case that did not complete (or could not be rerun).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    problems: list[str] = []
    followed: dict[UUID, str] = {}
    with get_client(sync_client=True) as client:
        for row in rows:
            try:
                followed[_restart(client, row, workflow)] = row.case_id
            except CaseNotRun as exc:
                problems.append(str(exc))
            except ObjectNotFound as exc:
                problems.append(f"case {row.case_id}: {exc}")
        if wait:
            problems += _follow(client, followed, poll)
        else:
            for run_id, case_id in followed.items():
                print(f"case {case_id}: flow run {run_id} scheduled (`mqi status` follows it)")
    if problems:
        raise CaseNotRun("\n".join(problems))


def _restart(client: SyncPrefectClient, row: CaseStatus, workflow: str) -> UUID:
    """Schedule the case's run again, or create a new one; return the run's id."""
    from uuid import UUID

    from prefect.exceptions import ObjectNotFound

    from config import get_config
    from flows.case_inspection import CaseRejected, content_digest
    from flows.naming import DEPLOYMENT, case_tag, run_key, run_name

    if not row.case_dir or not Path(row.case_dir).is_dir():
        raise CaseNotRun(f"case {row.case_id}: its folder {row.case_dir} is gone")
    cfg = get_config()
    try:
        digest = content_digest(row.case_dir, ignore={cfg.scanner.ready_marker})
    except CaseRejected as exc:
        raise CaseNotRun(f"case {row.case_id}: {exc.reason}") from None
    except OSError as exc:  # never the file's name: names can carry a patient id
        raise CaseNotRun(f"case {row.case_id}: cannot read its folder "
                         f"({exc.strerror or type(exc).__name__})") from None
    run = client.read_flow_run(UUID(row.flow_run_id))
    try:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        raise CaseNotRun(f"case {row.case_id}: no deployment {DEPLOYMENT} on this server; "
                         f"start `mqi up` (or `mqi deploy` for workers) first") from None
    key = run_key(row.case_id, digest)
    why = _why_not_the_same_run(run, deployment, key, workflow)
    if why is None:
        return _retry(client, run.id, row)
    parameters: dict[str, Any] = {"case_dir": row.case_dir, "workflow": workflow}
    if why in (MADE_BY_CLI, DEPLOYMENT_GONE, MOVED_TO_WORKERS):
        # The same content and workflow: the new run takes over the old run's remote
        # folder and finished stages (it has ended; no two runs of a case at once).
        parameters["resume"] = (run.parameters or {}).get("resume") or str(run.id)
    new = client.create_flow_run_from_deployment(
        deployment.id, parameters=parameters,
        # The plain key would hand back that same old run, which Prefect keeps for it.
        idempotency_key=f"{key}:after:{run.id}", name=run_name(row.case_id),
        tags=[case_tag(row.case_id)])
    if new.state is not None and new.state.is_final():  # made by an earlier rerun
        return _retry(client, new.id, row)
    print(f"case {row.case_id}: {why} since flow run {run.id}; new flow run {new.id}")
    return new.id


def _why_not_the_same_run(run: FlowRun, deployment: Any, key: str,
                          workflow: str) -> str | None:
    """Why the old run cannot simply be retried; None when it can."""
    if run.idempotency_key and not run.idempotency_key.startswith(key):
        return "its content changed"
    if (run.parameters or {}).get("workflow", "default_qa") != workflow:
        return f"workflow {workflow} was asked for"
    if run.deployment_id is None:
        return MADE_BY_CLI
    if run.deployment_id != deployment.id:
        return DEPLOYMENT_GONE
    if deployment.work_pool_name and run.work_queue_id is None:
        return MOVED_TO_WORKERS
    return None


MADE_BY_CLI = "its last run was made by `mqi run`, not through the deployment"
DEPLOYMENT_GONE = "the deployment of its last run is gone"
MOVED_TO_WORKERS = "the deployment moved to the workers"


def _retry(client: SyncPrefectClient, run_id: UUID, row: CaseStatus) -> UUID:
    """Schedule a finished run again, as the UI's Retry does."""
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Scheduled

    from flows.naming import UNCACHED_STAGES

    run = client.read_flow_run(run_id)  # again, just before: it may have started since
    if run.state is None or not run.state.is_final() or \
            run.state.type == StateType.COMPLETED and row.status != "COMPLETED":
        raise CaseNotRun(f"case {row.case_id}: its run {run_id} is "
                         f"{run.state.type.value if run.state else 'unknown'} now; not "
                         f"starting it again")
    stages = _stage_states(client, run_id)
    reused = sorted(n for n, s in stages.items() if s == "COMPLETED" and
                    n.split("-")[0] not in UNCACHED_STAGES)
    again = sorted(n for n, s in stages.items() if s != "COMPLETED")
    result: Any = client.set_flow_run_state(run_id, Scheduled(message="Retried by mqi rerun"),
                                       force=True)
    if result.status != SetStateStatus.ACCEPT:
        raise CaseNotRun(f"case {row.case_id}: the server refused to schedule run {run_id} "
                         f"again ({result.details})")
    print(f"case {row.case_id}: retrying flow run {run_id} (was {row.status}); "
          f"reused: {', '.join(reused) or 'nothing'}; "
          f"runs again: {', '.join(again) or 'what had not started'}")
    return run_id


def _stage_states(client: SyncPrefectClient, run_id: UUID) -> dict[str, str]:
    """The newest state of each task of a flow run, by task-run name."""
    from datetime import UTC, datetime

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200)
    newest = sorted(tasks, key=lambda t: t.created or datetime.min.replace(tzinfo=UTC))
    return {t.name: t.state.type.value if t.state else "PENDING" for t in newest}


def _follow(client: SyncPrefectClient, runs: dict[UUID, str], poll: float) -> list[str]:
    """Wait for every run to end; what became of those that did not complete."""
    started = time.monotonic()
    hinted = False
    pending = dict(runs)
    problems = []
    while pending:
        for run_id, case_id in list(pending.items()):
            run = client.read_flow_run(run_id)
            state = run.state
            if state is None or not state.is_final():
                continue
            del pending[run_id]
            if state.is_completed():
                print(f"case {case_id}: COMPLETED (flow run {run_id}, attempt {run.run_count})")
            else:
                problems.append(f"case {case_id}: {state.type.value}" +
                                (f": {state.message}" if state.message else ""))
        if pending and not hinted and time.monotonic() - started > 30:
            print(f"still waiting for {len(pending)} run(s) to be picked up or to end — is "
                  f"`mqi up` (or a worker on the work pool) running? (Ctrl+C stops waiting; "
                  f"the runs stay scheduled)", file=sys.stderr)
            hinted = True
        if pending:
            time.sleep(poll)
    return problems
