"""Host: what every host block offers — run a command, kill it, move files.

RemoteHost (SSH) and LocalHost (this machine) both satisfy the ``Host``
protocol, so flows and the GPU pool are written once against it. ``run``'s
options are declared here once (``RunOptions``), with their defaults
(``RunSpec``), rather than repeated in every host's signature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Self, TypedDict, Unpack, runtime_checkable

from blocks.results import CommandResult, TransferResult
from blocks.streaming import LineCallback, prefect_line_logger


class RunOptions(TypedDict, total=False):
    """The keyword arguments of ``Host.run``; every one may be left out (see RunSpec)."""

    timeout: float | None
    env: dict[str, str] | None
    cwd: str | None
    check: bool
    on_line: LineCallback | None
    stream: bool
    pid_file: str | None
    stdin: bytes | None


MAX_STDIN = 64 * 1024
"""The most ``RunSpec.stdin`` may hold: what a pipe takes without a reader (Linux), so
sending it never waits for a command that reads nothing."""


@dataclass(frozen=True)
class RunSpec:
    """One ``run`` call: the command and its options, defaults filled in.

    Attributes:
        command: A shell command line (render templates with shlex.quote first).
        timeout: Seconds before the command's whole process group is killed.
        env: Extra environment variables for the command.
        cwd: Directory to run in.
        check: Raise CommandError on a non-zero exit.
        on_line: Callback ``(stream, line)``; defaults to the Prefect run logger.
        stream: False to collect output without calling any line callback.
        pid_file: Path on the host where the process-group id is written, so the
            group can be killed later by ``kill_pid_file`` from another process.
        stdin: A small input (at most ``MAX_STDIN`` bytes: it is sent before any output
            is read) for the command's standard input, which is then closed; None: an
            empty input.
    """

    command: str
    timeout: float | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    check: bool = True
    on_line: LineCallback | None = None
    stream: bool = True
    pid_file: str | None = None
    stdin: bytes | None = None

    def __post_init__(self) -> None:
        if self.stdin is not None and len(self.stdin) > MAX_STDIN:
            raise ValueError(f"stdin of {len(self.stdin)} bytes for {self.command!r}: at "
                             f"most {MAX_STDIN} bytes may be sent this way")

    def line_callback(self, prefix: str) -> LineCallback | None:
        """Where complete lines go: ``on_line``, else the run log under ``prefix``;
        None when ``stream`` is off."""
        if not self.stream:
            return None
        return self.on_line or prefect_line_logger(prefix)


@runtime_checkable
class Host(Protocol):
    """A machine that runs commands in their own process group and takes and gives
    directory trees, verified and atomically; used as a context manager it closes
    its connection at the end."""

    @property
    def address(self) -> str:
        """Where commands run, for messages (``user@host:port`` or ``localhost``)."""
        ...

    def run(self, command: str, **options: Unpack[RunOptions]) -> CommandResult:
        """Run ``command`` in its own process group, streaming its lines (see RunSpec).

        Raises:
            CommandTimeoutError: The deadline passed; the process group was killed.
            CommandError: Non-zero exit and ``check`` is true.
            HostError: The host could not be reached.
        """
        ...

    def kill_process_group(self, pgid: int) -> None:
        """SIGTERM a process group, then SIGKILL it after the host's grace period."""
        ...

    def kill_pid_file(self, pid_file: str) -> bool:
        """Kill the process group whose id ``run(pid_file=...)`` wrote; True if one was found."""
        ...

    def upload(self, local_dir: str | os.PathLike[str], remote_dir: str) -> TransferResult:
        """Copy a local tree to ``remote_dir`` on the host, verified and atomic per file."""
        ...

    def download(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> TransferResult:
        """Copy ``remote_dir`` on the host into a local tree, verified and atomic per file."""
        ...

    def close(self) -> None:
        """Release the connection; safe to call any number of times."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
