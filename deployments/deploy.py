"""`mqi deploy`: make the Prefect server ready for workers (the distributed set-up).

Publishes the blocks flow runs load (deployments/publish.py), creates the
process work pool when it is missing, and registers every deployment of
deployments/definitions.py on it — what `prefect deploy --all` does from
prefect.yaml, without needing the repository — and makes the notification
automations (deployments/notifications.py). Workers then need only
``PREFECT_API_URL`` and this package: `prefect worker start --pool mqi-process`.
"""

from __future__ import annotations

from pathlib import Path

from config import MqiConfig
from deployments.capacity import case_slots
from deployments.definitions import CASES_QUEUE, WORK_POOL, deployments_for
from deployments.notifications import apply_notifications
from deployments.publish import publish


def ensure_work_pool(cfg: MqiConfig, name: str = WORK_POOL) -> list[str]:
    """Create the process work pool (Prefect's default job template) if it is missing,
    and bound its cases' queue to the cases allowed in flight at once; what was done,
    in words. The bound is on the queue, not the pool: housekeeping has a queue of its
    own on the pool (HOUSEKEEPING_QUEUE), which a backlog of cases never holds back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    limit, source = case_slots(cfg)
    bound = f"at most {limit} case(s) at once ({source})"
    done = []
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            done.append(f"created work pool {name!r} (type process)")
        try:
            queue = client.read_work_queue_by_name(CASES_QUEUE, work_pool_name=name)
        except ObjectNotFound:
            queue = client.create_work_queue(CASES_QUEUE, work_pool_name=name)
        if queue.concurrency_limit != limit:
            client.update_work_queue(queue.id, concurrency_limit=limit)
            done.append(f"work queue {CASES_QUEUE!r} of pool {name!r}: {bound}")
    return done


def deploy(cfg: MqiConfig, config_file: Path) -> list[str]:
    """Publish, create the pool, register the deployments, create the notification
    automations; return what was done, in words."""
    done = [f"published {', '.join(publish(cfg, config_file))}"]
    if cfg.cases.max_concurrent is None:
        _size_gpu_limit(cfg)  # the default bound follows the GPUs: know them first
    done += ensure_work_pool(cfg)
    # As `prefect deploy --all` does from prefect.yaml: every deployment, a housekeeping
    # one turned off in the configuration with its schedule inactive.
    for spec in deployments_for(cfg):
        queue = spec.work_queue
        spec.load().to_deployment(**spec.options(), work_queue_name=queue) \
            .apply(work_pool_name=WORK_POOL)
        done.append(f"deployed {spec.full_name} on work pool {WORK_POOL!r} (queue {queue})" +
                    ("" if spec.active else " (its schedule inactive: turned off in the "
                                            "configuration)"))
    # The server sends them, whoever runs the cases: a worker set-up needs them too.
    done += apply_notifications(cfg)
    return done


def _size_gpu_limit(cfg: MqiConfig) -> None:
    from deployments.up import prepare_gpu_limit

    problem = prepare_gpu_limit(cfg)
    if problem:
        print(f"warning: {problem}")
