"""Start flow runs from a pre-imported process instead of a fresh interpreter.

Prefect's runner starts each flow run of a served flow with
`prefect.flow_engine.run_flow_in_subprocess`, which uses the multiprocessing
"spawn" method: every case pays a new interpreter importing Prefect and the
pipeline (~2 s on the reference machine), longer than the whole start-latency
budget. Here the same function is given a "forkserver" context instead: one
helper process imports those modules once when `mqi up` starts, and each flow
run is forked from it in milliseconds.

Everything else about the start stays Prefect's (the pickled call, the
environment and settings handed to the child, the control channel, the process
handle the runner watches and cancels). The forkserver itself is
single-threaded, so forking from it is safe, and its children are still
descendants of the serve process, which is what `mqi up` stops and cleans up by.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
from types import SimpleNamespace

# Imported once in the forkserver; each child starts with them in memory. The
# list is what a process_case run imports beyond Prefect's engine (found by
# comparing sys.modules before and after a run); a module missing here is only
# imported late, never wrong.
PRELOAD = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.results",
    "prefect.artifacts",
    "prefect.concurrency.sync",
    "prefect.client.orchestration",
    "flows.process_case",
    "blocks.remote_host",
    "blocks.local_host",
    "blocks.gpu_pool",
    "paramiko",
    "pydicom",
)

log = logging.getLogger(__name__)


def enable(preload: tuple[str, ...] = PRELOAD) -> bool:
    """Make Prefect start flow runs by forking from a pre-imported forkserver.

    Returns False (and logs why) where that cannot be done, leaving Prefect's
    own spawn start in place: slower, never wrong.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        log.warning("warm flow-run starts unavailable here (no forkserver); "
                    "each case starts a fresh interpreter")
        return False
    import prefect.flow_engine as engine

    if getattr(engine.multiprocessing, "get_context", None) is None:
        log.warning("warm flow-run starts unavailable: prefect.flow_engine no longer "
                    "starts runs through multiprocessing.get_context")
        return False
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    # The only use of multiprocessing in prefect.flow_engine is the start
    # context of run_flow_in_subprocess; hand it the forkserver one (a stand-in
    # for the module, hence the ignore).
    engine.multiprocessing = SimpleNamespace(  # type: ignore[assignment]
        get_context=lambda method=None: context, context=multiprocessing.context)
    # Start the forkserver (and its imports) now, not when the first case arrives.
    multiprocessing.forkserver.ensure_running()
    return True
