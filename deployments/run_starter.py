"""How the sensor starts a case's run: through the deployment, over one warm client."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flows.naming import DEPLOYMENT, case_tag, run_name
from flows.run_states import ACTIVE

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient


class PrefectStarter:
    """Creates ``process_case`` runs through the deployment, over one long-lived client.

    The same as ``run_deployment(..., timeout=0)``, without a new client and a
    deployment lookup per case (which cost seconds on a busy server).
    """

    def __init__(self, deployment: str = DEPLOYMENT) -> None:
        self.deployment = deployment
        # The client stays open from the first case to close(); the stack holds it
        # the way prefect-shell's ShellOperation holds what it opens.
        self._exit_stack = ExitStack()
        self._client: SyncPrefectClient | None = None
        self._deployment_id: UUID | None = None

    def warm_up(self) -> None:
        """Open the client and find the deployment now, not when the first case is ready."""
        self._ready()

    def _ready(self) -> tuple[SyncPrefectClient, UUID]:
        from prefect.client.orchestration import get_client

        if self._client is None:
            client = self._exit_stack.enter_context(get_client(sync_client=True))
            _ask_again_soon(client)
            self._client = client
        if self._deployment_id is None:
            self._deployment_id = self._client.read_deployment_by_name(self.deployment).id
        return self._client, self._deployment_id

    def __call__(self, case_dir: str, case_id: str, key: str) -> str:
        client, deployment_id = self._ready()
        run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"case_dir": case_dir}, idempotency_key=key,
            name=run_name(case_id), tags=[case_tag(case_id)])
        return str(run.id)

    def active_runs(self, case_id: str) -> list[ActiveRun]:
        """The case's flow runs that have not ended, oldest first."""
        client, _ = self._ready()
        return active_runs(client, case_id)

    def close(self) -> None:
        self._client = None
        self._exit_stack.close()


@dataclass(frozen=True)
class ActiveRun:
    """A flow run of a case that has not ended (scheduled, waiting, running...)."""

    id: str
    key: str | None
    """Its idempotency key: which content it was created for."""
    state: str

    @property
    def short(self) -> str:
        return self.id[:8]




def active_runs(client: SyncPrefectClient, case_id: str) -> list[ActiveRun]:
    """Every flow run of ``case_id`` that has not ended, oldest first: whoever made it
    (the sensor, `mqi run`, `mqi rerun`, the UI), one case never has two at once."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run_name(case_id)]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType(s) for s in ACTIVE]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=20)
    return [ActiveRun(str(r.id), r.idempotency_key,
                      (r.state.name if r.state else None) or "Pending") for r in runs]


def _ask_again_soon(client: object) -> None:
    """Let the client's connection re-send a request the API answered "busy" at once.

    The embedded server answers 503 when SQLite is busy with another writer for a
    moment; Prefect's client then waits 2 s before asking again, the whole start
    latency budget. The transport Prefect built (TLS, limits, auth headers stay
    its own) is wrapped so such a request is re-sent within milliseconds; Prefect's
    slower retries remain behind it. Where the client's insides differ, nothing is
    changed: starts are then only slower under load.
    """
    from deployments.busy_retry import BusyRetryTransport

    inner = getattr(getattr(client, "_client", None), "_transport", None)
    if inner is not None and not isinstance(inner, BusyRetryTransport):
        client._client._transport = BusyRetryTransport(inner)  # type: ignore[attr-defined]
