"""Checks on the GPU host, over SSH: login, tools, the remote work root, the GPUs."""

from __future__ import annotations

import re
import shlex
import statistics
import time

from blocks import factory
from blocks.errors import HostAuthenticationError, HostError
from blocks.gpu_pool import GpuInfo, GpuPool, GpuQueryError, parse_compute_apps, parse_gpu_query
from blocks.host import Host
from config import MqiConfig
from deployments.doctor.check import Check, CheckFailed, attempt


def command_seconds(cfg: MqiConfig) -> float:
    """Deadline of one command the doctor runs on the GPU host."""
    return max(10.0, 2 * cfg.hosts[cfg.gpu.primary].connect_timeout_seconds)


def doctor_host(cfg: MqiConfig) -> Host:
    """The GPU host as the pipeline builds it, but one attempt to connect and never
    trusting an unknown host key."""
    name = cfg.gpu.primary
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


SLOW_ROUND_TRIP_SECONDS = 0.5


def check_round_trip(host: Host, timeout: float) -> Check:
    """How long one command takes on the live connection: every stage, transfer and GPU
    look pays it, mostly the account's shell starting (its ~/.bashrc). Informs, with
    the median of three; never fails."""
    def body() -> str:
        times = []
        for _ in range(3):
            started = time.monotonic()
            _shell(host, "true", timeout)
            times.append(time.monotonic() - started)
        median = statistics.median(times)
        slow = (" — slow: every stage and transfer pays it; see docs/troubleshooting.md, "
                "'Every stage starts late'") if median >= SLOW_ROUND_TRIP_SECONDS else ""
        return f"{median * 1000:.0f} ms per command{slow}"

    return attempt(f"command round trip on {host.address}", body)


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
