"""Faults on the GPU host, against the real sshd and the simulators, flows run here:
a hanging simulation (7), GPUs that vanish or an nvidia-smi that fails or hangs (8),
sshd stopped mid-upload (1), a full disk on either side (5, 6)."""

from __future__ import annotations

import subprocess
import time

import pytest

from demo.synthetic_case import write_case
from tests.faults.conftest import alive, gpu_slots, retune, run_case
from tests.support.pipeline import Installation

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_hanging_simulation_is_killed_whole_at_the_step_timeout_and_frees_its_gpu(
        fresh_pipe: Installation):
    inst = fresh_pipe
    timeout = 4
    retune(inst, retries={"steps": {"run_moqui_sim": {"timeout_seconds": timeout}}})
    inst.set_control(duration=1.0, batches=4, fail={"2": "hang"})
    case = write_case(inst.scan_root, "fault-hang", beams=1, layers=2, spots_per_layer=50,
                      seed=7)
    started = time.monotonic()
    state = run_case(case)
    ended = time.monotonic()
    assert state.is_failed()
    assert f"timed out after {timeout} s" in state.message, state.message
    assert "beam 2" in state.message
    # the whole remote process group is gone: the simulation and its helper, which
    # ignored SIGTERM and needed the SIGKILL
    hang = [e for e in inst.events("tps_env") if e["event"] == "hang"]
    assert len(hang) == 1
    sim_pid = next(e["pid"] for e in inst.events("tps_env") if e["event"] == "start")
    assert not alive(sim_pid) and not alive(hang[0]["helper"])
    # the GPU is free at once: no slot held, the host's lock on the index free
    assert all(v == 0 for v in gpu_slots(inst).values()), gpu_slots(inst)
    from config import get_config

    for index in (0, 1):
        lock = f"{get_config().gpu.lock_dir}/gpu-{index}.lock"
        free = subprocess.run(["flock", "-n", lock, "true"], check=False)
        assert free.returncode == 0, f"GPU {index}'s host lock is still held"
    print(f"\nhang: case failed {ended - started:.1f} s after start (timeout {timeout} s)")
