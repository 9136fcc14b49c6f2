"""Latency benchmark: from a case's ready marker to its flow run Running in Prefect.

    python -m bench.latency [--cases 20] [--stability 30] [--no-baseline]

Starts `mqi up` (real Prefect server, serve, sensor; a real sshd as GPU host,
the simulators as tools), then drops cases one at a time: the case folder is
moved in whole and its ``_CASE_READY`` marker written; the time from the marker
to the flow run's RUNNING start time is measured (both clocks are this
machine's). Each case is waited for before the next, so every figure is the
latency of an idle system. Prints median and p95 next to the stability window
(the latency of a case that arrives without a marker is that window plus this).
Target: median < 2 s.

The same run first measures a baseline with ``prefect.warm_start: false``
(Prefect's own start: a fresh interpreter per flow run), then the default warm
start (forked from a pre-imported process), and prints both and their ratio,
split into: run created (the sensor's share), picked up (PENDING: the runner's
poll) and RUNNING (the flow-run process started and reported in).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from bench.start_modes import add_baseline_flag, each_start_mode
from flows.naming import run_name


def _states(api: str, run_id: str) -> dict[str, float]:
    """State type -> first time the run entered it."""
    rows = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id},
                     timeout=10).json()
    first: dict[str, float] = {}
    for row in sorted(rows, key=lambda r: r["timestamp"]):
        first.setdefault(row["type"], datetime.fromisoformat(row["timestamp"]).timestamp())
    return first


def measure(work: Path, sshd: object, *, warm: bool, cases: int, stability: float,
            label: str) -> list[dict[str, float]]:
    """Start `mqi up` with warm_start on or off, drop ``cases`` cases one at a time."""
    from demo.synthetic_case import write_case
    from tests.support.pipeline import stop, write_installation

    inst = write_installation(work / label, sshd)
    data = yaml.safe_load(inst.config.read_text())
    data["scanner"]["stability_seconds"] = stability
    data["prefect"]["warm_start"] = warm
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    inst.set_control(duration=0.2, batches=2)
    up = inst.start_up()
    api = inst.api_url
    rows = []
    try:
        for i in range(cases):
            case_id = f"{label}-{i:02d}"
            staged = write_case(work / "staging", case_id, beams=1, layers=2, seed=i)
            os.replace(staged, inst.scan_root / case_id)
            marked = time.time()
            (inst.scan_root / case_id / "_CASE_READY").write_text("")
            run = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                    "flow_runs": {"name": {"any_": [run_name(case_id)]}}}).json()
                if runs and runs[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
                    run = runs[0]
                    break
                time.sleep(0.1)
            if run is None or run["state"]["type"] != "COMPLETED":
                raise SystemExit(f"{case_id} did not complete (see {work / label / 'up.log'})")
            first = _states(api, run["id"])
            created = datetime.fromisoformat(run["created"]).timestamp()
            row = {"created": created - marked,
                   "pending": first["PENDING"] - marked,
                   "running": first["RUNNING"] - marked}
            rows.append(row)
            print(f"  {case_id}: run created {row['created']:5.2f} s, picked up "
                  f"{row['pending']:5.2f} s, Running {row['running']:5.2f} s after its marker",
                  flush=True)
    finally:
        stop(up, grace=60)
    return rows


def _summary(rows: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = sorted(r[key] for r in rows)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return statistics.median(values), p95


def _pair(median: float, p95: float) -> str:
    return f"{median:.2f} / {p95:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--stability", type=float, default=30.0)
    add_baseline_flag(parser)
    args = parser.parse_args()
    results = each_start_mode(
        lambda work, sshd, warm, label: measure(work, sshd, warm=warm, cases=args.cases,
                                                stability=args.stability, label=label),
        no_baseline=args.no_baseline, prefix="mqi-bench-latency-")

    print(f"\nmarker -> Running, {args.cases} cases each, idle system "
          f"(stability window {args.stability:g} s: a case without a marker waits that "
          f"long plus this)")
    print(f"{'start':<7}{'created':>16}{'picked up':>16}{'Running':>16}  (median / p95, s)")
    for label, rows in results.items():
        cells = "".join(f"{_pair(*_summary(rows, k)):>16}"
                        for k in ("created", "pending", "running"))
        print(f"{label:<7}{cells}")
    warm_median = _summary(results["warm"], "running")[0]
    if "spawn" in results:
        spawn_median = _summary(results["spawn"], "running")[0]
        print(f"warm / spawn median ratio: {warm_median / spawn_median:.2f}")
    print(f"target: median < 2 s -> {'met' if warm_median < 2 else 'NOT met'} "
          f"({warm_median:.2f} s)")


if __name__ == "__main__":
    main()
