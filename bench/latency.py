"""Latency benchmark: from a case's ready marker to its flow run Running in Prefect.

    python -m bench.latency [--cases 20] [--stability 30]

Starts `mqi up` (real Prefect server, serve, sensor; a real sshd as GPU host,
the simulators as tools), then drops cases one at a time: the case folder is
moved in whole and its ``_CASE_READY`` marker written; the time from the marker
to the flow run's RUNNING start time is measured (both clocks are this
machine's). Each case is waited for before the next, so every figure is the
latency of an idle system. Prints median and p95 next to the stability window
(the latency of a case that arrives without a marker is that window plus this).
Target: median < 2 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--stability", type=float, default=30.0)
    args = parser.parse_args()

    from flows.synthetic_case import write_case
    from tests.support.pipeline import write_installation
    from tests.support.sshd import SshServer

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-latency-"))
    sshd = SshServer(work / "sshd").start()
    inst = write_installation(work / "mqi", sshd)
    data = yaml.safe_load(inst.config.read_text())
    data["scanner"]["stability_seconds"] = args.stability
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    inst.set_control(duration=0.2, batches=2)
    up = inst.start_up()
    api = inst.api_url
    try:
        latencies = []
        for i in range(args.cases):
            case_id = f"lat-{i:02d}"
            staged = write_case(work / "staging", case_id, beams=1, layers=2, seed=i)
            os.replace(staged, inst.scan_root / case_id)
            marked = time.time()
            (inst.scan_root / case_id / "_CASE_READY").write_text("")
            start = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                    "flow_runs": {"name": {"any_": [f"case-{case_id}"]}}}).json()
                if runs and runs[0].get("start_time"):
                    start = datetime.fromisoformat(runs[0]["start_time"]).timestamp()
                    if runs[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
                        break
                time.sleep(0.1)
            if start is None:
                raise SystemExit(f"{case_id} never started")
            latencies.append(start - marked)
            print(f"{case_id}: Running {start - marked:5.2f} s after its marker", flush=True)
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        print(f"\nmarker -> Running over {len(latencies)} cases: median "
              f"{statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s "
              f"(target: median < 2 s)")
        print(f"stability window (cases without a marker): {args.stability:g} s + the above")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
