"""Pipeline benchmark: wall time of one simulated case and the orchestration overhead.

    python -m bench.pipeline [--beams 3] [--gpus 2] [--sim-seconds 5] [--runs 2]

Starts a real sshd and a real Prefect server (as the tests do), processes a
synthetic case end to end with the simulators over SSH, and compares the wall
time with the critical path of the tools' own work, taken from the simulators'
records: interpreter + the busiest GPU's simulations + the last conversion.
The difference is what orchestration costs (Prefect states, SSH, transfers,
GPU acquisition). Each run uses a fresh case (nothing cached).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def critical_path(events: list[dict]) -> float:
    def spans(tool: str) -> list[tuple[float, float, dict]]:
        starts, out = {}, []
        for e in events:
            if e["tool"] != tool:
                continue
            if e["event"] == "start":
                starts[e["pid"]] = e
            elif e["event"] == "end" and e["pid"] in starts:
                s = starts.pop(e["pid"])
                out.append((s["t"], e["t"], s))
        return out

    interp = sum(e - s for s, e, _ in spans("interpreter"))
    per_gpu: dict[int, float] = defaultdict(float)
    for s, e, start in spans("tps_env"):
        per_gpu[start["gpu"]] += e - s
    converts = spans("raw2dicom")
    last_convert = max(converts)[1] - max(converts)[0] if converts else 0.0
    return interp + max(per_gpu.values(), default=0.0) + last_convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--sim-seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from tests.support.pipeline import write_installation
    from tests.support.sshd import SshServer

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-pipeline-"))
    sshd = SshServer(work / "sshd").start()
    inst = write_installation(work / "mqi", sshd)
    os.environ["MQI_CONFIG_PATH"] = str(inst.config)

    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from config import load_config
    from demo.synthetic_case import write_case
    from deployments import server
    from flows.process_case import process_case

    cfg = load_config(inst.config)
    proc = server.start_server(cfg, inst.root / "server.log")
    try:
        with temporary_settings(updates={
                PREFECT_API_URL: inst.api_url,
                PREFECT_LOCAL_STORAGE_PATH: server.prefect_home(cfg) / "storage"}):
            print(f"{'run':>3} {'wall s':>8} {'tool critical path s':>21} {'overhead s':>11}")
            for run in range(args.runs):
                inst.record.unlink(missing_ok=True)
                inst.set_control(duration=args.sim_seconds, batches=10, gpus=args.gpus)
                case = write_case(inst.scan_root, f"bench-{run}", beams=args.beams, layers=30,
                                  seed=run)
                t0 = time.monotonic()
                state = process_case(case_dir=str(case), return_state=True)
                wall = time.monotonic() - t0
                if not state.is_completed():
                    raise SystemExit(f"run {run} did not complete: {state.message}")
                path = critical_path(inst.events())
                print(f"{run:>3} {wall:8.2f} {path:21.2f} {wall - path:11.2f}")
            print(f"\n{args.beams} beams on {args.gpus} simulated GPUs, "
                  f"{args.sim_seconds:g} s per simulation; the first run includes warm-up "
                  f"(connection, limits, imports).")
    finally:
        from prefect.logging.handlers import APILogHandler

        try:
            APILogHandler().flush()  # ship queued run logs before the server goes away
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
