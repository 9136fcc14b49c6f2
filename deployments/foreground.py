"""Cases processed in this process: `mqi run`, `mqi rerun`, and the API `mqi status` reads.

``use_config`` must run before Prefect is imported (Prefect reads its settings
at import), which is why nothing here imports Prefect at module level.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from config import ENV_VAR, MqiConfig, MqiError, load_config
from deployments import server

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient

    from deployments.status import CaseStatus

RERUNNABLE = ("FAILED", "CRASHED", "CANCELLED")


class CaseNotRun(MqiError):
    """A case could not be (re)run, or its run did not complete."""


def use_config(config_file: Path) -> MqiConfig:
    """Load the config and point this process (and the flows in it) at it and its API.

    Raises:
        ConfigError: The file is invalid.
        ServerError: ``prefect.api_url`` is set and does not answer.
    """
    cfg = load_config(config_file)
    os.environ[ENV_VAR] = str(config_file)
    api = cfg.prefect.effective_api_url
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


def process(case_dir: str, workflow: str) -> str | None:
    """Run process_case here; print where a COMPLETED case's results are.

    Returns:
        None when the case COMPLETED, else what became of it.
    """
    from flows.process_case import process_case

    state = process_case(case_dir=case_dir, workflow=workflow, return_state=True)
    name = Path(case_dir).name
    if state.is_completed():
        outcome = state.result()
        print(f"case {name}: COMPLETED — results in {outcome.results} "
              f"(report: {outcome.report})")
        return None
    return f"case {name}: {state.type.value}" + (f": {state.message}" if state.message else "")


def run_case(case_dir: Path, workflow: str) -> None:
    """Process one case folder here.

    Raises:
        CaseNotRun: It is not a folder, or its run did not complete (said why).
    """
    if not case_dir.is_dir():
        raise CaseNotRun(f"not a case folder: {case_dir}")
    problem = process(str(case_dir.absolute()), workflow)
    if problem is not None:
        raise CaseNotRun(problem)


def chosen_for_rerun(case_id: str | None, *, force: bool) -> list[CaseStatus]:
    """The runs to repeat: every failed case (no ``case_id``), or the one named.

    A COMPLETED case is chosen only with ``force`` (otherwise that is said, and none is).

    Raises:
        CaseNotRun: The named case is unknown, queued or running.
    """
    from deployments.status import case_statuses

    rows = case_statuses()
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
    from the result store. A case whose content changed since gets a new run,
    and so does a run that was not created through the deployment (``mqi run``).

    Raises:
        CaseNotRun: Naming every case that did not complete (or whose folder is gone).
    """
    from prefect.client.orchestration import get_client

    problems: list[str] = []
    followed: list[tuple[str, UUID]] = []
    with get_client(sync_client=True) as client:
        for row in rows:
            try:
                followed.append((row.case_id, _restart(client, row, workflow)))
            except CaseNotRun as exc:
                problems.append(str(exc))
        if wait:
            problems += [p for case_id, run_id in followed
                         if (p := _follow(client, case_id, run_id, poll)) is not None]
        else:
            for case_id, run_id in followed:
                print(f"case {case_id}: flow run {run_id} scheduled (`mqi status` follows it)")
    if problems:
        raise CaseNotRun("\n".join(problems))


def _restart(client: SyncPrefectClient, row: CaseStatus, workflow: str) -> UUID:
    """Schedule the case's run again, or create a new one; return the run's id."""
    from uuid import UUID

    from prefect.states import Scheduled

    from config import get_config
    from flows.case_inspection import CaseRejected, content_digest
    from flows.naming import DEPLOYMENT, case_tag, run_key, run_name

    if not row.case_dir or not Path(row.case_dir).is_dir():
        raise CaseNotRun(f"case {row.case_id}: its folder {row.case_dir} is gone")
    cfg = get_config()
    try:
        digest = content_digest(row.case_dir, ignore={cfg.scanner.ready_marker})
    except (CaseRejected, OSError) as exc:
        raise CaseNotRun(f"case {row.case_id}: {exc}") from None
    run = client.read_flow_run(UUID(row.flow_run_id))
    key = run_key(row.case_id, digest)
    if run.deployment_id is not None and run.idempotency_key == key:
        tasks = _task_states(client, run.id)
        reused = sorted(n for n, s in tasks.items() if s == "COMPLETED")
        again = sorted(n for n, s in tasks.items() if s != "COMPLETED")
        client.set_flow_run_state(run.id, Scheduled(message="Retried by mqi rerun"),
                                  force=True)
        print(f"case {row.case_id}: retrying flow run {run.id} (was {row.status}); "
              f"reused: {', '.join(reused) or 'nothing'}; "
              f"runs again: {', '.join(again) or 'what did not start'}")
        return run.id
    why = "its content changed" if run.deployment_id is not None else \
        "its last run was not started through the deployment"
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    new = client.create_flow_run_from_deployment(
        deployment.id, parameters={"case_dir": row.case_dir, "workflow": workflow},
        idempotency_key=key, name=run_name(row.case_id), tags=[case_tag(row.case_id)])
    print(f"case {row.case_id}: {why} since flow run {run.id}; new flow run {new.id}")
    return new.id


def _task_states(client: SyncPrefectClient, run_id: UUID) -> dict[str, str]:
    """The newest state of each task of a flow run, by task-run name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {t.name: t.state.type.value if t.state else "PENDING" for t in tasks}


def _follow(client: SyncPrefectClient, case_id: str, run_id: UUID, poll: float) -> str | None:
    """Wait for the run to end; None when it COMPLETED, else what became of it."""
    started = time.monotonic()
    hinted = False
    while True:
        run = client.read_flow_run(run_id)
        state = run.state
        if state is not None and state.is_final():
            break
        if not hinted and time.monotonic() - started > 30 and state is not None \
                and state.is_scheduled():
            print(f"case {case_id}: still SCHEDULED after 30 s — is `mqi up` (or a worker "
                  f"on the work pool) running?", file=sys.stderr)
            hinted = True
        time.sleep(poll)
    if state.is_completed():
        print(f"case {case_id}: COMPLETED (flow run {run_id}, attempt {run.run_count})")
        return None
    return f"case {case_id}: {state.type.value}" + (f": {state.message}" if state.message
                                                      else "")
