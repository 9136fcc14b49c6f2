"""Placing fetched files into a local tree: skip identical, verify, rename into place.

LocalHost's copy and RemoteHost's download differ only in how one file's
bytes arrive; what happens around that is the same and lives here, once:
a file already present with the same size and SHA-256 is skipped, any other
is written under a temporary part name beside its target, its digest compared
with the expected one, and only then renamed into place (docs/architecture.md#verified-transfers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from blocks.errors import TransferError
from blocks.manifest import FileEntry, part_name, sha256_file, walk_local
from blocks.results import TransferResult

Fetch = Callable[[str, str], tuple[str, int]]
"""``fetch(relpath, part_path)`` writes one file's bytes to the local ``part_path`` and
returns the SHA-256 and size of what it wrote."""


def place_files(expected: Mapping[str, FileEntry], destination: str, fetch: Fetch,
                result: TransferResult, *, origin: Callable[[str], str], verb: str) -> None:
    """Bring ``destination`` to hold every file of ``expected``, verified and atomic per file.

    Args:
        expected: What the destination must hold, by relative POSIX path, each with
            its size and SHA-256 at the source.
        destination: The local directory (created when missing).
        fetch: Writes one file's bytes to a part path (see ``Fetch``).
        result: Receives copied and skipped paths, copied bytes, and the checksum of
            every file now at the destination.
        origin: Names where a relative path was read from, for error messages.
        verb: What ``fetch`` does ("copied", "downloaded"), for error messages.

    Raises:
        TransferError: A file's digest differs from the expected one (it changed at
            the source while being read): it was not put in place.
        OSError: A local read or write failed; the caller names the transfer.
    """
    os.makedirs(destination, exist_ok=True)
    present = walk_local(destination, hashes=False)
    for rel, want in sorted(expected.items()):
        wanted = want.sha256 or ""  # always set: the source's manifest is hashed
        result.checksums[rel] = wanted
        target = os.path.join(destination, *rel.split("/"))
        have = present.get(rel)
        if have and have.size == want.size and sha256_file(target) == wanted:
            result.skipped.append(rel)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        part = os.path.join(os.path.dirname(target), part_name(rel).rpartition("/")[2])
        try:
            digest, size = fetch(rel, part)
            if digest != wanted:
                raise TransferError(
                    f"{origin(rel)} changed while it was being {verb} (digest "
                    f"{wanted[:12]}… before, {digest[:12]}… received); "
                    f"nothing was put in place")
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
        result.files.append(rel)
        result.bytes += size
