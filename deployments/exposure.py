"""Who can reach the embedded server: loopback only, unless it asks for a password.

The embedded Prefect server is the dashboard and the whole API: whoever reaches
it can read every case, cancel runs, change the blocks that hold the GPU host's
credentials. Prefect's own protection is one shared secret,
``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``, HTTP basic auth on
every API call; the UI asks for it). So `mqi up` binds the embedded server to
an address other machines can reach only when that variable is set; otherwise
the dashboard is reached through an SSH tunnel (docs/dashboard-access.md).

The same secret is what our own clients (serve, the sensor, the flow runs,
the `mqi` commands) must send: Prefect's clients read it as
``PREFECT_API_AUTH_STRING``, which ``client_auth_env`` fills in from the
server's when only that one is set.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from config import MqiConfig, MqiError

SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"


class UnprotectedServer(MqiError):
    """The embedded server would be reachable from other machines without a password."""

    exit_status = 2  # a configuration problem, like an invalid config file


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address) binds to this machine's loopback only.

    A name counts as loopback only when every address it resolves to is one
    (``localhost``); a name that does not resolve is not (it could mean anything
    once DNS answers). ``0.0.0.0`` and ``::`` are every interface.
    """
    name = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).split("%", 1)[0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def serves_embedded(cfg: MqiConfig) -> bool:
    """Whether `mqi up` starts the embedded server for this configuration."""
    return cfg.prefect.api_url is None and "server" in cfg.processes.start


def refuse_unprotected_bind(cfg: MqiConfig, config_file: Path | None = None,
                            environ: Mapping[str, str] | None = None) -> None:
    """Refuse to start the embedded server beyond loopback without an auth string
    (for the caller that is about to start it).

    Raises:
        UnprotectedServer: ``prefect.server_host`` is not a loopback address and
            ``PREFECT_SERVER_API_AUTH_STRING`` is not set (or empty).
    """
    env = os.environ if environ is None else environ
    host = cfg.prefect.server_host
    if env.get(SERVER_AUTH_ENV) or is_loopback(host):
        return
    where = f" in {config_file}" if config_file else ""
    raise UnprotectedServer(
        f"prefect.server_host{where} is {host!r}, which other machines can reach, and "
        f"{SERVER_AUTH_ENV} is not set: anyone on the network could open the dashboard and "
        f"use the API without a password. Either keep prefect.server_host: 127.0.0.1 and "
        f"reach the dashboard through an SSH tunnel, or set {SERVER_AUTH_ENV}='user:password' "
        f"in the environment of `mqi up` (see docs/dashboard-access.md)")


def client_auth_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``PREFECT_API_AUTH_STRING`` for our Prefect clients, from the server's auth string
    when only that one is set (one secret to set for `mqi up` and all it starts)."""
    env = os.environ if environ is None else environ
    server_secret = env.get(SERVER_AUTH_ENV)
    if server_secret and not env.get(CLIENT_AUTH_ENV):
        return {CLIENT_AUTH_ENV: server_secret}
    return {}
