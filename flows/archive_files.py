"""One case's folders into one verified archive, and only then the originals deleted.

The steps, each of which stops the case with an ``ArchiveError`` that names the
case and the problem and leaves every original in place:

1. ``collect``: a manifest of each folder (relative path, size, mtime, SHA-256),
   read before anything is packed; a link or a file that cannot be read stops it.
   ``check_report``: every result file report.md lists has that SHA-256 still.
2. ``pack``: ``<case_id>_<UTC time>.tar.gz`` written under a temporary name in the
   archive folder (``input/...``, ``results/...`` and a ``SHA256SUMS`` of both),
   flushed to disk, read back whole, every member's SHA-256 compared with the
   manifest, then renamed into place. A full disk, an unreadable file or a
   mismatch removes the partial file.
3. ``append_index``: one JSON line in ``index.jsonl``.
4. ``delete_originals``: only files still as the manifest saw them (size and
   mtime), each one by name; folders only once empty, so a file that arrived
   meanwhile stays, with its folder.

Messages name ``.ptn``/``.mgn`` files by ``describe_file`` (their names carry a
patient id) and OS errors by their ``strerror``, never by the path they carry.
Nothing here imports Prefect.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from blocks.manifest import CHUNK, PART_SUFFIX, sha256_file
from config import MqiError
from flows.case_inspection import describe_file

INDEX = "index.jsonl"
LOCK = ".archiver.lock"
SUMS = "SHA256SUMS"
INPUT, RESULTS = "input", "results"
COMPRESS_LEVEL = 6  # spot logs hardly compress; 9 would cost time for nothing
REPORT_ROW = re.compile(r"^\|\s*[^|]*\|\s*`([^`]+)`\s*\|\s*`([0-9a-f]{64})`\s*\|\s*$")
"""A row of report.md's "Result files" table: ``| beam | `file` | `sha256` |``."""


class ArchiveError(MqiError):
    """One case could not be archived; unless said otherwise, nothing of it was deleted."""

    def __init__(self, case_id: str, problem: str, *, nothing_deleted: bool = True) -> None:
        self.case_id = case_id
        self.problem = problem
        self.nothing_deleted = nothing_deleted
        super().__init__(f"case {case_id}: {problem}" +
                         ("; nothing deleted" if nothing_deleted else ""))

    def __reduce__(self) -> tuple[object, ...]:  # crosses from the task to the flow
        return (_rebuild, (self.case_id, self.problem, self.nothing_deleted))


def _rebuild(case_id: str, problem: str, nothing_deleted: bool) -> ArchiveError:
    return ArchiveError(case_id, problem, nothing_deleted=nothing_deleted)


class ArchiverBusy(MqiError):
    """Another archiver holds the archive folder."""


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class FileSet:
    """The files of one folder, as they were before packing.

    Attributes:
        root: The folder.
        prefix: Its folder inside the archive (``input`` or ``results``).
        entries: Relative POSIX path → size, mtime and SHA-256.
    """

    root: Path
    prefix: str
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries.values())


@dataclass(frozen=True)
class Packed:
    """A verified archive in its place."""

    path: Path
    sha256: str
    size: int


def _os_problem(exc: OSError) -> str:
    """An OS error in words, without the path it carries (a name may hold a patient id)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({os.strerror(exc.errno)})"
    if exc.errno == errno.EFBIG:
        return f"no room for a file that large here ({os.strerror(exc.errno)})"
    if exc.strerror:
        return exc.strerror
    # tarfile's own "unexpected end of data" (a file shrank) carries no path
    return str(exc) if exc.filename is None and str(exc) else type(exc).__name__


def _where(rel: str) -> str:
    return describe_file(Path(rel))


def scan(root: Path, case_id: str) -> dict[str, os.stat_result]:
    """Every regular file under ``root`` by relative path, from stats alone.

    Raises:
        ArchiveError: ``root`` or something in it is a link, or not a regular file or
            folder, or cannot be listed.
    """
    if root.is_symlink():
        raise ArchiveError(case_id, f"{root} is a symbolic link; links are not archived")
    found: dict[str, os.stat_result] = {}
    stack = [""]
    try:
        while stack:
            rel = stack.pop()
            with os.scandir(root / rel if rel else root) as listing:
                for item in listing:
                    sub = f"{rel}/{item.name}" if rel else item.name
                    st = item.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(sub)
                    elif stat.S_ISREG(st.st_mode):
                        found[sub] = st
                    else:
                        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else \
                            "not a regular file"
                        raise ArchiveError(case_id, f"{root.name}/{_where(sub)} is {kind}; "
                                                    f"it is not archived")
    except OSError as exc:
        raise ArchiveError(case_id, f"cannot list {root}: {_os_problem(exc)}") from None
    return dict(sorted(found.items()))


def collect(root: Path, prefix: str, case_id: str) -> FileSet:
    """The manifest of ``root``: every file's size, mtime and SHA-256, read now.

    Raises:
        ArchiveError: A link, a special file, or a file that cannot be read.
    """
    files = FileSet(root, prefix)
    for rel, st in scan(root, case_id).items():
        try:
            files.entries[rel] = Entry(st.st_size, st.st_mtime_ns, sha256_file(root / rel))
        except OSError as exc:
            raise ArchiveError(case_id, f"cannot read {root.name}/{_where(rel)}: "
                                        f"{_os_problem(exc)}") from None
    return files


def report_checksums(report: str) -> dict[str, str]:
    """The result files report.md lists (relative to the results folder) → SHA-256."""
    return {m.group(1): m.group(2) for m in map(REPORT_ROW.match, report.splitlines()) if m}


def check_report(results: FileSet, case_id: str, *, required: bool) -> int:
    """Every result file report.md lists is there with the SHA-256 it lists.

    Returns:
        How many files the report lists.

    Raises:
        ArchiveError: No report.md though ``required``, or a listed file missing or
            different from what the report says.
    """
    if "report.md" not in results.entries:
        if required:
            raise ArchiveError(case_id, "its results folder has no report.md to check the "
                                        "results against")
        return 0
    try:
        listed = report_checksums((results.root / "report.md").read_text(errors="replace"))
    except OSError as exc:
        raise ArchiveError(case_id, f"cannot read report.md: {_os_problem(exc)}") from None
    for rel, digest in listed.items():
        entry = results.entries.get(rel)
        if entry is None:
            raise ArchiveError(case_id, f"result file {_where(rel)} listed in report.md is "
                                        f"missing")
        if entry.sha256 != digest:
            raise ArchiveError(case_id, f"result file {_where(rel)} does not match the "
                                        f"SHA-256 in report.md (checksum mismatch)")
    return len(listed)


def archive_name(case_id: str, when: datetime) -> str:
    return f"{case_id}_{when.astimezone(UTC):%Y%m%dT%H%M%SZ}.tar.gz"


def part_path(final: Path) -> Path:
    """The temporary name an archive has until it is verified."""
    return final.with_name(f".{final.name}{PART_SUFFIX}")


def _sums(sets: Iterable[FileSet]) -> bytes:
    lines = [f"{e.sha256}  {s.prefix}/{rel}\n" for s in sets for rel, e in s.entries.items()]
    return "".join(lines).encode("utf-8", "surrogateescape")


def _add(tar: tarfile.TarFile, name: str, size: int, fh: io.BufferedIOBase | io.BytesIO,
         mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    tar.addfile(info, fh)


def _write(part: Path, sets: list[FileSet], case_id: str) -> None:
    """Write the archive to ``part``; raises ArchiveError (the caller removes ``part``)."""
    try:
        raw = open(part, "xb")  # noqa: SIM115 - closed below, also on failure
    except OSError as exc:
        raise ArchiveError(case_id, f"cannot create the archive: {_os_problem(exc)}") from None
    reading = ""
    try:
        with raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=COMPRESS_LEVEL,
                               format=tarfile.PAX_FORMAT) as tar:
            sums = _sums(sets)
            _add(tar, SUMS, len(sums), io.BytesIO(sums), datetime.now(UTC).timestamp())
            for files in sets:
                for rel, entry in files.entries.items():
                    reading = f"{files.root.name}/{_where(rel)}"
                    with open(files.root / rel, "rb") as fh:
                        _add(tar, f"{files.prefix}/{rel}", entry.size, fh,
                             entry.mtime_ns / 1e9)
                    reading = ""
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as exc:
        # A file is read while the archive is written: no room is the writing's fault,
        # anything else while a file is open its reading's (tarfile's own "unexpected
        # end of data" included: the file shrank after the manifest).
        no_room = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        where = f"reading {reading}" if reading and not no_room else "writing the archive"
        raise ArchiveError(case_id, f"{where}: {_os_problem(exc)}") from None


def verify(part: Path, sets: list[FileSet], case_id: str) -> None:
    """Read the archive back whole: exactly the manifest's files, each with its SHA-256.

    Raises:
        ArchiveError: A member missing, extra, of another kind or with another digest,
            or an archive that cannot be read.
    """
    expected = {f"{s.prefix}/{rel}": e.sha256 for s in sets for rel, e in s.entries.items()}
    expected[SUMS] = hashlib.sha256(_sums(sets)).hexdigest()
    seen: dict[str, str] = {}
    try:
        with tarfile.open(part, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile() or member.name in seen:
                    raise ArchiveError(case_id, f"the archive read back holds an unexpected "
                                                f"{_where(member.name)}")
                digest = hashlib.sha256()
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has content
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                seen[member.name] = digest.hexdigest()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        problem = _os_problem(exc) if isinstance(exc, OSError) else type(exc).__name__
        raise ArchiveError(case_id, f"the archive cannot be read back ({problem})") from None
    wrong = sorted(n for n in expected if seen.get(n) != expected[n]) + \
        sorted(n for n in seen if n not in expected)
    if wrong:
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        raise ArchiveError(case_id, f"checksum mismatch: {_where(wrong[0])}{more} in the "
                                    f"archive read back {'differ' if more else 'differs'} "
                                    f"from the files as they were before packing")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pack(case_id: str, sets: list[FileSet], archive_dir: Path, when: datetime) -> Packed:
    """Write, read back, verify and rename into place the case's archive.

    Raises:
        ArchiveError: Disk full, an unreadable file, a mismatch: nothing is left of
            the archive.
    """
    final = archive_dir / archive_name(case_id, when)
    part = part_path(final)
    try:
        _write(part, sets, case_id)
        verify(part, sets, case_id)
        digest = sha256_file(part)
        size = part.stat().st_size
        if final.exists():
            raise ArchiveError(case_id, f"{final.name} exists already in the archive folder")
        os.replace(part, final)
        _fsync_dir(archive_dir)
    except OSError as exc:
        raise ArchiveError(case_id, f"finishing the archive: {_os_problem(exc)}") from None
    finally:
        with suppress(FileNotFoundError):
            part.unlink()
    return Packed(final, digest, size)


def append_index(archive_dir: Path, record: dict[str, object]) -> None:
    """Append one JSON line to the archive folder's index, flushed to disk.

    Raises:
        OSError: It could not be written (the caller takes the archive back).
    """
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(archive_dir / INDEX, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def check_unchanged(sets: list[FileSet], case_id: str) -> None:
    """Every file is still as the manifest saw it (size and mtime), so the archive holds
    what deleting it would lose.

    Raises:
        ArchiveError: A file changed or vanished since the manifest was made.
    """
    for files in sets:
        for rel, entry in files.entries.items():
            try:
                st = os.lstat(files.root / rel)
            except OSError as exc:
                raise ArchiveError(case_id, f"{files.root.name}/{_where(rel)} changed after "
                                            f"it was packed ({_os_problem(exc)})") from None
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise ArchiveError(case_id, f"{files.root.name}/{_where(rel)} changed after "
                                            f"it was packed")


def delete_originals(sets: list[FileSet], case_id: str) -> list[str]:
    """Delete what was archived (after ``check_unchanged``): each file of the manifest
    that is still exactly as it was packed (looked at again right before its unlink:
    time passed since the check), then the folders left empty, bottom up — empty
    sub-folders too. A file that changed or was not in the manifest stays, with its
    folders.

    Returns:
        The folders removed whole.

    Raises:
        ArchiveError: A deletion failed, or a file changed after packing and was kept
            (what was deleted is in the archive).
    """
    removed, kept = [], []
    for files in sets:
        try:
            for rel, entry in files.entries.items():
                path = files.root / rel
                st = os.lstat(path)
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    kept.append(f"{files.root.name}/{_where(rel)}")
                    continue
                path.unlink()
            for dirpath, _, _ in sorted(os.walk(files.root), key=lambda w: -len(w[0])):
                with suppress(OSError):  # not empty: something arrived meanwhile; it stays
                    os.rmdir(dirpath)
        except OSError as exc:
            raise ArchiveError(case_id, f"deleting {files.root} after archiving: "
                                        f"{_os_problem(exc)} (the archive holds every "
                                        f"file)", nothing_deleted=False) from None
        if not files.root.exists():
            removed.append(str(files.root))
    if kept:
        raise ArchiveError(case_id, f"{len(kept)} file(s) changed after packing and were "
                                    f"kept ({', '.join(kept[:3])}); the rest is deleted and "
                                    f"in the archive", nothing_deleted=False)
    return removed


@contextmanager
def exclusive(archive_dir: Path) -> Iterator[None]:
    """Hold the archive folder for one archiver at a time, and clear what a crashed one
    left half written.

    Raises:
        ArchiverBusy: Another archiver (a scheduled run, `mqi archive`) holds it.
    """
    import fcntl

    archive_dir.mkdir(parents=True, exist_ok=True)
    with open(archive_dir / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiverBusy(f"another archiver is working in {archive_dir}; this one "
                               f"did nothing") from None
        for left in archive_dir.glob(f".*{PART_SUFFIX}"):
            left.unlink()
        yield
