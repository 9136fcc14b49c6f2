"""Run one measurement per flow-run start mode (spawn baseline, then warm) in one run.

Both modes get the same real sshd (the GPU host) and a fresh `mqi up` each, so
their figures can be compared as a ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Measure = Callable[[Path, Any, bool, str], Any]


def add_baseline_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baseline run with Prefect's own (spawn) start")


def each_start_mode(measure: Measure, *, no_baseline: bool, prefix: str) -> dict[str, Any]:
    """``measure(work, sshd, warm, label)`` for spawn (unless no_baseline) and warm."""
    from tests.support.sshd import SshServer

    work = Path(tempfile.mkdtemp(prefix=prefix))
    sshd = SshServer(work / "sshd").start()
    results: dict[str, Any] = {}
    try:
        plans = [("warm", True)] if no_baseline else [("spawn", False), ("warm", True)]
        for label, warm in plans:
            print(f"{label}: prefect.warm_start={str(warm).lower()}", flush=True)
            results[label] = measure(work, sshd, warm, label)
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results
