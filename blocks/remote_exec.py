"""Running commands over SSH: own process group, live output, a deadline, and the kill.

A command runs under ``setsid`` (blocks.wrapping), whose first line on stderr
is the process-group marker. Both streams are read while the command runs, so
no amount of output can block it, and the wait loop keeps its own deadline: a
sync task's timeout cannot interrupt a blocking read. On a timeout, an error
or a cancellation the whole remote process group is killed
(docs/architecture.md#remote-process-groups).
"""

from __future__ import annotations

import logging
import select
import shlex
import time

import paramiko

from blocks.errors import CommandError, CommandTimeoutError, HostConnectError, HostError
from blocks.host import RunSpec
from blocks.manifest import CHUNK
from blocks.results import CommandResult
from blocks.ssh import SshSettings, open_session, transport
from blocks.streaming import OutputCollector
from blocks.wrapping import PGID_MARKER, kill_group_script, wrap_command

log = logging.getLogger("mqi.remote_host")

EOF_GRACE_SECONDS = 2.0
"""How long output may trail the exit status before we stop waiting for EOF."""


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


def run(host: SshSettings, spec: RunSpec, *, kill_grace: float) -> CommandResult:
    """Run ``spec.command`` on the host in its own process group (see ``RemoteHost.run``).

    Raises:
        CommandTimeoutError: The deadline passed; the process group was killed.
        CommandError: Non-zero exit and ``spec.check`` is true.
        HostError: The host could not be reached.
    """
    callback = spec.line_callback(host.hostname)
    wrapped = wrap_command(spec.command, env=spec.env, cwd=spec.cwd, pid_file=spec.pid_file)
    live = transport(host)
    started = time.monotonic()
    channel = live.open_session(timeout=host.connect_timeout)
    out = OutputCollector("stdout", callback)
    err = _MarkerStrippingCollector(OutputCollector("stderr", callback))
    try:
        channel.exec_command(wrapped)
        if spec.stdin:
            channel.sendall(spec.stdin)
        channel.shutdown_write()
        deadline = started + spec.timeout if spec.timeout else None
        exit_code = _pump(channel, out, err, deadline)
        if exit_code is None:
            raise _DeadlinePassed
    except BaseException as exc:
        # Timeout, cancellation (KeyboardInterrupt, Prefect's termination) or a
        # dropped connection: the remote process group must not outlive us.
        pgid = _await_pgid(channel, out, err)
        if pgid is not None:
            _kill_group_quietly(host, pgid, kill_grace)
        else:
            log.error("could not learn the process group of %r on %s to kill it",
                      spec.command, host.address)
        channel.close()
        out.close()
        err.close()
        if isinstance(exc, _DeadlinePassed):
            result = CommandResult(spec.command, None, out.text(), err.text(),
                                   time.monotonic() - started, host.address, timed_out=True)
            raise CommandTimeoutError(result, spec.timeout or 0) from None
        raise
    finally:
        channel.close()
    out.close()
    err.close()
    duration = time.monotonic() - started
    result = CommandResult(spec.command, exit_code, out.text(), err.text(), duration,
                           host.address)
    if spec.check and not result.ok:
        raise CommandError(result)
    return result


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
                code = channel.recv_exit_status()
                live = channel.get_transport()
                if code == -1 and (live is None or not live.is_active()):
                    # paramiko's "no status": the link went, the command may still run.
                    raise HostConnectError("the connection to the host was lost while the "
                                           "command ran; its outcome is not known here")
                return code
        if deadline is not None and time.monotonic() > deadline:
            return None
        if not busy:
            if channel.closed and not channel.exit_status_ready():
                raise HostConnectError("connection closed before the command ended")
            select.select([channel], [], [], 0.05)


def exec_start(host: SshSettings, command: str) -> paramiko.Channel:
    """Start a helper command now; feed and collect it later with ``exec_raw``.

    Starting early hides the remote shell's start-up behind other work.
    """
    channel = open_session(host)
    channel.exec_command(command)
    return channel


def exec_raw(host: SshSettings, command: str, stdin: bytes | None = None,
             timeout: float = 300,
             channel: paramiko.Channel | None = None) -> tuple[int, bytes, bytes]:
    """Run a helper command (no wrapping, no streaming); return exit code and raw output.

    ``channel``, when given, is the one ``exec_start`` already started ``command`` on.

    Raises:
        HostError: The command did not end within ``timeout`` seconds.
        HostConnectError: The connection closed before the command ended.
    """
    channel = channel or exec_start(host, command)
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
                    raise HostError(f"helper command timed out on {host.address}: {command}")
                if channel.closed and not channel.exit_status_ready():
                    raise HostConnectError("connection closed before the command ended")
                select.select([channel], [], [], 0.05)
        return channel.recv_exit_status(), bytes(out), bytes(err)
    finally:
        channel.close()


def _kill_group_quietly(host: SshSettings, pgid: int, grace: float) -> None:
    try:
        kill_process_group(host, pgid, grace)
    except Exception as exc:  # noqa: BLE001 - we are already failing; say so, don't mask
        log.error("could not kill process group %s on %s: %s", pgid, host.address, exc)


def kill_process_group(host: SshSettings, pgid: int, grace: float) -> None:
    """SIGTERM a process group on the host, then SIGKILL it after ``grace`` seconds."""
    exec_raw(host, kill_group_script(pgid, grace), timeout=grace + 30)


def kill_pid_file(host: SshSettings, pid_file: str, grace: float) -> bool:
    """Kill the process group whose id a ``run(pid_file=...)`` wrote. True if one was found."""
    code, out, _ = exec_raw(host, f"cat -- {shlex.quote(pid_file)}")
    text = out.decode().strip()
    if code != 0 or not text.isdigit():
        return False
    kill_process_group(host, int(text), grace)
    return True
