"""Faults of the link to the GPU host, with an sshd of the test's own that it cuts:
sshd stopped mid-upload and started again 10 s later (1)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocks.manifest import PART_SUFFIX, sha256_file
from demo.synthetic_case import write_case
from tests.faults.conftest import alive, gpu_slots, retune, run_case, sim_starts
from tests.support.pipeline import Installation
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def link(tmp_path: Path, fresh_pipe: Installation) -> Iterator[SshServer]:
    """An sshd of this test's own, and the installation's GPU host pointed at it."""
    server = SshServer(tmp_path / "sshd").start()
    retune(fresh_pipe, hosts={"gpu": {
        "kind": "ssh", "hostname": "127.0.0.1", "port": server.port,
        "username": server.username, "private_key_path": str(server.client_key),
        "known_hosts_path": str(server.known_hosts), "connect_retries": 1,
        "kill_grace_seconds": 2.0}})
    try:
        yield server
    finally:
        server.stop()


class FinalNameWatch(threading.Thread):
    """Looks at the remote case folder every few ms: a file under its final name must
    be whole (the local file's size) every time it is seen."""

    def __init__(self, remote: Path, local: Path) -> None:
        super().__init__(daemon=True)
        self.remote, self.local = remote, local
        self.bad: list[str] = []
        self.parts_seen = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        sizes = {p.relative_to(self.local).as_posix(): p.stat().st_size
                 for p in self.local.rglob("*") if p.is_file()}
        while not self.done.is_set():
            for case_dir in self.remote.glob("*/case"):
                for path in case_dir.rglob("*"):
                    if path.name.endswith(PART_SUFFIX):
                        self.parts_seen.set()
                        continue
                    rel = path.relative_to(case_dir).as_posix()
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:
                        continue
                    if rel in sizes and size != sizes[rel]:
                        self.bad.append(f"{rel}: {size} of {sizes[rel]} bytes")
            time.sleep(0.005)


def test_sshd_stopped_mid_upload_and_back_10_s_later_the_upload_completes_once(
        fresh_pipe: Installation, link: SshServer):
    inst = fresh_pipe
    retune(inst, retries={"steps": {"upload": {"retries": 4, "retry_delay_seconds": 4}}})
    inst.set_control(duration=0.3, batches=2)
    case = write_case(inst.scan_root, "fault-upload", beams=2, layers=12,
                      spots_per_layer=4000, seed=11)
    watch = FinalNameWatch(inst.remote_root / "fault-upload", case)
    watch.start()
    result: dict[str, object] = {}
    runner = threading.Thread(target=contextvars.copy_context().run,
                              args=(lambda: result.update(state=run_case(case)),), daemon=True)
    runner.start()
    try:
        assert watch.parts_seen.wait(120), "the upload never started"
        link.cut()
        cut_at = time.monotonic()
        time.sleep(10)
        link.restart()
        runner.join(240)
        assert not runner.is_alive(), "the case did not end"
    finally:
        watch.done.set()
    state = result["state"]
    assert state.is_completed(), state.message  # type: ignore[attr-defined]
    recovered = time.monotonic() - cut_at
    assert watch.bad == []  # never a partial file under its final name
    # what the host holds is what was sent, byte for byte
    remote_case = next((inst.remote_root / "fault-upload").glob("*/case"))
    for path in case.rglob("*"):
        if path.is_file():
            twin = remote_case / path.relative_to(case)
            assert sha256_file(twin) == sha256_file(path), twin
    assert not list(remote_case.rglob(f"*{PART_SUFFIX}"))
    assert sim_starts(inst) == {"2": 1, "3": 1}  # the case ran once
    from tests.test_pipeline import task_runs

    upload = next(t for t in task_runs(state.state_details.flow_run_id)  # type: ignore[attr-defined]
                  if t.name == "upload")
    assert upload.run_count >= 2  # the cut hit the upload, which was tried again
    print(f"\nsshd cut mid-upload: case completed {recovered:.1f} s after the cut "
          f"(sshd back after 10 s), upload tried {upload.run_count} times")


def test_network_cut_during_a_simulation_never_runs_the_beam_twice_at_once(
        fresh_pipe: Installation, link: SshServer):
    inst = fresh_pipe
    retune(inst, retries={"steps": {"run_moqui_sim": {"retries": 2, "retry_delay_seconds": 1}}})
    # A line every 5 s: cut off, the simulation notices (a broken pipe) only at its next
    # line, seconds after the stage has given up and its retry has begun.
    inst.set_control(duration=10.0, batches=2)
    case = write_case(inst.scan_root, "fault-netcut", beams=1, layers=2, spots_per_layer=50,
                      seed=12)
    result: dict[str, object] = {}
    runner = threading.Thread(target=contextvars.copy_context().run,
                              args=(lambda: result.update(state=run_case(case)),), daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while not [e for e in inst.events("tps_env") if e["event"] == "start"]:
        assert time.monotonic() < deadline, "the simulation never started"
        time.sleep(0.05)
    time.sleep(1.0)
    link.cut()
    cut_at = time.monotonic()
    time.sleep(1.0)
    link.restart()
    runner.join(240)
    assert not runner.is_alive(), "the case did not end"
    state = result["state"]
    took = time.monotonic() - cut_at
    # never two simulations of the beam at once: each one's start..exit (the simulator
    # records its exit however it ends) is apart from every other's
    sims = inst.events("tps_env")
    print("\nnetcut:", [(e["event"], e["pid"], round(e["t"] - sims[0]["t"], 1)) for e in sims])
    print("state:", state.type, state.message)  # type: ignore[attr-defined]
    exits = {e["pid"]: e["t"] for e in sims if e["event"] == "exit"}
    spans = sorted((e["t"], exits.get(e["pid"], float("inf")), e["pid"])
                   for e in sims if e["event"] == "start")
    for (_s1, e1, p1), (s2, _e2, p2) in zip(spans, spans[1:], strict=False):
        assert e1 <= s2, f"simulation {p2} started while {p1} still ran"
    assert not alive_any(p for _s, _e, p in spans)
    assert all(v == 0 for v in gpu_slots(inst).values())
    print(f"network cut: case {state.type} {took:.1f} s after the cut")  # type: ignore[attr-defined]


def alive_any(pids: object) -> bool:
    return any(alive(p) for p in pids)  # type: ignore[attr-defined]
