"""`mqi deploy`: make the Prefect server ready for workers (the distributed set-up).

Publishes the blocks flow runs load (deployments/publish.py), creates the
process work pool when it is missing, and registers every deployment of
deployments/definitions.py on it — what `prefect deploy --all` does from
prefect.yaml, without needing the repository. Workers then need only
``PREFECT_API_URL`` and this package: `prefect worker start --pool mqi-process`.
"""

from __future__ import annotations

from pathlib import Path

from config import MqiConfig
from deployments.definitions import DEPLOYMENTS, WORK_POOL
from deployments.publish import publish


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool with Prefect's default job template; True if new."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return True


def deploy(cfg: MqiConfig, config_file: Path) -> list[str]:
    """Publish, create the pool, register the deployments; return what was done, in words."""
    done = [f"published {', '.join(publish(cfg, config_file))}"]
    if ensure_work_pool():
        done.append(f"created work pool {WORK_POOL!r} (type process)")
    for spec in DEPLOYMENTS:
        spec.load().to_deployment(**spec.options()).apply(work_pool_name=WORK_POOL)
        done.append(f"deployed {spec.full_name} on work pool {WORK_POOL!r}")
    return done
