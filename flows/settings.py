"""What a flow run works with — configuration, GPU host and pool, result storage —
loaded from blocks on the Prefect server.

`mqi up` and `mqi deploy` publish them from the YAML (deployments/publish.py);
every flow run loads them by name, so a worker on another machine needs only
``PREFECT_API_URL``, and a block changed in the UI takes effect on the next run
(each attempt of a run loads them once and keeps them to its end, so a republish
mid-run cannot send later stages to another host).

``MQI_CONFIG_PATH`` set in the flow's own environment (``mqi run``, tests) means
"this file, wholly": its configuration and the host and pool it describes. The
GPU host block is otherwise the truth for the host, since credentials live there.
With several GPU hosts (``gpu.hosts``) each is its own block, ``mqi-gpu-host-<name>``
(``flow_gpu_hosts``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydantic import ValidationError

from blocks.gpu_pool import GpuPool
from blocks.host import Host
from config import ENV_VAR, ConfigError, MqiConfig, get_config
from config.loader import parse_config
from flows.naming import CONFIG_BLOCK, HOST_BLOCK, POOL_BLOCK, RESULTS_BLOCK, gpu_host_block

if TYPE_CHECKING:
    from prefect.filesystems import WritableFileSystem

B = TypeVar("B")


def current_attempt() -> str:
    """``<flow run id>:<run count>`` inside a flow run; "" outside one."""
    from prefect.runtime import flow_run

    return f"{flow_run.id}:{flow_run.run_count}" if flow_run.id else ""


def hook_attempt(flow_run: Any) -> str:
    """The same, for a state hook, which runs outside the flow run's context."""
    return f"{flow_run.id}:{flow_run.run_count}"


def _from_file() -> bool:
    return bool(os.environ.get(ENV_VAR))


def _load(kind: type[B], name: str) -> B | None:
    """The block ``name`` of type ``kind``; None when there is none (a broken one raises)."""
    try:
        # Called from sync code: Prefect's async_dispatch returns the block itself.
        return cast(B, kind.load(name))  # type: ignore[attr-defined]
    except ValidationError:
        raise  # there, but not valid: never quietly fall back to something else
    except ValueError:  # "Unable to find block document named ..."
        return None


def _once_per_attempt(load: Any) -> Any:
    """Cache ``load`` per attempt of a flow run; outside a run, load every time."""
    cached = functools.lru_cache(maxsize=16)(load)

    def get(attempt: str, *args: Any) -> Any:
        return cached(attempt, *args) if attempt else load(attempt, *args)

    return get


def _published_config(_attempt: str) -> MqiConfig:
    from blocks.published_config import PublishedConfig

    block = _load(PublishedConfig, CONFIG_BLOCK)
    if block is None:
        # Never fall back to the bundled default: a run on a wrong configuration
        # would send a case to the wrong host.
        raise ConfigError(f"block {CONFIG_BLOCK}", [
            ("", f"no configuration is published on this Prefect server (block "
                 f"{CONFIG_BLOCK}) and {ENV_VAR} is not set: run `mqi up` or `mqi deploy` "
                 f"with the installation's configuration first")])
    return parse_config(block.settings, Path(f"block {CONFIG_BLOCK} (from {block.source})"))


def _published_host(_attempt: str, kind: type[Host]) -> Host | None:
    return _load(kind, HOST_BLOCK)


def _published_named_host(_attempt: str, kind: type[Host], block: str) -> Host | None:
    return _load(kind, block)


def _published_pool(_attempt: str) -> GpuPool | None:
    return _load(GpuPool, POOL_BLOCK)


def _published_results(_attempt: str) -> WritableFileSystem | None:
    from prefect.filesystems import LocalFileSystem

    # The loaded block, not its slug: Prefect loads a slug again for every task run
    # (an API read and a "block loaded" event each: 15 per case, the most frequent
    # event of a case after the progress updates).
    return _load(LocalFileSystem, RESULTS_BLOCK)


_config_once = _once_per_attempt(_published_config)
_host_once = _once_per_attempt(_published_host)
_named_host_once = _once_per_attempt(_published_named_host)
_pool_once = _once_per_attempt(_published_pool)
_results_once = _once_per_attempt(_published_results)


def flow_config(attempt: str | None = None) -> MqiConfig:
    """The configuration of this flow run (``attempt``: for hooks, outside the run)."""
    if _from_file():
        return get_config()
    return cast(MqiConfig, _config_once(current_attempt() if attempt is None else attempt))


def flow_host(cfg: MqiConfig, attempt: str | None = None) -> Host:
    """The GPU host: the published block, else the one the configuration describes."""
    from blocks.factory import gpu_host
    from blocks.local_host import LocalHost
    from blocks.remote_host import RemoteHost

    if _from_file():
        return gpu_host(cfg)
    kind = LocalHost if cfg.hosts[cfg.gpu.primary].kind == "local" else RemoteHost
    host = _host_once(current_attempt() if attempt is None else attempt, kind)
    return cast(Host, host) if host is not None else gpu_host(cfg)


def flow_gpu_hosts(cfg: MqiConfig, attempt: str | None = None) -> dict[str, Host]:
    """Every GPU host by name (``gpu.hosts``; one host: ``flow_host``'s alone)."""
    from blocks.factory import host_from_settings
    from blocks.local_host import LocalHost
    from blocks.remote_host import RemoteHost

    if not cfg.gpu.several_hosts:
        return {cfg.gpu.primary: flow_host(cfg, attempt)}
    hosts: dict[str, Host] = {}
    for name in cfg.gpu.host_names:
        found = None
        if not _from_file():
            kind = LocalHost if cfg.hosts[name].kind == "local" else RemoteHost
            found = _named_host_once(current_attempt() if attempt is None else attempt, kind,
                                     gpu_host_block(name))
        hosts[name] = cast(Host, found) if found is not None else \
            host_from_settings(name, cfg.hosts[name])
    return hosts


def flow_pool(cfg: MqiConfig) -> GpuPool:
    """The GPU pool: the published block, else the one the configuration describes."""
    from blocks.factory import gpu_pool

    pool = None if _from_file() else _pool_once(current_attempt())
    return cast(GpuPool, pool) if pool is not None else gpu_pool(cfg)


def result_storage(cfg: MqiConfig) -> str | WritableFileSystem | None:
    """Where stage results are kept: the configured block's slug, else the published
    results block (loaded once per flow run); None: Prefect's local storage, which
    `mqi` points at the same folder (deployments/server.py ``client_env``)."""
    if cfg.prefect.result_storage_block:
        return cfg.prefect.result_storage_block
    return cast("WritableFileSystem | None", _results_once(current_attempt()))
