"""The embedded Prefect server: its environment, start-up and health.

Prefect's server, database and UI are MQI Communicator's state store and
dashboard. On one machine `mqi up` starts it with SQLite under the data dir;
with a PostgreSQL URL in config the same code runs on PostgreSQL.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from config import MqiConfig, MqiError
from deployments.exposure import client_auth_env, refuse_unprotected_bind
from deployments.supervisor import die_with_parent

# Held GPU slots must survive a server restart; the in-memory lease store would
# leak them for good (docs/prefect-behaviours.md#lease-store).
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
SERVER_KEEPALIVE_SECONDS = 65  # > the 25 s Prefect's clients keep idle connections


class ServerError(MqiError):
    """The Prefect server could not be started or reached."""


def prefect_home(cfg: MqiConfig) -> Path:
    return Path(cfg.paths.data_dir) / "prefect"


def results_folder(cfg: MqiConfig) -> Path:
    """The folder stage results are kept in (when no filesystem block is configured)."""
    return Path(cfg.prefect.result_storage or prefect_home(cfg) / "storage")


def database_url(cfg: MqiConfig) -> str:
    """The server's database URL, with the password from its environment variable."""
    url = cfg.prefect.database_url
    if url is None:
        return f"sqlite+aiosqlite:///{prefect_home(cfg) / 'mqi.db'}"
    env = cfg.prefect.database_password_env
    if env:
        password = os.environ.get(env)
        if password is None:
            raise ServerError(f"prefect.database_password_env names {env}, which is not set")
        parts = urlsplit(url)
        user = parts.username or ""
        netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        url = urlunsplit(parts._replace(netloc=netloc))
    return url


def mask_url(url: str | None) -> str | None:
    """The URL with any password replaced by ***, for printing."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def client_env(cfg: MqiConfig) -> dict[str, str]:
    """Environment for Prefect clients (serve, CLI subprocesses) talking to our API.

    ``PREFECT_API_URL`` is always explicit: a Prefect command without it would
    quietly start its own ephemeral server and keep state nobody sees.
    """
    return {
        "PREFECT_API_URL": cfg.prefect.effective_api_url,
        "PREFECT_HOME": str(prefect_home(cfg)),
        # Cached stage results: a rerun finds them here whichever process runs it
        # (the same folder publish.py saves as the mqi-results block).
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results_folder(cfg)),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's setting is whole seconds; `mqi up`'s serve passes the exact value.
        "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, math.ceil(cfg.prefect.runner_poll_seconds))),
        # the server's password, when it has one (deployments/exposure.py)
        **client_auth_env(),
    }


def server_env(cfg: MqiConfig) -> dict[str, str]:
    """Environment of the embedded server process."""
    return {
        **client_env(cfg),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(cfg),
        "PREFECT_SERVER_API_HOST": cfg.prefect.server_host,
        "PREFECT_SERVER_API_PORT": str(cfg.prefect.server_port),
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        # A beam waiting for a GPU re-asks after at most this long (Prefect's default
        # of 30 s would leave a freed GPU idle that long).
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS":
            str(cfg.gpu.max_slot_wait_seconds),
        "PREFECT_UI_API_URL": cfg.prefect.effective_api_url,
        # Prefect's clients keep idle connections 25 s; the server's default is to close
        # them after 5 s. A request sent on a connection the server is closing at that
        # moment fails and Prefect's client retries it only 2 s later. Outlast the
        # clients, so they always drop idle connections first.
        "PREFECT_SERVER_API_KEEPALIVE_TIMEOUT": str(SERVER_KEEPALIVE_SECONDS),
        # The archiver's pruning deletes old flow runs; their logs go only when the
        # orphan clean-up runs (off by Prefect's default), else the database keeps them.
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,orphans",
    }


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API at ``api_url`` answers its health check."""
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def ui_url(cfg: MqiConfig) -> str:
    """Address of the dashboard."""
    return cfg.prefect.effective_api_url.removesuffix("/api")


def start_server(cfg: MqiConfig, log_file: Path, timeout: float = 90.0) -> subprocess.Popen[bytes]:
    """Start the embedded server and wait until it is healthy.

    Raises:
        ServerError: It exited or did not become healthy in time (the log's tail is quoted).
    """
    refuse_unprotected_bind(cfg)
    home = prefect_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **server_env(cfg)}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start",
             "--host", cfg.prefect.server_host, "--port", str(cfg.prefect.server_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + timeout
    api = cfg.prefect.effective_api_url
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the Prefect server exited with code {proc.returncode}:\n"
                              + _tail(log_file))
        if is_healthy(api):
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise ServerError(f"the Prefect server did not become healthy at {api} within "
                      f"{timeout:g} s:\n" + _tail(log_file))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
