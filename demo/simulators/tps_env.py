"""Simulated MOQUI (``tps_env <input_file>``): same input, log lines, exit codes and files.

Reads the plain ``Key Value`` input (``#`` comments), needs a valid GPUID,
prints ``... with N batches`` and ``Generating particles for (i of N batches)``
over the configured duration, writes a dose grid to OutputDir and ends with
``Total execution time: X seconds``. The control file can make a beam fail
(FATAL ERROR, a segfault, a hang, a missing success line, an ERROR: line).
While it runs it holds an exclusive lock on its GPU index and records a
collision if another simulation already held it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from demo.simulators import _simctl

HANGING_HELPER = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(3600)")

def parse_input(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    return values


def _stop(signum: int, _frame: object) -> None:
    # SIGTERM (a timeout's or a cancellation's first signal) ends the run like the real
    # tool: it leaves, and its GPU shows free again.
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = _simctl.arguments("tps_env")
    parser.add_argument("input_file")
    args = parser.parse_args()
    control = _simctl.load(args.control)
    started = time.monotonic()
    print("MOQUI tps_env (SIMULATED by MQI Communicator's test simulator)", flush=True)
    path = Path(args.input_file)
    if not path.is_file():
        print(f"FATAL ERROR: cannot open input file {path}", flush=True)
        return 1
    values = parse_input(path)
    try:
        gpu = int(values["GPUID"])
        if not 0 <= gpu < int(control["gpus"]):
            raise ValueError
    except (KeyError, ValueError):
        print(f"FATAL ERROR: invalid GPUID {values.get('GPUID')!r} "
              f"({control['gpus']} device(s) visible)", flush=True)
        return 1
    for key in ("OutputDir", "BeamNumbers"):
        if key not in values:
            print(f"FATAL ERROR: {key} is missing from {path}", flush=True)
            return 1
    beam = values["BeamNumbers"]
    state = _simctl.state_dir(control)
    if gpu in control.get("vanish_on_start", ()) and state is not None:
        # The device falls off the bus as we start: the driver lists it no more.
        (state / f"gone{gpu}").write_text("")
        _simctl.record(control, "tps_env", "vanished", beam=beam, gpu=gpu)
    if state is not None and (state / f"gone{gpu}").exists():
        print(f"FATAL ERROR: cudaSetDevice({gpu}): invalid device ordinal", flush=True)
        return 1
    mode = control["fail"].get(str(beam))
    batches = int(control["batches"])
    _simctl.record(control, "tps_env", "start", beam=beam, gpu=gpu, input=str(path))

    lock = None
    if state is not None:
        # Held open for the whole simulation: the kernel drops the lock when we exit.
        lock = open(state / f"gpu{gpu}.sim-lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _simctl.record(control, "tps_env", "collision", beam=beam, gpu=gpu)
        (state / f"gpu{gpu}.busy").write_text(str(os.getpid()))
    try:
        print(f"Simulating beam {beam} on GPU {gpu} with {batches} batches", flush=True)
        began = time.monotonic()
        duration = float(control["duration"])
        dose = None
        if mode is None or mode in ("no_success", "error_line"):
            # Scored now and written at the end: `duration` is the whole simulation, the
            # dose's making included (numpy's import and the grid took ~0.85 s of a
            # 30 s beam on a busy 2-core machine, which bench/throughput.py counted
            # as the system's overhead).
            from demo.dose_model import SIMULATOR_GRID, simulated_dose

            dose = simulated_dose(int(beam), SIMULATOR_GRID)
        for i in range(1, batches + 1):
            if mode == "hang" and i > batches // 2:
                # A helper process that ignores SIGTERM hangs with us: only the kill of
                # the whole process group, up to SIGKILL, ends both.
                helper = subprocess.Popen([sys.executable, "-c", HANGING_HELPER])
                _simctl.record(control, "tps_env", "hang", beam=beam, gpu=gpu,
                               helper=helper.pid)
                while True:
                    time.sleep(3600)
            if mode == "fatal" and i > batches // 2:
                print("FATAL ERROR: simulated failure: particle transport diverged", flush=True)
                _simctl.record(control, "tps_env", "end", beam=beam, gpu=gpu, ok=False)
                return 1
            if mode == "segfault" and i > batches // 2:
                print("Segmentation fault (core dumped)", flush=True)
                _simctl.record(control, "tps_env", "end", beam=beam, gpu=gpu, ok=False)
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(max(0.0, began + duration * i / batches - time.monotonic()))
            print(f"Generating particles for ({i} of {batches} batches)", flush=True)
            if mode == "error_line" and i == 1:
                print("ERROR: simulated dose scorer overflow", flush=True)
        out = Path(values["OutputDir"])
        out.mkdir(parents=True, exist_ok=True)
        # The made-up dose a synthetic case's reference RT Dose is made from
        # (demo/dose_model.py), so that the dose QA has something true to find.
        grid = SIMULATOR_GRID
        assert dose is not None  # scored above for every mode that gets here
        (out / f"Dose_beam{beam}.raw").write_bytes(dose.astype("<f4").tobytes())
        frames, rows, cols = grid.shape
        (out / f"Dose_beam{beam}.json").write_text(json.dumps(
            {"beam": beam, "frames": frames, "rows": rows, "columns": cols,
             "spacing_mm": list(grid.spacing), "origin_mm": list(grid.origin),
             "format": values.get("OutputFormat", "raw"), "gpu": gpu, "simulated": True}))
        _simctl.record(control, "tps_env", "end", beam=beam, gpu=gpu, ok=mode is None)
        if mode != "no_success":
            print(f"Total execution time: {time.monotonic() - started:.2f} seconds", flush=True)
        return 0
    finally:
        # However it ends (success, failure, SIGTERM, a broken output pipe): when.
        _simctl.record(control, "tps_env", "exit", beam=beam, gpu=gpu)
        if state is not None:
            (state / f"gpu{gpu}.busy").unlink(missing_ok=True)
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main())
