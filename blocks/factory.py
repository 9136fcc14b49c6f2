"""Blocks built from the configuration (the config → blocks step of the data flow).

Secrets named by ``*_env`` keys are read from the environment here, where the
block is built, and go straight into ``SecretStr`` fields.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

from blocks.gpu_pool import GpuPool
from blocks.host import Host
from blocks.local_host import LocalHost
from blocks.remote_host import RemoteHost
from config import MqiConfig, MqiError
from config.models import HostSettings

__all__ = ["Host", "MissingSecretError", "gpu_host", "gpu_hosts", "gpu_pool", "host_from_settings",
           "pool_on"]


class MissingSecretError(MqiError):
    """A configured ``*_env`` variable is not set."""


def _secret(host_name: str, key: str, env: str | None) -> SecretStr | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if value is None:
        raise MissingSecretError(f"hosts.{host_name}.{key} names the environment variable "
                                 f"{env}, which is not set")
    return SecretStr(value)


def host_from_settings(name: str, settings: HostSettings) -> Host:
    """A RemoteHost or LocalHost for the ``hosts.<name>`` entry."""
    if settings.kind == "local":
        return LocalHost(kill_grace_period=settings.kill_grace_seconds,
                         working_dir=str(settings.working_dir) if settings.working_dir else None,
                         prefer_this_python=settings.prefer_this_python)
    return RemoteHost(
        hostname=settings.hostname or "", port=settings.port, username=settings.username or "",
        password=_secret(name, "password_env", settings.password_env),
        private_key=_secret(name, "private_key_env", settings.private_key_env),
        private_key_path=str(settings.private_key_path) if settings.private_key_path else None,
        passphrase=_secret(name, "passphrase_env", settings.passphrase_env),
        known_hosts_path=str(settings.known_hosts_path),
        auto_add_host_keys=settings.auto_add_host_keys,
        connect_timeout=settings.connect_timeout_seconds,
        keepalive_interval=settings.keepalive_seconds,
        transfer_idle_timeout=settings.transfer_idle_seconds,
        connect_retries=settings.connect_retries,
        kill_grace_period=settings.kill_grace_seconds,
    )


def gpu_host(cfg: MqiConfig) -> Host:
    """The host that has the GPUs and runs the remote commands (the first of several)."""
    return host_from_settings(cfg.gpu.primary, cfg.hosts[cfg.gpu.primary])


def gpu_hosts(cfg: MqiConfig) -> dict[str, Host]:
    """Every GPU host by its name in ``hosts``, in the order of ``gpu.hosts``."""
    return {name: host_from_settings(name, cfg.hosts[name]) for name in cfg.gpu.host_names}


def pool_on(pool: GpuPool, cfg: MqiConfig, name: str) -> GpuPool:
    """``pool`` as it applies on the GPU host ``name``: its own lock folder, if it has one."""
    lock_dir = cfg.gpu.host_entry(name).lock_dir
    return pool if lock_dir is None else pool.model_copy(update={"lock_dir": lock_dir})


def gpu_pool(cfg: MqiConfig) -> GpuPool:
    g = cfg.gpu
    return GpuPool(source=g.source, query_command=g.query_command, apps_command=g.apps_command,
                   indices=g.indices, min_free_memory_mib=g.min_free_memory_mib,
                   skip_gpus_with_foreign_processes=g.skip_gpus_with_foreign_processes,
                   limit_name=g.concurrency_limit, lease_seconds=g.lease_seconds,
                   lock_dir=g.lock_dir, poll_seconds=g.poll_seconds,
                   max_wait_seconds=g.max_wait_seconds,
                   query_timeout_seconds=g.query_timeout_seconds)
