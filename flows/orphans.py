"""A beam's simulation left running by an earlier try of the same flow run.

When the link to the GPU host breaks mid-simulation, the stage cannot know how
the remote process ends; it fails (the connection was lost) and Prefect tries
it again. The earlier process may still run on its GPU (its output pipe broke,
but it notices only when it next writes): before a retry starts the beam anew,
that process group is killed through its pid file, so that two simulations of
one beam never run at once (on two GPUs, writing the same output folder).
"""

from __future__ import annotations

import logging

from blocks.host import Host
from config.models import GPU_STEP
from flows.layout import RemoteLayout


def is_a_retry() -> bool:
    """Whether this task has run before in this flow run (a Prefect retry, seconds after
    the last try). Not a rerun of the flow days later: its pid file's group id may by
    then name another process on the host."""
    from prefect.runtime import task_run

    return int(task_run.run_count or 1) > 1


def end_earlier_simulation(host: Host, layout: RemoteLayout, beam: int,
                           logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Kill what an earlier try of this beam left running (its pid file says which)."""
    if not is_a_retry():
        return  # a first try has no earlier one: no round trip
    if host.kill_pid_file(layout.pid_file(GPU_STEP, beam)):
        logger.warning("beam %d: the earlier try's simulation on %s is stopped (its process "
                       "group killed, if it still ran) before the beam starts again", beam,
                       host.address)
