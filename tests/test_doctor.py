"""`mqi doctor` against the real test sshd: a good installation, then broken ones.

Each broken config breaks one thing; the test asserts the ✗ line that names it
and that what depends on it is skipped rather than waited for.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.cli import main
from tests.support.pipeline import Installation, write_installation
from tests.support.sshd import SshServer, free_port, keygen


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, sshd: SshServer) -> Installation:
    """A test installation: the real sshd as GPU host, the simulators as tools."""
    return write_installation(tmp_path_factory.mktemp("doctor"), sshd)


def variant(inst: Installation, tmp_path: Path, change: Any) -> Path:
    """A copy of the installation's config with ``change(data)`` applied."""
    data = yaml.safe_load(inst.config.read_text())
    change(data)
    path = tmp_path / "mqi.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def doctor(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `mqi doctor --config` in this process: (exit status, stdout lines)."""
    capsys.readouterr()
    rc = main(["doctor", "--config", str(config)])
    out = capsys.readouterr().out
    return rc, out.splitlines()


def line(lines: list[str], start: str) -> str:
    found = [ln for ln in lines if ln.startswith(start)]
    assert len(found) == 1, f"no single line starting {start!r} in:\n" + "\n".join(lines)
    return found[0]


def host_address(inst: Installation, sshd: SshServer) -> str:
    return f"{sshd.username}@127.0.0.1:{sshd.port}"


@pytest.fixture
def embedded_server(inst: Installation) -> Iterator[str]:
    """The installation's embedded Prefect server, started as `mqi up` starts it."""
    from config import load_config
    from deployments import server

    cfg = load_config(inst.config)
    proc = server.start_server(cfg, inst.root / "server.log")
    try:
        yield cfg.prefect.effective_api_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_good_installation_passes_every_check(inst, sshd, embedded_server, capsys):
    rc, lines = doctor(inst.config, capsys)
    assert rc == 0, "\n".join(lines)
    assert all(ln.startswith("✓ ") for ln in lines), "\n".join(lines)
    address = host_address(inst, sshd)
    assert line(lines, "✓ host key of 127.0.0.1") == (
        f"✓ host key of 127.0.0.1:{sshd.port}: {sshd.host_fingerprint()}, in {sshd.known_hosts}")
    assert line(lines, f"✓ SSH login to {address}")
    assert re.fullmatch(rf"✓ command round trip on {re.escape(address)}: \d+ ms per command"
                        rf"( — slow: .*)?", line(lines, "✓ command round trip on"))
    for tool in ("python", "interpreter", "moqui", "raw2dicom"):
        assert line(lines, f"✓ tool {tool} on {address}")
    assert "-m demo.simulators.tps_env" in line(lines, "✓ tool moqui")
    assert line(lines, f"✓ remote work root {inst.remote_root} on {address}: writable")
    assert line(lines, f"✓ GPUs on {address}").endswith("2 of 2 usable now (0, 1)")
    assert line(lines, "✓ scanner.target_directory") == (
        f"✓ scanner.target_directory {inst.scan_root}: writable")
    assert line(lines, "✓ paths.results_root") == (
        f"✓ paths.results_root {inst.results}: writable (not there yet; made in {inst.root} "
        f"when needed)")
    assert line(lines, f"✓ Prefect API answers at {embedded_server}")
    # nothing was left behind by the write checks
    assert not list(inst.scan_root.glob(".mqi-doctor*"))


def test_without_a_running_server_the_api_line_says_so_and_passes(inst, capsys):
    rc, lines = doctor(inst.config, capsys)
    assert rc == 0, "\n".join(lines)
    assert lines[-1] == (f"- Prefect API at {inst.api_url}: the embedded server is not "
                         f"running — `mqi up` starts it")


def test_a_configured_api_that_does_not_answer_fails(inst, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/api"
    config = variant(inst, tmp_path, lambda d: d["prefect"].update(api_url=url))
    rc, lines = doctor(config, capsys)
    assert rc == 1
    assert line(lines, "✗ Prefect API").startswith(
        f"✗ Prefect API at {url}: does not answer /health — ")


def test_a_missing_key_file_fails_and_skips_what_needs_the_login(inst, sshd, tmp_path,
                                                                 capsys):
    missing = tmp_path / "no-such-key"
    config = variant(inst, tmp_path,
                     lambda d: d["hosts"]["gpu"].update(private_key_path=str(missing)))
    started = time.monotonic()
    rc, lines = doctor(config, capsys)
    assert time.monotonic() - started < 10
    assert rc == 1
    assert line(lines, "✗ private key file").startswith(
        f"✗ private key file {missing} of hosts.gpu: does not exist — create the key")
    assert line(lines, "✓ host key of 127.0.0.1")  # needs no key: still checked
    assert line(lines, "- SSH login to").endswith(": skipped (needs a usable key)")
    for skipped in ("tool moqui", f"remote work root {inst.remote_root}",
                    "GPUs on the GPU host"):
        assert line(lines, f"- {skipped}") == f"- {skipped}: skipped (needs SSH login)"
    assert line(lines, "✓ scanner.target_directory")  # local checks still run


def test_a_key_the_host_refuses_fails_the_login(inst, sshd, tmp_path, capsys):
    stranger = keygen(tmp_path / "stranger_ed25519")
    config = variant(inst, tmp_path,
                     lambda d: d["hosts"]["gpu"].update(private_key_path=str(stranger)))
    rc, lines = doctor(config, capsys)
    assert rc == 1
    address = host_address(inst, sshd)
    assert line(lines, "✗ SSH login to").startswith(
        f"✗ SSH login to {address}: authentication failed for {address}")
    assert line(lines, "- tool python") == "- tool python: skipped (needs SSH login)"


def test_an_unset_secret_is_named_and_no_secret_is_printed(inst, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("MQI_TEST_DOCTOR_PASSWORD", "doctor-hunter2")
    monkeypatch.delenv("MQI_TEST_DOCTOR_PASSPHRASE", raising=False)
    config = variant(inst, tmp_path, lambda d: d["hosts"]["gpu"].update(
        password_env="MQI_TEST_DOCTOR_PASSWORD", passphrase_env="MQI_TEST_DOCTOR_PASSPHRASE"))
    rc, lines = doctor(config, capsys)
    assert rc == 1
    assert line(lines, "✓ environment variable MQI_TEST_DOCTOR_PASSWORD") == (
        "✓ environment variable MQI_TEST_DOCTOR_PASSWORD (hosts.gpu.password_env)")
    assert line(lines, "✗ environment variable MQI_TEST_DOCTOR_PASSPHRASE").startswith(
        "✗ environment variable MQI_TEST_DOCTOR_PASSPHRASE (hosts.gpu.passphrase_env): "
        "not set — export MQI_TEST_DOCTOR_PASSPHRASE")
    assert line(lines, "- SSH login to").endswith(
        ": skipped (needs MQI_TEST_DOCTOR_PASSPHRASE set)")
    assert "hunter2" not in "\n".join(lines)


def test_an_unknown_host_key_prints_the_line_to_add_and_adds_nothing(inst, sshd, tmp_path,
                                                                     capsys):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = variant(inst, tmp_path,
                     lambda d: d["hosts"]["gpu"].update(known_hosts_path=str(known_hosts)))
    rc, lines = doctor(config, capsys)
    assert rc == 1
    kind, key = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
    entry = f"[127.0.0.1]:{sshd.port}"
    got = line(lines, "✗ host key of")
    assert f"{entry} is not in {known_hosts}; the server offers {kind} " \
           f"{sshd.host_fingerprint()}" in got
    assert got.endswith(f"then add this line to {known_hosts}: {entry} {kind} {key}")
    assert known_hosts.read_text() == ""  # printed, never added
    assert line(lines, "- SSH login to").endswith(
        ": skipped (needs a reachable host with a known key)")
    assert line(lines, "- tool python") == "- tool python: skipped (needs SSH login)"


def test_a_changed_host_key_is_called_changed(inst, sshd, tmp_path, capsys):
    other = keygen(tmp_path / "other_host_key")
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    config = variant(inst, tmp_path,
                     lambda d: d["hosts"]["gpu"].update(known_hosts_path=str(known_hosts)))
    rc, lines = doctor(config, capsys)
    assert rc == 1
    got = line(lines, "✗ host key of")
    assert "the host key has CHANGED" in got and sshd.host_fingerprint() in got


def test_broken_tools_are_each_named(inst, sshd, tmp_path, capsys):
    not_executable = tmp_path / "tps_env"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)

    def break_tools(data: dict[str, Any]) -> None:
        data["tools"].update(
            moqui=str(tmp_path / "no" / "tps_env"),
            not_exec=str(not_executable),
            not_on_path="mqi-no-such-tool",
            no_module=[sys.executable, "-m", "mqi_no_such_module"])

    rc, lines = doctor(variant(inst, tmp_path, break_tools), capsys)
    assert rc == 1
    address = host_address(inst, sshd)
    assert line(lines, "✗ tool moqui").startswith(
        f"✗ tool moqui on {address}: {tmp_path}/no/tps_env does not exist — ")
    assert line(lines, "✗ tool not_exec").startswith(
        f"✗ tool not_exec on {address}: {not_executable} is not executable — ")
    assert line(lines, "✗ tool not_on_path").startswith(
        f"✗ tool not_on_path on {address}: mqi-no-such-tool is not found on the PATH")
    assert line(lines, "✗ tool no_module").startswith(
        f"✗ tool no_module on {address}: {sys.executable} cannot import mqi_no_such_module")
    assert line(lines, "✓ tool interpreter")  # the others still pass
    assert line(lines, "✓ GPUs on")
    assert sum(ln.startswith("✗ ") for ln in lines) == 4
    assert lines[-1] == "4 check(s) failed"


def test_missing_or_unusable_local_folders_are_named(inst, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    def break_folders(data: dict[str, Any]) -> None:
        data["scanner"]["target_directory"] = str(tmp_path / "no-scan-root")
        data["paths"]["results_root"] = str(a_file / "results")

    rc, lines = doctor(variant(inst, tmp_path, break_folders), capsys)
    assert rc == 1
    assert line(lines, "✗ scanner.target_directory") == (
        f"✗ scanner.target_directory {tmp_path}/no-scan-root: does not exist — "
        f"create it (mkdir -p {tmp_path}/no-scan-root) or fix scanner.target_directory")
    assert line(lines, "✗ paths.results_root").startswith(
        f"✗ paths.results_root {a_file}/results: {a_file} is not a folder — ")


def test_a_wrong_port_fails_fast_and_skips_the_remote_checks(inst, tmp_path):
    """Run as an operator runs it: the console script, exit status 1, and plain ASCII
    when the terminal cannot print ✓/✗."""
    port = free_port()  # nothing listens there
    config = variant(inst, tmp_path, lambda d: d["hosts"]["gpu"].update(port=port))
    env = {**os.environ, "PYTHONIOENCODING": "ascii",
           "PREFECT_API_URL": inst.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "mqi"), "doctor",
                             "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert line(lines, "FAIL host key of").startswith(
        f"FAIL host key of 127.0.0.1:{port}: cannot reach the SSH server at 127.0.0.1:{port} "
        f"(ConnectionRefusedError")
    assert " -- check hosts.gpu.hostname and hosts.gpu.port" in line(lines, "FAIL host key of")
    assert line(lines, "- SSH login to").endswith(
        "skipped (needs a reachable host with a known key)")
    skipped = [ln for ln in lines if ln.endswith("skipped (needs SSH login)")]
    assert len(skipped) == 4 + 2  # the tools, the remote work root, the GPUs
    assert line(lines, "OK scanner.target_directory")
    assert "Traceback" not in result.stderr


def test_a_tool_run_by_another_is_checked_with_it():
    """`{python} {interpreter}`: the interpreter script is run by the python tool, so a
    missing python is blamed on tools.python."""
    from config import DEFAULT_PATH, load_config
    from deployments.doctor import tool_argv

    cfg = load_config(DEFAULT_PATH)
    assert tool_argv(cfg, "interpreter") == (["python3", "/opt/mqi/interpreter/main_cli.py"],
                                             "python")
    assert tool_argv(cfg, "moqui") == (["/opt/moqui/bin/tps_env"], None)


def test_each_of_several_gpu_hosts_is_checked(inst, sshd, tmp_path, capsys):
    port = free_port()  # gpu_b: nothing listens there

    def two_hosts(d: dict[str, Any]) -> None:
        d["hosts"]["gpu_b"] = dict(d["hosts"]["gpu"], port=port)
        d["gpu"]["hosts"] = ["gpu", "gpu_b"]

    rc, lines = doctor(variant(inst, tmp_path, two_hosts), capsys)
    assert rc == 1, "\n".join(lines)
    address = host_address(inst, sshd)
    assert line(lines, f"✓ host key of 127.0.0.1:{sshd.port}")
    assert line(lines, f"✓ SSH login to {address}")
    assert line(lines, f"✓ GPUs on {address}")
    assert line(lines, f"✗ host key of 127.0.0.1:{port}")
    assert line(lines, "- SSH login to").endswith(
        "skipped (needs a reachable host with a known key)")
    assert len([ln for ln in lines if ln.endswith("skipped (needs SSH login)")]) == 4 + 2
