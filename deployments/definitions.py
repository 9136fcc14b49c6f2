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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flows.naming import (
    ARCHIVER_DEPLOYMENT,
    ARCHIVER_FLOW,
    DEPLOYMENT_NAME,
    FLOW_NAME,
    SYSTEM_TAG,
)

if TYPE_CHECKING:
    from config import MqiConfig

WORK_POOL = "mqi-process"
"""The process work pool `prefect deploy` targets (prefect.yaml)."""
CASES_QUEUE = "default"
"""The pool's queue of the cases: its concurrency limit bounds the cases in flight."""
HOUSEKEEPING_QUEUE = "housekeeping"
"""The pool's queue of the curator and the archiver: no limit, never behind the cases."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, under which name, with which defaults.

    Attributes:
        name: The deployment's name (the full name is ``<flow name>/<name>``).
        entrypoint: ``module:flow`` — a module path, not a file path.
        description: Shown in the UI.
        parameters: Default parameters of every run.
        tags: Tags of every run.
        schedule: When it runs by itself, for scheduled housekeeping: the keys of one
            prefect.yaml ``schedules:`` entry (``cron`` or ``interval``, and ``timezone``,
            ``active``, ``slug``); empty: only when asked for.
        configured_by: For housekeeping the configuration sets: the schedule a
            configuration asks for (``active: False`` turns the deployment off).
            ``schedule`` then holds the default configuration's, and ``for_config``
            gives the spec a configuration means.
    """

    name: str
    entrypoint: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = (SYSTEM_TAG,)
    schedule: dict[str, Any] = field(default_factory=dict)
    configured_by: Callable[[MqiConfig], dict[str, Any]] | None = None

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
                **self._schedules()}

    def _schedules(self) -> dict[str, Any]:
        if not self.schedule:
            return {}
        from prefect.schedules import Cron, Interval, RRule

        given = dict(self.schedule)
        extra = {k: given[k] for k in ("timezone", "active", "slug") if k in given}
        if "cron" in given:
            made = Cron(given["cron"], **extra)
        elif "rrule" in given:
            made = RRule(given["rrule"], **extra)
        else:
            made = Interval(given["interval"], **extra)
        return {"schedules": [made]}

    def for_config(self, cfg: MqiConfig) -> DeploymentSpec:
        """This deployment as ``cfg`` wants it: its schedule from the configuration."""
        if self.configured_by is None:
            return self
        return replace(self, schedule=self.configured_by(cfg))

    @property
    def work_queue(self) -> str:
        """Its queue on the work pool: the cases' bounded one, or housekeeping's."""
        return CASES_QUEUE if self.name == DEPLOYMENT_NAME else HOUSEKEEPING_QUEUE

    @property
    def active(self) -> bool:
        """False when the configuration turned this housekeeping off: serve leaves it out."""
        return bool(self.schedule.get("active", True))

    def schedule_variables(self) -> dict[str, Any]:
        """The Prefect variables prefect.yaml's schedule of this deployment reads, by name.

        `prefect deploy` cannot read our configuration, so `mqi up` and `mqi deploy`
        publish each configured schedule value as ``mqi_<name>_<key>`` (``-`` as ``_``)
        and prefect.yaml names them (``"{{ prefect.variables.mqi_<name>_<key> }}"``):
        both ways register the schedule the configuration says, and `prefect deploy`
        fails on an empty cron rather than invent one when nothing was published.
        """
        if self.configured_by is None:
            return {}
        slug = self.name.replace("-", "_")
        return {f"mqi_{slug}_{key}": value for key, value in self.schedule.items()}

    def load(self) -> Any:
        """The flow object (imports the module)."""
        module, _, attribute = self.entrypoint.partition(":")
        return getattr(importlib.import_module(module), attribute)


def _archiver_schedule(cfg: MqiConfig | None) -> dict[str, Any]:
    """``archiver.schedule_cron`` in ``archiver.schedule_timezone``; ``enabled: false``
    makes it inactive (None: the defaults)."""
    from config.models import ArchiverSettings

    section = ArchiverSettings() if cfg is None else cfg.archiver
    return {"cron": section.schedule_cron, "timezone": section.schedule_timezone,
            "active": section.enabled}


def _curator_schedule(cfg: MqiConfig | None) -> dict[str, Any]:
    """Every ``curator.interval_seconds``; ``curator.enabled: false`` makes it inactive
    (None: the defaults)."""
    from config.models import CuratorSettings

    section = CuratorSettings() if cfg is None else cfg.curator
    # An rrule, not an interval: prefect.yaml reads it from a Prefect variable, and
    # `prefect deploy` checks a schedule's fields before it fills variables in — a
    # placeholder passes as an rrule's text, never as an interval's number.
    every = max(1, round(section.interval_seconds))
    return {"rrule": f"FREQ=SECONDLY;INTERVAL={every}", "active": section.enabled}


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name=DEPLOYMENT_NAME,
        entrypoint=f"flows.process_case:{FLOW_NAME}",
        description="One case folder end to end: inspect, upload, interpreter, MOQUI per "
                    "beam on one GPU each, RT Dose conversion, download, verify, report.",
        parameters={"workflow": "default_qa"},
    ),
    # the archiver's block: its schedule is the configuration's `archiver` section
    DeploymentSpec(
        name=ARCHIVER_DEPLOYMENT,
        entrypoint=f"flows.archiver:{ARCHIVER_FLOW}",
        description="Housekeeping: each case whose newest run COMPLETED more than "
                    "archiver.keep_days ago, its case folder and results packed into one "
                    "verified archive, then deleted; docs/archiver.md.",
        schedule=_archiver_schedule(None),
        configured_by=_archiver_schedule,
    ),
    # the GPU curator's block: its schedule is the configuration's `curator` section
    DeploymentSpec(
        name="curate-gpus",
        entrypoint="flows.curator:curate_gpus",
        description="Housekeeping: the GPU pool every curator.interval_seconds — the "
                    "gpu-pool table artifact, mqi.gpu.status and mqi.gpu.warning events, the "
                    "admission limit sized to the usable GPUs, stale GPU locks, zombie runs "
                    "and leftover work folders repaired; docs/curator.md.",
        schedule=_curator_schedule(None),
        configured_by=_curator_schedule,
    ),
)


def deployments_for(cfg: MqiConfig) -> tuple[DeploymentSpec, ...]:
    """Every deployment as ``cfg`` configures it (housekeeping schedules from its sections).

    Serve registers the ``active`` ones; `mqi deploy`, like `prefect deploy --all`,
    registers all of them on the work pool, an inactive schedule making no runs.
    """
    return tuple(spec.for_config(cfg) for spec in DEPLOYMENTS)


def schedule_variables(cfg: MqiConfig) -> dict[str, Any]:
    """The Prefect variables prefect.yaml's configured schedules read (``mqi up`` and
    ``mqi deploy`` publish them; see ``DeploymentSpec.schedule_variables``)."""
    return {name: value for spec in deployments_for(cfg)
            for name, value in spec.schedule_variables().items()}
