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

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from blocks.host import Host
from config import MqiConfig
from deployments.doctor.access import (
    check_credentials,
    check_env,
    check_host_key,
    check_key_file,
    secret_env_names,
)
from deployments.doctor.check import Check, skipped
from deployments.doctor.local import check_api, check_local_dir
from deployments.doctor.remote import (
    check_gpus,
    check_login,
    check_remote_root,
    check_round_trip,
    check_tool,
    command_seconds,
    doctor_host,
    tool_argv,
)

__all__ = ["Check", "diagnose", "run_checks", "tool_argv"]


def credential_checks(cfg: MqiConfig, login_needs: dict[str, list[str]]) -> Iterator[Check]:
    """Key files of the ssh hosts and every ``*_env`` variable; what a GPU host's login
    would lack is added to ``login_needs[<its name>]``."""
    for name, settings in cfg.hosts.items():
        if settings.kind != "ssh":
            continue
        checks = [check_credentials(name, settings)]
        if settings.private_key_path:
            checks.append(check_key_file(name, settings))
        for check in filter(None, checks):
            if name in login_needs and not check.passed:
                login_needs[name].append("a usable key")
            yield check
    for key, env in secret_env_names(cfg):
        check = check_env(key, env)
        for gpu, needs in login_needs.items():
            if key.startswith(f"hosts.{gpu}.") and not check.passed:
                needs.append(f"{env} set")
        yield check


def gpu_host_checks(cfg: MqiConfig, login_needs: list[str]) -> Iterator[Check]:
    """Host key, login, tools, remote work root and GPUs; each skipped, not waited
    for, when what it needs failed."""
    settings = cfg.hosts[cfg.gpu.primary]
    timeout = command_seconds(cfg)
    host: Host | None = None
    if settings.kind == "ssh":
        check = check_host_key(cfg.gpu.primary, settings)
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
            if check.passed:
                yield check_round_trip(host, timeout)
            else:
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
    from flows.placement import host_view

    # With several GPU hosts (gpu.hosts) each is checked as a case would meet it: its
    # own login, tools, work root and GPUs.
    login_needs: dict[str, list[str]] = {name: [] for name in cfg.gpu.host_names}
    yield from credential_checks(cfg, login_needs)
    for name, needs in login_needs.items():
        yield from gpu_host_checks(host_view(cfg, name) if cfg.gpu.several_hosts else cfg,
                                   needs)
    yield check_local_dir("scanner.target_directory", Path(cfg.scanner.target_directory),
                          must_exist=True)
    yield check_local_dir("paths.results_root", Path(cfg.paths.results_root), must_exist=False)
    yield check_api(cfg, timeout=cfg.hosts[cfg.gpu.primary].connect_timeout_seconds)


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
