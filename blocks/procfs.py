"""Reading processes from /proc (Linux): state, parent and process group of each.

Zombies matter here: where PID 1 does not reap orphans (containers), a dead
process lingers as state Z and must not count as alive.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple


class ProcStat(NamedTuple):
    pid: int
    state: str
    ppid: int
    pgrp: int

    @property
    def alive(self) -> bool:
        return self.state != "Z"


def stat(pid: int) -> ProcStat | None:
    """One process's state, parent and group; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return ProcStat(pid, fields[0].decode(), int(fields[1]), int(fields[2]))


def all_stats() -> Iterator[ProcStat]:
    """Every process on this machine."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = stat(int(entry.name))
            if found is not None:
                yield found
