"""How things are named in Prefect: the flow, its deployment, runs, tags, artifacts.

Every place that creates a run (the sensor, ``mqi rerun``, serve) or looks one
up (``mqi status``, the hooks, tests and benches) takes the names from here, so
that a dashboard filter such as ``case:<id>`` means the same thing everywhere.
Nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import re
from uuid import UUID

FLOW_NAME = "process_case"
DEPLOYMENT_NAME = "process-case"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
"""The full name ``prefect deployment run`` and ``run_deployment`` take."""

RUN_PREFIX = "case-"
INVALID_RUN_NAME = f"{RUN_PREFIX}(invalid id)"
"""The name of a run whose folder name failed the id check: never show the unchecked name."""

SYSTEM_TAG = "mqi"
SIMULATED_TAG = "SIMULATED"


def run_name(case_id: str) -> str:
    """``case-<case_id>``: the flow run's name, from its creation on."""
    return f"{RUN_PREFIX}{case_id}"


def short_run_id(flow_run_id: UUID | str) -> str:
    """The first 8 hex digits of a flow run's id: what names the run's remote work folder.

    Parsed as a UUID first, so whatever reaches a remote path (and ``rm -rf`` at the
    end of a run) is hex and nothing else. Two runs of one case sharing these 32 bits
    is unlikely enough; the folder is for one case's runs only.

    Raises:
        ValueError: ``flow_run_id`` is not a UUID.
    """
    return UUID(str(flow_run_id)).hex[:8]


def case_id_from_run_name(name: str) -> str | None:
    """The case id a run name carries, or None for a run not named by us."""
    if not name.startswith(RUN_PREFIX) or name == INVALID_RUN_NAME:
        return None
    return name.removeprefix(RUN_PREFIX)


def run_key(case_id: str, digest: str) -> str:
    """The idempotency key of a case's run: the same content never starts a second run."""
    return f"{case_id}:{digest[:32]}"


def case_tag(case_id: str) -> str:
    """``case:<case_id>``: the tag a dashboard filters one case's runs by."""
    return f"case:{case_id}"


def patient_tag(patient_hash: str) -> str:
    """``patient:<hash>``: a pseudonym, never the patient id itself."""
    return f"patient:{patient_hash}"


UNCACHED_STAGES = frozenset({"inspect", "verify", "report"})
"""Stages that run again on every attempt (they read local files; nothing to reuse)."""

SIMULATION_TASK = re.compile(r"run_moqui_sim-beam(\d+)(?:-gpu(\d+))?")


def simulation_task_run_name(beam: int, gpu: int | None = None) -> str:
    """``run_moqui_sim-beam<N>``, and ``-gpu<I>`` once the beam holds GPU index I.

    The GPU a beam holds is part of its task run's name so that the dashboard
    and ``mqi status`` show it while it runs, not only in the final report.
    """
    return f"run_moqui_sim-beam{beam}" + ("" if gpu is None else f"-gpu{gpu}")


def gpu_from_task_run_name(name: str) -> tuple[int, int] | None:
    """(beam, GPU index) from a simulation task run's name; None before a GPU is held."""
    match = SIMULATION_TASK.fullmatch(name)
    if match is None or match.group(2) is None:
        return None
    return int(match.group(1)), int(match.group(2))


def report_artifact_key(case_id: str) -> str:
    """``case-<case_id>``: the key of the case report artifact on each of its flow runs.

    Prefect allows only lowercase letters, digits and dashes in a key. An id that is
    already so is used as it is; any other id is lowercased, each run of other
    characters becomes one dash, and the first 8 hex digits of the id's SHA-256 are
    appended (``1.2.840.5`` → ``case-1-2-840-5-<hash>``), so that ids differing only
    in case or punctuation never share a key, and the key of an id never changes.
    """
    if re.fullmatch(r"[a-z0-9-]+", case_id):
        return f"{RUN_PREFIX}{case_id}"
    slug = re.sub(r"[^a-z0-9-]+", "-", case_id.lower()).strip("-")
    digest = hashlib.sha256(case_id.encode()).hexdigest()[:8]
    return f"{RUN_PREFIX}{slug}-{digest}" if slug else f"{RUN_PREFIX}{digest}"


def progress_artifact_key(case_id: str, beam: int) -> str:
    """``case-<case_id>-beam-<N>``: the key of a beam's simulation progress artifact."""
    return f"{report_artifact_key(case_id)}-beam-{beam}"


def gpu_tag(index: int) -> str:
    """``gpu:<index>``: the tag of a simulation task run that holds GPU ``index``."""
    return f"gpu:{index}"


# Blocks `mqi up` / `mqi deploy` publish and every flow run loads (flows/settings.py).
CONFIG_BLOCK = "mqi-config"
"""An MQI Configuration block: the validated configuration (no secrets, only their names)."""
HOST_BLOCK = "mqi-gpu-host"
"""The GPU host: an MQI Remote Host or MQI Local Host block, secrets as SecretStr."""
POOL_BLOCK = "mqi-gpu-pool"
RESULTS_BLOCK = "mqi-results"
"""A local-file-system block: where stage results are kept for every process."""

# The archiver (flows/archiver.py): scheduled housekeeping, one deployment.
ARCHIVER_FLOW = "archive_cases"
ARCHIVER_DEPLOYMENT = "archive-cases"
