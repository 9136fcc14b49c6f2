"""Cases processed in this process: `mqi run`, `mqi rerun`, and the API `mqi status` reads.

``use_config`` must run before Prefect is imported (Prefect reads its settings
at import), which is why nothing here imports Prefect at module level.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from config import ENV_VAR, MqiConfig, MqiError, load_config
from deployments import server

if TYPE_CHECKING:
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


def rerun(rows: list[CaseStatus], workflow: str) -> None:
    """Run each case again in turn; stages done for the same inputs are reused.

    Raises:
        CaseNotRun: Naming every case that did not complete (or whose folder is gone).
    """
    problems = []
    for row in rows:
        if not row.case_dir or not Path(row.case_dir).is_dir():
            problems.append(f"case {row.case_id}: its folder {row.case_dir} is gone")
            continue
        print(f"rerunning case {row.case_id} (was {row.status}); finished stages are reused")
        problem = process(row.case_dir, workflow)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise CaseNotRun("\n".join(problems))
