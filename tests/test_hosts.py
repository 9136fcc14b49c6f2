"""Behaviour both hosts share: RemoteHost against a real sshd, LocalHost on this machine."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from blocks import CommandError, CommandTimeoutError, TransferError
from blocks.manifest import PART_SUFFIX

pytestmark = pytest.mark.integration


def pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def wait_gone(pattern: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = pgrep(pattern)
        if not left:
            return []
        time.sleep(0.05)
    return pgrep(pattern)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ commands
def test_exit_codes_and_result(host):
    ok = host.run("echo out; echo err >&2", stream=False)
    assert (ok.exit_code, ok.ok, ok.stdout, ok.stderr) == (0, True, "out\n", "err\n")
    failed = host.run("echo before; exit 7", check=False, stream=False)
    assert failed.exit_code == 7 and not failed.ok
    with pytest.raises(CommandError) as info:
        host.run("echo last words >&2; exit 3", stream=False)
    assert info.value.result.exit_code == 3
    assert "exit code 3" in str(info.value) and "last words" in str(info.value)


def test_lines_stream_in_order_while_the_command_runs(host):
    seen: list[tuple[float, str, str]] = []
    started = time.monotonic()
    result = host.run(
        "for i in 1 2 3 4; do echo line$i; echo warn$i >&2; sleep 0.3; done",
        on_line=lambda stream, line: seen.append((time.monotonic() - started, stream, line)))
    out = [line for _, s, line in seen if s == "stdout"]
    err = [line for _, s, line in seen if s == "stderr"]
    assert out == [f"line{i}" for i in range(1, 5)]
    assert err == [f"warn{i}" for i in range(1, 5)]
    # The first line arrived long before the command ended: it was streamed, not batched.
    first = next(t for t, _, line in seen if line == "line1")
    assert first < result.duration - 0.6


def test_large_output_on_both_streams_does_not_deadlock(host):
    counted = {"stdout": 0, "stderr": 0}

    def count(stream: str, line: str) -> None:
        counted[stream] += 1

    # 50 MB on stdout and 10 MB on stderr at the same time, in 100-byte lines.
    cmd = ("yes $(printf 'e%.0s' $(seq 99)) | head -c 10000000 >&2 & "
           "yes $(printf 'o%.0s' $(seq 99)) | head -c 50000000; wait")
    result = host.run(cmd, on_line=count, timeout=120)
    assert len(result.stdout) == 50_000_000 and len(result.stderr) == 10_000_000
    assert result.stdout.count("o" * 99 + "\n") == 500_000
    assert counted == {"stdout": 500_000, "stderr": 100_000}


def test_timeout_kills_the_whole_process_group(host):
    tag = f"{time.time() % 1000:.6f}"  # a sleep argument no other process uses
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as info:
        host.run(f"echo started; sleep 3{tag} & sh -c 'sleep 4{tag}'; echo never", timeout=1.0,
                 stream=False)
    assert time.monotonic() - started < 10
    assert info.value.result.timed_out and info.value.result.exit_code is None
    assert "started" in info.value.result.stdout and "never" not in info.value.result.stdout
    assert wait_gone(f"sleep [34]{tag}") == []


def test_an_exception_while_streaming_kills_the_command(host):
    tag = f"{time.time() % 1000:.6f}"

    def explode(stream: str, line: str) -> None:
        raise KeyboardInterrupt  # stands for a cancellation arriving mid-run

    with pytest.raises(KeyboardInterrupt):
        host.run(f"echo go; sleep 5{tag}", on_line=explode)
    assert wait_gone(f"sleep 5{tag}") == []


def test_kill_by_pid_file_from_another_block(host, tmp_path):
    tag = f"{time.time() % 1000:.6f}"
    pid_file = str(tmp_path / "run.pid")
    errors: list[BaseException] = []

    def target() -> None:
        try:
            host.run(f"sleep 6{tag}", pid_file=pid_file, stream=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 10

    def started() -> bool:
        # The SSH session's shell names the command before the wrapper writes the pid file.
        return bool(pgrep(f"sleep 6{tag}")) and os.path.exists(pid_file) \
            and os.path.getsize(pid_file) > 0

    while not started() and time.monotonic() < deadline:
        time.sleep(0.05)
    other = host.model_copy()  # a fresh instance, as an on_cancellation hook would build
    assert other.kill_pid_file(pid_file) is True
    thread.join(15)
    assert wait_gone(f"sleep 6{tag}") == []
    assert errors and isinstance(errors[0], CommandError)
    assert other.kill_pid_file(str(tmp_path / "missing.pid")) is False


def test_env_and_cwd_are_passed_literally(host, tmp_path):
    odd = tmp_path / "dir with 'quotes' and $(dollar)"
    odd.mkdir()
    value = "a b; echo injected $(id) `id` 'q' \"d\""
    result = host.run('printf "%s|" "$MQI_VALUE"; pwd', env={"MQI_VALUE": value},
                      cwd=str(odd), stream=False)
    assert result.stdout == f"{value}|{odd}\n"
    with pytest.raises(ValueError):
        host.run("true", env={"BAD NAME": "x"})



def test_stdin_reaches_the_command_and_is_closed(host):
    data = "line one\n'quoted' $(id) `id`\n\x00binary\xff".encode("latin-1")
    result = host.run("od -An -tx1 -v | tr -d ' \\n'", stdin=data, stream=False)
    assert result.stdout == data.hex()
    # No input: the command reads an empty stdin and ends (nothing waits for EOF).
    assert host.run("wc -c", timeout=20, stream=False).stdout.strip() == "0"
    with pytest.raises(ValueError, match="at most"):
        host.run("cat", stdin=b"x" * (64 * 1024 + 1))


def test_a_locked_command_writes_its_input_only_once_the_gpu_lock_is_held(host, tmp_path):
    from blocks.gpu_pool import LOCK_BUSY_EXIT, GpuPool

    pool = GpuPool(query_command="true", apps_command="true", lock_dir=str(tmp_path / "locks"))
    target = tmp_path / "run dir" / "moqui" / "beam_1.in"
    text = b"GPUID 0\nParentDir /x y/$(id)\n"
    command = pool.locked_command(0, f"cat {shlex.quote(str(target))} && echo ran",
                                  input_file=str(target))
    result = host.run(command, stdin=text, stream=False, timeout=20)
    assert result.exit_code == 0
    assert result.stdout == text.decode() + "ran\n"  # written before the command ran
    assert target.read_bytes() == text
    assert [p.name for p in target.parent.iterdir()] == ["beam_1.in"]  # no part left

    # The index is taken: nothing runs and nothing is written.
    target.unlink()
    holder = subprocess.Popen(["flock", str(tmp_path / "locks" / "gpu-0.lock"), "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(
                ["flock", "-n", str(tmp_path / "locks" / "gpu-0.lock"), "true"]).returncode == 0:
            time.sleep(0.05)
        busy = host.run(command, stdin=text, check=False, stream=False, timeout=20)
    finally:
        holder.kill()
        holder.wait()
    assert busy.exit_code == LOCK_BUSY_EXIT
    assert not target.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(ValueError, match="absolute"):
        pool.locked_command(0, "true", input_file="beam_1.in")


# ----------------------------------------------------------------- transfers
def test_upload_download_round_trip_with_checksums(host, tree, tmp_path):
    remote_dir = str(tmp_path / "remote" / "case 1")
    up = host.upload(tree, remote_dir)
    expected = files_of(tree)
    assert sorted(up.files) == sorted(expected) and up.skipped == []
    assert up.checksums == expected
    assert up.bytes == sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    assert files_of(Path(remote_dir)) == expected          # same bytes on the far side
    assert not list(Path(remote_dir).rglob(f"*{PART_SUFFIX}"))  # no temporary left
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()

    back = tmp_path / "back"
    down = host.download(remote_dir, back)
    assert files_of(back) == expected and down.checksums == expected
    assert sorted(down.files) == sorted(expected)


def test_second_upload_skips_identical_files_and_resends_changed_ones(host, tree, tmp_path):
    remote_dir = str(tmp_path / "remote")
    host.upload(tree, remote_dir)
    again = host.upload(tree, remote_dir)
    assert again.files == [] and again.bytes == 0
    assert sorted(again.skipped) == sorted(files_of(tree))

    plan = tree / "RP.1.2.3.dcm"
    plan.write_bytes(os.urandom(5000))  # same size, new content: only the digest can tell
    third = host.upload(tree, remote_dir)
    assert third.files == ["RP.1.2.3.dcm"]
    assert sha(Path(remote_dir) / "RP.1.2.3.dcm") == sha(plan)

    back = tmp_path / "back"
    host.download(remote_dir, back)
    assert host.download(remote_dir, back).files == []


def _when_part_appears(directory: Path, action, timeout: float = 20.0) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(directory.rglob(f"*{PART_SUFFIX}")) if directory.exists() else False:
                action()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_local_file_changed_mid_upload_is_detected(host, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "beam.ptn"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    remote_dir = tmp_path / "remote"

    def append() -> None:
        with open(big, "ab") as fh:
            fh.write(b"late bytes")

    watcher = _when_part_appears(remote_dir, append)
    with pytest.raises(TransferError, match="changed while it was being"):
        host.upload(src, str(remote_dir))
    watcher.join()
    assert not (remote_dir / "beam.ptn").exists()
    assert not list(remote_dir.rglob(f"*{PART_SUFFIX}"))


def test_remote_file_changed_mid_download_is_detected(host, tmp_path):
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    big = remote_dir / "dose.raw"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    local = tmp_path / "local"

    def rewrite() -> None:
        with open(big, "r+b") as fh:
            fh.seek(90 * 1024 * 1024)
            fh.write(os.urandom(1024 * 1024))

    watcher = _when_part_appears(local, rewrite)
    with pytest.raises(TransferError, match="changed while it was being"):
        host.download(str(remote_dir), local)
    watcher.join()
    assert not (local / "dose.raw").exists()
    assert not list(local.rglob(f"*{PART_SUFFIX}"))


def test_missing_remote_directory_and_symlinks_are_refused(host, tmp_path):
    with pytest.raises(TransferError, match="not found"):
        host.download(str(tmp_path / f"nothing-{uuid.uuid4().hex}"), tmp_path / "x")
    src = tmp_path / "src"
    src.mkdir()
    (src / "escape").symlink_to("/etc/passwd")
    with pytest.raises(TransferError, match="symbolic link"):
        host.upload(src, str(tmp_path / "dst"))
