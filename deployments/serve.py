"""Serve every deployment of MQI Communicator from one process (started by `mqi up`).

Adding a deployment is one line in DEPLOYMENTS: the scheduled housekeeping
flows join the case pipeline here.

    python -m deployments.serve [--config PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def _process_case() -> Any:
    from flows.process_case import process_case

    return process_case.to_deployment(
        name="process-case", tags=["mqi"],
        description="One case folder end to end (started by the sensor or `mqi run`).")


DEPLOYMENTS: list[Callable[[], Any]] = [
    _process_case,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqi-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs at once (default: no limit; the GPU limit "
                             "throttles simulations)")
    args = parser.parse_args(argv)
    from prefect import serve

    from config import get_config

    # Runner polls for scheduled runs this often (Prefect's default is 10 s, and its
    # setting takes whole seconds only); each started case waits up to this long.
    poll = get_config(args.config).prefect.runner_poll_seconds
    # pause_on_shutdown=False: a restart of `mqi up` must find the deployments active.
    serve(*(make() for make in DEPLOYMENTS), limit=args.limit, pause_on_shutdown=False,
          query_seconds=poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
