"""The one description of every deployment; prefect.yaml mirrors it (a test holds them
together) and `mqi up`'s serve registers from it.

Two ways run the same deployments (docs/architecture.md#two-ways-to-run):

- one box: `mqi up` serves them from its own process;
- distributed: `prefect deploy --all` registers them on the work pool and
  `prefect worker start --pool <pool>` processes on any machine run them.

They never overwrite each other: a deployment that `prefect deploy` put on a
work pool belongs to the workers, and `mqi up` leaves it alone (its runs go to
the workers, whichever process creates them). Entrypoints are module paths, so a
worker finds the flow wherever it was started, in any folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from flows.naming import DEPLOYMENT_NAME, FLOW_NAME, SYSTEM_TAG

WORK_POOL = "mqi-process"
"""The process work pool `prefect deploy` targets (prefect.yaml)."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, under which name, with which defaults.

    Attributes:
        name: The deployment's name (the full name is ``<flow name>/<name>``).
        entrypoint: ``module:flow`` — a module path, not a file path.
        description: Shown in the UI.
        parameters: Default parameters of every run.
        tags: Tags of every run.
        schedule: Runner.add_flow / prefect.yaml schedule arguments (cron=, interval=),
            for scheduled housekeeping.
    """

    name: str
    entrypoint: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = (SYSTEM_TAG,)
    schedule: dict[str, Any] = field(default_factory=dict)

    @property
    def flow_name(self) -> str:
        return self.load().name

    @property
    def full_name(self) -> str:
        """``<flow>/<deployment>``, as run_deployment and the API name it."""
        return f"{self.flow_name}/{self.name}"

    def options(self) -> dict[str, Any]:
        """The arguments both Runner.add_flow (serve) and Flow.to_deployment (deploy) take,
        so the two ways to run register the very same deployment."""
        from prefect.types.entrypoint import EntrypointType

        return {"name": self.name, "tags": list(self.tags), "description": self.description,
                "parameters": self.parameters, "entrypoint_type": EntrypointType.MODULE_PATH,
                **self.schedule}

    def load(self) -> Any:
        """The flow object (imports the module)."""
        module, _, attribute = self.entrypoint.partition(":")
        return getattr(importlib.import_module(module), attribute)


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name=DEPLOYMENT_NAME,
        entrypoint=f"flows.process_case:{FLOW_NAME}",
        description="One case folder end to end: inspect, upload, interpreter, MOQUI per "
                    "beam on one GPU each, RT Dose conversion, download, verify, report.",
        parameters={"workflow": "default_qa"},
    ),
)
