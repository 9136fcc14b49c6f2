"""What a flow run works with — configuration, GPU host and pool, result storage —
loaded from blocks on the Prefect server.

`mqi up` and `mqi deploy` publish them from the YAML (deployments/publish.py);
every flow run loads them by name, so a worker on another machine needs only
``PREFECT_API_URL``, and a block changed in the UI takes effect on the next run.
``MQI_CONFIG_PATH`` set in the flow's own environment wins over the published
configuration (development, tests); the GPU host block wins over the host the
configuration describes, because that is where credentials live.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, cast

from blocks.gpu_pool import GpuPool
from blocks.host import Host
from config import ENV_VAR, ConfigError, MqiConfig, get_config
from config.loader import parse_config
from flows.naming import CONFIG_BLOCK, HOST_BLOCK, POOL_BLOCK, RESULTS_BLOCK


def _run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def flow_config(run_id: str | None = None) -> MqiConfig:
    """The configuration of this flow run (``run_id``: for hooks, outside the run)."""
    if os.environ.get(ENV_VAR):
        return get_config()
    return _published_config(run_id or _run_id() or "")


@functools.lru_cache(maxsize=8)
def _published_config(run_id: str) -> MqiConfig:
    """Loaded once per flow run: a run sees one configuration from start to end."""
    from blocks.published_config import PublishedConfig

    try:
        # Called from sync code: Prefect's async_dispatch returns the block itself.
        block = cast(PublishedConfig, PublishedConfig.load(CONFIG_BLOCK))
    except ValueError:
        # Never fall back to the bundled default: a run on a wrong configuration
        # would send a case to the wrong host.
        raise ConfigError(f"block {CONFIG_BLOCK}", [
            ("", f"no configuration is published on this Prefect server (block "
                 f"{CONFIG_BLOCK}) and {ENV_VAR} is not set: run `mqi up` or `mqi deploy` "
                 f"with the installation's configuration first")]) from None
    return parse_config(block.settings, Path(f"block {CONFIG_BLOCK} (from {block.source})"))


def flow_host(cfg: MqiConfig) -> Host:
    """The GPU host: the published block when there is one, else built from config."""
    from blocks.factory import gpu_host
    from blocks.local_host import LocalHost
    from blocks.remote_host import RemoteHost

    kind: Any = LocalHost if cfg.hosts[cfg.gpu.host].kind == "local" else RemoteHost
    try:
        host: Host = kind.load(HOST_BLOCK)
    except ValueError:
        return gpu_host(cfg)
    return host


def result_storage(cfg: MqiConfig) -> str | None:
    """The slug of the block that keeps stage results; None: Prefect's local default."""
    return cfg.prefect.result_storage_block or _published_results(_run_id() or "")


def flow_pool(cfg: MqiConfig) -> GpuPool:
    """The GPU pool: the published block when there is one, else built from config."""
    from blocks.factory import gpu_pool

    try:
        return cast(GpuPool, GpuPool.load(POOL_BLOCK))
    except ValueError:
        return gpu_pool(cfg)


@functools.lru_cache(maxsize=8)
def _published_results(run_id: str) -> str | None:
    from prefect.filesystems import LocalFileSystem

    try:
        LocalFileSystem.load(RESULTS_BLOCK)
    except ValueError:
        return None
    return f"local-file-system/{RESULTS_BLOCK}"
