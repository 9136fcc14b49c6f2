"""`mqi up` as a user runs it: server, serve and sensor supervised; cases dropped in
(slowly, file by file) start exactly one flow run each; a second instance is
refused; a crashed sensor is restarted without duplicating runs; SIGTERM leaves
no process behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from blocks import procfs
from demo.synthetic_case import write_case
from deployments.supervisor import descendants
from flows.naming import report_artifact_key, run_name
from tests.support.pipeline import REPO, Installation, stop, wait_for, write_installation

pytestmark = pytest.mark.integration


def flow_runs(api: str, case_id: str) -> list[dict]:
    response = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flow_runs": {"name": {"any_": [run_name(case_id)]}}, "limit": 50})
    response.raise_for_status()
    return response.json()


def state_of(api: str, case_id: str) -> str | None:
    runs = flow_runs(api, case_id)
    return runs[0]["state"]["type"] if len(runs) == 1 else None


def case_reports(api: str, flow_run_id: str, case_id: str) -> list[dict]:
    """The case report artifacts on one flow run, read back from the API."""
    response = httpx.post(f"{api}/artifacts/filter", timeout=10, json={"artifacts": {
        "key": {"any_": [report_artifact_key(case_id)]},
        "flow_run_id": {"any_": [flow_run_id]}}})
    response.raise_for_status()
    return response.json()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def forked_flow_runs(up_pid: int) -> list[int]:
    """Flow-run processes below `mqi up` forked from the warm start's forkserver."""
    pids = descendants(up_pid)
    forkservers = {p for p in pids if b"multiprocessing.forkserver" in _cmdline(p)}
    return [p for p in pids if (st := procfs.stat(p)) is not None and st.ppid in forkservers]


def copy_slowly(src: Path, dst: Path, pause: float) -> None:
    """Copy a case the way a network share delivers it: one file at a time."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            time.sleep(pause)


@pytest.fixture
def inst(tmp_path, sshd) -> Installation:
    installation = write_installation(tmp_path / "mqi", sshd)
    data = yaml.safe_load(installation.config.read_text())
    data["scanner"].update(stability_seconds=2.0, rescan_interval_seconds=5.0)
    data["processes"] = {"start": ["server", "serve", "sensor"],
                         "restart": {"max_restarts": 3, "backoff_initial_seconds": 0.5,
                                     "backoff_max_seconds": 2.0}}
    installation.config.write_text(yaml.safe_dump(data, sort_keys=False))
    installation.set_control(duration=0.5, batches=2)
    return installation


@pytest.mark.scenario(budget=360)
def test_up_runs_each_case_once_and_stops_cleanly(inst: Installation, tmp_path):
    api = inst.api_url
    cmd = [sys.executable, "-m", "deployments.cli", "up", "--config", str(inst.config)]
    inst.scan_root.rmdir()  # mqi up makes a missing scan root (and says so)
    up = inst.start_up()
    children: list[int] = []
    try:
        made = f"created {inst.scan_root} (scanner.target_directory): it did not exist"
        # (up.log appears with mqi up's first line: a while on a busy machine)
        wait_for(lambda: (log := inst.root / "up.log").exists() and made in log.read_text(),
                 60, "mqi up to say so")
        assert inst.scan_root.is_dir() and inst.results.is_dir()
        children = descendants(up.pid)
        pool = httpx.get(f"{api}/block_types/slug/mqi-gpu-pool/block_documents/name/"
                         f"mqi-gpu-pool", timeout=10)
        assert pool.status_code == 200 and pool.json()["data"]["limit_name"]  # in the UI

        # 1. a case arriving slowly never starts early, then starts exactly once
        staged = write_case(tmp_path / "staging", "slow-case", beams=2, layers=2, seed=1)
        copy_slowly(staged, inst.scan_root / "slow-case", pause=0.15)
        assert flow_runs(api, "slow-case") == []  # files still arriving: nothing started
        assert wait_for(lambda: state_of(api, "slow-case") == "COMPLETED", 180,
                        "slow-case to complete")

        # 2. a marker starts a case at once (no stability wait)
        staged = write_case(tmp_path / "staging", "marked-case", beams=1, layers=2, seed=2)
        os.replace(staged, inst.scan_root / "marked-case")
        (inst.scan_root / "marked-case" / "_CASE_READY").write_text("")
        assert wait_for(lambda: flow_runs(api, "marked-case"), 10, "marked-case to start")
        # ... in a process forked from serve's pre-imported forkserver (prefect.warm_start),
        # not a fresh interpreter
        assert wait_for(lambda: forked_flow_runs(up.pid), 30, "a forked flow-run process",
                        interval=0.05)

        # 3. duplicate events (same content rewritten, touched) start nothing new
        for path in list((inst.scan_root / "slow-case").rglob("*.ptn"))[:3]:
            path.write_bytes(path.read_bytes())
            os.utime(path)

        # 4. a crashed sensor is restarted, rescans, and duplicates nothing
        sensor = [p for p in descendants(up.pid)
                  if b"deployments.sensor" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(sensor) == 1
        os.kill(sensor[0], signal.SIGKILL)
        wait_for(lambda: [p for p in descendants(up.pid) if p != sensor[0] and
                          b"deployments.sensor" in Path(f"/proc/{p}/cmdline").read_bytes()],
                 30, "the sensor to be restarted")
        assert wait_for(lambda: state_of(api, "marked-case") == "COMPLETED", 180,
                        "marked-case to complete")
        time.sleep(6)  # past the stability window and a rescan
        assert len(flow_runs(api, "slow-case")) == 1
        assert len(flow_runs(api, "marked-case")) == 1

        # 5. a second instance on the same data dir is refused
        second = subprocess.run(cmd, capture_output=True, text=True, env=inst.env(),
                                timeout=60, cwd=REPO)
        assert second.returncode == 1 and "another `mqi up`" in second.stderr

        # 6. SIGTERM stops everything: no child, grandchild or flow-run process is left
        children = descendants(up.pid)
        assert children
        up.send_signal(signal.SIGTERM)
        assert up.wait(90) == 0
        time.sleep(0.5)
        left = [p for p in children if Path(f"/proc/{p}").exists() and
                Path(f"/proc/{p}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z"]
        assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.scenario(budget=300)
def test_kill_9_of_up_mid_simulation_then_restart_completes_the_case_once(inst: Installation,
                                                                          tmp_path):
    api = inst.api_url
    inst.set_control(duration=6.0, batches=4)
    up = inst.start_up()
    second: subprocess.Popen[str] | None = None
    try:
        staged = write_case(tmp_path / "staging", "killed-case", beams=3, layers=2, seed=3)
        os.replace(staged, inst.scan_root / "killed-case")
        (inst.scan_root / "killed-case" / "_CASE_READY").write_text("")
        wait_for(lambda: len([e for e in inst.events("tps_env") if e["event"] == "start"]) >= 2,
                 120, "two beams to be simulating")
        up.kill()  # kill -9: no clean-up of any kind
        up.wait()

        second = inst.start_up()
        # The dead run's GPU slots are freed at once, not when their leases expire: the
        # simulating beam's, and the other GPU's unless it was between two beams (a slot
        # passed on a moment before and not yet held by its taker, or still being asked
        # for: on a busy SQLite server one request can take seconds).
        freed = wait_for(lambda: re.search(
            r"freed (\d+) GPU slot\(s\) held by runs of the previous mqi up",
            (inst.root / "up.log").read_text()), 10, "the orphaned GPU slots to be freed")
        assert 1 <= int(freed.group(1)) <= 2, freed.group(0)
        terminal = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
        final = wait_for(lambda: (s := state_of(api, "killed-case")) in terminal and s, 240,
                         "the case to finish")
        assert final == "COMPLETED", flow_runs(api, "killed-case")
        assert len(flow_runs(api, "killed-case")) == 1  # exactly once: the same run resumed
        ended = {e["beam"] for e in inst.events("tps_env") if e["event"] == "end"}
        assert ended == {"2", "3", "4"}
        doses = sorted((inst.results / "killed-case" / "dicom").glob("*/*.dcm"))
        assert [p.name for p in doses] == ["RTDOSE_beam2.dcm", "RTDOSE_beam3.dcm",
                                           "RTDOSE_beam4.dcm"]
        second.send_signal(signal.SIGTERM)
        assert second.wait(90) == 0
    finally:
        for proc in (up, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.scenario(budget=270)
def test_rerun_retries_the_failed_run_itself_and_only_the_failed_beam_runs_again(
        inst: Installation, tmp_path):
    """`mqi rerun` does what the UI's Retry does: the same flow run, on serve, resumed
    from the result store; the failed run does not stay red beside a new one."""
    api = inst.api_url
    inst.set_control(duration=0.3, batches=2, fail={"3": "fatal"})
    up = inst.start_up()
    try:
        staged = write_case(tmp_path / "staging", "rerun-case", beams=3, layers=2, seed=4)
        os.replace(staged, inst.scan_root / "rerun-case")
        (inst.scan_root / "rerun-case" / "_CASE_READY").write_text("")
        assert wait_for(lambda: state_of(api, "rerun-case") == "FAILED", 180,
                        "rerun-case to fail in beam 3")
        failed_id = flow_runs(api, "rerun-case")[0]["id"]
        # under serve too, the flow run's report says why and how to run it again
        (failed,) = wait_for(lambda: case_reports(api, failed_id, "rerun-case"), 10,
                             "the case report of the failed run")
        assert "## run_moqui_sim [beam 3] FAILED" in failed["data"]
        assert f"mqi rerun --config {inst.config} rerun-case" in failed["data"]
        # the flow runs under serve (forked from its forkserver) find the configuration
        # and the host through the blocks `mqi up` published, not MQI_CONFIG_PATH
        forkservers = [p for p in descendants(up.pid)
                       if b"multiprocessing.forkserver" in _cmdline(p)]
        assert forkservers
        environ = Path(f"/proc/{forkservers[0]}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"MQI_CONFIG_PATH=")]

        inst.set_control(duration=0.3, batches=2)  # the fault is gone
        rerun = inst.mqi("rerun", "rerun-case")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert f"retrying flow run {failed_id}" in rerun.stdout
        assert "reused:" in rerun.stdout and "run_moqui_sim-beam2" in rerun.stdout
        runs = flow_runs(api, "rerun-case")
        assert [r["id"] for r in runs] == [failed_id]  # the same run, no second one
        assert runs[0]["state"]["type"] == "COMPLETED" and runs[0]["run_count"] == 2
        (report,) = case_reports(api, failed_id, "rerun-case")  # the same one, rewritten
        assert report["id"] == failed["id"] and "**Status: COMPLETED**" in report["data"]
        starts = [e for e in inst.events("tps_env") if e["event"] == "start"]
        per_beam = {b: sum(1 for e in starts if e["beam"] == b) for b in ("2", "3", "4")}
        assert per_beam == {"2": 1, "3": 2, "4": 1}  # only the failed beam ran again
        assert len([e for e in inst.events("interpreter") if e["event"] == "start"]) == 1

        status = inst.mqi("status")
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith("rerun-case"))
        assert "COMPLETED (try 2)" in line

        # a case that failed under `mqi run` (in the CLI's process, no deployment) is
        # rerun through the deployment, reusing what the CLI's run finished
        inst.set_control(duration=0.3, batches=2, fail={"2": "fatal"})
        write_case(inst.root / "elsewhere", "cli-case", beams=2, layers=2, seed=5)
        failed_run = inst.mqi("run", str(inst.root / "elsewhere" / "cli-case"))
        assert failed_run.returncode != 0, failed_run.stdout
        inst.set_control(duration=0.3, batches=2)
        rerun = inst.mqi("rerun", "cli-case")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "made by `mqi run`" in rerun.stdout
        cli_starts = [e for e in inst.events("tps_env")
                      if e["event"] == "start" and "/cli-case/" in e["input"]]
        assert sorted(e["beam"] for e in cli_starts) == ["2", "2", "3"]
    finally:
        stop(up, grace=90)
