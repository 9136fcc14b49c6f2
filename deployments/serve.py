"""Serve every deployment of MQI Communicator from one process (started by `mqi up`).

Adding a deployment is one line in DEPLOYMENTS: the scheduled housekeeping
flows join the case pipeline here (add_flow takes cron= / interval= too).

    python -m deployments.serve [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

from deployments.supervisor import announce_ready
from flows.naming import DEPLOYMENT_NAME, SYSTEM_TAG


@dataclass(frozen=True)
class Served:
    """A flow served as a deployment: where it lives and Runner.add_flow's arguments."""

    module: str
    flow: str
    options: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.module), self.flow)


DEPLOYMENTS: list[Served] = [
    Served("flows.process_case", "process_case", {
        "name": DEPLOYMENT_NAME, "tags": [SYSTEM_TAG],
        "description": "One case folder end to end (started by the sensor or `mqi run`)."}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqi-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs at once (default: no limit; the GPU limit "
                             "throttles simulations)")
    args = parser.parse_args(argv)
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from config import get_config

    config = get_config(args.config)
    if config.prefect.warm_start:
        from deployments import warm_start

        warm_start.enable()
    # Runner polls for scheduled runs this often (Prefect's default is 10 s, and its
    # setting takes whole seconds only); each started case waits up to this long.
    # pause_on_shutdown=False: a restart of `mqi up` must find the deployments active.
    runner = Runner(name="mqi-serve", limit=args.limit, pause_on_shutdown=False,
                    query_seconds=config.prefect.runner_poll_seconds)
    # add_flow (not serve(deployment)) keeps the flow object in the runner, so a run
    # is started from it directly (multiprocessing, warm when enabled) rather than
    # through `python -m prefect.engine`, which imports everything again.
    for served in DEPLOYMENTS:
        runner.add_flow(served.load(), **served.options)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(_run(runner))
    return 0


async def _run(runner: Any) -> None:
    async def announce() -> None:
        while not runner.started:
            await asyncio.sleep(0.05)
        announce_ready()
        print(f"serving {', '.join(s.options.get('name', s.flow) for s in DEPLOYMENTS)}; "
              f"polling every {runner.query_seconds:g} s", flush=True)

    watcher = asyncio.create_task(announce())
    try:
        await runner.start()
    finally:
        watcher.cancel()


if __name__ == "__main__":
    sys.exit(main())
