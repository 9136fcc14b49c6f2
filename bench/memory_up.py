"""Memory of `mqi up` with cases running: peak RSS of all its processes.

    python -m bench.memory_up [--cases 4] [--sim-seconds 8]

Starts `mqi up` (server, serve, sensor; a real sshd as GPU host), drops the
cases at once, and samples the resident memory of `mqi up` and every process
below it (server, serve, sensor, one process per flow run) until all cases are
done. The simulators run under sshd, on the "GPU host", and are not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def label(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"
    for key, name in (("prefect server", "server"), ("deployments.serve", "serve"),
                      ("deployments.sensor", "sensor"), ("deployments.cli", "mqi up"),
                      ("multiprocessing", "flow run"), ("prefect.engine", "flow run")):
        if key in cmd:
            return name
    return cmd[:40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--sim-seconds", type=float, default=8.0)
    args = parser.parse_args()

    from deployments.supervisor import descendants
    from flows.synthetic_case import write_case
    from tests.support.pipeline import write_installation
    from tests.support.sshd import SshServer

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-memory-"))
    sshd = SshServer(work / "sshd").start()
    inst = write_installation(work / "mqi", sshd)
    inst.set_control(duration=args.sim_seconds, batches=8, gpus=2)
    up = inst.start_up()
    try:
        idle = {p: rss_kib(p) for p in [up.pid, *descendants(up.pid)]}
        ids = [f"mem-{i}" for i in range(args.cases)]
        for i, case_id in enumerate(ids):
            staged = write_case(work / "staging", case_id, beams=3, layers=10, seed=i)
            os.replace(staged, inst.scan_root / case_id)
            (inst.scan_root / case_id / "_CASE_READY").write_text("")
        peak, peak_parts, peak_names, running_max = 0, {}, {}, 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pids = [up.pid, *descendants(up.pid)]
            parts = {p: rss_kib(p) for p in pids}
            names = {p: label(p) for p in pids}
            total = sum(parts.values())
            flows = sum(1 for p in pids if names[p] == "flow run")
            running_max = max(running_max, flows)
            if total > peak:
                peak, peak_parts, peak_names = total, parts, names
            runs = httpx.post(f"{inst.api_url}/flow_runs/filter", timeout=10, json={
                "flow_runs": {"name": {"any_": [f"case-{c}" for c in ids]}}}).json()
            if len(runs) == len(ids) and all(r["state"]["type"] in ("COMPLETED", "FAILED")
                                             for r in runs):
                break
            time.sleep(0.5)
        print(f"idle (no case): {sum(idle.values()) / 1024:.0f} MiB in {len(idle)} processes")
        print(f"peak with {args.cases} cases ({running_max} flow-run processes at once): "
              f"{peak / 1024:.0f} MiB in {len(peak_parts)} processes")
        by_kind: dict[str, list[int]] = {}
        for pid, kib in peak_parts.items():
            by_kind.setdefault(peak_names[pid], []).append(kib)
        for kind, sizes in sorted(by_kind.items()):
            print(f"  {kind:<10} {len(sizes)} x ~{sum(sizes) / len(sizes) / 1024:.0f} MiB")
        print("states:", sorted(r["state"]["type"] for r in runs))
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
