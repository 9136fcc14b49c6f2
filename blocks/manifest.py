"""File manifests: relative path → size and SHA-256, for skip and verify decisions.

A transfer compares the two ends by size first and by SHA-256 second, so that
an unchanged file is never sent twice and a copied file is never trusted
before both ends agree on its digest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from blocks.errors import TransferError

CHUNK = 1024 * 1024
PART_SUFFIX = ".mqi-part"
"""Suffix of the temporary name a file has until it is verified and renamed into place."""


@dataclass(frozen=True)
class FileEntry:
    """One regular file of a tree."""

    relpath: str
    size: int
    sha256: str | None = None
    mtime_ns: int = 0

    def unchanged_since(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` still has the size and modification time recorded here."""
        st = os.stat(path)
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def part_name(relpath: str) -> str:
    """The temporary name of ``relpath`` while it is being written."""
    head, _, tail = relpath.rpartition("/")
    return f"{head}/.{tail}{PART_SUFFIX}" if head else f".{tail}{PART_SUFFIX}"


def walk_local(root: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, FileEntry]:
    """List the regular files under ``root`` by relative POSIX path.

    Symbolic links are refused rather than followed: a link could point outside
    the tree and send (or overwrite) a file nobody meant to move. Leftover
    temporary ``*.mqi-part`` files from an interrupted transfer are ignored.

    Raises:
        TransferError: ``root`` is not a directory, or the tree holds a link
            or something that is not a regular file.
    """
    root = Path(root)
    if not root.is_dir():
        raise TransferError(f"not a directory: {root}")
    entries: dict[str, FileEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            link = os.path.join(dirpath, name)
            if os.path.islink(link):
                raise TransferError(f"refusing to transfer symbolic link {link}")
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise TransferError(f"refusing to transfer symbolic link {full}")
            if name.endswith(PART_SUFFIX):
                continue
            st = os.stat(full)
            rel = Path(full).relative_to(root).as_posix()
            entries[rel] = FileEntry(rel, st.st_size, sha256_file(full) if hashes else None,
                                     st.st_mtime_ns)
    return entries


def parse_sha256sum(output: bytes, separator: bytes = b"\0") -> dict[str, str]:
    """Parse ``sha256sum -z`` output (``<hex>  <name>\\0`` records) into name → digest.

    ``openssl dgst -sha256 -r`` prints the same records ending in newlines instead.
    """
    digests: dict[str, str] = {}
    for record in output.split(separator):
        if not record:
            continue
        digest, name = record[:64], record[66:]
        if len(digest) != 64 or record[64:66] not in (b"  ", b" *"):
            raise TransferError(f"unexpected sha256sum output: {record[:120]!r}")
        digests[name.decode("utf-8", "surrogateescape")] = digest.decode("ascii")
    return digests
