"""Publishing the configuration to the Prefect server as the blocks flow runs load.

`mqi up`, `mqi deploy` and the CLI's own runs call ``publish`` before any flow
runs: the validated configuration (block ``mqi-config``), the GPU host with its
secrets read from the ``*_env`` variables into SecretStr fields
(``mqi-gpu-host``; with several GPU hosts also each as ``mqi-gpu-host-<name>``), the GPU
pool (``mqi-gpu-pool``), the result storage every
process shares (``local-file-system/mqi-results``), and the configured
housekeeping schedules as the Prefect variables prefect.yaml reads
(``mqi_<deployment>_<key>``). A worker anywhere then needs only
``PREFECT_API_URL`` (flows/settings.py loads them).
"""

from __future__ import annotations

from pathlib import Path

from config import MqiConfig
from deployments import server
from flows.naming import CONFIG_BLOCK, HOST_BLOCK, POOL_BLOCK, RESULTS_BLOCK, gpu_host_block


def publish(cfg: MqiConfig, config_file: Path) -> list[str]:
    """Save every block flow runs need; return their names, for the log.

    Raises:
        MissingSecretError: A ``*_env`` variable the host needs is not set.
    """
    from prefect.filesystems import LocalFileSystem

    from blocks.factory import gpu_host, gpu_hosts, gpu_pool
    from blocks.gpu_pool import GpuPool
    from blocks.local_host import LocalHost
    from blocks.published_config import PublishedConfig
    from blocks.remote_host import RemoteHost

    for cls in (RemoteHost, LocalHost, GpuPool, PublishedConfig):
        cls.register_type_and_schema()
    settings = cfg.model_dump(mode="json")
    # Flow runs do not need the database; a password written into its URL must not
    # reach a block every worker and the UI can read.
    settings["prefect"]["database_url"] = server.mask_url(cfg.prefect.database_url)
    PublishedConfig(settings=settings, source=str(config_file)).save(
        CONFIG_BLOCK, overwrite=True)
    saved = [f"mqi-configuration/{CONFIG_BLOCK}"]
    host = gpu_host(cfg)
    if isinstance(host, RemoteHost | LocalHost):
        host.save(HOST_BLOCK, overwrite=True)
        saved.append(f"{host.get_block_type_slug()}/{HOST_BLOCK}")
    if cfg.gpu.several_hosts:  # each GPU host of the pool as its own block too
        for name, each in gpu_hosts(cfg).items():
            if isinstance(each, RemoteHost | LocalHost):
                each.save(gpu_host_block(name), overwrite=True)
                saved.append(f"{each.get_block_type_slug()}/{gpu_host_block(name)}")
    gpu_pool(cfg).save(POOL_BLOCK, overwrite=True)
    saved.append(f"mqi-gpu-pool/{POOL_BLOCK}")
    if cfg.prefect.result_storage_block is None:
        folder = server.results_folder(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        LocalFileSystem(basepath=str(folder)).save(RESULTS_BLOCK, overwrite=True)
        saved.append(f"local-file-system/{RESULTS_BLOCK}")
    saved += publish_schedules(cfg)
    return saved


def publish_schedules(cfg: MqiConfig) -> list[str]:
    """Save the configured housekeeping schedules as the Prefect variables prefect.yaml
    reads, so `prefect deploy --all` registers the configuration's schedules too."""
    from prefect.variables import Variable

    from deployments.definitions import schedule_variables

    variables = schedule_variables(cfg)
    for name, value in variables.items():
        Variable.set(name, value, overwrite=True)
    return [f"variable/{name}" for name in sorted(variables)]
