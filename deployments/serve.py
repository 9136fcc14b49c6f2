"""Serve every deployment of MQI Communicator from one process (started by `mqi up`).

It serves what deployments/definitions.py describes, except a deployment that
`prefect deploy` put on a work pool: that one belongs to the workers.

    python -m deployments.serve [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from deployments.capacity import case_slots
from deployments.definitions import DeploymentSpec, deployments_for
from deployments.supervisor import announce_ready
from flows.naming import DEPLOYMENT_NAME


def owned_by_workers(client: Any, spec: DeploymentSpec) -> str | None:
    """The work pool of ``spec``'s deployment when `prefect deploy` registered it there.

    Such a deployment belongs to the workers: serving it would rewrite it (work
    pool, entrypoint and parameters gone) and take its runs away from them.
    """
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(spec.full_name)
    except ObjectNotFound:
        return None
    return deployment.work_pool_name or None


def remove_served(client: Any, spec: DeploymentSpec) -> bool:
    """Delete ``spec``'s deployment that serve registered before (none on a work pool):
    the configuration turned it off, and its schedule must make no more runs."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(spec.full_name)
    except ObjectNotFound:
        return False
    if deployment.work_pool_name:
        return False
    client.delete_deployment(deployment.id)
    return True


def main(argv: list[str] | None = None) -> int:
    # rich (Prefect's console log handler) imports its emoji table the first time a line
    # needs it. A SIGTERM whose handler logs while that import is under way finds the
    # module half made and the shutdown's own log line fails with "cannot import name
    # 'EMOJI' from partially initialized module 'rich._emoji_codes'" (seen in
    # housekeeping.log). Imported whole here, before any signal can land.
    import rich._emoji_codes  # noqa: F401

    parser = argparse.ArgumentParser(prog="mqi-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    parser.add_argument("--limit", type=int, default=None,
                        help="most cases at once (default: cases.max_concurrent, or the "
                             "GPUs + 2)")
    parser.add_argument("--housekeeping", action="store_true",
                        help="serve the housekeeping deployments (curator, archiver) "
                             "instead of the cases")
    args = parser.parse_args(argv)
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from config import ENV_VAR, get_config

    config = get_config(args.config)
    # The flow runs started from here load the configuration `mqi up` published
    # (flows/settings.py), exactly as a worker's do: the file path stays with us.
    os.environ.pop(ENV_VAR, None)
    if config.prefect.warm_start and not args.housekeeping:
        from deployments import warm_start

        warm_start.enable()
    # Runner polls for scheduled runs this often (Prefect's default is 10 s, and its
    # setting takes whole seconds only); each started case waits up to this long.
    # pause_on_shutdown=False: a restart of `mqi up` must find the deployments active.
    # The runner's limit bounds the cases in flight: the others stay Scheduled, in
    # order, with no process and no memory (deployments/capacity.py). Housekeeping has
    # a runner (a process) of its own, so that a backlog of cases holding every slot
    # never holds back the curator or the archiver.
    if args.housekeeping:
        limit, why = None, "housekeeping"
    else:
        limit, source = (args.limit, "--limit") if args.limit else case_slots(config)
        why = f"at most {limit} case(s) at once ({source})"
    runner = Runner(name="mqi-housekeeping" if args.housekeeping else "mqi-serve",
                    limit=limit, pause_on_shutdown=False,
                    query_seconds=config.prefect.runner_poll_seconds)
    _once_per_shutdown(runner)
    # add_flow (not serve(deployment)) keeps the flow object in the runner, so a run
    # is started from it directly (multiprocessing, warm when enabled) rather than
    # through `python -m prefect.engine`, which imports everything again.
    from prefect.client.orchestration import get_client

    served: list[str] = []
    with get_client(sync_client=True) as client:
        # Housekeeping schedules come from the configuration (deployments/definitions.py).
        for spec in deployments_for(config):
            if (spec.name != DEPLOYMENT_NAME) != args.housekeeping:
                continue  # the other serve process's
            pool = owned_by_workers(client, spec)
            if pool is not None:
                print(f"{spec.full_name} is deployed on work pool {pool!r}: its runs go to "
                      f"the workers there; not served here", flush=True)
                continue
            if not spec.active:
                gone = "; removed the one served before" if remove_served(client, spec) else ""
                print(f"{spec.full_name} is turned off in the configuration: not served{gone}",
                      flush=True)
                continue
            runner.add_flow(spec.load(), **spec.options())
            served.append(spec.full_name)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(_run(runner, served, why))
    return 0


def _once_per_shutdown(runner: Any) -> None:
    """Make a SIGTERM that lands while the runner is already stopping do nothing.

    Prefect's runner answers such a second signal with ``sys.exit(0)``, raised in
    whatever coroutine its loop is running at that moment: the graceful shutdown is
    cut short and a "Task exception was never retrieved … SystemExit" traceback lands
    in the log. A second Ctrl-C or `kill` must not do that; the supervisor SIGKILLs
    what outlives its grace period anyway."""
    first = runner.handle_sigterm

    def handle_sigterm(*args: Any, **kwargs: Any) -> None:
        if runner.stopping:
            logging.getLogger("prefect.runner").info(
                "SIGTERM received again: already shutting down")
            return
        first(*args, **kwargs)

    runner.handle_sigterm = handle_sigterm


async def _run(runner: Any, served: list[str], why: str) -> None:
    async def announce() -> None:
        while not runner.started:
            await asyncio.sleep(0.05)
        announce_ready()
        print(f"serving {', '.join(served) or 'nothing (every deployment is on a work pool)'}"
              f"; polling every {runner.query_seconds:g} s; {why}", flush=True)

    watcher = asyncio.create_task(announce())
    try:
        await runner.start()
    finally:
        watcher.cancel()


if __name__ == "__main__":
    sys.exit(main())
