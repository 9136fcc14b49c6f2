"""RemoteHost: run commands and move files on another machine over SSH (paramiko).

The GPU server is reached through this block. It connects on first use, keeps
one connection per host for the life of the process (so every task of a flow
run shares it), verifies the host key against known_hosts, and closes
idempotently. Secrets are ``SecretStr`` and are unwrapped only where the
paramiko client is built.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Iterable
from typing import Any, Unpack

import paramiko
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, PrivateAttr, SecretStr

from blocks.errors import (
    CommandError,
    CommandTimeoutError,
    HostAuthenticationError,
    HostConnectError,
    HostError,
    HostKeyError,
    TransferError,
)
from blocks.host import RunOptions, RunSpec
from blocks.manifest import (
    CHUNK,
    PART_SUFFIX,
    FileEntry,
    parse_sha256sum,
    part_name,
    sha256_file,
    walk_local,
)
from blocks.placing import place_files
from blocks.results import CommandResult, TransferResult
from blocks.streaming import OutputCollector
from blocks.wrapping import PGID_MARKER, kill_group_script, wrap_command

log = logging.getLogger("mqi.remote_host")


# SFTP requests of 32 KiB (paramiko's default) cost one Python round of
# packetising each; OpenSSH's sftp-server accepts up to 256 KiB per write, so
# larger requests cut the per-byte overhead of big files.
SFTP_REQUEST_SIZE = 255 * 1024
SFTP_PACKET_SIZE = SFTP_REQUEST_SIZE + 1024
SFTP_WINDOW_SIZE = 16 * 1024 * 1024
# AES-GCM authenticates while it encrypts (one pass in OpenSSL) where CTR+HMAC
# takes two; preferred when the server offers it, otherwise paramiko's order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
EOF_GRACE_SECONDS = 2.0

# One live connection per (host, port, user, credentials) per process: tasks
# of a flow run load the block anew, but should not each pay a handshake.
_POOL: dict[tuple[Any, ...], paramiko.SSHClient] = {}
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


def _load_private_key(text: str | None, path: str | None,
                      passphrase: str | None) -> paramiko.PKey | None:
    if path:
        try:
            return paramiko.PKey.from_path(os.path.expanduser(path),
                                           passphrase.encode() if passphrase else None)
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


class RemoteHost(Block):
    """A machine reached over SSH: run commands in their own process group with live
    output, and copy directory trees with SFTP, verified by SHA-256 on both ends."""

    _block_type_name = "MQI Remote Host"
    _block_type_slug = "mqi-remote-host"
    _logo_url = HttpUrl(
        "https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png")  # noqa: E501
    _description = (
        "An SSH host (the GPU server): runs commands in their own process group, streams "
        "their output into the Prefect run log, kills them on timeout or cancellation, and "
        "moves directory trees with verified, atomic SFTP transfers."
    )
    _documentation_url = HttpUrl("https://docs.paramiko.org/en/stable/api/client.html")

    hostname: str = Field(..., description="DNS name or IP address of the host.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port of the host.")
    username: str = Field(..., description="Login user on the host.")
    password: SecretStr | None = Field(
        default=None, description="Login password, when the host does not take a key.")
    private_key: SecretStr | None = Field(
        default=None, description="Private key text (OpenSSH or PEM); wins over private_key_path.")
    private_key_path: str | None = Field(
        default=None, description="Path of a private key file on the machine running the flow.")
    passphrase: SecretStr | None = Field(
        default=None, description="Passphrase of an encrypted private key.")
    known_hosts_path: str = Field(
        default="~/.ssh/known_hosts",
        description="known_hosts file the host key is verified against.")
    auto_add_host_keys: bool = Field(
        default=False,
        description="Trust and record an unknown host key on first connection (logged as a "
                    "warning). Off by default: an unknown key is refused.")
    connect_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for TCP connect, banner and auth.")
    keepalive_interval: int = Field(
        default=30, ge=0, description="Seconds between SSH keepalives (0 disables them).")
    connect_retries: int = Field(
        default=3, ge=0,
        description="Retries of a connection that failed for a network reason (never for "
                    "authentication or host key failures).")
    retry_backoff: float = Field(
        default=1.0, ge=0, description="First retry delay in seconds; doubles on each retry.")
    kill_grace_period: float = Field(
        default=5.0, ge=0,
        description="Seconds between SIGTERM and SIGKILL when a command's process group is killed.")

    _client: paramiko.SSHClient | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ naming
    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        return f"{self.username}@{self.hostname}:{self.port}"

    def __repr__(self) -> str:  # the pydantic repr already masks SecretStr; keep it short
        return f"RemoteHost({self.address})"

    # -------------------------------------------------------------- connection
    def _pool_key(self) -> tuple[Any, ...]:
        # A digest, so the pool never holds secrets in the clear as dictionary keys.
        secret = hashlib.sha256()
        for value in (self.password, self.private_key, self.passphrase):
            secret.update(b"\0" + (value.get_secret_value().encode() if value else b""))
        return (self.hostname, self.port, self.username, self.private_key_path,
                os.path.expanduser(self.known_hosts_path), secret.hexdigest())

    def _connect(self) -> paramiko.SSHClient:
        """Return a live client, connecting (with retries) when there is none."""
        client = self._client
        if client is not None and _alive(client):
            return client
        key = self._pool_key()
        with _POOL_LOCK:
            client = _POOL.get(key)
            if client is None or not _alive(client):
                if client is not None:
                    client.close()
                client = self._open_client()
                _POOL[key] = client
        self._client = client
        return client

    def _open_client(self) -> paramiko.SSHClient:
        known_hosts = os.path.expanduser(self.known_hosts_path)
        pkey = _load_private_key(
            self.private_key.get_secret_value() if self.private_key else None,
            None if self.private_key else self.private_key_path,
            self.passphrase.get_secret_value() if self.passphrase else None,
        )
        delay = self.retry_backoff
        for attempt in range(self.connect_retries + 1):
            client = paramiko.SSHClient()
            if os.path.exists(known_hosts):
                client.load_host_keys(known_hosts)
            if self.auto_add_host_keys:
                client.set_missing_host_key_policy(_AddUnknownHostWithWarning(known_hosts))
            else:
                client.set_missing_host_key_policy(_RefuseUnknownHost(known_hosts))
            try:
                sock = socket.create_connection((self.hostname, self.port),
                                                timeout=self.connect_timeout)
                # Without TCP_NODELAY, every small SFTP request (open, close, rename)
                # waits out the peer's delayed ACK (~40 ms): this is what makes a
                # naive put of a 200-file case ~25x slower than scp.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.connect(
                    self.hostname, port=self.port, username=self.username, pkey=pkey,
                    password=self.password.get_secret_value() if self.password else None,
                    sock=sock, timeout=self.connect_timeout, transport_factory=_transport,
                    banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout,
                    allow_agent=False, look_for_keys=False,
                )
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
                    f"authentication failed for {self.address} "
                    f"({type(exc).__name__}: {_safe_reason(exc)}); check username, key and "
                    f"authorized_keys on the host",
                ) from None
            except (OSError, EOFError, paramiko.SSHException) as exc:
                client.close()
                if attempt >= self.connect_retries:
                    raise HostConnectError(
                        f"cannot connect to {self.address} after {attempt + 1} attempt(s): "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
                log.warning("connecting to %s failed (%s: %s); retrying in %.1f s",
                            self.address, type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay *= 2
                continue
            transport = client.get_transport()
            assert transport is not None
            if self.keepalive_interval:
                transport.set_keepalive(self.keepalive_interval)
            return client
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection to this host. Safe to call any number of times."""
        key = self._pool_key()
        with _POOL_LOCK:
            pooled = _POOL.pop(key, None)
        for client in {id(c): c for c in (pooled, self._client) if c is not None}.values():
            client.close()
        self._client = None

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- commands
    def run(self, command: str, **options: Unpack[RunOptions]) -> CommandResult:
        """Run a shell command on the host in its own process group.

        Output is read while the command runs (so no amount of it can block the
        command) and every line goes to ``on_line`` — by default the Prefect run
        log — as soon as it is complete. On a timeout, an error while reading
        or a cancellation, the command's whole process group is killed.

        Args:
            command: A shell command line (render templates with shlex.quote first).
            **options: ``timeout``, ``env``, ``cwd``, ``check``, ``on_line``,
                ``stream``, ``pid_file``; see ``blocks.host.RunSpec``.

        Returns:
            The CommandResult.

        Raises:
            CommandTimeoutError: The deadline passed; the process group was killed.
            CommandError: Non-zero exit and ``check`` is true.
            HostError: The host could not be reached.
        """
        spec = RunSpec(command, **options)
        callback = spec.line_callback(self.hostname)
        wrapped = wrap_command(command, env=spec.env, cwd=spec.cwd, pid_file=spec.pid_file)
        client = self._connect()
        transport = client.get_transport()
        assert transport is not None
        started = time.monotonic()
        channel = transport.open_session(timeout=self.connect_timeout)
        out = OutputCollector("stdout", callback)
        err = _MarkerStrippingCollector(OutputCollector("stderr", callback))
        try:
            channel.exec_command(wrapped)
            channel.shutdown_write()
            deadline = started + spec.timeout if spec.timeout else None
            exit_code = self._pump(channel, out, err, deadline)
            if exit_code is None:
                raise _DeadlinePassed
        except BaseException as exc:
            # Timeout, cancellation (KeyboardInterrupt, Prefect's termination) or a
            # dropped connection: the remote process group must not outlive us.
            pgid = self._await_pgid(channel, out, err)
            if pgid is not None:
                self._kill_group_quietly(pgid)
            else:
                log.error("could not learn the process group of %r on %s to kill it",
                          command, self.address)
            channel.close()
            out.close()
            err.close()
            if isinstance(exc, _DeadlinePassed):
                result = CommandResult(command, None, out.text(), err.text(),
                                       time.monotonic() - started, self.address, timed_out=True)
                raise CommandTimeoutError(result, spec.timeout or 0) from None
            raise
        finally:
            channel.close()
        out.close()
        err.close()
        duration = time.monotonic() - started
        result = CommandResult(command, exit_code, out.text(), err.text(), duration, self.address)
        if spec.check and not result.ok:
            raise CommandError(result)
        return result

    @staticmethod
    def _await_pgid(channel: paramiko.Channel, out: OutputCollector,
                    err: _MarkerStrippingCollector, timeout: float = 5.0) -> int | None:
        """The command's process-group id, waiting briefly for its marker if need be.

        The marker is the first thing the wrapper writes, but on stderr: stdout
        can be delivered (and a callback can fail) before it has been read.
        """
        out.mute()
        err.inner.mute()
        deadline = time.monotonic() + timeout
        while err.pgid is None and time.monotonic() < deadline and not channel.closed:
            if channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(CHUNK))
            elif channel.recv_ready():
                out.feed(channel.recv(CHUNK))
            else:
                select.select([channel], [], [], 0.05)
        return err.pgid

    @staticmethod
    def _pump(channel: paramiko.Channel, out: OutputCollector,
              err: _MarkerStrippingCollector, deadline: float | None) -> int | None:
        """Read both streams until the command exits; None when the deadline passed first."""
        exited_at: float | None = None
        while True:
            busy = False
            while channel.recv_ready():
                out.feed(channel.recv(CHUNK))
                busy = True
            while channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(CHUNK))
                busy = True
            if channel.exit_status_ready() and not busy:
                # Output can still trail the exit status; wait for EOF, but not for
                # ever: a background child may hold the stream open after we are done.
                exited_at = exited_at or time.monotonic()
                if channel.eof_received or channel.closed \
                        or time.monotonic() - exited_at > EOF_GRACE_SECONDS:
                    return channel.recv_exit_status()
            if deadline is not None and time.monotonic() > deadline:
                return None
            if not busy:
                if channel.closed and not channel.exit_status_ready():
                    raise HostConnectError("connection closed before the command ended")
                select.select([channel], [], [], 0.05)

    def _exec_start(self, command: str) -> paramiko.Channel:
        """Start a helper command now; feed and collect it later with ``_exec_raw``.

        Starting early hides the remote shell's start-up behind other work.
        """
        transport = self._connect().get_transport()
        assert transport is not None
        channel = transport.open_session(timeout=self.connect_timeout)
        channel.exec_command(command)
        return channel

    def _exec_raw(self, command: str, stdin: bytes | None = None, timeout: float = 300,
                  channel: paramiko.Channel | None = None) -> tuple[int, bytes, bytes]:
        """Run a helper command (no wrapping, no streaming); return exit code and raw output."""
        channel = channel or self._exec_start(command)
        try:
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while not (channel.exit_status_ready() and channel.eof_received
                       and not channel.recv_ready() and not channel.recv_stderr_ready()):
                if channel.recv_ready():
                    out += channel.recv(CHUNK)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(CHUNK)
                else:
                    if time.monotonic() > deadline:
                        raise HostError(f"helper command timed out on {self.address}: {command}")
                    if channel.closed and not channel.exit_status_ready():
                        raise HostConnectError("connection closed before the command ended")
                    select.select([channel], [], [], 0.05)
            return channel.recv_exit_status(), bytes(out), bytes(err)
        finally:
            channel.close()

    def _kill_group_quietly(self, pgid: int) -> None:
        try:
            self.kill_process_group(pgid)
        except Exception as exc:  # noqa: BLE001 - we are already failing; say so, don't mask
            log.error("could not kill process group %s on %s: %s", pgid, self.address, exc)

    def kill_process_group(self, pgid: int) -> None:
        """SIGTERM a process group on the host, then SIGKILL it after the grace period."""
        self._exec_raw(kill_group_script(pgid, self.kill_grace_period),
                       timeout=self.kill_grace_period + 30)

    def kill_pid_file(self, pid_file: str) -> bool:
        """Kill the process group whose id a ``run(pid_file=...)`` wrote. True if one was found."""
        code, out, _ = self._exec_raw(f"cat -- {shlex.quote(pid_file)}")
        text = out.decode().strip()
        if code != 0 or not text.isdigit():
            return False
        self.kill_process_group(int(text))
        return True

    # --------------------------------------------------------------- transfers
    @staticmethod
    def _remote_sizes(sftp: paramiko.SFTPClient, remote_dir: str) -> dict[str, int] | None:
        """Sizes of the regular files under ``remote_dir`` (None when it does not exist).

        Listed over the open SFTP session (one round trip per directory): a
        separate command would cost a remote shell start, which on a host with a
        heavy login profile is ~0.1 s each.
        """
        sizes: dict[str, int] = {}
        pending = [""]
        while pending:
            rel_dir = pending.pop()
            try:
                entries = sftp.listdir_attr(f"{remote_dir}/{rel_dir}" if rel_dir else remote_dir)
            except FileNotFoundError:
                if rel_dir:
                    continue  # removed while we listed
                return None
            for entry in entries:
                rel = f"{rel_dir}/{entry.filename}" if rel_dir else entry.filename
                mode = entry.st_mode or 0
                if stat.S_ISDIR(mode):
                    pending.append(rel)
                elif stat.S_ISREG(mode) and not entry.filename.endswith(PART_SUFFIX):
                    sizes[rel] = entry.st_size or 0
        return sizes

    def _sha256_command(self, remote_dir: str, relpaths: Iterable[str]) -> str:
        # openssl hashes ~3x faster than coreutils' sha256sum where the CPU has SHA
        # extensions; its output is newline-separated, so only names without a
        # newline or backslash may take that path.
        plain = not any("\n" in r or "\\" in r for r in relpaths)
        tool = ('if command -v openssl >/dev/null 2>&1; then printf O; '
                'xargs -0 -r openssl dgst -sha256 -r; '
                'else printf Z; xargs -0 -r sha256sum -z --; fi') if plain \
            else "printf Z; xargs -0 -r sha256sum -z --"
        return f"cd {shlex.quote(remote_dir)} && {{ {tool}; }}"

    def _remote_sha256(self, remote_dir: str, relpaths: Iterable[str],
                       channel: paramiko.Channel | None = None) -> dict[str, str]:
        """SHA-256 of files under ``remote_dir``, computed on the host in one command."""
        relpaths = list(relpaths)
        if not relpaths:
            if channel is not None:
                channel.close()
            return {}
        names = b"".join(b"./" + r.encode("utf-8", "surrogateescape") + b"\0" for r in relpaths)
        command = self._sha256_command(remote_dir, relpaths)
        code, out, err = self._exec_raw(command, stdin=names, channel=channel)
        if code != 0 or out[:1] not in (b"O", b"Z"):
            raise TransferError(f"cannot checksum files in {remote_dir} on {self.address}: "
                                f"{err.decode(errors='replace').strip()}")
        parsed = parse_sha256sum(out[1:], b"\n" if out[:1] == b"O" else b"\0")
        return {name.removeprefix("./"): digest for name, digest in parsed.items()}

    @staticmethod
    def _remote_mkdirs(sftp: paramiko.SFTPClient, remote_dir: str,
                       relpaths: Iterable[str]) -> None:
        """Create ``remote_dir`` and the parent directories of ``relpaths`` that are missing."""
        wanted = {remote_dir} | {f"{remote_dir}/{r.rpartition('/')[0]}" for r in relpaths
                                 if "/" in r}
        needed: set[str] = set()
        for path in wanted:
            parts = path.split("/")
            needed.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for path in sorted(p for p in needed if p not in ("", ".")):
            try:
                sftp.mkdir(path)
            except OSError:
                try:
                    if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                        raise TransferError(f"{path} exists on the host and is not a directory")
                except FileNotFoundError as exc:
                    raise TransferError(f"cannot create directory {path} on the host") from exc

    def _open_sftp(self) -> paramiko.SFTPClient:
        transport = self._connect().get_transport()
        assert transport is not None
        sftp = paramiko.SFTPClient.from_transport(
            transport, window_size=SFTP_WINDOW_SIZE, max_packet_size=SFTP_PACKET_SIZE)
        assert sftp is not None
        return sftp

    def upload(self, local_dir: str | os.PathLike[str], remote_dir: str) -> TransferResult:
        """Copy a local directory tree to the host, verified and atomic per file.

        Files already present remotely with the same size and SHA-256 are skipped.
        Every other file is written under a temporary name, checked on the host
        against the SHA-256 of the bytes sent, and only then renamed into place.
        A local file that changes while it is sent (size or modification time
        differ afterwards) fails the transfer, and nothing partial is left under
        the real name.

        Raises:
            TransferError: A file changed mid-way, a checksum disagreed, or the
                host refused a write (disk full, permissions).
        """
        started = time.monotonic()
        local_dir = os.fspath(local_dir)
        local = walk_local(local_dir, hashes=False)
        result = TransferResult(source=local_dir, destination=f"{self.address}:{remote_dir}")
        sftp = self._open_sftp()
        to_send: list[str] = []
        verifier: paramiko.Channel | None = None
        placed = False
        try:
            remote_sizes = self._remote_sizes(sftp, remote_dir) or {}
            same_size = [r for r, e in local.items() if remote_sizes.get(r) == e.size]
            remote_digests = self._remote_sha256(remote_dir, same_size)
            for rel in sorted(local):
                if rel in remote_digests and \
                        remote_digests[rel] == sha256_file(os.path.join(local_dir, rel)):
                    result.skipped.append(rel)
                    result.checksums[rel] = remote_digests[rel]
                else:
                    to_send.append(rel)
            if to_send:
                self._remote_mkdirs(sftp, remote_dir, to_send)
                parts = [part_name(r) for r in to_send]
                verifier = self._exec_start(self._sha256_command(remote_dir, parts))
            sent = []
            for rel in to_send:
                path = os.path.join(local_dir, rel)
                digest, size = _put_file(sftp, path, f"{remote_dir}/{part_name(rel)}")
                if size != local[rel].size or not local[rel].unchanged_since(path):
                    raise TransferError(
                        f"{path} changed while it was being sent (size {local[rel].size} -> "
                        f"{os.path.getsize(path)}); nothing was put in place, retry once the "
                        f"file is complete")
                sent.append((rel, digest, size))
            remote = self._remote_sha256(remote_dir, parts, channel=verifier) if to_send else {}
            for rel, digest, size in sent:
                if remote.get(part_name(rel)) != digest:
                    raise TransferError(
                        f"checksum mismatch after upload of {rel} to {self.address}:"
                        f"{remote_dir}: sent {digest}, host has {remote.get(part_name(rel))}")
                result.checksums[rel] = digest
                result.bytes += size
            for rel in to_send:
                sftp.posix_rename(f"{remote_dir}/{part_name(rel)}", f"{remote_dir}/{rel}")
            placed = True
        except OSError as exc:
            raise TransferError(f"upload to {self.address}:{remote_dir} failed: {exc}") from exc
        finally:
            if verifier is not None:
                verifier.close()
            if not placed and to_send:
                self._remove_parts(remote_dir, to_send)
            sftp.close()
        result.files = to_send
        result.checksums = dict(sorted(result.checksums.items()))
        result.seconds = time.monotonic() - started
        return result

    def write_file(self, remote_path: str, data: bytes) -> None:
        """Write one small file on the host (parents created), atomically via a temp name."""
        directory, _, name = remote_path.rpartition("/")
        sftp = self._open_sftp()
        try:
            self._remote_mkdirs(sftp, directory or ".", [])
            part = f"{directory}/{part_name(name)}" if directory else part_name(name)
            with sftp.open(part, "wb") as fh:
                fh.write(data)
            sftp.posix_rename(part, remote_path)
        except OSError as exc:
            raise TransferError(f"cannot write {self.address}:{remote_path}: {exc}") from exc
        finally:
            sftp.close()

    def _remove_parts(self, remote_dir: str, relpaths: list[str]) -> None:
        names = b"".join(b"./" + part_name(r).encode("utf-8", "surrogateescape") + b"\0"
                         for r in relpaths)
        try:
            self._exec_raw(f"cd {shlex.quote(remote_dir)} && xargs -0 rm -f --", stdin=names)
        except HostError as exc:
            log.error("could not remove temporary files in %s on %s: %s",
                      remote_dir, self.address, exc)

    def download(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> TransferResult:
        """Copy a directory tree from the host, verified and atomic per file.

        Files already present locally with the same SHA-256 are skipped. Each other
        file is written to a temporary local name, its digest compared to the one
        computed on the host, and renamed into place only on a match.

        Raises:
            TransferError: The remote directory does not exist, a file changed
                mid-way, or a local write failed.
        """
        started = time.monotonic()
        local_dir = os.fspath(local_dir)
        result = TransferResult(source=f"{self.address}:{remote_dir}", destination=local_dir)
        sftp = self._open_sftp()
        try:
            sizes = self._remote_sizes(sftp, remote_dir)
            if sizes is None:
                raise TransferError(
                    f"remote directory not found on {self.address}: {remote_dir}")
            digests = self._remote_sha256(remote_dir, sizes)
            expected = {rel: FileEntry(rel, sizes[rel], digest) for rel, digest in digests.items()}
            place_files(expected, local_dir,
                        lambda rel, part: _get_file(sftp, f"{remote_dir}/{rel}", part), result,
                        origin=lambda rel: f"{self.address}:{remote_dir}/{rel}",
                        verb="downloaded")
        except OSError as exc:
            raise TransferError(
                f"download from {self.address}:{remote_dir} failed: {exc}") from exc
        finally:
            sftp.close()
        result.seconds = time.monotonic() - started
        return result


class _DeadlinePassed(Exception):
    """Internal: the command's timeout expired (turned into CommandTimeoutError)."""


class _MarkerStrippingCollector:
    """Takes the process-group marker off the head of stderr before it reaches anyone."""

    def __init__(self, inner: OutputCollector) -> None:
        self.inner = inner
        self.pgid: int | None = None
        self._head: bytes | None = b""

    def feed(self, data: bytes) -> None:
        if self._head is None:
            self.inner.feed(data)
            return
        self._head += data
        line, sep, rest = self._head.partition(b"\n")
        if not sep:
            return
        self._head = None
        if line.startswith(PGID_MARKER):
            self.pgid = int(line[len(PGID_MARKER):].strip())
            self.inner.feed(rest)
        else:
            self.inner.feed(line + sep + rest)

    def close(self) -> None:
        if self._head:
            self.inner.feed(self._head)
            self._head = None
        self.inner.close()

    def text(self) -> str:
        return self.inner.text()


def _transport(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in PREFERRED_CIPHERS)
    return transport


def _alive(client: paramiko.SSHClient) -> bool:
    transport = client.get_transport()
    return transport is not None and transport.is_active()


def _safe_reason(exc: Exception) -> str:
    # paramiko's auth messages never contain the secret, but keep them short.
    return str(exc).splitlines()[0][:200] if str(exc) else "refused"


def _put_file(sftp: paramiko.SFTPClient, local_path: str, remote_path: str) -> tuple[str, int]:
    """Write one file with pipelined large requests; return digest and size of what was sent."""
    digest = hashlib.sha256()
    size = 0
    with open(local_path, "rb") as src, sftp.open(remote_path, "wb") as dst:
        dst.set_pipelined(True)
        dst.MAX_REQUEST_SIZE = SFTP_REQUEST_SIZE
        while chunk := src.read(4 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return digest.hexdigest(), size


def _get_file(sftp: paramiko.SFTPClient, remote_path: str, local_path: str) -> tuple[str, int]:
    """Read one file with prefetching; return digest and size of what was received."""
    digest = hashlib.sha256()
    size = 0
    with sftp.open(remote_path, "rb") as src, open(local_path, "wb") as dst:
        file_size = src.stat().st_size
        src.MAX_REQUEST_SIZE = SFTP_REQUEST_SIZE
        src.prefetch(file_size)
        while chunk := src.read(4 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return digest.hexdigest(), size
