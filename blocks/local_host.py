"""LocalHost: the RemoteHost interface for this machine (the GPU box itself, the demo).

prefect-shell's ShellOperation runs a fixed list of commands set on the block;
this block must run a different command per call with a per-call timeout, cwd
and pid file, and copy trees with the same verified, atomic semantics as
RemoteHost. So it follows ShellOperation's manner (a Block, live output into
the run log, its own process group) with RemoteHost's methods, over subprocess,
and the project does not depend on prefect-shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Unpack

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl

from blocks.errors import CommandError, CommandTimeoutError, TransferError
from blocks.host import RunOptions, RunSpec
from blocks.manifest import CHUNK, walk_local
from blocks.placing import place_files
from blocks.results import CommandResult, TransferResult
from blocks.streaming import OutputCollector
from blocks.wrapping import ENV_NAME, group_alive


class LocalHost(Block):
    """This machine, with the same interface as RemoteHost: commands in their own
    process group with live output, and verified, atomic directory copies."""

    _block_type_name = "MQI Local Host"
    _block_type_slug = "mqi-local-host"
    _logo_url = HttpUrl(
        "https://images.ctfassets.net/gm98wzqotmnx/5h9vGvpbqhtDDMpvMxCHFe/8a4ad5c0d0a40b4a04e8b0fdfdc5f6bb/shell.png")
    _description = (
        "The machine the flow runs on, used like a remote host: runs commands in their own "
        "process group with output streamed to the run log, and copies directory trees with "
        "SHA-256 verification and atomic renames."
    )
    _documentation_url = HttpUrl("https://docs.python.org/3/library/subprocess.html")

    shell: str = Field(default="/bin/sh", description="Shell that interprets each command.")
    working_dir: str | None = Field(
        default=None, description="Folder commands run in when no cwd is given.")
    prefer_this_python: bool = Field(
        default=False, description="Put the folder of the Python running this block first on "
                                   "PATH, so `python3` in commands is this environment's.")
    kill_grace_period: float = Field(
        default=5.0, ge=0,
        description="Seconds between SIGTERM and SIGKILL when a command's process group is killed.")

    @property
    def address(self) -> str:
        """``localhost``, for messages."""
        return "localhost"

    def close(self) -> None:
        """Nothing to close; present so both hosts can be used the same way."""

    def __enter__(self) -> LocalHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, command: str, **options: Unpack[RunOptions]) -> CommandResult:
        """Run a shell command in its own session and process group.

        Same options (see ``RunSpec``), result and errors as ``RemoteHost.run``.
        """
        spec = RunSpec(command, **options)
        callback = spec.line_callback("localhost")
        for name in spec.env or {}:
            if not ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name: {name!r}")
        full_env = {**os.environ, **(spec.env or {})}
        if self.prefer_this_python:
            full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + \
                full_env.get("PATH", "")
        started = time.monotonic()
        proc = subprocess.Popen(
            [self.shell, "-c", command], cwd=spec.cwd or self.working_dir, env=full_env,
            stdin=subprocess.DEVNULL if spec.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        if proc.stdin is not None:
            # Small by contract (RunSpec.stdin): fits the pipe, so this cannot block on
            # a command that is not reading yet.
            with contextlib.suppress(BrokenPipeError):  # it exited without reading
                proc.stdin.write(spec.stdin or b"")
            proc.stdin.close()
        if spec.pid_file:
            with open(spec.pid_file, "w", encoding="ascii") as fh:
                fh.write(f"{proc.pid}\n")
        out = OutputCollector("stdout", callback)
        err = OutputCollector("stderr", callback)
        deadline = started + spec.timeout if spec.timeout else None
        try:
            finished = _pump(proc, out, err, deadline)
        except BaseException:
            self.kill_process_group(proc.pid, proc)
            proc.wait()
            raise
        finally:
            out.close()
            err.close()
        duration = time.monotonic() - started
        if not finished:
            self.kill_process_group(proc.pid, proc)
            proc.wait()
            result = CommandResult(command, None, out.text(), err.text(), duration,
                                   self.address, timed_out=True)
            raise CommandTimeoutError(result, spec.timeout or 0)
        # A command killed by a signal reports -N from Popen; shells say 128+N.
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        result = CommandResult(command, code, out.text(), err.text(), duration, self.address)
        if spec.check and not result.ok:
            raise CommandError(result)
        return result

    def kill_process_group(self, pgid: int,
                           leader: subprocess.Popen[bytes] | None = None) -> None:
        """SIGTERM a process group, then SIGKILL it after the grace period.

        ``leader`` is our own child at the head of the group: it is reaped while we
        wait, or its zombie would look like a live group member until the grace ends.
        """
        if pgid <= 1:
            raise ValueError(f"refusing to kill process group {pgid}")
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.kill_grace_period
        while time.monotonic() < deadline:
            if leader is not None:
                leader.poll()
            if not group_alive(pgid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def kill_pid_file(self, pid_file: str) -> bool:
        """Kill the process group whose id ``run(pid_file=...)`` wrote. True if one was found."""
        try:
            text = Path(pid_file).read_text(encoding="ascii").strip()
        except OSError:
            return False
        if not text.isdigit():
            return False
        self.kill_process_group(int(text))
        return True

    def upload(self, local_dir: str | os.PathLike[str], remote_dir: str) -> TransferResult:
        """Copy a tree into ``remote_dir`` on this machine (same semantics as RemoteHost)."""
        return copy_tree(local_dir, remote_dir)

    def download(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> TransferResult:
        """Copy ``remote_dir`` on this machine into ``local_dir`` (same semantics as RemoteHost)."""
        if not os.path.isdir(remote_dir):
            raise TransferError(f"remote directory not found on localhost: {remote_dir}")
        return copy_tree(remote_dir, local_dir)


def _pump(proc: subprocess.Popen[bytes], out: OutputCollector, err: OutputCollector,
          deadline: float | None) -> bool:
    """Read both pipes until EOF and exit; False when the deadline passed first."""
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    exited_at: float | None = None
    try:
        while sel.get_map():
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            for key, _ in sel.select(wait):
                data = os.read(key.fd, CHUNK)
                if data:
                    key.data.feed(data)
                else:
                    sel.unregister(key.fileobj)
            if deadline is not None and time.monotonic() > deadline:
                return False
            if proc.poll() is not None:
                # A background child may keep the pipes open after the command ended.
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 2.0:
                    break
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    while proc.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def copy_tree(source: str | os.PathLike[str],
              destination: str | os.PathLike[str]) -> TransferResult:
    """Copy a tree on this machine: skip identical files, write to a temporary name,
    verify SHA-256 of what was written against the source, rename into place.

    Raises:
        TransferError: A source file changed while being copied, or a write failed.
    """
    started = time.monotonic()
    source, destination = os.fspath(source), os.fspath(destination)
    src = walk_local(source)
    result = TransferResult(source=source, destination=destination)
    try:
        place_files(src, destination,
                    lambda rel, part: _copy_file(os.path.join(source, *rel.split("/")), part),
                    result, origin=lambda rel: os.path.join(source, rel), verb="copied")
    except OSError as exc:
        raise TransferError(f"copy from {source} to {destination} failed: {exc}") from exc
    result.seconds = time.monotonic() - started
    return result


def _copy_file(source: str, part: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(part, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return digest.hexdigest(), size
