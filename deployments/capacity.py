"""How many cases may be in flight at once: ``cases.max_concurrent``, or the GPUs + 2.

Both ways of running bound it with Prefect's own mechanism: serve with the
runner's limit (deployments/serve.py), workers with the concurrency limit of the
work pool's cases queue, `default` (deployments/deploy.py; housekeeping has a queue
of its own). A case beyond it stays Scheduled — QUEUED in
`mqi status`, Scheduled/Late in the UI — and costs no process and no memory
until a slot frees; the runner takes the waiting runs in order of their
scheduled time, so the oldest case goes first.
"""

from __future__ import annotations

import logging

from config import MqiConfig

log = logging.getLogger("mqi.capacity")

SPARE_CASES = 2
"""Cases beyond one per GPU: their upload and interpreter run while the GPUs are busy,
so a freed GPU finds a beam ready instead of waiting for an upload."""
WHEN_GPUS_UNKNOWN = 4
"""The bound when the GPU limit cannot be read (the GPU host was down at start)."""


def case_slots(cfg: MqiConfig) -> tuple[int, str]:
    """The bound, and where it comes from (in words, for the log)."""
    if cfg.cases.max_concurrent is not None:
        return cfg.cases.max_concurrent, "cases.max_concurrent"
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            gpus = client.read_global_concurrency_limit_by_name(cfg.gpu.concurrency_limit).limit
    except Exception as exc:  # noqa: BLE001 - no limit yet, API hiccup: a safe default
        log.warning("GPU limit %s not readable (%s); at most %d cases at once",
                    cfg.gpu.concurrency_limit, exc, WHEN_GPUS_UNKNOWN)
        return WHEN_GPUS_UNKNOWN, "the GPU count is unknown"
    return max(1, gpus) + SPARE_CASES, f"{gpus} GPU(s) + {SPARE_CASES}"
