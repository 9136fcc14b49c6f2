"""What only RemoteHost does: host keys, authentication, retries, secrets, connection reuse."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest
from pydantic import SecretStr

from blocks import HostAuthenticationError, HostConnectError, HostKeyError, RemoteHost, ssh
from tests.support.sshd import free_port, keygen

pytestmark = pytest.mark.integration


def test_unknown_host_key_is_refused_naming_host_and_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = sshd.remote_host(known_hosts_path=str(empty))
    with pytest.raises(HostKeyError) as info:
        host.run("true")
    message = str(info.value)
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert sshd.host_fingerprint() in message
    assert info.value.fingerprint == sshd.host_fingerprint()
    assert empty.read_text() == ""  # nothing was added behind our back


def test_changed_host_key_is_refused(sshd, tmp_path):
    impostor = keygen(tmp_path / "other_host_key")
    kind, blob = impostor.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    expected = subprocess.run(["ssh-keygen", "-lf", str(impostor.with_suffix(".pub"))],
                              capture_output=True, text=True, check=True).stdout.split()[1]
    host = sshd.remote_host(known_hosts_path=str(known))
    with pytest.raises(HostKeyError) as info:
        host.run("true")
    assert "CHANGED" in str(info.value)
    assert info.value.fingerprint == sshd.host_fingerprint()
    assert info.value.expected_fingerprint == expected
    assert expected in str(info.value) and sshd.host_fingerprint() in str(info.value)


def test_auto_add_is_an_explicit_logged_opt_in(sshd, tmp_path, caplog):
    known = tmp_path / "known_hosts"
    host = sshd.remote_host(known_hosts_path=str(known), auto_add_host_keys=True)
    with caplog.at_level(logging.WARNING, logger="mqi.remote_host"):
        assert host.run("echo hi", stream=False).stdout == "hi\n"
    host.close()
    assert any("auto_add_host_keys" in r.message and sshd.host_fingerprint() in r.message
               for r in caplog.records)
    assert f"[127.0.0.1]:{sshd.port}" in known.read_text()
    # The recorded key is now trusted without the opt-in.
    strict = sshd.remote_host(known_hosts_path=str(known))
    assert strict.run("echo again", stream=False).stdout == "again\n"
    strict.close()


def test_authentication_failure_is_clear_and_not_retried(sshd, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    host = sshd.remote_host(private_key_path=str(stranger), connect_retries=3, retry_backoff=2.0)
    started = time.monotonic()
    with pytest.raises(HostAuthenticationError) as info:
        host.run("true")
    # Three retries with a 2 s backoff would take 14 s: it failed at once instead.
    assert time.monotonic() - started < 5
    assert f"{sshd.username}@127.0.0.1:{sshd.port}" in str(info.value)


def test_encrypted_key_needs_its_passphrase_which_never_shows(sshd, tmp_path):
    locked = keygen(tmp_path / "locked", passphrase="s3cret-phrase")
    with open(sshd.root / "authorized_keys", "a") as fh:
        fh.write(locked.with_suffix(".pub").read_text())
    good = sshd.remote_host(private_key_path=str(locked),
                            passphrase=SecretStr("s3cret-phrase"))
    assert good.run("echo in", stream=False).stdout == "in\n"
    good.close()
    bad = sshd.remote_host(private_key_path=str(locked), passphrase=SecretStr("wrong-phrase"))
    with pytest.raises(HostAuthenticationError) as info:
        bad.run("true")
    assert "wrong-phrase" not in str(info.value)
    missing = sshd.remote_host(private_key_path=str(locked))
    with pytest.raises(HostAuthenticationError, match="encrypted"):
        missing.run("true")


def test_private_key_text_from_a_secret_works(sshd):
    host = sshd.remote_host(private_key_path=None,
                            private_key=SecretStr(sshd.client_key.read_text()))
    assert host.run("echo key-text", stream=False).stdout == "key-text\n"
    host.close()


def test_secrets_never_appear_in_repr_dump_or_errors(sshd):
    host = sshd.remote_host(password=SecretStr("hunter2-pw"),
                            passphrase=SecretStr("hunter2-pp"), private_key_path="/nonexistent")
    for text in (repr(host), str(host), str(host.model_dump()), host.model_dump_json()):
        assert "hunter2" not in text
    with pytest.raises(HostAuthenticationError) as info:
        host.run("true")
    assert "hunter2" not in str(info.value)


def test_unreachable_host_is_retried_then_reported(tmp_path):
    port = free_port()  # nothing listens here
    host = RemoteHost(hostname="127.0.0.1", port=port, username="nobody",
                      known_hosts_path=str(tmp_path / "kh"), connect_retries=2,
                      retry_backoff=0.05, connect_timeout=2)
    with pytest.raises(HostConnectError) as info:
        host.run("true")
    assert f"127.0.0.1:{port}" in str(info.value) and "3 attempt(s)" in str(info.value)


def test_connection_is_reused_and_close_is_idempotent(sshd):
    first = sshd.remote_host()
    second = sshd.remote_host()
    first.run("true", stream=False)
    second.run("true", stream=False)
    assert ssh.connect(first) is ssh.connect(second)  # one SSH connection for both blocks
    first.close()
    first.close()
    assert second.run("echo reconnected", stream=False).stdout == "reconnected\n"
    second.close()


def test_port_is_validated():
    with pytest.raises(ValueError):
        RemoteHost(hostname="h", username="u", port=70000)


def test_a_transfer_from_a_host_that_hangs_fails_after_the_idle_timeout(sshd, tmp_path):
    """A host that stops answering with its connection open (here: its SFTP server is
    stopped mid-transfer) fails the transfer as a lost connection after
    transfer_idle_timeout, instead of holding it for ever."""
    import contextlib
    import os
    import signal
    import threading

    from blocks import procfs

    remote = sshd.remote_host(transfer_idle_timeout=2.0)
    stopped: list[int] = []
    try:
        folder = str(tmp_path / "remote")  # the test's sshd serves this machine
        remote.run(f"mkdir -p {folder} && head -c 200000000 /dev/urandom > {folder}/big.bin",
                   stream=False, timeout=120)
        before = {p.pid for p in procfs.all_stats() if p.alive}
        done = threading.Event()

        def stop_its_sftp_server() -> None:
            assert sshd.process is not None
            while not done.is_set() and not stopped:
                for p in procfs.all_stats():
                    if p.alive and p.pid not in before and _comm(p.pid) == "sftp-server":
                        os.kill(p.pid, signal.SIGSTOP)
                        stopped.append(p.pid)
                time.sleep(0.002)

        watcher = threading.Thread(target=stop_its_sftp_server, daemon=True)
        watcher.start()
        started = time.monotonic()
        with pytest.raises(HostConnectError, match="nothing moved for 2 s"):
            remote.download(folder, tmp_path / "got")
        took = time.monotonic() - started
        done.set()
        assert stopped, "the SFTP server was not found"
        assert took < 30, took
        assert not list((tmp_path / "got").glob("big.bin"))  # nothing half-made in place
    finally:
        for pid in stopped:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        remote.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
