"""Faults on the GPU host, against the real sshd and the simulators, flows run here:
a hanging simulation (7), GPUs that vanish or an nvidia-smi that fails or hangs (8),
sshd stopped mid-upload (1), a full disk on either side (5, 6)."""

from __future__ import annotations

import subprocess
import time

import pytest

from demo.synthetic_case import write_case
from tests.faults.conftest import alive, events, gpu_slots, retune, run_case
from tests.support.pipeline import Installation, wait_for

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


def test_a_gpu_that_vanishes_between_choice_and_start_sends_the_beam_to_another(
        fresh_pipe: Installation):
    inst = fresh_pipe
    inst.set_control(duration=0.5, batches=2, vanish_on_start=[1])
    case = write_case(inst.scan_root, "fault-vanish", beams=2, layers=2, spots_per_layer=50,
                      seed=8)
    state = run_case(case)
    assert state.is_completed(), state.message
    assert [e["gpu"] for e in inst.events("tps_env") if e["event"] == "vanished"] == [1]
    assert set(state.result().gpus.values()) == {0}  # both beams ended on the GPU left
    assert {e["gpu"] for e in inst.events("tps_env") if e["event"] == "end"} == {0}
    said = wait_for(lambda: events(inst.api_url, "mqi.gpu.vanished"), 15,
                    "the mqi.gpu.vanished event")
    assert "GPU 1 is no longer listed" in said[0]["payload"]["message"]
    assert all(v == 0 for v in gpu_slots(inst).values())


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_a_failing_or_hanging_nvidia_smi_makes_the_beam_wait_not_fail(
        fresh_pipe: Installation, mode: str):
    inst = fresh_pipe
    retune(inst, gpu={"query_timeout_seconds": 2.0})
    inst.set_control(duration=0.5, batches=2, smi_fail={"mode": mode, "times": 1})
    case = write_case(inst.scan_root, f"fault-smi-{mode}", beams=1, layers=2,
                      spots_per_layer=50, seed=9)
    state = run_case(case)
    assert state.is_completed(), state.message
    assert len(inst.events("nvidia-smi")) == 1  # it failed once, then answered
    why = "timed out after 2 s" if mode == "hang" else "exit code 9"
    wait_for(lambda: [e for e in events(inst.api_url, "mqi.gpu.query-failed")
                      if why in e["payload"]["reason"]], 15,
             f"the mqi.gpu.query-failed event saying {why!r}")
