"""Simulated ``nvidia-smi`` for the demo's and tests' GPU host.

Answers ``--query-gpu=...`` and ``--query-compute-apps=...`` with ``--format=csv``
(optionally ``noheader`` and ``nounits``) exactly as the real tool formats them
(values as captured on an NVIDIA H100: ../shared/fixtures/nvidia-h100/). A GPU
with a running simulated MOQUI (its busy marker in the control's state_dir)
shows memory in use and a compute process; a ``foreign<N>`` file there stands
for somebody else's process on GPU N. The GPU name says SIMULATED.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from demo.simulators import _simctl

NAME = "NVIDIA H100 80GB HBM3 (SIMULATED)"
TOTAL = 81559
IDLE_FREE = 81079  # the driver reserves some: used + free < total
LOAD_USED = 21491

UNITS = {"memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB",
         "utilization.gpu": "%", "utilization.memory": "%", "power.draw": "W",
         "used_gpu_memory": "MiB", "used_memory": "MiB"}
HEADER_NAME = {"used_memory": "used_gpu_memory"}


def uuid(index: int) -> str:
    return f"GPU-5b4bf769-7807-a5fa-e96c-8fca12d6{index:04x}"


def gpu_row(index: int, busy: bool) -> dict[str, str]:
    used = LOAD_USED if busy else 0
    return {
        "index": str(index), "uuid": uuid(index), "name": NAME,
        "memory.total": str(TOTAL), "memory.used": str(used),
        "memory.free": str(IDLE_FREE - used),
        "utilization.gpu": "100" if busy else "0", "utilization.memory": "31" if busy else "0",
        "temperature.gpu": "52" if busy else "34", "power.draw": "695.86" if busy else "125.47",
        "pstate": "P0", "compute_mode": "Default",
    }


def render(fields: list[str], rows: list[dict[str, str]], fmt: set[str]) -> str:
    lines = []
    if "noheader" not in fmt:
        lines.append(", ".join(
            HEADER_NAME.get(f, f) + (f" [{UNITS[f]}]" if f in UNITS else "") for f in fields))
    for row in rows:
        cells = []
        for f in fields:
            value = row[f]
            if f in UNITS and "nounits" not in fmt:
                value = f"{value} {UNITS[f]}"
            cells.append(value)
        lines.append(", ".join(cells))
    return "\n".join(lines) + ("\n" if lines else "")


def _failure(control: dict) -> str | None:
    """``smi_fail`` of the control ({"mode": "error" | "hang", "times": N}): the mode for
    this call while fewer than N calls have failed (counted in the state dir)."""
    spec = control.get("smi_fail") or {}
    state = _simctl.state_dir(control)
    if not spec or state is None:
        return None
    counter = state / "smi-failures"
    fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = int(os.read(fd, 32) or b"0")
        if done >= int(spec.get("times", 1)):
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(done + 1).encode())
    finally:
        os.close(fd)
    _simctl.record(control, "nvidia-smi", spec["mode"])
    return str(spec["mode"])


def main() -> int:
    parser = _simctl.arguments("nvidia-smi")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--query-gpu")
    parser.add_argument("--query-compute-apps")
    parser.add_argument("--format", default="csv")
    args = parser.parse_args()
    control = _simctl.load(args.control)
    failure = _failure(control)
    if failure == "error":
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.", flush=True)
        return 9
    if failure == "hang":
        while True:
            time.sleep(3600)
    count = args.gpus if args.gpus is not None else int(control["gpus"])
    fmt = set(args.format.split(",")[1:])
    state = _simctl.state_dir(control)
    busy = {}
    foreign = {}
    # A GPU that fell off the bus (tps_env's vanish_on_start) is not listed any more.
    present = [i for i in range(count) if state is None or not (state / f"gone{i}").exists()]
    for i in present:
        marker = state / f"gpu{i}.busy" if state else None
        if marker is not None and marker.exists():
            busy[i] = marker.read_text().strip() or "0"
        if state is not None and (state / f"foreign{i}").exists():
            foreign[i] = (state / f"foreign{i}").read_text().strip() or "4242"
    if args.query_gpu:
        fields = args.query_gpu.split(",")
        rows = [gpu_row(i, i in busy or i in foreign) for i in present]
    elif args.query_compute_apps:
        fields = args.query_compute_apps.split(",")
        rows = [{"pid": pid, "process_name": "python3", "gpu_uuid": uuid(i),
                 "used_gpu_memory": str(LOAD_USED), "used_memory": str(LOAD_USED)}
                for i, pid in sorted({**busy, **foreign}.items())]
    else:
        print("SIMULATED nvidia-smi: only --query-gpu and --query-compute-apps are supported",
              file=sys.stderr)
        return 2
    unknown = [f for f in fields if f not in (rows[0] if rows else {**gpu_row(0, False),
                                                                      "pid": "", "gpu_uuid": "",
                                                                      "process_name": "",
                                                                      "used_memory": "",
                                                                      "used_gpu_memory": ""})]
    if unknown:
        print(f'Field "{unknown[0]}" is not a valid field to query.', file=sys.stderr)
        return 2
    sys.stdout.write(render(fields, rows, fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
