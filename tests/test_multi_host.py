"""Several GPU hosts in one pool (``gpu.hosts``).

Integration: two sshd on this machine stand for two GPU hosts. Each has its own
simulated GPUs (its sessions get their own simulator control file through sshd's
SetEnv: own GPUs, busy markers and record), its own GPU lock folder and its own
remote work root. Eight three-beam cases go through `mqi up`; once host B has run a
few simulations it drops off (its sshd and session processes killed: connections
break, new ones are refused). Its GPUs
leave the admission limit, the remaining beams (and those whose results were on B)
run on A, and every case completes. The simulators' own records show no (host, index)
pair ever held by two simulations at once.

Unit: the limit sizing with one host down (a closed port, or a failing nvidia-smi).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from demo.synthetic_case import write_case
from tests.support.pipeline import (
    APPS_QUERY,
    GPU_QUERY,
    Installation,
    read_record,
    sim_intervals,
    simulator,
    stop,
    wait_for,
    write_installation,
)
from tests.support.sshd import SshServer, free_port
from tests.test_up import flow_runs

CASES, BEAMS, GPUS = 8, 3, 2


@dataclass
class GpuBox:
    """One simulated GPU host: its sshd and where its simulators keep their state."""

    name: str
    root: Path
    server: SshServer

    @property
    def control(self) -> Path:
        return self.root / "control.json"

    @property
    def record(self) -> Path:
        return self.root / "sim-record.jsonl"

    @property
    def locks(self) -> Path:
        return self.root / "gpu-locks"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def sims(self) -> list[dict]:
        return read_record(self.record, "tps_env")

    def settings(self) -> dict:
        s = self.server
        return {"kind": "ssh", "hostname": "127.0.0.1", "port": s.port, "username": s.username,
                "private_key_path": str(s.client_key), "known_hosts_path": str(s.known_hosts),
                "connect_retries": 0, "connect_timeout_seconds": 5.0,
                "kill_grace_seconds": 2.0}


def _box(tmp_path: Path, name: str) -> GpuBox:
    root = tmp_path / name
    root.mkdir()
    box = GpuBox(name, root, SshServer(root / "sshd",
                                       env={"MQI_SIM_CONTROL": str(root / "control.json")}))
    box.control.write_text(json.dumps({"duration": 0.5, "batches": 2, "gpus": GPUS, "fail": {},
                                       "record": str(box.record),
                                       "state_dir": str(root / "gpu-state")}))
    box.server.start()
    return box


@pytest.fixture
def pool(tmp_path: Path):
    boxes = [_box(tmp_path, "gpu_a"), _box(tmp_path, "gpu_b")]
    try:
        inst = write_installation(tmp_path / "mqi", boxes[0].server)
        data = yaml.safe_load(inst.config.read_text())
        py = sys.executable
        # No --control: each host's sessions name their own control file (SetEnv).
        smi = f"{py} -m {simulator('nvidia_smi')}"
        data["hosts"] = {b.name: b.settings() for b in boxes}
        data["gpu"].update(
            hosts=[{"host": b.name, "lock_dir": str(b.locks), "remote_work_root": str(b.work)}
                   for b in boxes],
            query_command=f"{smi} {GPU_QUERY}", apps_command=f"{smi} {APPS_QUERY}")
        data["tools"] = {"python": py, "interpreter": ["-m", simulator("interpreter")],
                         "moqui": [py, "-m", simulator("tps_env")],
                         "raw2dicom": ["-m", simulator("raw2dicom")]}
        data["scanner"]["stability_seconds"] = 1.0
        inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
        yield inst, boxes
    finally:
        for box in boxes:
            box.server.stop()


def _limit(api: str, name: str) -> int:
    response = httpx.get(f"{api}/v2/concurrency_limits/{name}", timeout=10)
    response.raise_for_status()
    return int(response.json()["limit"])


def _host_warnings(api: str, host: str) -> list[dict]:
    response = httpx.post(f"{api}/events/filter", timeout=10, json={
        "filter": {"event": {"name": ["mqi.gpu.warning"]},
                   "resource": {"id": [f"mqi.gpu-host.{host}"]}}, "limit": 50})
    response.raise_for_status()
    return response.json()["events"]


@pytest.mark.integration
@pytest.mark.scenario(budget=450)
def test_two_gpu_hosts_share_the_work_and_one_going_down_leaves_the_pool(
        pool: tuple[Installation, list[GpuBox]], tmp_path: Path):
    inst, (a, b) = pool
    api = inst.api_url
    limit_name = yaml.safe_load(inst.config.read_text())["gpu"]["concurrency_limit"]
    staging = tmp_path / "staging"
    names = [f"pool-{i}" for i in range(CASES)]
    for i, name in enumerate(names):
        write_case(staging, name, beams=BEAMS, layers=1, spots_per_layer=10, seed=40 + i,
                   ready_marker="_CASE_READY")
    up = inst.start_up()
    try:
        assert _limit(api, limit_name) == 2 * GPUS  # both hosts' GPUs
        for name in names:
            os.replace(staging / name, inst.scan_root / name)
        # mid-way: B has run a few simulations (some of its cases are still going)
        wait_for(lambda: sum(e["event"] == "end" for e in b.sims()) >= 3, 120,
                 "host B to run three simulations")
        b.server.cut()
        down_at = time.time()

        def finished() -> bool:
            runs = [r for n in names for r in flow_runs(api, n)]
            return len(runs) == CASES and all(
                r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                for r in runs)

        try:  # (beside another test file on two cores this phase has taken 4 min)
            wait_for(finished, 480, "every case to finish", interval=1.0)
        except AssertionError as exc:  # say where each case stands
            raise AssertionError(f"{exc}: " + ", ".join(
                f"{n}: {r['state']['type']} {r['state'].get('message') or ''}"
                for n in names for r in flow_runs(api, n))) from None
        runs = {n: flow_runs(api, n) for n in names}
        assert all(len(r) == 1 for r in runs.values()), "a case ran twice"
        failed = {n: r[0]["state"].get("message") for n, r in runs.items()
                  if r[0]["state"]["type"] != "COMPLETED"}
        assert not failed
        # B's GPUs left the pool, said with a warning event naming B
        assert _limit(api, limit_name) == GPUS
        assert any(e["payload"].get("kind") == "host-unreachable"
                   for e in _host_warnings(api, b.name))
    finally:
        stop(up, grace=90)

    # both hosts worked; after B went down the remaining simulations ran on A
    a_sims, b_sims = a.sims(), b.sims()
    assert any(e["event"] == "end" for e in b_sims)
    assert not [e for e in b_sims if e["event"] == "start" and e["t"] > down_at + 1]
    assert [e for e in a_sims if e["event"] == "start" and e["t"] > down_at]
    # no (host, index) pair ever held by two simulations at once (each host's own record)
    for box, events in ((a, a_sims), (b, b_sims)):
        assert not [e for e in events if e["event"] == "collision"], box.name
        for gpu, held in sim_intervals(events).items():
            held.sort()
            for (_s1, e1, x), (s2, _e2, y) in zip(held, held[1:], strict=False):
                assert e1 <= s2, f"{box.name} GPU {gpu}: {x} and {y} overlapped"
    # every beam of every case came back, whichever host made it
    for name in names:
        doses = sorted((inst.results / name / "dicom").glob("beam_*/*.dcm"))
        assert len({p.parent.name for p in doses}) == BEAMS, name
    # each host got the cases it ran, in its own work root
    assert any(a.work.glob("*/run-*/case")) and any(b.work.glob("*/run-*/case"))


# ---------------------------------------------------------------------------- unit
def test_the_limit_counts_the_gpus_of_the_hosts_that_answer(tmp_path: Path, monkeypatch,
                                                            caplog):
    from blocks.gpu_pool import GpuPool
    from blocks.local_host import LocalHost
    from blocks.remote_host import RemoteHost
    from config import DEFAULT_PATH, load_config
    from flows import placement

    control = tmp_path / "control.json"
    control.write_text(json.dumps({"gpus": 3, "state_dir": str(tmp_path / "state")}))
    monkeypatch.setenv("MQI_SIM_CONTROL", str(control))
    py = sys.executable
    smi = f"{py} -m {simulator('nvidia_smi')}"
    gpus = GpuPool(query_command=f"{smi} {GPU_QUERY}", apps_command=f"{smi} {APPS_QUERY}",
                   min_free_memory_mib=1024, lock_dir=str(tmp_path / "locks"))
    up = placement.GpuHost("up", LocalHost(), gpus)
    closed = RemoteHost(hostname="127.0.0.1", port=free_port(), username="nobody",
                        known_hosts_path=str(tmp_path / "known_hosts"), connect_retries=0,
                        connect_timeout=2.0)
    down = placement.GpuHost("down", closed, gpus)
    broken = placement.GpuHost("broken", LocalHost(), gpus.model_copy(
        update={"query_command": "echo 'NVIDIA-SMI has failed' >&2; exit 9"}))
    cfg = load_config(DEFAULT_PATH)
    placement.forget()
    try:
        with caplog.at_level(logging.WARNING):
            looks = placement.look(cfg, [up, down, broken], logging.getLogger("test"))
        assert set(looks) == {"up"}
        assert placement.limit_slots([up, down, broken], looks) == 3
        said = caplog.text
        assert "GPU host down is out of the pool" in said
        assert "GPU host broken is out of the pool: exit code 9: NVIDIA-SMI has failed" in said
        # with every host answering, the limit is their sum; gpu.indices counts per host
        looks["again"] = looks["up"]
        two = placement.GpuHost("again", LocalHost(), gpus.model_copy(update={"indices": [0]}))
        assert placement.limit_slots([up, down, two], looks) == 3 + 1
        # as the curator counts: a GPU taken by somebody else's process is not ours to give
        (tmp_path / "state" / "foreign1").write_text("4242")
        busy = placement.look(cfg, [up], logging.getLogger("test"))
        assert placement.limit_slots([up], busy) == 2
        # a host found down is not asked again until gpu.host_retry_seconds passed
        caplog.clear()
        assert set(placement.look(cfg, [up, down], logging.getLogger("test"))) == {"up"}
        assert "out of the pool" not in caplog.text
    finally:
        placement.forget()


def test_gpu_hosts_in_the_configuration(tmp_path: Path):
    from config import load_config
    from tests.test_config import BASE, broken, issues, write

    data = json.loads(json.dumps(BASE))
    data["hosts"]["gpu_b"] = dict(data["hosts"]["gpu"], hostname="gpu-b.example.org")
    data["gpu"]["hosts"] = ["gpu", {"host": "gpu_b", "lock_dir": "/scratch/locks",
                                    "remote_work_root": "/scratch/cases"}]
    gpu = load_config(write(tmp_path, data)).gpu
    assert gpu.host_names == ["gpu", "gpu_b"] and gpu.several_hosts
    assert gpu.host_entry("gpu_b").lock_dir == "/scratch/locks"
    assert gpu.host_entry("gpu").lock_dir is None  # gpu.lock_dir applies
    assert not load_config(write(tmp_path, BASE, "one.yaml")).gpu.several_hosts

    def change(d):
        d["gpu"]["hosts"] = ["gpu", "gpu", "gpu_c"]
        d["workflows"]["default_qa"].append("summary")
        d["remote_commands"]["summary"] = "true"
    err = issues(broken(tmp_path, change))
    assert err["gpu.hosts[1].host"] == "'gpu' is listed twice"
    assert err["gpu.hosts[2].host"].startswith("no host named 'gpu_c'")
    assert "case steps (summary) must come before" in err["workflows.default_qa"]


def test_mqi_gpus_shows_every_gpu_host_and_says_which_one_does_not_answer(
        tmp_path: Path, monkeypatch):
    from config import load_config
    from flows.curator import GpuReadError, gpus_now
    from tests.test_config import BASE, write

    control = tmp_path / "control.json"
    control.write_text(json.dumps({"gpus": 2, "state_dir": str(tmp_path / "state")}))
    monkeypatch.setenv("MQI_SIM_CONTROL", str(control))
    smi = f"{sys.executable} -m {simulator('nvidia_smi')}"
    data = json.loads(json.dumps(BASE))
    data["paths"]["data_dir"] = str(tmp_path / "data")
    data["hosts"]["gpu_a"] = {"kind": "local"}
    data["hosts"]["gpu_b"] = dict(data["hosts"]["gpu"], hostname="127.0.0.1", port=free_port(),
                                  known_hosts_path=str(tmp_path / "known_hosts"),
                                  connect_retries=0, connect_timeout_seconds=2.0,
                                  private_key_path=None, password_env="MQI_TEST_PASSWORD")
    monkeypatch.setenv("MQI_TEST_PASSWORD", "not-used")  # nothing listens on the port
    data["gpu"].update(hosts=["gpu_a", "gpu_b"], query_command=f"{smi} {GPU_QUERY}",
                       apps_command=f"{smi} {APPS_QUERY}", lock_dir=str(tmp_path / "locks"))
    cfg = load_config(write(tmp_path, data))

    rows, notes = gpus_now(cfg, with_api=False)
    assert sorted(r.index for r in rows) == [0, 1]  # the answering host's two GPUs
    gone = [n for n in notes if "could not read the GPUs of" in n]
    assert len(gone) == 1 and "127.0.0.1" in gone[0] and "out of the pool" in gone[0], notes
    assert "refused" in gone[0] or "could not connect" in gone[0], gone

    data["hosts"]["gpu_a"] = dict(data["hosts"]["gpu_b"], port=free_port())
    with pytest.raises(GpuReadError, match="could not read the GPUs of"):
        gpus_now(load_config(write(tmp_path, data, "none.yaml")), with_api=False)
