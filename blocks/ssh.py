"""SSH connections: credentials, host-key policy, retries, and one connection per host.

RemoteHost's settings are read through ``SshSettings``; this module turns them
into a live ``paramiko.SSHClient``. A connection is opened on first use, shared
by every block with the same settings in this process (tasks of a flow run load
the block anew, but should not each pay a handshake), reopened when it died,
and closed idempotently. Secrets are unwrapped only here, where the client is
built, and never logged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import paramiko
from pydantic import SecretStr

from blocks.errors import HostAuthenticationError, HostConnectError, HostKeyError

if TYPE_CHECKING:
    from paramiko.transport import _SocketLike

# The logger of RemoteHost as a whole: operators filter on it, whichever module logs.
log = logging.getLogger("mqi.remote_host")

# AES-GCM authenticates while it encrypts (one pass in OpenSSL) where CTR+HMAC
# takes two; preferred when the server offers it, otherwise paramiko's order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class SshSettings(Protocol):
    """How to reach and log in to a host (RemoteHost's fields; see their descriptions)."""

    hostname: str
    port: int
    username: str
    password: SecretStr | None
    private_key: SecretStr | None
    private_key_path: str | None
    passphrase: SecretStr | None
    known_hosts_path: str
    auto_add_host_keys: bool
    connect_timeout: float
    keepalive_interval: int
    transfer_idle_timeout: float
    connect_retries: int
    retry_backoff: float

    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        ...


PoolKey = tuple[str, int, str, str | None, str, str]

# One live connection per (host, port, user, credentials) per process.
_POOL: dict[PoolKey, paramiko.SSHClient] = {}
_POOL_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a key, as `ssh-keygen -lf` prints it."""
    return key.fingerprint


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse a host that known_hosts does not list, naming it and its key."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"host key of {hostname} is not in {self.known_hosts} "
            f"({key.get_name()} {fingerprint(key)}); refusing to connect. Verify the "
            f"fingerprint with the server's administrator, then add it with "
            f"`ssh-keyscan -p PORT HOST >> {self.known_hosts}`",
            host=hostname,
            fingerprint=fingerprint(key),
        )


class _AddUnknownHostWithWarning(paramiko.MissingHostKeyPolicy):
    """Explicit opt-in: trust a new host key on first use, record it, and say so loudly."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        log.warning(
            "auto_add_host_keys is on: trusting the unknown host key of %s (%s %s) and "
            "recording it in %s",
            hostname, key.get_name(), fingerprint(key), self.known_hosts,
        )
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.known_hosts) or ".", exist_ok=True)
        with open(self.known_hosts, "a", encoding="ascii") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def load_private_key(text: str | None, path: str | None,
                     passphrase: str | None) -> paramiko.PKey | None:
    """The private key from its text or, failing that, its file; None when neither is given.

    Raises:
        HostAuthenticationError: The key is missing, unreadable, encrypted without a
            passphrase, or the passphrase is wrong (the message never holds a secret).
    """
    if path:
        try:
            # paramiko (and its stubs) annotate the password as str, but hand it to
            # cryptography's loaders, which refuse str ("password must be bytes").
            return paramiko.PKey.from_path(
                os.path.expanduser(path),
                passphrase.encode() if passphrase else None)  # type: ignore[arg-type]
        except FileNotFoundError as exc:
            raise HostAuthenticationError(f"private key file not found: {path}") from exc
        except paramiko.PasswordRequiredException as exc:
            raise HostAuthenticationError(
                f"private key {path} is encrypted and no passphrase was given") from exc
        except TypeError:
            # cryptography's word for an encrypted OpenSSH key loaded without passphrase
            if passphrase is None:
                raise HostAuthenticationError(
                    f"private key {path} is encrypted and no passphrase was given") from None
            raise HostAuthenticationError(f"could not read private key {path}") from None
        except (paramiko.SSHException, ValueError) as exc:
            raise HostAuthenticationError(
                f"could not read private key {path} (wrong passphrase or not a key)") from exc
    if text:
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key(io.StringIO(text), password=passphrase)
            except paramiko.PasswordRequiredException as exc:
                raise HostAuthenticationError(
                    "the private key is encrypted and no passphrase was given") from exc
            except (paramiko.SSHException, ValueError):
                continue
        raise HostAuthenticationError(
            "could not read the private key (wrong passphrase or unsupported key type)")
    return None


def _pool_key(settings: SshSettings) -> PoolKey:
    # A digest, so the pool never holds secrets in the clear as dictionary keys.
    secret = hashlib.sha256()
    for value in (settings.password, settings.private_key, settings.passphrase):
        secret.update(b"\0" + (value.get_secret_value().encode() if value else b""))
    return (settings.hostname, settings.port, settings.username, settings.private_key_path,
            os.path.expanduser(settings.known_hosts_path), secret.hexdigest())


def connect(settings: SshSettings) -> paramiko.SSHClient:
    """The live shared client for these settings, connecting (with retries) when there is none.

    Raises:
        HostKeyError: The host key is unknown (and not opted in) or has changed.
        HostAuthenticationError: The credentials were refused (never retried).
        HostConnectError: The host could not be reached after the retries.
    """
    key = _pool_key(settings)
    with _POOL_LOCK:
        client = _POOL.get(key)
        if client is None or not _alive(client):
            if client is not None:
                client.close()
            client = _open_client(settings)
            _POOL[key] = client
    return client


def disconnect(settings: SshSettings) -> None:
    """Close the shared connection for these settings, if any. Safe to call any number of times."""
    with _POOL_LOCK:
        client = _POOL.pop(_pool_key(settings), None)
    if client is not None:
        client.close()


def transport(settings: SshSettings) -> paramiko.Transport:
    """The live connection's transport (connecting first when needed)."""
    live = connect(settings).get_transport()
    assert live is not None  # connect() returns only clients whose transport is active
    return live


def open_session(settings: SshSettings) -> paramiko.Channel:
    """A new session channel on the live connection, ready for one command."""
    return transport(settings).open_session(timeout=settings.connect_timeout)


def _open_client(settings: SshSettings) -> paramiko.SSHClient:
    known_hosts = os.path.expanduser(settings.known_hosts_path)
    pkey = load_private_key(
        settings.private_key.get_secret_value() if settings.private_key else None,
        None if settings.private_key else settings.private_key_path,
        settings.passphrase.get_secret_value() if settings.passphrase else None,
    )
    delay = settings.retry_backoff
    for attempt in range(settings.connect_retries + 1):
        client = paramiko.SSHClient()
        if os.path.exists(known_hosts):
            client.load_host_keys(known_hosts)
        if settings.auto_add_host_keys:
            client.set_missing_host_key_policy(_AddUnknownHostWithWarning(known_hosts))
        else:
            client.set_missing_host_key_policy(_RefuseUnknownHost(known_hosts))
        try:
            _login(client, settings, pkey)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host key of {exc.hostname} has CHANGED: the server offered "
                f"{exc.key.get_name()} {fingerprint(exc.key)} but {known_hosts} expects "
                f"{fingerprint(exc.expected_key)}; refusing to connect (possible "
                f"man-in-the-middle, or the server was reinstalled)",
                host=exc.hostname, fingerprint=fingerprint(exc.key),
                expected_fingerprint=fingerprint(exc.expected_key),
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise HostAuthenticationError(
                f"authentication failed for {settings.address} "
                f"({type(exc).__name__}: {_safe_reason(exc)}); check username, key and "
                f"authorized_keys on the host",
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            if attempt >= settings.connect_retries:
                raise HostConnectError(
                    f"cannot connect to {settings.address} after {attempt + 1} attempt(s): "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.warning("connecting to %s failed (%s: %s); retrying in %.1f s",
                        settings.address, type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay *= 2
            continue
        live = client.get_transport()
        assert live is not None  # connect() succeeded, so the transport exists
        if settings.keepalive_interval:
            live.set_keepalive(settings.keepalive_interval)
        return client
    raise AssertionError("unreachable")  # pragma: no cover


def _login(client: paramiko.SSHClient, settings: SshSettings,
           pkey: paramiko.PKey | None) -> None:
    """One attempt: TCP connect, handshake, host key check and authentication."""
    sock = socket.create_connection((settings.hostname, settings.port),
                                    timeout=settings.connect_timeout)
    # Without TCP_NODELAY, every small SFTP request (open, close, rename)
    # waits out the peer's delayed ACK (~40 ms): this is what makes a
    # naive put of a 200-file case ~25x slower than scp.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.connect(
        settings.hostname, port=settings.port, username=settings.username, pkey=pkey,
        password=settings.password.get_secret_value() if settings.password else None,
        sock=sock, timeout=settings.connect_timeout, transport_factory=_transport,
        banner_timeout=settings.connect_timeout, auth_timeout=settings.connect_timeout,
        allow_agent=False, look_for_keys=False,
    )


def _transport(sock: _SocketLike, /, *, gss_kex: bool = False, gss_deleg_creds: bool = True,
               disabled_algorithms: Mapping[str, Iterable[str]] | None = None,
               ) -> paramiko.Transport:
    """paramiko's transport with AES-GCM moved to the front of the cipher list.

    paramiko 5 passes only ``disabled_algorithms``; the GSS arguments (no longer
    supported by paramiko's Transport) are accepted for the stubs' older signature.
    """
    made = paramiko.Transport(sock, disabled_algorithms=disabled_algorithms)
    options = made.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in PREFERRED_CIPHERS)
    return made


def _alive(client: paramiko.SSHClient) -> bool:
    live = client.get_transport()
    return live is not None and live.is_active()


def _safe_reason(exc: Exception) -> str:
    # paramiko's auth messages never contain the secret, but keep them short.
    return str(exc).splitlines()[0][:200] if str(exc) else "refused"
