"""Bringing the whole system up on one machine: server, serve, sensor, supervised.

Used by `mqi up` and `mqi demo`. One instance per data dir: a second one is
refused while the first holds ``<data_dir>/mqi-up.lock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path
from typing import IO

from config import MqiConfig
from deployments import server
from deployments.supervisor import Child, Supervisor

log = logging.getLogger("mqi.up")


class AlreadyRunning(RuntimeError):
    """Another `mqi up` holds this data dir."""


def take_instance_lock(cfg: MqiConfig) -> IO[str]:
    """Hold ``<data_dir>/mqi-up.lock`` for the life of the process (the kernel frees it).

    Raises:
        AlreadyRunning: Naming the pid that holds it.
    """
    data = Path(cfg.paths.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    fh = open(data / "mqi-up.lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise AlreadyRunning(f"another `mqi up` (pid {holder}) is running on {data}; stop it "
                             f"first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def children(cfg: MqiConfig, config_file: Path) -> list[Child]:
    """The processes `mqi up` runs, in start order, per ``processes.start``."""
    logs = Path(cfg.paths.data_dir) / "logs"
    py = sys.executable
    common = {**server.client_env(cfg), "MQI_CONFIG_PATH": str(config_file)}
    out: list[Child] = []
    wanted = cfg.processes.start
    if "server" in wanted and cfg.prefect.api_url is None:
        api = cfg.prefect.effective_api_url
        server.prefect_home(cfg).mkdir(parents=True, exist_ok=True)
        out.append(Child(
            "server", [py, "-m", "prefect", "server", "start", "--host",
                       cfg.prefect.server_host, "--port", str(cfg.prefect.server_port)],
            {**common, **server.server_env(cfg)}, logs / "server.log",
            ready=lambda: server.is_healthy(api)))
    if "serve" in wanted:
        out.append(Child("serve", [py, "-m", "deployments.serve"], common, logs / "serve.log"))
    if "sensor" in wanted:
        out.append(Child("sensor", [py, "-m", "deployments.sensor"], common,
                         logs / "sensor.log"))
    return out


def prepare_gpu_limit(cfg: MqiConfig) -> str | None:
    """Size the GPU admission limit now; a message when the GPU host cannot be read."""
    from blocks.factory import gpu_host, gpu_pool

    try:
        gpus = gpu_pool(cfg).ensure_limit(gpu_host(cfg))
    except Exception as exc:  # noqa: BLE001 - reported; each case will say it again
        return f"could not read the GPUs on host {cfg.gpu.host!r}: {exc}"
    log.info("GPU limit %s: %d GPU(s)", cfg.gpu.concurrency_limit, len(gpus))
    return None


def bring_up(cfg: MqiConfig, config_file: Path) -> Supervisor:
    """Start the children (server first, waited for) and size the GPU limit.

    The caller owns the returned supervisor: ``watch`` it, then ``stop_all``.
    """
    os.environ.update(server.client_env(cfg))
    os.environ["MQI_CONFIG_PATH"] = str(config_file)
    supervisor = Supervisor(children(cfg, config_file), cfg.processes.restart)
    first = [c for c in supervisor.children if c.name == "server"]
    rest = [c for c in supervisor.children if c.name != "server"]
    supervisor.children = first
    try:
        supervisor.start_all()
        if not server.is_healthy(cfg.prefect.effective_api_url):
            raise server.ServerError(
                f"the Prefect API at {cfg.prefect.effective_api_url} is not reachable")
        problem = prepare_gpu_limit(cfg)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        supervisor.children = first + rest
        for child in rest:
            supervisor.spawn(child)
    except BaseException:
        supervisor.children = first + rest
        supervisor.stop_all()
        raise
    return supervisor
