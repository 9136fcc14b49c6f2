"""A real OpenSSH sshd on a free 127.0.0.1 port, with keys made in a temp dir.

Used by the integration tests (one per session) and by the benchmarks, so both
talk to the same kind of server the GPU host runs.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
SFTP_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                   "/usr/libexec/sftp-server")


class SshdUnavailable(RuntimeError):
    """sshd is not installed or would not start."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(candidates: tuple[str, ...], what: str) -> str:
    for path in candidates:
        if os.path.exists(path):
            return path
    raise SshdUnavailable(
        f"{what} not found (looked in {', '.join(candidates)}); install the Debian package "
        f"openssh-server (the README's test command does it)")


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    """Make a key pair at ``path`` / ``path``.pub with ssh-keygen."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "mqi-test",
                    "-f", str(path)], check=True)
    return path


@dataclass
class SshServer:
    """One running sshd and everything a client needs to reach it."""

    root: Path
    port: int = 0
    username: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Variables every session gets (sshd_config SetEnv): with several servers on this
    machine, what makes each a host of its own (e.g. the simulators' control file)."""
    shell_rc: bool = False
    """Whether sessions read the account's ~/.bashrc, as bash does for an SSH command. Off:
    this machine's account is not a GPU host's, and what its ~/.bashrc runs (here `pyenv
    init`, 160 ms of CPU per session) is no part of what a test or a benchmark measures;
    with it the suite took twice as long. SHLVL=1 makes bash see itself as nested."""
    _argv: list[str] = field(default_factory=list)

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def log_file(self) -> Path:
        return self.root / "sshd.log"

    def start(self) -> SshServer:
        sshd = _find(SSHD_CANDIDATES, "sshd")
        sftp_server = _find(SFTP_CANDIDATES, "sftp-server")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        keygen(self.host_key)
        keygen(self.client_key)
        authorized = self.root / "authorized_keys"
        shutil.copy(self.client_key.with_suffix(".pub"), authorized)
        os.chmod(authorized, 0o600)
        # sshd refuses to start as root without its privilege-separation directory.
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = self.port or free_port()
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "MaxSessions 100\n"
            "MaxStartups 100:30:200\n"
            f"Subsystem sftp {sftp_server}\n"
            "LogLevel ERROR\n"
            + self._set_env()
        )
        self._argv = [sshd, "-D", "-e", "-f", str(config)]
        self._launch()
        pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        return self

    def _set_env(self) -> str:
        """The SetEnv line: one for all (sshd takes the first SetEnv line only)."""
        env = ({} if self.shell_rc else {"SHLVL": "1"}) | self.env
        if not env:
            return ""
        return "SetEnv " + " ".join(f'"{name}={value}"' for name, value in env.items()) + "\n"

    def _launch(self) -> None:
        self.process = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL,
            stderr=open(self.log_file, "ab"))  # noqa: SIM115
        self._wait_listening()

    def cut(self) -> None:
        """The network to the host is cut: sshd, its session processes and their SFTP
        servers die at once (kill -9), so open connections break and new ones are refused.
        What the sessions started (our commands run under setsid) keeps running; a login
        shell is never killed (one killed mid-way through its profile can leave locks
        behind on this machine, which is every test's host)."""
        from blocks import procfs

        if self.process is None:
            return
        os.kill(self.process.pid, signal.SIGSTOP)  # no new session while they are killed
        while True:
            children: dict[int, list[int]] = {}
            for proc in procfs.all_stats():
                if proc.alive:
                    children.setdefault(proc.ppid, []).append(proc.pid)
            doomed, todo = [], [self.process.pid]
            while todo:
                for child in children.get(todo.pop(), []):
                    todo.append(child)
                    if _is_sshd(child):
                        doomed.append(child)
            if not doomed:
                break
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Start sshd again on the same port, keys and configuration (after ``cut``)."""
        self._launch()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise SshdUnavailable(
                    f"sshd exited with {self.process.returncode}: "
                    f"{self.log_file.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SshdUnavailable(f"sshd did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def host_fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", str(self.host_key.with_suffix(".pub"))],
                             check=True, capture_output=True, text=True).stdout
        return out.split()[1]

    def remote_host(self, **overrides: object):
        """A RemoteHost block pointed at this server (fields overridable)."""
        from blocks.remote_host import RemoteHost

        fields: dict[str, object] = dict(
            hostname="127.0.0.1", port=self.port, username=self.username,
            private_key_path=str(self.client_key), known_hosts_path=str(self.known_hosts),
            connect_retries=0,
        )
        fields.update(overrides)
        return RemoteHost(**fields)

    def ssh_args(self) -> list[str]:
        """OpenSSH client options that reach this server the same way (for scp/ssh)."""
        return ["-i", str(self.client_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes"]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _is_sshd(pid: int) -> bool:
    """sshd itself or its SFTP server: what carries the connections, no login shell."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith(("sshd", "sftp-server"))
    except OSError:
        return False
