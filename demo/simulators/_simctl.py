"""What the simulators share: their control file and their own record of what they did.

A test (or the demo) steers a simulator with a JSON control file, named by
``--control FILE`` or ``$MQI_SIM_CONTROL``:

    {"duration": 1.0,          seconds a simulation takes
     "batches": 10,            progress lines a simulation prints
     "gpus": 2,                how many GPUs exist (tps_env rejects a GPUID beyond)
     "fail": {"3": "fatal"},   beam -> fatal | segfault | hang | no_success | error_line
     "record": "/x/sim.jsonl", where every simulator appends what it did
     "state_dir": "/x/state",  busy markers shared by tps_env and nvidia-smi
     "dose_padding_mb": 0,     raw2dicom: MB of private padding per RT Dose (big files)
     "vanish_on_start": [1],   tps_env: these GPUs fall off the bus as a simulation starts
     "smi_fail": {"mode": "error", "times": 2}}  nvidia-smi fails (or hangs) N times

Every simulator says SIMULATED in its output.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {"duration": 2.0, "batches": 10, "gpus": 2, "fail": {},
                            "record": None, "state_dir": None}


def load(path: str | None) -> dict[str, Any]:
    path = path or os.environ.get("MQI_SIM_CONTROL")
    control = dict(DEFAULTS)
    if path and Path(path).exists():
        control.update(json.loads(Path(path).read_text()))
    return control


def arguments(prog: str) -> argparse.ArgumentParser:
    """A simulated tool's parser: ``prog`` is the real tool's name, ``--control`` is ours."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--control", help="the JSON control file (default: $MQI_SIM_CONTROL)")
    return parser


def start(control_file: str | None, tool: str, banner: str, **fields: Any) -> dict[str, Any]:
    """Load the control, record the tool's start and print its first line; the control."""
    control = load(control_file)
    record(control, tool, "start", **fields)
    print(banner, flush=True)
    return control


def record(control: dict[str, Any], tool: str, event: str, **fields: Any) -> None:
    """Append one event to the record file (O_APPEND lines: safe across processes)."""
    if not control.get("record"):
        return
    # cpu: this process's own CPU seconds so far (a benchmark tells the simulators' CPU
    # from the rest of the GPU host's: sshd, the shells).
    times = os.times()
    line = json.dumps({"tool": tool, "event": event, "pid": os.getpid(), "t": time.time(),
                       "cpu": round(times.user + times.system, 3), **fields}) + "\n"
    fd = os.open(control["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def state_dir(control: dict[str, Any]) -> Path | None:
    if not control.get("state_dir"):
        return None
    path = Path(control["state_dir"])
    path.mkdir(parents=True, exist_ok=True)
    return path
