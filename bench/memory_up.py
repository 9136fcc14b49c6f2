"""Memory of `mqi up` with cases running: peak RSS (and PSS) of all its processes.

    python -m bench.memory_up [--cases 4] [--sim-seconds 8] [--no-baseline]

Starts `mqi up` (server, serve, sensor; a real sshd as GPU host), drops the
cases at once, and samples the memory of `mqi up` and every process below it
(server, serve, sensor, one process per flow run) until all cases are done. The
simulators run under sshd, on the "GPU host", and are not counted.

RSS counts a page once per process that maps it; flow runs forked from the warm
start's forkserver share its pages, so their RSS sum overstates what they take.
PSS (each shared page split between its sharers) is printed beside it. The same
run first measures a baseline with ``prefect.warm_start: false`` (a fresh
interpreter per flow run) and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import httpx
import yaml

from bench.start_modes import add_baseline_flag, each_start_mode
from flows.naming import run_name

FORKSERVER = "multiprocessing.forkserver"


def _kib(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _kib(pid, "status", "VmRSS:")


def pss_kib(pid: int) -> int:
    return _kib(pid, "smaps_rollup", "Pss:")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def label(pid: int, parents: dict[int, int]) -> str:
    cmd = _cmdline(pid)
    if FORKSERVER in cmd:  # the forkserver, or a flow run forked from it
        return "flow run" if FORKSERVER in _cmdline(parents.get(pid, 0)) else "forkserver"
    for key, name in (("prefect server", "server"), ("deployments.serve", "serve"),
                      ("deployments.sensor", "sensor"), ("deployments.cli", "mqi up"),
                      ("resource_tracker", "res.tracker"), ("multiprocessing", "flow run"),
                      ("prefect.engine", "flow run")):
        if key in cmd:
            return name
    return cmd[:40]


def measure(work: Path, sshd: object, *, warm: bool, cases: int, sim_seconds: float,
            label_: str) -> dict:
    from blocks import procfs
    from demo.synthetic_case import write_case
    from deployments.supervisor import descendants
    from tests.support.pipeline import stop, write_installation

    inst = write_installation(work / label_, sshd)
    data = yaml.safe_load(inst.config.read_text())
    data["prefect"]["warm_start"] = warm
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    inst.set_control(duration=sim_seconds, batches=8, gpus=2)
    up = inst.start_up()
    try:
        idle_pids = [up.pid, *descendants(up.pid)]
        idle = (sum(map(rss_kib, idle_pids)), sum(map(pss_kib, idle_pids)), len(idle_pids))
        ids = [f"{label_}-{i}" for i in range(cases)]
        for i, case_id in enumerate(ids):
            staged = write_case(work / "staging", case_id, beams=3, layers=10, seed=i)
            os.replace(staged, inst.scan_root / case_id)
            (inst.scan_root / case_id / "_CASE_READY").write_text("")
        peak = {"rss": 0}
        running_max, runs = 0, []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pids = [up.pid, *descendants(up.pid)]
            parents = {s.pid: s.ppid for s in procfs.all_stats()}
            rss = {p: rss_kib(p) for p in pids}
            names = {p: label(p, parents) for p in pids}
            running_max = max(running_max, sum(1 for n in names.values() if n == "flow run"))
            if sum(rss.values()) > peak["rss"]:
                pss = {p: pss_kib(p) for p in pids}
                peak = {"rss": sum(rss.values()), "pss": sum(pss.values()), "parts": rss,
                        "pss_parts": pss, "names": names}
            runs = httpx.post(f"{inst.api_url}/flow_runs/filter", timeout=10, json={
                "flow_runs": {"name": {"any_": [run_name(c) for c in ids]}}}).json()
            if len(runs) == len(ids) and all(r["state"]["type"] in ("COMPLETED", "FAILED")
                                             for r in runs):
                break
            time.sleep(0.5)
    finally:
        stop(up, grace=90)
    return {"idle": idle, "peak": peak, "running_max": running_max,
            "states": sorted(r["state"]["type"] for r in runs)}


def _report(name: str, cases: int, result: dict) -> None:
    rss, pss, n = result["idle"]
    peak = result["peak"]
    print(f"{name}: idle {rss / 1024:.0f} MiB RSS / {pss / 1024:.0f} MiB PSS in {n} processes; "
          f"peak with {cases} cases ({result['running_max']} flow runs at once): "
          f"{peak['rss'] / 1024:.0f} MiB RSS / {peak['pss'] / 1024:.0f} MiB PSS in "
          f"{len(peak['parts'])} processes")
    by_kind: dict[str, list[int]] = {}
    for pid in peak["parts"]:
        by_kind.setdefault(peak["names"][pid], []).append(pid)
    for kind, pids in sorted(by_kind.items()):
        rss_each = sum(peak["parts"][p] for p in pids) / len(pids) / 1024
        pss_each = sum(peak["pss_parts"][p] for p in pids) / len(pids) / 1024
        print(f"    {kind:<12} {len(pids)} x ~{rss_each:.0f} MiB RSS, ~{pss_each:.0f} MiB PSS")
    print(f"    states: {result['states']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--sim-seconds", type=float, default=8.0)
    add_baseline_flag(parser)
    args = parser.parse_args()
    results = each_start_mode(
        lambda work, sshd, warm, label: measure(work, sshd, warm=warm, cases=args.cases,
                                                sim_seconds=args.sim_seconds, label_=label),
        no_baseline=args.no_baseline, prefix="mqi-bench-memory-")
    for name, result in results.items():
        _report(name, args.cases, result)
    if "spawn" in results:
        for key in ("rss", "pss"):
            ratio = results["warm"]["peak"][key] / results["spawn"]["peak"][key]
            print(f"peak {key.upper()} warm / spawn: {ratio:.2f}")


if __name__ == "__main__":
    main()
