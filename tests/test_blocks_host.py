"""The one Host interface, and the verify-and-rename loop both hosts share.

That RemoteHost and LocalHost satisfy ``Host`` statically is checked by mypy
(``blocks.factory.host_from_settings`` returns either as a ``Host``); here the
runtime-checkable protocol is asked too, and ``place_files`` is driven with
fetchers that fail the ways a transfer can.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from blocks import Host, LocalHost, RemoteHost, TransferError
from blocks.factory import Host as FactoryHost
from blocks.host import RunSpec
from blocks.manifest import PART_SUFFIX, FileEntry
from blocks.placing import place_files
from blocks.results import TransferResult


def test_both_hosts_satisfy_the_host_protocol():
    remote = RemoteHost(hostname="gpu.example", username="mqi")
    local = LocalHost()
    assert isinstance(remote, Host) and isinstance(local, Host)
    assert not isinstance(object(), Host)
    assert FactoryHost is Host  # flows import it from blocks.factory


def test_run_options_default_like_the_documented_signature():
    spec = RunSpec("true")
    assert (spec.timeout, spec.env, spec.cwd, spec.check, spec.on_line, spec.stream,
            spec.pid_file) == (None, None, None, True, None, True, None)
    assert RunSpec("true", stream=False, on_line=print).line_callback("h") is None
    assert RunSpec("true", on_line=print).line_callback("h") is print


def test_an_unknown_run_option_is_refused():
    with pytest.raises(TypeError):
        LocalHost().run("true", timout=5)  # type: ignore[call-arg]


def _entry(rel: str, data: bytes) -> FileEntry:
    return FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())


def _place(tmp_path: Path, data: bytes, fetch) -> TransferResult:
    result = TransferResult(source="src", destination=str(tmp_path / "dst"))
    place_files({"sub/a.bin": _entry("sub/a.bin", data)}, str(tmp_path / "dst"), fetch, result,
                origin=lambda rel: f"src/{rel}", verb="copied")
    return result


def test_a_digest_mismatch_places_nothing_and_leaves_no_part(tmp_path):
    def changed_meanwhile(rel: str, part: str) -> tuple[str, int]:
        Path(part).write_bytes(b"other bytes")
        return hashlib.sha256(b"other bytes").hexdigest(), 11

    with pytest.raises(TransferError, match="src/sub/a.bin changed while it was being copied"):
        _place(tmp_path, b"expected bytes", changed_meanwhile)
    assert not (tmp_path / "dst" / "sub" / "a.bin").exists()
    assert not list((tmp_path / "dst").rglob(f"*{PART_SUFFIX}"))


def test_a_failed_fetch_leaves_no_part(tmp_path):
    def disk_full(rel: str, part: str) -> tuple[str, int]:
        Path(part).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        _place(tmp_path, b"expected bytes", disk_full)
    assert not list((tmp_path / "dst").rglob("*.*"))


def test_identical_files_are_skipped_and_others_placed(tmp_path):
    calls: list[str] = []

    def fetch(rel: str, part: str) -> tuple[str, int]:
        calls.append(rel)
        Path(part).write_bytes(b"payload")
        return hashlib.sha256(b"payload").hexdigest(), 7

    first = _place(tmp_path, b"payload", fetch)
    assert first.files == ["sub/a.bin"] and first.bytes == 7 and first.skipped == []
    assert (tmp_path / "dst" / "sub" / "a.bin").read_bytes() == b"payload"
    again = _place(tmp_path, b"payload", fetch)
    assert again.files == [] and again.skipped == ["sub/a.bin"] and calls == ["sub/a.bin"]
    assert again.checksums == {"sub/a.bin": hashlib.sha256(b"payload").hexdigest()}
