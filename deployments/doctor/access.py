"""Checks of what reaching the GPU host takes: secrets, the key file, the host key."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import paramiko

from blocks import ssh
from blocks.errors import HostError
from config import MqiConfig
from config.models import HostSettings
from deployments.doctor.check import Check, CheckFailed, attempt


# ------------------------------------------------------------------ 1. secrets
def secret_env_names(cfg: MqiConfig) -> list[tuple[str, str]]:
    """(key path, variable) of every ``*_env`` key the config sets."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if str(key).endswith("_env") and isinstance(value, str):
                    found.append((here, value))
                else:
                    walk(value, here)

    walk(cfg.model_dump(mode="python"), "")
    return found


def check_env(key: str, name: str) -> Check:
    def body() -> None:
        if os.environ.get(name) is None:
            raise CheckFailed("not set", f"export {name} in the environment mqi runs in "
                                         f"(or remove {key} from the config)")

    return attempt(f"environment variable {name} ({key})", body)


def check_key_file(name: str, settings: HostSettings) -> Check:
    path = Path(str(settings.private_key_path))

    def body() -> None:
        if not path.exists():
            raise CheckFailed("does not exist", f"create the key (ssh-keygen -t ed25519 -f "
                                                f"{path}) or fix hosts.{name}.private_key_path")
        if not path.is_file():
            raise CheckFailed("is not a file", f"point hosts.{name}.private_key_path at the "
                                               f"private key file")
        if not os.access(path, os.R_OK):
            raise CheckFailed("is not readable by this user",
                              f"chmod 600 {path} as its owner, or run mqi as that user")
        env = settings.passphrase_env
        if env is not None and os.environ.get(env) is None:
            return  # the passphrase's own line says it is missing
        try:
            ssh.load_private_key(None, str(path), os.environ.get(env) if env else None)
        except HostError as exc:
            raise CheckFailed(str(exc), f"give the passphrase with hosts.{name}.passphrase_env, "
                                        f"or point private_key_path at an OpenSSH private key"
                              ) from None

    return attempt(f"private key file {path} of hosts.{name}", body)


def check_credentials(name: str, settings: HostSettings) -> Check | None:
    """A line only when an ssh host has no way to log in at all."""
    if settings.private_key_path or settings.private_key_env or settings.password_env:
        return None
    return Check(f"credentials of hosts.{name}", False, "none configured",
                 f"set hosts.{name}.private_key_path (or private_key_env / password_env)")


# ----------------------------------------------------------------- 2. host key
def known_hosts_name(hostname: str, port: int) -> str:
    """How known_hosts names a host (``[host]:port`` unless the port is 22)."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


# paramiko's transport thread logs a failed handshake itself; the check's line says it,
# so without logging configured the record goes nowhere instead of to stderr.
HANDSHAKE_LOG = "mqi.doctor.handshake"
logging.getLogger(HANDSHAKE_LOG).addHandler(logging.NullHandler())


def server_host_key(sock: socket.socket, timeout: float,
                    preferred: list[str]) -> paramiko.PKey:
    """The key the SSH server on ``sock`` offers, read with a bare handshake (no login).

    ``preferred`` key types go first, as paramiko's client does when known_hosts
    lists the host, so that the key compared is the one a login would be shown.
    """
    transport = paramiko.Transport(sock)
    transport.set_log_channel(HANDSHAKE_LOG)
    try:
        transport.banner_timeout = timeout
        options = transport.get_security_options()
        offered = list(options.key_types)
        first = [k for k in preferred if k in offered]
        options.key_types = tuple(first + [k for k in offered if k not in first])
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()


def check_host_key(name: str, settings: HostSettings) -> Check:
    hostname, port = settings.hostname or "", settings.port
    known_hosts = Path(str(settings.known_hosts_path))
    entry = known_hosts_name(hostname, port)
    timeout = settings.connect_timeout_seconds

    def body() -> str:
        keys = paramiko.HostKeys()
        if known_hosts.exists():
            try:
                keys.load(str(known_hosts))
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckFailed(f"cannot read {known_hosts}: {exc}",
                                  f"fix hosts.{name}.known_hosts_path or the file's "
                                  f"permissions") from None
        ours = keys.lookup(entry)
        preferred = list(ours.keys()) if ours else []
        if "ssh-rsa" in preferred:
            preferred[preferred.index("ssh-rsa"):] = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        try:
            sock = socket.create_connection((hostname, port), timeout=timeout)
        except OSError as exc:
            raise CheckFailed(
                f"cannot reach the SSH server at {hostname}:{port} "
                f"({type(exc).__name__}: {exc})",
                f"check hosts.{name}.hostname and hosts.{name}.port, that sshd runs there "
                f"and that no firewall blocks the port") from None
        try:
            key = server_host_key(sock, timeout, preferred)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise CheckFailed(
                f"{hostname}:{port} accepts connections but no SSH handshake completed "
                f"within {timeout:g} s ({type(exc).__name__}: {str(exc) or 'no answer'})",
                f"check that hosts.{name}.port is the SSH port of {hostname}") from None
        offered = f"{key.get_name()} {ssh.fingerprint(key)}"
        if ours is None:
            note = (" (auto_add_host_keys is on: a flow would trust it unverified)"
                    if settings.auto_add_host_keys else "")
            raise CheckFailed(
                f"{entry} is not in {known_hosts}; the server offers {offered}{note}",
                f"verify {ssh.fingerprint(key)} with the host's administrator, then add this "
                f"line to {known_hosts}: {entry} {key.get_name()} {key.get_base64()}")
        expected = ours.get(key.get_name()) or next(iter(ours.values()))
        if expected != key:
            raise CheckFailed(
                f"the host key has CHANGED: the server offers {offered} but {known_hosts} "
                f"expects {expected.get_name()} {ssh.fingerprint(expected)} (possible "
                f"man-in-the-middle, or the server was reinstalled)",
                f"ask the host's administrator whether its key changed; only then replace "
                f"the line for {entry} in {known_hosts} with: {entry} {key.get_name()} "
                f"{key.get_base64()}")
        return f"{ssh.fingerprint(key)}, in {known_hosts}"

    return attempt(f"host key of {hostname}:{port}", body)


# -------------------------------------------------------------- 3.-6. GPU host
