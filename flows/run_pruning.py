"""Deleting old flow runs through the API (``archiver.prune_runs_after_days``; off by default).

Only finished runs (COMPLETED, FAILED, CRASHED, CANCELLED) that ended before the
cutoff, of this installation's flows (process_case, the archiver, and any run
tagged ``mqi``), and never a case's newest run while that case's folders are
still here: `mqi status` and `mqi rerun` need it, and the archiver ages the case
by it. The server drops a deleted run's task runs with it; its artifacts are
deleted here; its logs go when the server's orphan vacuum runs
(``PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED`` with ``orphans``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from flows.naming import FLOW_NAME, SYSTEM_TAG
from flows.run_states import FINISHED

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

PAGE = 200


def _finished_before(client: SyncPrefectClient, cutoff: datetime, *,
                     flow_names: list[str] | None = None,
                     tag: str | None = None) -> list[FlowRun]:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    which = FlowRunFilter(
        end_time=FlowRunFilterEndTime.model_validate({"before_": cutoff}),
        state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType(s) for s in FINISHED])),
        tags=FlowRunFilterTags(all_=[tag]) if tag else None)
    flows = FlowFilter(name=FlowFilterName(any_=flow_names)) if flow_names else None
    found: list[FlowRun] = []
    while True:
        page = client.read_flow_runs(flow_filter=flows, flow_run_filter=which,
                                     sort=FlowRunSort.ID_DESC, limit=PAGE,
                                     offset=len(found))
        found += page
        if len(page) < PAGE:
            return found


def prunable_runs(client: SyncPrefectClient, cutoff: datetime, flow_names: Iterable[str],
                  keep: set[UUID]) -> list[FlowRun]:
    """The finished runs of ours that ended before ``cutoff``, less ``keep``."""
    runs = {r.id: r for r in _finished_before(client, cutoff,
                                               flow_names=[FLOW_NAME, *flow_names])}
    runs |= {r.id: r for r in _finished_before(client, cutoff, tag=SYSTEM_TAG)}
    return [r for run_id, r in runs.items() if run_id not in keep]


def delete_runs(client: SyncPrefectClient, runs: Iterable[FlowRun]) -> int:
    """Delete each run and its artifacts; how many runs were deleted."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.exceptions import ObjectNotFound

    deleted = 0
    for run in runs:
        for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))):
            with suppress(ObjectNotFound):
                client.delete_artifact(artifact.id)
        try:
            client.delete_flow_run(run.id)
        except ObjectNotFound:
            continue  # gone meanwhile (another pruner, the UI)
        deleted += 1
    return deleted
