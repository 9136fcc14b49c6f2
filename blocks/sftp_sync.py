"""Moving directory trees over SFTP, verified by SHA-256 on both ends, atomic per file.

Files are compared by size first and SHA-256 second (the host hashes its side
in one command), so an unchanged file is never sent twice; every other file is
written under a temporary part name, verified, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import stat
import time
from collections.abc import Iterable, Iterator

import paramiko

from blocks.errors import HostConnectError, HostError, TransferError
from blocks.manifest import (
    PART_SUFFIX,
    FileEntry,
    parse_sha256sum,
    part_name,
    sha256_file,
    walk_local,
)
from blocks.placing import place_files
from blocks.remote_exec import exec_raw, exec_start
from blocks.results import TransferResult
from blocks.ssh import SshSettings, transport

log = logging.getLogger("mqi.remote_host")

# SFTP requests of 32 KiB (paramiko's default) cost one Python round of
# packetising each; OpenSSH's sftp-server accepts up to 256 KiB per write, so
# larger requests cut the per-byte overhead of big files.
SFTP_REQUEST_SIZE = 255 * 1024
SFTP_PACKET_SIZE = SFTP_REQUEST_SIZE + 1024
SFTP_WINDOW_SIZE = 16 * 1024 * 1024


def open_sftp(host: SshSettings) -> paramiko.SFTPClient:
    """An SFTP session on the host's live connection, with a large window and packets.

    A read or write on it that moves nothing for ``transfer_idle_timeout`` raises
    TimeoutError: a host that hangs with its connection open (seen: a crashed host whose
    SFTP servers lived on) would otherwise hold a transfer for ever. The same holds for
    the SFTP handshake (paramiko's ``from_transport`` waits for the server's version
    without a timeout): a host that stalls there fails with HostConnectError.

    Raises:
        HostConnectError: The session could not be opened, or the handshake stalled.
    """
    idle = host.transfer_idle_timeout
    try:
        channel = transport(host).open_session(window_size=SFTP_WINDOW_SIZE,
                                               max_packet_size=SFTP_PACKET_SIZE, timeout=idle)
        channel.settimeout(idle)
        try:
            channel.invoke_subsystem("sftp")
            return paramiko.SFTPClient(channel)
        except BaseException:
            channel.close()
            raise
    except TimeoutError as exc:
        raise HostConnectError(f"opening an SFTP session on {host.address}: "
                               f"{_stalled(host)}") from exc
    except (paramiko.SSHException, EOFError) as exc:
        raise HostConnectError(f"opening an SFTP session on {host.address}: the connection "
                               f"was lost ({type(exc).__name__}: {exc})") from exc


def _stalled(host: SshSettings) -> str:
    return (f"nothing moved for {host.transfer_idle_timeout:g} s: the host or the link "
            f"stalled (hosts.<name>.transfer_idle_seconds)")


def remote_sizes(sftp: paramiko.SFTPClient, remote_dir: str) -> dict[str, int] | None:
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


def sha256_command(remote_dir: str, relpaths: Iterable[str]) -> str:
    """Shell that prints the SHA-256 of the NUL-separated names on its stdin.

    Its output starts with ``O`` (openssl, newline-separated records) or ``Z``
    (sha256sum -z, NUL-separated), which says how to parse the rest.
    """
    # openssl hashes ~3x faster than coreutils' sha256sum where the CPU has SHA
    # extensions; its output is newline-separated, so only names without a
    # newline or backslash may take that path.
    plain = not any("\n" in r or "\\" in r for r in relpaths)
    tool = ('if command -v openssl >/dev/null 2>&1; then printf O; '
            'xargs -0 -r openssl dgst -sha256 -r; '
            'else printf Z; xargs -0 -r sha256sum -z --; fi') if plain \
        else "printf Z; xargs -0 -r sha256sum -z --"
    return f"cd {shlex.quote(remote_dir)} && {{ {tool}; }}"


def remote_sha256(host: SshSettings, remote_dir: str, relpaths: Iterable[str],
                  channel: paramiko.Channel | None = None) -> dict[str, str]:
    """SHA-256 of files under ``remote_dir``, computed on the host in one command.

    ``channel``, when given, already runs ``sha256_command`` for these paths.
    """
    relpaths = list(relpaths)
    if not relpaths:
        if channel is not None:
            channel.close()
        return {}
    names = b"".join(b"./" + r.encode("utf-8", "surrogateescape") + b"\0" for r in relpaths)
    command = sha256_command(remote_dir, relpaths)
    code, out, err = exec_raw(host, command, stdin=names, channel=channel)
    if code != 0 or out[:1] not in (b"O", b"Z"):
        raise TransferError(f"cannot checksum files in {remote_dir} on {host.address}: "
                            f"{err.decode(errors='replace').strip()}")
    parsed = parse_sha256sum(out[1:], b"\n" if out[:1] == b"O" else b"\0")
    return {name.removeprefix("./"): digest for name, digest in parsed.items()}


def remote_mkdirs(sftp: paramiko.SFTPClient, remote_dir: str, relpaths: Iterable[str]) -> None:
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


def upload(host: SshSettings, local_dir: str | os.PathLike[str],
           remote_dir: str) -> TransferResult:
    """Copy a local directory tree to the host (see ``RemoteHost.upload``)."""
    started = time.monotonic()
    local_dir = os.fspath(local_dir)
    local = walk_local(local_dir, hashes=False)
    result = TransferResult(source=local_dir, destination=f"{host.address}:{remote_dir}")
    sftp = open_sftp(host)
    to_send: list[str] = []
    verifier: paramiko.Channel | None = None
    placed = False
    try:
        sizes = remote_sizes(sftp, remote_dir) or {}
        same_size = [r for r, e in local.items() if sizes.get(r) == e.size]
        remote_digests = remote_sha256(host, remote_dir, same_size)
        for rel in sorted(local):
            if rel in remote_digests and \
                    remote_digests[rel] == sha256_file(os.path.join(local_dir, rel)):
                result.skipped.append(rel)
                result.checksums[rel] = remote_digests[rel]
            else:
                to_send.append(rel)
        parts = [part_name(r) for r in to_send]
        if to_send:
            remote_mkdirs(sftp, remote_dir, to_send)
            # Started now, so the host's shell is up by the time the last byte is sent.
            verifier = exec_start(host, sha256_command(remote_dir, parts))
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
        remote = remote_sha256(host, remote_dir, parts, channel=verifier) if to_send else {}
        for rel, digest, size in sent:
            if remote.get(part_name(rel)) != digest:
                raise TransferError(
                    f"checksum mismatch after upload of {rel} to {host.address}:"
                    f"{remote_dir}: sent {digest}, host has {remote.get(part_name(rel))}"
                    # a pipelined write the host could not store fails no request
                    f"{_remote_space(host, remote_dir, local, to_send)}")
            result.checksums[rel] = digest
            result.bytes += size
        for rel in to_send:
            sftp.posix_rename(f"{remote_dir}/{part_name(rel)}", f"{remote_dir}/{rel}")
        placed = True
    except (paramiko.SSHException, EOFError) as exc:  # the link went mid-way
        raise HostConnectError(f"upload to {host.address}:{remote_dir}: the connection was "
                               f"lost ({type(exc).__name__}: {exc})") from exc
    except TimeoutError as exc:
        raise HostConnectError(f"upload to {host.address}:{remote_dir}: {_stalled(host)}") \
            from exc
    except OSError as exc:
        raise TransferError(f"upload to {host.address}:{remote_dir} failed: {exc}"
                            f"{_remote_space(host, remote_dir, local, to_send)}") from exc
    finally:
        if verifier is not None:
            verifier.close()
        if not placed and to_send:
            _remove_parts(host, remote_dir, to_send)
        sftp.close()
    result.files = to_send
    result.checksums = dict(sorted(result.checksums.items()))
    result.seconds = time.monotonic() - started
    return result


def download(host: SshSettings, remote_dir: str,
             local_dir: str | os.PathLike[str]) -> TransferResult:
    """Copy a directory tree from the host (see ``RemoteHost.download``)."""
    started = time.monotonic()
    local_dir = os.fspath(local_dir)
    result = TransferResult(source=f"{host.address}:{remote_dir}", destination=local_dir)
    sftp = open_sftp(host)
    try:
        sizes = remote_sizes(sftp, remote_dir)
        if sizes is None:
            raise TransferError(f"remote directory not found on {host.address}: {remote_dir}")
        digests = remote_sha256(host, remote_dir, sizes)
        expected = {rel: FileEntry(rel, sizes[rel], digest) for rel, digest in digests.items()}
        place_files(expected, local_dir,
                    lambda rel, part: _get_file(sftp, f"{remote_dir}/{rel}", part), result,
                    origin=lambda rel: f"{host.address}:{remote_dir}/{rel}", verb="downloaded")
    except (paramiko.SSHException, EOFError) as exc:  # the link went mid-way
        raise HostConnectError(f"download from {host.address}:{remote_dir}: the connection "
                               f"was lost ({type(exc).__name__}: {exc})") from exc
    except TimeoutError as exc:
        raise HostConnectError(f"download from {host.address}:{remote_dir}: "
                               f"{_stalled(host)}") from exc
    except OSError as exc:
        # The local side's error names no file when a write fails (a full disk): say
        # where it was going.
        raise TransferError(f"download from {host.address}:{remote_dir} to {local_dir} "
                            f"failed: {exc}") from exc
    finally:
        sftp.close()
    result.seconds = time.monotonic() - started
    return result


def _remote_space(host: SshSettings, remote_dir: str, local: dict[str, FileEntry],
                  to_send: list[str]) -> str:
    """"; the host's disk is full ..." when the failed upload did not fit, else "".

    OpenSSH's sftp-server says only "Failure" for a full disk (SFTP v3 has no
    code for it): the free space at ``remote_dir`` tells what happened.
    """
    needed = sum(local[r].size for r in to_send if r in local)
    try:
        code, out, _ = exec_raw(host, f"df -Pk -- {shlex.quote(remote_dir)}", timeout=30)
        free_kib = int(out.decode().splitlines()[-1].split()[3]) if code == 0 else None
    except (HostError, ValueError, IndexError):
        return ""  # the host is gone too, or df is not there: the error above stands
    if free_kib is None or free_kib * 1024 >= needed:
        return ""
    return (f"; the host's disk is full: {free_kib} KiB free at {host.address}:{remote_dir}, "
            f"{-(-needed // 1024)} KiB to write")


def _remove_parts(host: SshSettings, remote_dir: str, relpaths: list[str]) -> None:
    names = b"".join(b"./" + part_name(r).encode("utf-8", "surrogateescape") + b"\0"
                     for r in relpaths)
    try:
        exec_raw(host, f"cd {shlex.quote(remote_dir)} && xargs -0 rm -f --", stdin=names)
    except HostError as exc:
        log.error("could not remove temporary files in %s on %s: %s",
                  remote_dir, host.address, exc)


def _put_file(sftp: paramiko.SFTPClient, local_path: str, remote_path: str) -> tuple[str, int]:
    """Write one file with pipelined large requests; return digest and size of what was sent."""
    digest = hashlib.sha256()
    size = 0
    with open(local_path, "rb") as src, _closing(sftp.open(remote_path, "wb")) as dst:
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
    with _closing(sftp.open(remote_path, "rb")) as src, open(local_path, "wb") as dst:
        file_size = src.stat().st_size
        src.MAX_REQUEST_SIZE = SFTP_REQUEST_SIZE
        src.prefetch(file_size)
        while chunk := src.read(4 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return digest.hexdigest(), size


@contextlib.contextmanager
def _closing(remote: paramiko.SFTPFile) -> Iterator[paramiko.SFTPFile]:
    """A remote file closed on the way out, whose close never hides why we left.

    A signal (SIGTERM of `mqi up`: Prefect's TerminationSignal) or an error raised
    in the middle of an SFTP read leaves the session mid-packet; closing the file
    then fails too ("Garbage packet received"), and that error would replace the
    real one: an interrupted download would end as a failed case instead of an
    interrupted one that the next start resumes.
    """
    try:
        yield remote
    except BaseException:
        with contextlib.suppress(Exception):
            remote.close()
        raise
    remote.close()
