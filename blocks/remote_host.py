"""RemoteHost: run commands and move files on another machine over SSH (paramiko).

The GPU server is reached through this block. Like fabric's ``Connection`` it
holds the settings and delegates the work: ``blocks.ssh`` connects (on first
use, one shared connection per host for the life of the process, host key
verified against known_hosts) and closes idempotently, ``blocks.remote_exec``
runs commands, ``blocks.sftp_sync`` moves trees. Secrets are ``SecretStr`` and
are unwrapped only where the paramiko client is built.
"""

from __future__ import annotations

import os
from typing import Unpack

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from blocks import remote_exec, sftp_sync, ssh
from blocks.host import RunOptions, RunSpec
from blocks.results import CommandResult, TransferResult


class RemoteHost(Block):
    """A machine reached over SSH: run commands in their own process group with live
    output, and copy directory trees with SFTP, verified by SHA-256 on both ends."""

    _block_type_name = "MQI Remote Host"
    _block_type_slug = "mqi-remote-host"
    _logo_url = HttpUrl(
        "https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png")
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
    transfer_idle_timeout: float = Field(
        default=120.0, gt=0,
        description="Seconds a transfer may move nothing before it fails as a lost connection.")
    connect_retries: int = Field(
        default=3, ge=0,
        description="Retries of a connection that failed for a network reason (never for "
                    "authentication or host key failures).")
    retry_backoff: float = Field(
        default=1.0, ge=0, description="First retry delay in seconds; doubles on each retry.")
    kill_grace_period: float = Field(
        default=5.0, ge=0,
        description="Seconds between SIGTERM and SIGKILL when a command's process group is killed.")

    # ------------------------------------------------------------------ naming
    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        return f"{self.username}@{self.hostname}:{self.port}"

    def __repr__(self) -> str:  # the pydantic repr already masks SecretStr; keep it short
        return f"RemoteHost({self.address})"

    # -------------------------------------------------------------- connection
    def close(self) -> None:
        """Close the connection to this host. Safe to call any number of times."""
        ssh.disconnect(self)

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
        return remote_exec.run(self, RunSpec(command, **options),
                               kill_grace=self.kill_grace_period)

    def kill_process_group(self, pgid: int) -> None:
        """SIGTERM a process group on the host, then SIGKILL it after the grace period."""
        remote_exec.kill_process_group(self, pgid, self.kill_grace_period)

    def kill_pid_file(self, pid_file: str) -> bool:
        """Kill the process group whose id a ``run(pid_file=...)`` wrote. True if one was found."""
        return remote_exec.kill_pid_file(self, pid_file, self.kill_grace_period)

    # --------------------------------------------------------------- transfers
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
        return sftp_sync.upload(self, local_dir, remote_dir)

    def download(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> TransferResult:
        """Copy a directory tree from the host, verified and atomic per file.

        Files already present locally with the same SHA-256 are skipped. Each other
        file is written to a temporary local name, its digest compared to the one
        computed on the host, and renamed into place only on a match.

        Raises:
            TransferError: The remote directory does not exist, a file changed
                mid-way, or a local write failed.
        """
        return sftp_sync.download(self, remote_dir, local_dir)
