"""``mqi doctor``: check, for the configuration in use, what a case will need.

One line per check, in the order a case meets them: credentials, the GPU
host's key, SSH login, the tools, the remote work root, the GPUs, the local
folders, the Prefect API. A passing check prints ``✓ <what>``; a failing one
``✗ <what>: <problem> — <how to fix>``; a check that cannot run because an
earlier one failed prints ``- <what>: skipped (<why>)`` instead of waiting for
its own timeout. The exit status is 1 when any check failed.

Nothing is changed anywhere: an unknown host key is printed, never added
(the login uses a RemoteHost that refuses unknown keys whatever the config
says), and the write checks create and remove a temporary file only. Secrets
are read where the host block is built and never printed; an ``*_env`` key
shows only whether its variable is set.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paramiko

from blocks import factory, ssh
from blocks.errors import HostAuthenticationError, HostError
from blocks.gpu_pool import GpuInfo, GpuPool, GpuQueryError, parse_compute_apps, parse_gpu_query
from blocks.host import Host
from config import MqiConfig, MqiError
from config.models import HostSettings
from deployments import server


class CheckFailed(MqiError):
    """One check found a problem; ``fix`` says what the operator can do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} — {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        what: What was checked, naming the host or path (with details when it passed).
        passed: True, False, or None for a check that was skipped or only informs.
        problem: Why it failed or was skipped.
        fix: How to fix it (failed and informing checks).
    """

    what: str
    passed: bool | None
    problem: str = ""
    fix: str = ""

    def line(self, unicode: bool = True) -> str:
        ok, bad, dash = ("✓", "✗", "—") if unicode else ("OK", "FAIL", "--")
        if self.passed:
            return f"{ok} {self.what}"
        if self.passed is False:
            return f"{bad} {self.what}: {self.problem} {dash} {self.fix}"
        if self.fix:
            return f"- {self.what}: {self.problem} {dash} {self.fix}"
        return f"- {self.what}: skipped ({self.problem})"


def attempt(what: str, body: Callable[[], str | None]) -> Check:
    """Run one check: ``body`` returns details for the ✓ line or raises CheckFailed."""
    try:
        detail = body()
    except CheckFailed as exc:
        return Check(what, False, exc.problem, exc.fix)
    return Check(f"{what}: {detail}" if detail else what, True)


def skipped(what: str, why: str) -> Check:
    return Check(what, None, why)


# ------------------------------------------------------------------ 1. secrets
def secret_env_names(cfg: MqiConfig) -> list[tuple[str, str]]:
    """(key path, variable) of every ``*_env`` key the config sets."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if str(key).endswith("_env") and isinstance(value, str):
                    found.append((here, value))
                else:
                    walk(value, here)

    walk(cfg.model_dump(mode="python"), "")
    return found


def check_env(key: str, name: str) -> Check:
    def body() -> None:
        if os.environ.get(name) is None:
            raise CheckFailed("not set", f"export {name} in the environment mqi runs in "
                                         f"(or remove {key} from the config)")

    return attempt(f"environment variable {name} ({key})", body)


def check_key_file(name: str, settings: HostSettings) -> Check:
    path = Path(str(settings.private_key_path))

    def body() -> None:
        if not path.exists():
            raise CheckFailed("does not exist", f"create the key (ssh-keygen -t ed25519 -f "
                                                f"{path}) or fix hosts.{name}.private_key_path")
        if not path.is_file():
            raise CheckFailed("is not a file", f"point hosts.{name}.private_key_path at the "
                                               f"private key file")
        if not os.access(path, os.R_OK):
            raise CheckFailed("is not readable by this user",
                              f"chmod 600 {path} as its owner, or run mqi as that user")
        env = settings.passphrase_env
        if env is not None and os.environ.get(env) is None:
            return  # the passphrase's own line says it is missing
        try:
            ssh.load_private_key(None, str(path), os.environ.get(env) if env else None)
        except HostError as exc:
            raise CheckFailed(str(exc), f"give the passphrase with hosts.{name}.passphrase_env, "
                                        f"or point private_key_path at an OpenSSH private key"
                              ) from None

    return attempt(f"private key file {path} of hosts.{name}", body)


def check_credentials(name: str, settings: HostSettings) -> Check | None:
    """A line only when an ssh host has no way to log in at all."""
    if settings.private_key_path or settings.private_key_env or settings.password_env:
        return None
    return Check(f"credentials of hosts.{name}", False, "none configured",
                 f"set hosts.{name}.private_key_path (or private_key_env / password_env)")


# ----------------------------------------------------------------- 2. host key
def known_hosts_name(hostname: str, port: int) -> str:
    """How known_hosts names a host (``[host]:port`` unless the port is 22)."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


# paramiko's transport thread logs a failed handshake itself; the check's line says it,
# so without logging configured the record goes nowhere instead of to stderr.
HANDSHAKE_LOG = "mqi.doctor.handshake"
logging.getLogger(HANDSHAKE_LOG).addHandler(logging.NullHandler())


def server_host_key(sock: socket.socket, timeout: float,
                    preferred: list[str]) -> paramiko.PKey:
    """The key the SSH server on ``sock`` offers, read with a bare handshake (no login).

    ``preferred`` key types go first, as paramiko's client does when known_hosts
    lists the host, so that the key compared is the one a login would be shown.
    """
    transport = paramiko.Transport(sock)
    transport.set_log_channel(HANDSHAKE_LOG)
    try:
        transport.banner_timeout = timeout
        options = transport.get_security_options()
        offered = list(options.key_types)
        first = [k for k in preferred if k in offered]
        options.key_types = tuple(first + [k for k in offered if k not in first])
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()


def check_host_key(name: str, settings: HostSettings) -> Check:
    hostname, port = settings.hostname or "", settings.port
    known_hosts = Path(str(settings.known_hosts_path))
    entry = known_hosts_name(hostname, port)
    timeout = settings.connect_timeout_seconds

    def body() -> str:
        keys = paramiko.HostKeys()
        if known_hosts.exists():
            try:
                keys.load(str(known_hosts))
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckFailed(f"cannot read {known_hosts}: {exc}",
                                  f"fix hosts.{name}.known_hosts_path or the file's "
                                  f"permissions") from None
        ours = keys.lookup(entry)
        preferred = list(ours.keys()) if ours else []
        if "ssh-rsa" in preferred:
            preferred[preferred.index("ssh-rsa"):] = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
        try:
            sock = socket.create_connection((hostname, port), timeout=timeout)
        except OSError as exc:
            raise CheckFailed(
                f"cannot reach the SSH server at {hostname}:{port} "
                f"({type(exc).__name__}: {exc})",
                f"check hosts.{name}.hostname and hosts.{name}.port, that sshd runs there "
                f"and that no firewall blocks the port") from None
        try:
            key = server_host_key(sock, timeout, preferred)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise CheckFailed(
                f"{hostname}:{port} accepts connections but no SSH handshake completed "
                f"within {timeout:g} s ({type(exc).__name__}: {str(exc) or 'no answer'})",
                f"check that hosts.{name}.port is the SSH port of {hostname}") from None
        offered = f"{key.get_name()} {ssh.fingerprint(key)}"
        if ours is None:
            note = (" (auto_add_host_keys is on: a flow would trust it unverified)"
                    if settings.auto_add_host_keys else "")
            raise CheckFailed(
                f"{entry} is not in {known_hosts}; the server offers {offered}{note}",
                f"verify {ssh.fingerprint(key)} with the host's administrator, then add this "
                f"line to {known_hosts}: {entry} {key.get_name()} {key.get_base64()}")
        expected = ours.get(key.get_name()) or next(iter(ours.values()))
        if expected != key:
            raise CheckFailed(
                f"the host key has CHANGED: the server offers {offered} but {known_hosts} "
                f"expects {expected.get_name()} {ssh.fingerprint(expected)} (possible "
                f"man-in-the-middle, or the server was reinstalled)",
                f"ask the host's administrator whether its key changed; only then replace "
                f"the line for {entry} in {known_hosts} with: {entry} {key.get_name()} "
                f"{key.get_base64()}")
        return f"{ssh.fingerprint(key)}, in {known_hosts}"

    return attempt(f"host key of {hostname}:{port}", body)


# -------------------------------------------------------------- 3.-6. GPU host
def command_seconds(cfg: MqiConfig) -> float:
    """Deadline of one command the doctor runs on the GPU host."""
    return max(10.0, 2 * cfg.hosts[cfg.gpu.host].connect_timeout_seconds)


def doctor_host(cfg: MqiConfig) -> Host:
    """The GPU host as the pipeline builds it, but one attempt to connect and never
    trusting an unknown host key."""
    name = cfg.gpu.host
    settings = cfg.hosts[name].model_copy(
        update={"connect_retries": 0, "auto_add_host_keys": False})
    return factory.host_from_settings(name, settings)


def check_login(host: Host, timeout: float) -> Check:
    def body() -> None:
        try:
            host.run("true", stream=False, timeout=timeout)
        except HostAuthenticationError as exc:
            raise CheckFailed(str(exc), "fix the user or key in the config, or add the public "
                                        "key to the host's authorized_keys; `ssh -v` with the "
                                        "same key shows the server's side") from None
        except HostError as exc:
            raise CheckFailed(str(exc).splitlines()[0],
                              f"check that {host.address} is reachable and its sshd "
                              f"accepts sessions") from None

    return attempt(f"SSH login to {host.address}", body)


def _shell(host: Host, script: str, timeout: float) -> tuple[int | None, str]:
    """Run a small script; (exit status, stdout + stderr stripped). Host errors are failures."""
    try:
        result = host.run(script, stream=False, timeout=timeout, check=False)
    except HostError as exc:
        raise CheckFailed(str(exc).splitlines()[0],
                          f"check that {host.address} is reachable and responsive") from None
    return result.exit_code, (result.stdout + result.stderr).strip()


def tool_argv(cfg: MqiConfig, name: str) -> tuple[list[str], str | None]:
    """The words that run tool ``name``, and the tool they start with when that is
    another one.

    A tool used as ``{python} {interpreter}`` in a command template is run by the
    ``python`` tool: its words follow that tool's (``-m module`` or a script path).
    """
    value = cfg.tools[name]
    words = [value] if isinstance(value, str) else list(value)
    pattern = re.compile(r"\{(\w+)\}\s+\{" + re.escape(name) + r"\}")
    for template in cfg.remote_commands.values():
        match = pattern.search(template)
        if match and match.group(1) in cfg.tools and match.group(1) != name:
            runner = cfg.tools[match.group(1)]
            return ([runner] if isinstance(runner, str) else list(runner)) + words, \
                match.group(1)
    return words, None


FIND_MODULE = ("import importlib.util, sys\n"
               "try:\n    found = importlib.util.find_spec(sys.argv[1])\n"
               "except ImportError:\n    found = None\n"
               "sys.exit(0 if found else 3)")


def check_tool(cfg: MqiConfig, host: Host, name: str, timeout: float) -> Check:
    argv, runner = tool_argv(cfg, name)
    exe_key = f"tools.{runner or name}"

    def body() -> str:
        exe = argv[0]
        if "/" in exe:
            q = shlex.quote(exe)
            _, said = _shell(host, f'if [ ! -e {q} ]; then echo "does not exist"; '
                                   f'elif [ -d {q} ]; then echo "is a folder"; '
                                   f'elif [ ! -x {q} ]; then echo "is not executable"; fi',
                             timeout)
            if said:
                raise CheckFailed(f"{exe} {said}", f"install it there or fix {exe_key}")
            shown = exe
        else:
            code, said = _shell(host, f"command -v {shlex.quote(exe)}", timeout)
            if code != 0 or not said:
                raise CheckFailed(f"{exe} is not found on the PATH of a login shell",
                                  f"install it there, or give its full path in {exe_key}")
            shown = f"{exe} ({said.splitlines()[-1]})"
        if argv[1:2] == ["-m"] and len(argv) > 2:
            module = argv[2]
            code, said = _shell(host, f"{shlex.quote(exe)} -c {shlex.quote(FIND_MODULE)} "
                                      f"{shlex.quote(module)}", timeout)
            if code != 0:
                raise CheckFailed(f"{exe} cannot import {module}"
                                  + (f" ({said.splitlines()[-1]})" if said else ""),
                                  f"install {module} for {exe} there, or fix tools.{name}")
            shown += f" -m {module}"
        elif runner and len(argv) > 1 and "/" in argv[1] and not argv[1].startswith("-"):
            script = shlex.quote(argv[1])
            _, said = _shell(host, f'if [ ! -f {script} ]; then echo "does not exist"; '
                                   f'elif [ ! -r {script} ]; then echo "is not readable"; fi',
                             timeout)
            if said:
                raise CheckFailed(f"{argv[1]} {said}", f"install it there or fix tools.{name}")
            shown += f" {argv[1]}"
        return shown

    return attempt(f"tool {name} on {host.address}", body)


WRITABLE_SCRIPT = """\
d={root}
while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
if [ ! -d "$d" ]; then echo "notdir $d"; exit 0; fi
f="$d/.mqi-doctor.$$"
if (set -C; : > "$f") 2>/dev/null; then rm -f -- "$f"; echo "ok $d"; else echo "denied $d"; fi
"""


def check_remote_root(cfg: MqiConfig, host: Host, timeout: float) -> Check:
    root = cfg.paths.remote_work_root

    def body() -> str:
        _, said = _shell(host, WRITABLE_SCRIPT.format(root=shlex.quote(root)), timeout)
        verdict, _, where = said.splitlines()[-1].partition(" ") if said else ("", "", "")
        if verdict == "notdir":
            raise CheckFailed(f"{where} is not a folder",
                              "fix paths.remote_work_root or remove that file on the host")
        if verdict == "denied":
            raise CheckFailed(f"{where} is not writable by {host.address}",
                              f"give that user write access to {where} on the host, or "
                              f"choose another paths.remote_work_root")
        if verdict != "ok":
            raise CheckFailed(f"unexpected answer from the host: {said[-200:]!r}",
                              "check that the host has a POSIX shell")
        return "writable" + ("" if where == root else
                             f" (not there yet; made in {where} when needed)")

    return attempt(f"remote work root {root} on {host.address}", body)


def _gpu_list(gpus: list[GpuInfo]) -> str:
    return ", ".join(f"{g.index}: {g.name}" for g in gpus)


def check_gpus(cfg: MqiConfig, host: Host, timeout: float) -> Check:
    pool: GpuPool = factory.gpu_pool(cfg)
    source = "NVML" if pool.source == "nvml" else "gpu.query_command"

    def query(command: str, key: str) -> str:
        code, said = _shell(host, command, timeout)
        if code != 0:
            last = said.splitlines()[-1] if said else "no output"
            raise CheckFailed(f"gpu.{key} exited with {code} ({last})",
                              f"run it on {host.address} by hand: is the NVIDIA driver loaded "
                              f"and nvidia-smi installed? Or fix gpu.{key}")
        return said

    def body() -> str:
        try:
            if pool.source == "nvml":
                gpus, apps = pool.read(host)
            else:
                gpus = parse_gpu_query(query(pool.query_command, "query_command"))
                apps = parse_compute_apps(query(pool.apps_command, "apps_command"))
        except GpuQueryError as exc:
            raise CheckFailed(str(exc), "make gpu.query_command / gpu.apps_command print "
                                        "nvidia-smi's CSV") from None
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - NVML raises its own exception types
            raise CheckFailed(f"NVML does not answer ({type(exc).__name__}: {exc})",
                              "install pynvml and the NVIDIA driver, or use "
                              "gpu.source: nvidia-smi") from None
        selected = [g for g in gpus if pool.indices is None or g.index in pool.indices]
        usable = pool.usable(gpus, apps)
        if not selected:
            raise CheckFailed(
                "no GPU reported" + (f" among gpu.indices {pool.indices}" if pool.indices
                                     else ""),
                "check the GPUs with nvidia-smi on the host, or fix gpu.indices")
        if not usable:
            raise CheckFailed(
                f"none of {len(selected)} GPU(s) is usable now ({_gpu_list(selected)}): each "
                f"has under {pool.min_free_memory_mib} MiB free or runs another process",
                "free a GPU, or lower gpu.min_free_memory_mib / turn off "
                "gpu.skip_gpus_with_foreign_processes")
        return (f"{len(usable)} of {len(selected)} usable now "
                f"({', '.join(str(g.index) for g in usable)})")

    return attempt(f"GPUs on {host.address} ({source})", body)


# ------------------------------------------------------------- 7. local folders
def check_local_dir(key: str, path: Path, *, must_exist: bool) -> Check:
    def body() -> str:
        where = path
        while not where.exists() and not must_exist and where != where.parent:
            where = where.parent
        if not where.exists():
            raise CheckFailed("does not exist", f"create it (mkdir -p {path}) or fix {key}")
        if not where.is_dir():
            raise CheckFailed(f"{where} is not a folder", f"fix {key}")
        try:
            fd, temp = tempfile.mkstemp(prefix=".mqi-doctor.", dir=where)
        except OSError as exc:
            raise CheckFailed(f"{where} is not writable ({exc.strerror})",
                              f"give this user write access to {where}, or fix {key}") from None
        os.close(fd)
        os.unlink(temp)
        return "writable" + ("" if where == path else
                             f" (not there yet; made in {where} when needed)")

    return attempt(f"{key} {path}", body)


# ------------------------------------------------------------------ 8. Prefect
def check_api(cfg: MqiConfig, timeout: float) -> Check:
    url = cfg.prefect.effective_api_url
    shown = server.mask_url(url)
    if server.is_healthy(url, timeout=timeout):
        return Check(f"Prefect API answers at {shown}", True)
    if cfg.prefect.api_url is None:
        return Check(f"Prefect API at {shown}", None, "the embedded server is not running",
                     "`mqi up` starts it")
    return Check(f"Prefect API at {shown}", False, "does not answer /health",
                 "start that server, or fix prefect.api_url (null: `mqi up` starts an "
                 "embedded one)")


# --------------------------------------------------------------------- together
def credential_checks(cfg: MqiConfig, login_needs: list[str]) -> Iterator[Check]:
    """Key files of the ssh hosts and every ``*_env`` variable; what the GPU host's
    login would lack is added to ``login_needs``."""
    gpu = cfg.gpu.host
    for name, settings in cfg.hosts.items():
        if settings.kind != "ssh":
            continue
        checks = [check_credentials(name, settings)]
        if settings.private_key_path:
            checks.append(check_key_file(name, settings))
        for check in filter(None, checks):
            if name == gpu and not check.passed:
                login_needs.append("a usable key")
            yield check
    for key, env in secret_env_names(cfg):
        check = check_env(key, env)
        if key.startswith(f"hosts.{gpu}.") and not check.passed:
            login_needs.append(f"{env} set")
        yield check


def gpu_host_checks(cfg: MqiConfig, login_needs: list[str]) -> Iterator[Check]:
    """Host key, login, tools, remote work root and GPUs; each skipped, not waited
    for, when what it needs failed."""
    settings = cfg.hosts[cfg.gpu.host]
    timeout = command_seconds(cfg)
    host: Host | None = None
    if settings.kind == "ssh":
        check = check_host_key(cfg.gpu.host, settings)
        yield check
        if not check.passed:
            login_needs.append("a reachable host with a known key")
        if login_needs:
            yield skipped(f"SSH login to {settings.username}@{settings.hostname}:"
                          f"{settings.port}", "needs " + " and ".join(dict.fromkeys(login_needs)))
        else:
            host = doctor_host(cfg)
            check = check_login(host, timeout)
            yield check
            if not check.passed:
                host.close()
                host = None
    else:
        host = doctor_host(cfg)
    try:
        for name in cfg.tools:
            yield (check_tool(cfg, host, name, timeout) if host
                   else skipped(f"tool {name}", "needs SSH login"))
        root = cfg.paths.remote_work_root
        yield (check_remote_root(cfg, host, timeout) if host
               else skipped(f"remote work root {root}", "needs SSH login"))
        yield (check_gpus(cfg, host, timeout) if host
               else skipped("GPUs on the GPU host", "needs SSH login"))
    finally:
        if host is not None:
            host.close()


def run_checks(cfg: MqiConfig) -> Iterator[Check]:
    """Every check, in the order a case meets them, each as soon as it is done."""
    login_needs: list[str] = []
    yield from credential_checks(cfg, login_needs)
    yield from gpu_host_checks(cfg, login_needs)
    yield check_local_dir("scanner.target_directory", Path(cfg.scanner.target_directory),
                          must_exist=True)
    yield check_local_dir("paths.results_root", Path(cfg.paths.results_root), must_exist=False)
    yield check_api(cfg, timeout=cfg.hosts[cfg.gpu.host].connect_timeout_seconds)


def speaks_unicode(stream: TextIO) -> bool:
    """Whether ``stream`` can print ✓, ✗ and —."""
    try:
        "✓✗—".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def diagnose(cfg: MqiConfig, out: TextIO | None = None) -> int:
    """Print one line per check to ``out`` (stdout); 1 when any check failed, else 0."""
    stream = out or sys.stdout
    unicode = speaks_unicode(stream)
    failed = 0
    for check in run_checks(cfg):
        print(check.line(unicode), file=stream, flush=True)
        failed += check.passed is False
    if failed:
        print(f"{failed} check(s) failed", file=stream, flush=True)
    return 1 if failed else 0
