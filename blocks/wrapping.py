"""Shell wrappers shared by the hosts: own process group, environment, working dir, kill.

A command runs as ``setsid -w sh -c SCRIPT``: the new session makes the
command and everything it starts one process group that can be killed as a
whole, and ``-w`` keeps the SSH channel open until that group's leader exits.
The leader reports its process-group id on the first line of stderr (and, when
asked, in a pid file), which is how a timeout or a cancellation finds it.
"""

from __future__ import annotations

import re
import shlex

from blocks import procfs

PGID_MARKER = b"\x1eMQI-PGID "
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_SCRIPT = (
    'printf "\\036MQI-PGID %s\\n" "$$" >&2; '
    'if [ -n "$3" ]; then printf "%s\\n" "$$" > "$3" || exit 125; fi; '
    'if [ -n "$1" ]; then cd -- "$1" || exit 125; fi; '
    'exec sh -c "$2"'
)


def wrap_command(command: str, *, env: dict[str, str] | None = None, cwd: str | None = None,
                 pid_file: str | None = None) -> str:
    """Return the command line that runs ``command`` in its own process group.

    Every value is passed as a separate, quoted argument: nothing in ``cwd``,
    ``pid_file`` or an environment value is ever interpreted by the shell.

    Raises:
        ValueError: An environment variable name is not a valid shell name.
    """
    assignments = []
    for name, value in (env or {}).items():
        if not ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name: {name!r}")
        assignments.append(f"{name}={shlex.quote(str(value))}")
    prefix = f"env {' '.join(assignments)} " if assignments else ""
    return (f"exec {prefix}setsid -w sh -c {shlex.quote(_SCRIPT)} mqi-run "
            f"{shlex.quote(cwd or '')} {shlex.quote(command)} {shlex.quote(pid_file or '')}")


def kill_group_script(pgid: int, grace: float) -> str:
    """Shell that SIGTERMs process group ``pgid``, waits up to ``grace`` s, then SIGKILLs it.

    "Alive" means a member that is not a zombie: where PID 1 does not reap
    orphans (containers), ``kill -0`` would see the dead for the whole grace.
    """
    pgid = int(pgid)
    if pgid <= 1:
        raise ValueError(f"refusing to kill process group {pgid}")
    steps = max(1, int(grace / 0.1))
    return (
        f"if command -v ps >/dev/null 2>&1; then alive() {{ ps -eo pgid=,stat= | "
        f"awk -v g={pgid} '$1==g && $2 !~ /^Z/ {{f=1}} END {{exit !f}}'; }}; "
        f"else alive() {{ kill -0 -- -{pgid} 2>/dev/null; }}; fi; "
        f"kill -TERM -- -{pgid} 2>/dev/null || exit 0; "
        f"i=0; while [ $i -lt {steps} ]; do alive || exit 0; sleep 0.1; i=$((i+1)); done; "
        f"kill -KILL -- -{pgid} 2>/dev/null; exit 0"
    )


def group_alive(pgid: int) -> bool:
    """True while process group ``pgid`` on this machine has a member that is not a zombie."""
    return any(p.pgrp == pgid and p.alive for p in procfs.all_stats())
